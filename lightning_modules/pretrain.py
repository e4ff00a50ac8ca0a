"""Pretraining: next-token cross-entropy; validation loss and bits-per-byte per data source."""

import math

import torch

from lightning_modules.base import LMModule
from slmlab.training.losses import IGNORE_INDEX, lm_loss


class PretrainModule(LMModule):
    def __init__(self, *args, z_loss: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.z_loss = z_loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["input_ids"])
        loss, ce = lm_loss(logits, batch["labels"], self.z_loss)
        self.log("train/loss", ce, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        # per source: summed cross-entropy (nats) and token count, reduced over ranks at the end
        self._val_sums = torch.zeros(len(self.trainer.datamodule.val_sources), 2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.model(batch["input_ids"])
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="sum")
        self._val_sums[dataloader_idx, 0] += ce.double()
        self._val_sums[dataloader_idx, 1] += (batch["labels"] != IGNORE_INDEX).sum()

    def on_validation_epoch_end(self) -> None:
        """loss = nats per token; bits-per-byte = nats / ln 2 / bytes, where each source's bytes are its
        evaluated tokens times the bytes-per-token measured on its validation text."""
        dm = self.trainer.datamodule
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        metrics, total_nats, total_tokens, total_bytes = {}, 0.0, 0.0, 0.0
        for (nats, tokens), name in zip(sums.tolist(), dm.val_sources):
            if tokens == 0:
                continue
            n_bytes = tokens * dm.bytes_per_token(name)
            metrics[f"val/{name}/loss"] = nats / tokens
            metrics[f"val/{name}/bpb"] = nats / math.log(2) / n_bytes
            total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + tokens, total_bytes + n_bytes
        if total_tokens:
            metrics["val/loss"] = total_nats / total_tokens
            metrics["val/bpb"] = total_nats / math.log(2) / total_bytes
        for key, value in metrics.items():  # already reduced over ranks: no sync_dist
            self.log(key, value, prog_bar=key == "val/loss")
