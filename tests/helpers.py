"""Callbacks the end-to-end tests add to a run with `+callbacks.<name>._target_=tests.helpers.<Class>`."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from slmlab.training.callbacks import GenerateSample


class StopAtStep(Callback):
    """Ends fit after the validation (and checkpoint) of optimizer step `step`, as a preemption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class RecordBatches(Callback):
    """Writes a hash of every training sample this rank saw to `<out_dir>/rank<r>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.hashes: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.hashes += [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest() for row in batch["input_ids"]]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.hashes))


class RecordProgressBarKeys(Callback):
    """Writes the progress-bar metric names Lightning held after each training batch to `path` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.keys: list[list[str]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.keys.append(sorted(trainer.progress_bar_metrics))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(json.dumps(self.keys))


class RecordWeights(Callback):
    """Saves the model's weights after every optimizer step, as a list of state dicts, to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.weights: list[dict] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step > len(self.weights):
            self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.weights, self.path)


class RecordSampledWeights(GenerateSample):
    """The end-of-run sample, saving the model weights it samples from to `path`."""

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}, self.path)
        super().on_train_end(trainer, pl_module)
