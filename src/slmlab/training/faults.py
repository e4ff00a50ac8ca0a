"""Faults a run survives or refuses early: a termination signal, non-finite losses or gradients, an
output directory it could not write to. The callbacks are registered in `conf/callbacks/default.yaml`."""

import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from slmlab.data.atomic import atomic_write

ADAMW_COPIES = 3  # a trained parameter's bytes in a checkpoint: the weight and AdamW's two moments


class PreflightError(RuntimeError):
    """The run cannot write its outputs; raised before anything is set up."""


class NonFiniteError(RuntimeError):
    """Training diverged: too many consecutive steps with a non-finite loss or gradients."""


def preflight(output_dir: str | Path, module: torch.nn.Module) -> None:
    """Fail before training, not at the first checkpoint: `output_dir` must be creatable and writable,
    and its file system must have room for one checkpoint of `module` (float32 weights, plus AdamW's
    two moments of each trained one)."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_probe.{os.getpid()}"
        with atomic_write(probe) as f:  # the checkpoint writer's own path: temp file, fsync, rename
            f.write(b"\0")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"paths.output_dir={output_dir} cannot be written to: {e}") from None
    need = sum(p.numel() * 4 * (ADAMW_COPIES if p.requires_grad else 1) for p in module.parameters())
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise PreflightError(f"paths.output_dir={output_dir}: {free / 2**30:.2f} GiB free, but one checkpoint of "
                             f"this model takes {need / 2**30:.2f} GiB; free some space or choose another directory")


def inside_accumulation(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether training batch `batch_idx` ended inside an optimizer step (gradient accumulation). A
    checkpoint written there would hold the weights from before the step but a data position after its
    first micro-batches, whose gradients it does not hold: the resumed run would never apply them."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches != 0


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, which with `train_time_interval` may save after any micro-batch, saving
    at optimizer-step boundaries only (the first one after the interval)."""

    @property
    def state_key(self) -> str:  # ModelCheckpoint's: a run resumed from a checkpoint it wrote keeps its state
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not inside_accumulation(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's preemption, `kill`), write `last.ckpt` at the end of the optimizer step
    under way, then exit with status 143 (128 + SIGTERM), as a process the signal killed would: not done,
    to be resumed.

    Lightning by itself stops after the batch under way, also inside a gradient accumulation, saving
    nothing (it saves only under SLURM with auto-requeue), and exits with status 0. Its signal handler is
    replaced here by one that only records the signal; Lightning is told to stop at the next optimizer-step
    boundary (`inside_accumulation`), on every rank at the same step. A SIGTERM during a validation stops it
    part way (under DDP at its end); the resumed run goes on after it, without its metrics.
    """

    def __init__(self) -> None:
        self._received = False
        self._launcher = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning installed its handler before this hook, and puts the process's own back when fit ends;
        # a signal that reached its handler before (while a resumed run restored its loaders) is held too
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._record)
        self._received |= trainer._signal_connector.received_sigterm
        trainer._signal_connector.received_sigterm = False
        self._launcher = trainer.strategy.launcher

    def _record(self, signum: int, frame: Any) -> None:
        if not self._received and self._launcher is not None:
            self._launcher.kill(signum)  # ranks this process started, as Lightning's handler does
        self._received = True

    def _stop_if_signalled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stop = self._received
        if trainer.world_size > 1:  # any rank's signal stops all of them after the same step
            flag = torch.tensor(float(stop), device=pl_module.device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="max"))
        if stop:  # Lightning raises SIGTERMException once the batch (or validation batch) has ended
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not inside_accumulation(trainer, batch_idx):
            self._stop_if_signalled(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # ranks may hold different numbers of validation batches: under DDP they agree at its end
        if trainer.world_size == 1 and not inside_accumulation(trainer, trainer.fit_loop.epoch_loop.batch_idx):
            self._stop_if_signalled(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and not inside_accumulation(trainer, trainer.fit_loop.epoch_loop.batch_idx):
            self._stop_if_signalled(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = 128 + signal.SIGTERM
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or trainer.global_step == 0:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        checkpoint.last_model_path = str(path)  # recorded in the checkpoint, as ModelCheckpoint does
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with resume=true")


class NonFiniteGuard(Callback):
    """Skips every optimizer step whose loss or gradients hold a NaN or Inf, and stops the run after
    `max_bad_steps` such steps in a row with `NonFiniteError` (saving nothing: the checkpoints on disk
    hold the last good weights).

    A skipped step leaves the weights and the optimizer's state exactly as they were. Zeroing the
    gradients would not do that: AdamW would still decay the weights and move its moments. With a fused
    Adam(W) the verdict stays on the device: it goes to the kernel as `found_inf`, as GradScaler passes
    it, and the kernel then changes nothing. The host reads it back one step later (or before a
    checkpoint is written, or when training ends), to count, warn and stop: reading it at once would
    wait for the backward and leave the GPU idle while Python launches the update. Other optimizers
    (and fp16, whose GradScaler sets `found_inf` itself) get the verdict on the host and no gradients
    (`grad = None`: torch optimizers then leave those parameters alone). Under fp16 the gradients checked
    are unscaled (`LMModule.gradient_norm`), and a step whose scaled gradients overflow counts too:
    GradScaler skips it as well and halves its scale, so ten in a row mean gradients beyond fp16's range
    at a thousandth of the scale.

    The step still counts (global step, LR schedule, data position). Logs `train/skipped_steps`, the
    run's total. The verdict is one for all ranks.
    """

    def __init__(self, max_bad_steps: int = 10) -> None:
        if not isinstance(max_bad_steps, int) or max_bad_steps < 1:
            raise ValueError(f"callbacks.nonfinite.max_bad_steps={max_bad_steps!r}: must be an integer of at least 1")
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # steps skipped in the whole run (kept in checkpoints), as far as read back
        self.in_a_row = 0
        self._loss_finite: bool | torch.Tensor = True  # over the micro-batches of the current step
        self._unread: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None  # step, verdict, copy done

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all() & self._loss_finite  # no host sync per micro-batch

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._read_back()  # the previous step's verdict, long computed: this step's backward is queued behind it
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # the norm is finite exactly when every gradient is (or it overflows: a divergence as well);
        # slmlab's modules compute it once per step for logging and clipping too
        shared = getattr(pl_module, "gradient_norm", None)
        norm = shared() if shared is not None else torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = self._loss_finite & (torch.isfinite(norm) if norm is not None  # None: no gradients at all
                                      else torch.ones((), dtype=torch.bool, device=pl_module.device))
        self._loss_finite = True
        # any rank's fault skips the step everywhere: with sharded gradients (FSDP) a rank sees only its part
        bad = trainer.strategy.reduce((~finite).float(), reduce_op="max")
        pl_module.log("train/skipped_steps", bad + self.skipped)  # a device value: no sync
        on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and \
            getattr(trainer.precision_plugin, "scaler", None) is None
        if on_device:
            optimizer.found_inf = bad
            done = torch.cuda.Event() if bad.is_cuda else None
            self._unread = (trainer.global_step, bad.to("cpu", non_blocking=True), done)
            if done is not None:
                done.record()
        else:
            verdict = bad.cpu()
            if verdict:
                for p in params:
                    p.grad = None
            self._unread = (trainer.global_step, verdict, None)
            self._read_back()

    def _read_back(self) -> None:
        """Counts, warns about and stops on the verdict not read back yet."""
        if self._unread is None:
            return
        step, bad, done = self._unread
        self._unread = None
        if done is not None:
            done.synchronize()
        if not bad:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        rank_zero_warn(f"step {step}: non-finite loss or gradients, update skipped "
                       f"({self.in_a_row} in a row, {self.skipped} in this run)")
        if self.in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                f"gradients (callbacks.nonfinite.max_bad_steps={self.max_bad_steps}); stopped without saving, "
                "so the run's checkpoints hold the last good weights. Lower optim.lr, or look for bad data")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_back()

    def state_dict(self) -> dict[str, Any]:
        self._read_back()  # called as a checkpoint is assembled: a step that ends the run raises before the write
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.in_a_row = state_dict["skipped"], state_dict["in_a_row"]
