"""Pretraining: next-token cross-entropy; validation loss and bits-per-byte per data source."""

import math

import torch

from lightning_modules.base import LMModule


def loss_and_bpb(sums: dict[str, tuple[float, float]], bytes_per_token, prefix: str = "val") -> dict[str, float]:
    """Per source and overall: loss = nats per token; bits-per-byte = nats / ln 2 / bytes, where each
    source's bytes are its evaluated tokens times the bytes-per-token measured on its validation text."""
    metrics, total_nats, total_tokens, total_bytes = {}, 0.0, 0.0, 0.0
    for name, (nats, tokens) in sums.items():
        n_bytes = tokens * bytes_per_token(name)
        metrics[f"{prefix}/{name}/loss"] = nats / tokens
        metrics[f"{prefix}/{name}/bpb"] = nats / math.log(2) / n_bytes
        total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + tokens, total_bytes + n_bytes
    if total_tokens:
        metrics[f"{prefix}/loss"] = total_nats / total_tokens
        metrics[f"{prefix}/bpb"] = total_nats / math.log(2) / total_bytes
    return metrics


class PretrainModule(LMModule):
    def __init__(self, *args, z_loss: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, ce = self.model.loss(batch["input_ids"], batch["labels"], self.z_loss)  # no whole-batch logits
        self.log("train/loss", ce)  # no prog_bar: Lightning would read it back (a GPU sync) every step
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.accumulate_val_loss(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self.log_metrics(loss_and_bpb(self.val_loss_sums(), self.trainer.datamodule.bytes_per_token))
