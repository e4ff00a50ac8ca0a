"""Logit distillation from a teacher checkpoint of this codebase (any size or mixers, same vocabulary).

For sequence-level KD (SFT on teacher generations), see `python -m slmlab.seqkd`.
"""

import warnings

import torch

from datamodules.chat import ChatDataModule
from datamodules.token_shards import TokenShardDataModule
from lightning_modules.base import frozen_dtype
from lightning_modules.pretrain import PretrainModule
from slmlab.checkpoint import load_model
from slmlab.training.losses import chunked_distill_loss


class DistillModule(PretrainModule):
    """loss = alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (+ stage.z_loss's term),
    on whatever data the run uses (pretraining shards or chat data); validation is the pretraining one.
    Neither model's (tokens, vocab) logits are ever held for the whole batch (`chunked_distill_loss`)."""

    def __init__(self, *args, teacher: str | None, temperature: float = 1.0, alpha: float = 0.5,
                 teacher_dtype: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.superposition:
            raise ValueError("stage.superposition is pretraining's (stage=pretrain): distillation matches the "
                             "teacher's next-token distributions")
        if not 0 <= alpha <= 1:
            raise ValueError(f"stage.alpha={alpha} must lie in [0, 1]")
        if temperature <= 0:  # the softened distributions divide the logits by it: 0 gives a NaN loss
            raise ValueError(f"stage.temperature={temperature} must be positive")
        if teacher is None:
            raise ValueError("stage=distill needs teacher=<checkpoint of the model to distil from>")
        dtype = frozen_dtype("stage.teacher_dtype", teacher_dtype)  # before the teacher is read
        teacher_model = load_model(teacher).requires_grad_(False)
        if teacher_model.cfg.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"teacher {teacher} has vocab_size={teacher_model.cfg.vocab_size}, the student "
                             f"{self.model_config.vocab_size}: logit distillation needs one shared vocabulary")
        if dtype is not None:
            teacher_model = teacher_model.to(dtype)
        self.hold_frozen("teacher", teacher_model)
        self.temperature, self.alpha = temperature, alpha

    def setup(self, stage: str) -> None:
        self.require_data((TokenShardDataModule, ChatDataModule), "stage=distill trains on token shards "
                          "(data=de_en, ...) or conversations (data=chat_embedded, ...)")
        dm = self.trainer.datamodule
        if isinstance(dm, ChatDataModule) and dm.constraint_val is not None:  # its validation is the loss
            raise ValueError("stage=distill validates the loss on held-out text: remove data.constraint_val")
        super().setup(stage)
        if dm is not None and dm.seq_len > self.teacher.cfg.max_seq_len:
            # allowed (a student may be taught a longer context), but the targets there are extrapolated
            warnings.warn(f"data.seq_len={dm.seq_len} is longer than the teacher's max_seq_len="
                          f"{self.teacher.cfg.max_seq_len}: its targets past that position come from positions it "
                          "was not trained at", stacklevel=2)

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        positions = self.batch_positions(batch)  # packed chat data, or stage.document_mask's documents
        hidden = self.model.hidden(batch["input_ids"], positions=positions)
        with torch.no_grad():
            teacher_hidden = self.teacher.hidden(batch["input_ids"], positions=positions)
        # neither model's logits exist for the whole batch: each head runs a chunk of rows at a time
        loss, kd, ce = chunked_distill_loss(hidden, self.model.lm_head.weight, teacher_hidden,
                                            self.teacher.lm_head.weight, batch["labels"], self.temperature, self.alpha,
                                            self.z_loss, self.model.cfg.logit_softcap, self.teacher.cfg.logit_softcap)
        self.log_train_means({"train/loss": ce, "train/kd": kd, "train/total_loss": loss}, batch["labels"])
        return self.token_weighted(loss, batch["labels"])  # chat data: micro-batches of unequal label counts
