"""What every training stage shares: the model, AdamW groups, a per-step LR schedule, grad-norm logging."""

from dataclasses import asdict
from functools import partial

import lightning as L
import torch

from slmlab.models import CausalLM, ModelConfig
from slmlab.training.optim import weight_decay_groups


class LMModule(L.LightningModule):
    """Base LightningModule of all stages; a stage adds its `training_step` / `validation_step`.

    `optimizer` and `scheduler` are partials from `conf/optim` and `conf/schedule`; the schedule's
    length is the trainer's `max_steps`.
    """

    def __init__(self, model_config: ModelConfig, optimizer: partial, scheduler: partial,
                 decay_embeddings: bool = False, compile: bool = False) -> None:
        super().__init__()
        self.model_config = model_config
        self.model = CausalLM(model_config)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.decay_embeddings, self.compile_blocks = decay_embeddings, compile

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        if dm.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {dm.vocab_size} tokens but model.vocab_size={self.model_config.vocab_size}; "
                             "set model.vocab_size to at least the tokenizer's size")
        if dm.seq_len > self.model_config.max_seq_len:
            raise ValueError(f"data.seq_len={dm.seq_len} exceeds model.max_seq_len={self.model_config.max_seq_len}")

    def configure_model(self) -> None:
        # compile block by block: parameter names stay unchanged, so checkpoints load either way
        if self.compile_blocks:
            for block in self.model.blocks:
                block.compile()

    def configure_optimizers(self) -> dict:
        weight_decay = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        groups = weight_decay_groups(self.model, weight_decay, self.decay_embeddings)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        optimizer = self.optimizer_factory(groups, **fused)
        if self.trainer.max_steps is None or self.trainer.max_steps < 1:
            raise ValueError("trainer.max_steps must be set: the LR schedule is defined over optimizer steps")
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("train/grad_norm", norm)  # before clipping
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"] = asdict(self.model_config)
