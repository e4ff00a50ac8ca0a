"""Supervised fine-tuning on chat data: loss on assistant tokens only, fractional-epoch stopping,
and at each validation the instruction loss next to held-out pretraining loss (forgetting)."""

import math

import torch

from datamodules.chat import CONSTRAINTS_SOURCE, ChatDataModule
from lightning_modules.base import LMModule
from lightning_modules.pretrain import loss_and_bpb
from slmlab.training.rollout import PassRate


class SFTModule(LMModule):
    """`epochs` may be fractional: 0.5 trains on exactly half an epoch of conversations (rounded to
    whole optimizer steps), the schedule spanning just those steps. The run's `trainer.max_steps` is
    replaced by that count."""

    def __init__(self, *args, epochs: float = 1.0, max_new_tokens: int = 48, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if epochs <= 0:
            raise ValueError(f"stage.epochs={epochs} must be positive")
        self.epochs, self.max_new_tokens = epochs, max_new_tokens

    def setup(self, stage: str) -> None:
        self.require_data(ChatDataModule, "stage=sft trains on conversations: data=chat_embedded or data=smoltalk "
                                          "(a ChatDataModule)")
        super().setup(stage)
        dm = self.trainer.datamodule
        steps = max(1, round(dm.steps_per_epoch(self.trainer.world_size, self.trainer.accumulate_grad_batches)
                             * self.epochs))
        warmup = self.scheduler_factory.keywords.get("warmup_steps", 0)
        if warmup > steps:  # the schedule's own error would name trainer.max_steps, which this replaces
            raise ValueError(f"schedule.warmup_steps={warmup} is more than the {steps} optimizer steps of "
                             f"stage.epochs={self.epochs} ({dm.train_size} conversations, data.batch_size="
                             f"{dm.batch_size}): lower schedule.warmup_steps or raise stage.epochs")
        self.trainer.fit_loop.epoch_loop.max_steps = steps  # what trainer.max_steps reads

    def samples_on_each_rank(self) -> str | None:
        dm = self.trainer.datamodule
        return "data.constraint_val (the pass-rate validation)" if dm and CONSTRAINTS_SOURCE in dm.val_sources else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self.model.loss(batch["input_ids"], batch["labels"], positions=batch.get("positions"))  # packed
        self.log_train_means({"train/loss": loss}, batch["labels"])
        dm = self.trainer.datamodule
        self.log("train/epoch", torch.tensor(dm.samples_consumed / dm.train_size))  # on the CPU: no copy to the GPU
        return self.token_weighted(loss, batch["labels"])

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._pass_rate = PassRate(self.max_new_tokens)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        dm = self.trainer.datamodule
        if dm.val_sources[dataloader_idx] == CONSTRAINTS_SOURCE:  # data.constraint_val: greedy answers
            self._pass_rate.add(self.model, batch, dm.tokenizer, dm.eos_id)
        else:
            self.accumulate_val_loss(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        """val/loss is the instruction loss (held-out conversations, assistant tokens); val/pretrain/...
        the loss and bits-per-byte on held-out pretraining text, whose rise measures forgetting;
        val/pass_rate (with data.constraint_val) the held-out constraint-following pass-rate."""
        sums = self.val_loss_sums()
        chat_nats, chat_tokens = sums.pop("chat", (math.nan, 1.0))
        metrics = {"val/loss": chat_nats / chat_tokens}
        if sums:
            metrics.update(loss_and_bpb(sums, self.trainer.datamodule.bytes_per_token, prefix="val/pretrain"))
        metrics.update(self._pass_rate.metrics(self.trainer.strategy, self.device))
        self.log_metrics(metrics)
