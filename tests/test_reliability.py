"""Nothing is lost when a run is killed, its checkpoints are damaged, its numbers blow up, its inputs
are bad or its processes are several: SIGKILL and SIGTERM at random steps, a kill during a checkpoint
write, NaN/Inf steps, DDP with uneven validation splits and a resume, an unwritable output directory."""

import errno
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from lightning_modules.base import LMModule
from slmlab.checkpoint import check_checkpoint_file, newest_checkpoint, resolve_ckpt_path
from slmlab.data.errors import DataError
from slmlab.data.readers import DocumentReader
from slmlab.data.records import read_jsonl
from slmlab.data.streams import ValBatches
from slmlab.models import ModelConfig
from slmlab.training.checkpoint_io import AtomicCheckpointIO
from slmlab.training.faults import NonFiniteError, NonFiniteGuard, PreflightError
from tests.conftest import ROOT, compose_config, metric, tiny_run_overrides
from train import train

STEPS, VAL_EVERY, SAVE_EVERY = 10, 5, 2  # validation and checkpoint at 5 and 10, a periodic one every 2 steps
PACE = 0.2  # seconds each training step of a subprocess run waits, for a signal to land within the run


def run_overrides(tmp_path: Path, *extra: str, val_batches: int | None = 4) -> list[str]:
    """The tiny run of these tests; `val_batches` per source and validation (None: all)."""
    return tiny_run_overrides(tmp_path, steps=STEPS, val_every=VAL_EVERY) + [
        "callbacks.periodic.train_time_interval=null", f"callbacks.periodic.every_n_train_steps={SAVE_EVERY}",
        f"+trainer.limit_val_batches={val_batches or 1.0}", *extra]


def checkpoint_dir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints"


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(run: Path, reference: Path) -> None:
    a, b = load(checkpoint_dir(run) / "last.ckpt"), load(checkpoint_dir(reference) / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    assert metric(run / "run", "val/loss")[-1] == metric(reference / "run", "val/loss")[-1]  # both at step STEPS


# -- callbacks that runs of these tests add with +callbacks.<name>._target_=tests.test_reliability.<Class> --

class Pace(Callback):
    """Writes the step reached to `path` after each training batch, then waits `seconds`: a signal
    sent once the file says k lands at step k or k + 1."""

    def __init__(self, path: str, seconds: float) -> None:
        self.path, self.seconds = Path(path), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.seconds)


class Poison(Callback):
    """Makes the loss NaN at the steps `loss_steps` (the final hidden states become NaN), or one
    gradient Inf with a finite loss at `grad_steps`; writes to `out` whether each step changed the
    weights or AdamW's state."""

    def __init__(self, out: str, loss_steps: list[int], grad_steps: list[int]) -> None:
        self.out, self.loss_steps, self.grad_steps = Path(out), loss_steps, grad_steps
        self.changed: dict[int, bool] = {}

    @staticmethod
    def state(pl_module) -> list[torch.Tensor]:
        optimizer = pl_module.optimizers().optimizer
        moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [t.detach().clone() for t in [*pl_module.parameters(), *moments]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.before = self.state(pl_module)
        self.hook = None
        if trainer.global_step in self.loss_steps:
            self.hook = pl_module.model.norm.register_forward_hook(lambda module, args, out: out * float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.grad_steps:
            pl_module.model.embed.weight.grad[0, 0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.hook is not None:
            self.hook.remove()
        after = self.state(pl_module)
        self.changed[trainer.global_step - 1] = len(after) != len(self.before) or any(
            not torch.equal(a, b) for a, b in zip(after, self.before))
        self.out.write_text(json.dumps(self.changed))


# -- killed runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that the interrupted ones must reproduce."""
    tmp_path = tmp_path_factory.mktemp("reference")
    train(compose_config(run_overrides(tmp_path)))
    return tmp_path


def start_paced_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`python train.py` of the test run, each step paced; returns the process and its progress file."""
    progress = tmp_path / "progress"
    overrides = run_overrides(tmp_path, "+callbacks.pace._target_=tests.test_reliability.Pace",
                              f"+callbacks.pace.path={progress}", f"+callbacks.pace.seconds={PACE}",
                              f"hydra.run.dir={tmp_path / 'hydra'}")
    with open(tmp_path / "output.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "train.py", *overrides], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, progress


def output(tmp_path: Path) -> str:
    """The end of a subprocess run's output, for failure messages."""
    return (tmp_path / "output.log").read_text()[-3000:]


def wait_for_step(proc: subprocess.Popen, progress: Path, step: int, tmp_path: Path) -> None:
    while not progress.is_file() or int(progress.read_text() or 0) < step:
        assert proc.poll() is None, output(tmp_path)
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_weights(tmp_path, reference):
    step = random.randint(SAVE_EVERY + 1, STEPS - 2)  # the checkpoint of step SAVE_EVERY is written by then
    proc, progress = start_paced_run(tmp_path)
    wait_for_step(proc, progress, step, tmp_path)
    time.sleep(random.uniform(0, 0.75 * PACE))  # in training, validation or a checkpoint write, before the end
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, output(tmp_path)
    resumed_from = load(newest_checkpoint(checkpoint_dir(tmp_path)))["global_step"]
    assert step - SAVE_EVERY <= resumed_from <= step + 1, f"killed at step {step}: more than one interval lost"
    train(compose_config(run_overrides(tmp_path, "ckpt_path=last")))
    assert_same_weights(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_run_resumes_exactly(tmp_path, reference):
    proc, progress = start_paced_run(tmp_path)
    wait_for_step(proc, progress, random.randint(1, STEPS - 2), tmp_path)
    time.sleep(random.uniform(0, 0.75 * PACE))  # in training, validation or a checkpoint write, before the end
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output(tmp_path)
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    assert newest_checkpoint(checkpoint_dir(tmp_path)) == str(last)
    assert load(last)["global_step"] == int(progress.read_text()), output(tmp_path)
    train(compose_config(run_overrides(tmp_path, "resume=true")))
    assert_same_weights(tmp_path, reference)


class Interrupt(Callback):
    """After training batch `sleep_at` (a micro-batch under accumulation) waits `seconds`; after batch
    `sigterm_at` sends this process SIGTERM."""

    def __init__(self, sleep_at: int, seconds: float, sigterm_at: int) -> None:
        self.sleep_at, self.seconds, self.sigterm_at = sleep_at, seconds, sigterm_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.sleep_at:  # the stream is one epoch: batch_idx counts from the start
            time.sleep(self.seconds)
        if batch_idx == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInValidation(Callback):
    """Sends this process SIGTERM after the first batch of the validation at `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordSaves(Callback):
    """Records the step and the data module's position of every checkpoint written."""

    saves: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        RecordSaves.saves.append((trainer.global_step, trainer.datamodule.state_dict()["samples_consumed"]))


ACCUMULATE = ["trainer.accumulate_grad_batches=2", f"trainer.val_check_interval={2 * VAL_EVERY}"]


@pytest.mark.slow
def test_under_accumulation_checkpoints_hold_whole_steps_and_a_sigterm_resumes_exactly(tmp_path):
    """A checkpoint written inside an optimizer step held the weights before it but a data position after
    its first micro-batch, whose gradient was lost to the resumed run. The periodic checkpoint, due during
    the first micro-batch of step 2, waits for the end of that step, and a SIGTERM after the first
    micro-batch of step 4 stops the run once that step is complete."""
    # batch size 4 (tiny_run_overrides), two micro-batches a step
    train(compose_config(run_overrides(tmp_path / "reference", *ACCUMULATE)))
    RecordSaves.saves = []
    with pytest.raises(SystemExit) as stopped:
        train(compose_config(run_overrides(
            tmp_path, *ACCUMULATE, "callbacks.periodic.every_n_train_steps=null",
            "callbacks.periodic.train_time_interval={_target_:datetime.timedelta,seconds:1}",
            "+callbacks.interrupt._target_=tests.test_reliability.Interrupt", "+callbacks.interrupt.sleep_at=2",
            "+callbacks.interrupt.seconds=1.1", "+callbacks.interrupt.sigterm_at=6",
            "+callbacks.record._target_=tests.test_reliability.RecordSaves")))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert RecordSaves.saves == [(2, 16), (4, 32)]  # (step, samples read): periodic, then last.ckpt
    train(compose_config(run_overrides(tmp_path, *ACCUMULATE, "resume=true")))
    assert_same_weights(tmp_path, tmp_path / "reference")


def test_a_sigterm_before_training_starts_is_held_to_a_step_boundary_and_state_keys_stay_lightnings():
    """A signal that reaches Lightning's handler before the callback installs its own (a resumed run
    restoring its loaders) is taken over, or Lightning would stop after the first micro-batch. The
    callbacks that replace Lightning's keep their state under Lightning's keys, so a checkpoint written by
    either resumes with its state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from slmlab.training.callbacks import AveragedWeights
    from slmlab.training.faults import CheckpointOnSigterm, PeriodicCheckpoint

    callback = CheckpointOnSigterm()
    connector = SimpleNamespace(received_sigterm=True)
    trainer = SimpleNamespace(_signal_connector=connector, strategy=SimpleNamespace(launcher=None))
    original = signal.getsignal(signal.SIGTERM)
    try:
        callback.on_train_start(trainer, None)
    finally:
        signal.signal(signal.SIGTERM, original)
    assert callback._received and not connector.received_sigterm
    periodic, lightnings = PeriodicCheckpoint(every_n_train_steps=2), ModelCheckpoint(every_n_train_steps=2)
    assert periodic.state_key == lightnings.state_key
    assert AveragedWeights().state_key == "WeightAveraging"


@pytest.mark.slow
def test_a_sigterm_during_a_validation_of_a_weight_average_resumes_exactly(tmp_path):
    """During a validation the module holds the average. The SIGTERM checkpoint written there swapped the
    two sets: the resumed run trained on from the average."""
    ema = ["+callbacks/ema=default", "callbacks.ema.multi_avg_fn.decay=0.8"]
    train(compose_config(run_overrides(tmp_path / "reference", *ema)))
    with pytest.raises(SystemExit):
        train(compose_config(run_overrides(
            tmp_path, *ema, "+callbacks.interrupt._target_=tests.test_reliability.SigtermInValidation",
            f"+callbacks.interrupt.step={VAL_EVERY}")))
    assert load(checkpoint_dir(tmp_path) / "last.ckpt")["global_step"] == VAL_EVERY
    train(compose_config(run_overrides(tmp_path, *ema, "resume=true")))
    resumed, reference = (load(checkpoint_dir(run) / "last.ckpt") for run in (tmp_path, tmp_path / "reference"))
    for key in ("state_dict", "current_model_state"):
        for name, weight in reference[key].items():
            torch.testing.assert_close(resumed[key][name], weight, rtol=0, atol=0, msg=f"{key} {name}")


WRITER = """
import sys, torch
from slmlab.training.checkpoint_io import AtomicCheckpointIO
io, version = AtomicCheckpointIO(), 0
while True:
    print(version, flush=True)
    io.save_checkpoint({"version": version, "weights": torch.full((1 << 23,), float(version))}, sys.argv[1])
    version += 1
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) == 3:  # versions 0 to 2 are written, 3 is being written
            break
    time.sleep(random.uniform(0, 0.05))
    proc.kill()
    proc.wait()
    ckpt = load(check_checkpoint_file(path))
    assert ckpt["version"] >= 2 and torch.equal(ckpt["weights"], torch.full((1 << 23,), float(ckpt["version"])))
    assert newest_checkpoint(tmp_path) == str(path)  # a temp file left by the kill is not taken for a checkpoint
    AtomicCheckpointIO().save_checkpoint({"version": -1}, tmp_path / "step000004.ckpt")  # and the next save removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step000004.ckpt"]


def test_the_trainer_writes_checkpoints_atomically_and_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    trainer = instantiate(compose_config(tiny_run_overrides(tmp_path)).trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    trainer.strategy.checkpoint_io.save_checkpoint({"version": 1}, path)

    def full_disk(obj, f) -> None:
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer.strategy.checkpoint_io.save_checkpoint({"version": 2}, path)
    monkeypatch.undo()
    assert load(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_damaged_checkpoint_is_named_and_resume_takes_the_newest_intact_one(tmp_path, caplog):
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)))
    assert resolve_ckpt_path(None, True, trainer) is None  # resume=true with nothing to resume: a fresh start
    for i, name in enumerate(["step000004-val5.0000.ckpt", "step000006.ckpt", "last.ckpt"]):
        torch.save({"global_step": 2 * i + 4, "weights": torch.arange(1000.0)}, tmp_path / name)
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    assert resolve_ckpt_path("last", False, trainer) == str(tmp_path / "last.ckpt")

    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-100])  # a torn write
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {last} is truncated or corrupt")):
        resolve_ckpt_path(str(last), False, trainer)
    with caplog.at_level("WARNING"):
        assert resolve_ckpt_path(None, True, trainer) == str(tmp_path / "step000006.ckpt")
    assert f"{last} is truncated" in caplog.text

    periodic = tmp_path / "step000006.ckpt"
    data = bytearray(periodic.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot inside the weights: torch.load would not notice
    periodic.write_bytes(bytes(data))
    assert resolve_ckpt_path("last", False, trainer) == str(tmp_path / "step000004-val5.0000.ckpt")
    assert "step000006.ckpt is truncated or corrupt (record" in caplog.text

    (tmp_path / "step000004-val5.0000.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged") as err:
        resolve_ckpt_path(None, True, trainer)
    assert all(name in str(err.value) for name in ("last.ckpt", "step000006.ckpt", "step000004-val5.0000.ckpt"))


@pytest.mark.parametrize("where, mask", [
    (lambda data: 29, 0xFF),  # the first record's local header: its extra field's length (zipfile: EOFError)
    (lambda data: data.rfind(b"PK\x01\x02") + 6, 0xFF),  # central directory: version needed (NotImplementedError)
    (lambda data: data.find(b"PK\x01\x02") + 8, 0x01),  # central directory: the "encrypted" flag (RuntimeError)
], ids=["extra-length", "version-needed", "encrypted-flag"])
def test_a_checkpoint_with_a_damaged_zip_header_is_named_and_skipped(tmp_path, where, mask):
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)))
    for i, name in enumerate(["step000004.ckpt", "last.ckpt"]):
        torch.save({"global_step": 4 + i, "weights": torch.arange(1000.0)}, tmp_path / name)
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    last = tmp_path / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[where(bytes(data))] ^= mask
    last.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {last} is truncated or corrupt")):
        resolve_ckpt_path(str(last), False, trainer)
    assert resolve_ckpt_path(None, True, trainer) == str(tmp_path / "step000004.ckpt")


# -- non-finite steps ------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_leaving_good_checkpoints(tmp_path):
    changes = tmp_path / "changes.json"
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 7\)"):
        train(compose_config(run_overrides(
            tmp_path, "callbacks.nonfinite.max_bad_steps=3", "+callbacks.poison._target_=tests.test_reliability.Poison",
            f"+callbacks.poison.out={changes}", "+callbacks.poison.loss_steps=[2,6,7]",
            "+callbacks.poison.grad_steps=[5]")))
    # a skipped step leaves weights and AdamW moments exactly as they were (weight decay 0.1 included)
    changed = {int(step): c for step, c in json.loads(changes.read_text()).items()}
    # (step 7 is skipped too; the host reads its verdict back afterwards and stops the run)
    assert changed == {0: True, 1: True, 2: False, 3: True, 4: True, 5: False, 6: False, 7: False}
    assert metric(tmp_path / "run", "train/skipped_steps") == [0, 1, 2]  # logged at steps 1, 3, 5
    checkpoints = list(checkpoint_dir(tmp_path).glob("*.ckpt"))
    for path in checkpoints:
        assert all(t.isfinite().all() for t in load(path)["state_dict"].values()), path
    # the newest holds the weights after step 4: steps 5 and 6 were skipped, step 7 stopped the run
    assert load(newest_checkpoint(checkpoint_dir(tmp_path)))["global_step"] == 6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("fused", [True, False], ids=["verdict-on-device", "verdict-on-host"])
def test_a_skipped_step_changes_nothing_and_the_host_counts_it(fused, device):
    """Fused AdamW gets the verdict as `found_inf` and the host reads it a step later; an unfused
    optimizer (SGD with momentum and weight decay) gets no gradients, decided at once."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, device=device))
    optimizer = (torch.optim.AdamW([w], lr=0.1, weight_decay=0.1, fused=True) if fused
                 else torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1))
    guard, logged = NonFiniteGuard(max_bad_steps=2), []
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
                              precision_plugin=SimpleNamespace())
    module = SimpleNamespace(log=lambda name, value: logged.append(float(value)))

    def step(first_grad: float) -> list[torch.Tensor]:
        w.grad = torch.tensor([first_grad, 1.0, 1.0, 1.0], device=device)
        guard.on_before_optimizer_step(trainer, module, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        trainer.global_step += 1
        return [w.detach().clone(), *(t.clone() for t in optimizer.state[w].values())]

    before = step(1.0)
    with pytest.warns(UserWarning, match=r"step 1: non-finite .* \(1 in a row, 1 in this run\)"):
        after = step(float("nan"))
        step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert guard.state_dict() == {"skipped": 1, "in_a_row": 0} and logged == [0, 1, 1]
    with pytest.raises(NonFiniteError, match=r"2 steps in a row \(up to step 4\)"):
        step(float("inf"))
        step(float("nan"))
        guard.state_dict()  # as a checkpoint is assembled


class OverflowingFp16Module(LMModule):
    """A step whose fp16 gradients overflow at GradScaler's initial scale (65536) and fit from 1024 down."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.model.lm_head(torch.ones(4, self.model_config.d_model))  # fp16 under 16-mixed autocast
        assert out.dtype == torch.float16
        return (8 * out).float().sum()  # d/d lm_head.weight = 32 per element


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "unscaled-in-its-step"])
def test_fp16_overflows_are_skipped_and_the_scale_backs_off_with_fused_adamw_too(fused):
    """Lightning does not unscale the gradients of an optimizer that unscales them in its own step (fused
    AdamW). The guard dropped those scaled, overflowing gradients before GradScaler had checked them, and
    its update failed ("No inf checks were recorded"); `train/grad_norm` was the scaled gradients' norm."""
    from functools import partial

    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from slmlab.training.schedules import Constant

    torch.manual_seed(0)
    module = OverflowingFp16Module(
        ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, ffn_hidden=32),
        partial(torch.optim.AdamW, lr=1e-3, fused=fused), partial(Constant))
    logged = []
    module.on_before_optimizer_step = lambda optimizer: logged.append(module.gradient_norm().item())
    scaler, guard = torch.amp.GradScaler("cpu"), NonFiniteGuard(max_bad_steps=10)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[guard])
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1))
    assert trainer.global_step == 8 and scaler.get_scale() == 1024.0  # halved at each of six overflows
    assert guard.skipped == 6 and guard.in_a_row == 0
    assert logged[6:] == pytest.approx([32 * (64 * 16) ** 0.5] * 2, rel=1e-3)  # the unscaled gradients' norm


# -- processes that must agree ---------------------------------------------------------------------

def run_ddp(tmp_path: Path, *extra: str) -> None:
    """`python train.py` of the test run (all validation batches) on 2 processes."""
    overrides = run_overrides(tmp_path, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'hydra'}",
                              *extra, val_batches=None)
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_with_uneven_validation_splits_resumes_like_one_process(tmp_path, reference):
    # a batch size at which the ranks get different numbers of validation batches (never a hang)
    dm = instantiate(compose_config(run_overrides(tmp_path)).data)
    dm.setup("fit")  # the reference run prepared the shards

    def uneven(batch_size: int) -> bool:
        return any(len(list(ValBatches(blocks, batch_size, 0, 2))) != len(list(ValBatches(blocks, batch_size, 1, 2)))
                   for blocks in dm.val_blocks.values())

    batch_size = next(b for b in range(2, 9) if uneven(b))
    record = ["+callbacks.record._target_=tests.helpers.RecordBatches", f"data.batch_size={batch_size}"]
    ddp = tmp_path / "ddp"
    run_ddp(ddp, *record, f"+callbacks.record.out_dir={ddp / 'first'}",
            "+callbacks.stop._target_=tests.helpers.StopAtStep", f"+callbacks.stop.step={VAL_EVERY}")
    run_ddp(ddp, *record, f"+callbacks.record.out_dir={ddp / 'second'}", "ckpt_path=last")
    one = tmp_path / "one"  # one process, each DDP step's two rank batches as one batch
    train(compose_config(run_overrides(one, "+callbacks.record._target_=tests.helpers.RecordBatches",
                                       f"+callbacks.record.out_dir={one / 'record'}",
                                       f"data.batch_size={2 * batch_size}", val_batches=None)))

    def samples(out_dir: Path, rank: int) -> list[str]:
        return json.loads((out_dir / f"rank{rank}.json").read_text())

    ranks = [samples(ddp / "first", r) + samples(ddp / "second", r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == STEPS * batch_size  # every rank did every step
    steps = [ranks[0][i:i + batch_size] + ranks[1][i:i + batch_size] for i in range(0, STEPS * batch_size, batch_size)]
    assert sum(steps, []) == samples(one / "record", 0)
    a, b = load(checkpoint_dir(ddp) / "last.ckpt"), load(checkpoint_dir(one) / "last.ckpt")
    for key in a["state_dict"]:  # gradients averaged over ranks: equal up to the order of float sums
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=1e-6, msg=key)
    # each validation block counted once over the uneven ranks
    assert metric(ddp / "run", "val/loss")[-1] == pytest.approx(metric(one / "run", "val/loss")[-1], rel=1e-5)
    # rank 0 alone wrote: one file per checkpoint, no temp files or copies of another rank
    names = sorted(p.name for p in checkpoint_dir(ddp).iterdir())
    assert [re.sub(r"val\d+\.\d+", "val", n) for n in names] == [
        "last.ckpt", "step000005-val.ckpt", "step000010-val.ckpt", "step000010.ckpt"], names


# -- bad inputs and outputs ------------------------------------------------------------------------

@pytest.mark.parametrize("override, error, message", [
    ("data=nope", MissingConfigException, "Could not find 'data/nope'"),
    ("stage=nope", MissingConfigException, "Could not find 'stage/nope'"),
    ("data.batch_size=abc", InstantiationException, "batch_size='abc': must be an integer of at least 1"),
    ("data.val_fraction=2", InstantiationException, "val_fraction=2: must be a number in (0, 1)"),
    ("callbacks.nonfinite.max_bad_steps=0", InstantiationException, "max_bad_steps=0: must be an integer"),
])
def test_bad_settings_are_named(override, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cfg = compose_config([override])
        instantiate(cfg.data)
        instantiate(cfg.callbacks.nonfinite)


CUT_GZIP = gzip.compress(b"".join(b'{"id": "%d", "text": "a line of text"}\n' % i for i in range(2000)))[:200]


@pytest.mark.parametrize("name, data, read, message", [
    ("chat.jsonl", b'{"id": "a"}\n{"id": "caf\xe9"}\n', read_jsonl, ":2: not valid UTF-8 (byte 11)"),
    ("chat.jsonl.gz", CUT_GZIP, read_jsonl, ": truncated or corrupt gzip file"),
    ("raw.jsonl.gz", CUT_GZIP, DocumentReader, ": truncated or corrupt gzip file"),
])
def test_a_damaged_data_file_is_named(tmp_path, name, data, read, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=re.escape(f"{path}{message}")):
        list(read(str(path)))


@pytest.mark.slow
def test_resuming_with_another_architecture_names_the_fields(tmp_path, reference):
    with pytest.raises(ValueError, match=r"ckpt_path=.*last.ckpt: the checkpoint holds another architecture.*"
                                         r"d_model: checkpoint 32, config 48"):
        train(compose_config(run_overrides(tmp_path, "model.d_model=48",
                                           f"ckpt_path={checkpoint_dir(reference) / 'last.ckpt'}")))


def test_an_unwritable_or_full_output_dir_fails_before_anything_is_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PreflightError, match=re.escape(f"paths.output_dir={blocker / 'run'} cannot be written to")):
        train(compose_config(tiny_run_overrides(blocker)))
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(PreflightError, match=r"0.00 GiB free, but one checkpoint of this model takes"):
        train(compose_config(tiny_run_overrides(tmp_path)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no logs, no checkpoints
