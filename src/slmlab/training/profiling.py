"""Where a training step's time goes, measured inside `train.py`: `callbacks.profile.steps=N` runs the
torch profiler over N optimizer steps from `callbacks.profile.start` and prints GPU time by kind of
kernel, the busiest kernels, and the time the GPU sat idle with what the host was doing meanwhile.
Idle time between kernels is what a host sync costs (an `.item()`, a copy to the CPU): the GPU drains
its queue, then waits while Python loads the next batch and launches the next kernels."""

import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from slmlab.training.callbacks import console_print

# GPU kernels by what they do, from their names (a regular expression each, searched in the lowercased
# name, the first match wins): attention (cuDNN, which runs nothing else here, flash, FlexAttention;
# FlashAttention 4's CuTe kernels have "cutlass" in their names too), cuBLAS/CUTLASS/quack matmuls,
# fla's and mamba-ssm's chunked scans (their kernels' names begin so), slmlab's own Triton kernels, the
# fused optimizer; the rest is elementwise work (norms, RoPE, activations, casts) inductor generates
KERNEL_KINDS = (("attention", r"fmha|sdpa|flash|attention|cudnn"),
                ("matmul", r"nvjet|gemm|cutlass|splitkreduce|xmma"),
                ("recurrent scan", r"^_?(chunk|bmm_chunk|state_passing|fused_recurrent)"),
                ("causal conv", r"^_causal_conv"),
                ("qk-norm + rope", r"^_qk_norm_rope"),
                ("optimizer", r"multi_tensor_apply|adam"))


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, lower)), "elementwise, other")


def is_kernel(name: str) -> bool:
    """Whether a GPU-timeline row is a kernel (or copy): an op's row (aten::mm, ...) and a record_function's
    (`Optimizer.step#AdamW.step` spans a whole Lightning step, closure included) cover kernels' time."""
    return not name.startswith(("aten::", "Optimizer.", "Command ", "ProfilerStep"))


def kernel_summary(prof: profile, steps: int, top: int) -> list[str]:
    """Lines: GPU kernel milliseconds per step in all, by kind of kernel, then the `top` kernels. Only GPU
    rows count: with the CPU profiled too, the host's rows that launched a kernel (a custom op, an inductor
    kernel of the same name) carry its time as well."""
    kernels = sorted(((e.key, e.self_device_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()
                      if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
                      and is_kernel(e.key)), key=lambda k: -k[1])
    total = sum(ms for _, ms, _ in kernels)
    by_kind: Counter[str] = Counter()
    for name, ms, _ in kernels:
        by_kind[kernel_kind(name)] += ms
    lines = [f"{total:.1f} ms of GPU kernels per step"]
    lines += [f"  {kind:20s} {ms:8.2f} ms  {ms / total:6.1%}" for kind, ms in by_kind.most_common()]
    lines += [f"  {ms:8.2f} ms  {calls:5.0f}x  {name[:120]}" for name, ms, calls in kernels[:top]]
    return lines


def saved_activation_bytes(forward: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of `forward()`: every storage it saves, once, except the
    storages of `params`. This counts what a layer holds between its forward and backward, on any
    device and whatever the kernels (fla's and mamba-ssm's autograd functions save through the same
    hooks); autocast's half-precision weight copies are included, a constant that does not grow with
    the tokens."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # held until the backward: no saved storage is freed and reused meanwhile
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


@dataclass
class Gap:
    """A stretch of time (microseconds) in which the GPU ran nothing, between two kernels or copies."""

    start: float
    length: float
    after: str
    before: str


def idle_gaps(activity: list[tuple[float, float, str]]) -> list[Gap]:
    """The gaps between intervals (start, end, name) of GPU activity, which may overlap (several streams)."""
    gaps, busy_until, last = [], None, ""
    for start, end, name in sorted(activity):
        if busy_until is not None and start > busy_until:
            gaps.append(Gap(busy_until, start - busy_until, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    return gaps


class StepProfiler(Callback):
    """Profiles optimizer steps [start, start + steps) of rank 0 and prints where their time went
    (`steps=0`: off). With `trace`, also writes a Chrome trace (chrome://tracing, Perfetto) to
    `<trainer.default_root_dir>/profile/trace.json`."""

    def __init__(self, start: int = 20, steps: int = 0, top: int = 15, gaps: int = 5, trace: bool = False) -> None:
        if steps < 0 or start < 0:
            raise ValueError(f"callbacks.profile: start={start} and steps={steps} must not be negative")
        self.start, self.steps, self.top, self.gaps, self.trace = start, steps, top, gaps, trace
        self._prof: profile | None = None
        self._t0 = 0.0
        self._done = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps or not trainer.is_global_zero:
            return
        end = self.start + self.steps
        if trainer.global_step > self.start or (trainer.max_steps >= 0 and end > trainer.max_steps):
            last = trainer.max_steps - 1 if trainer.max_steps >= 0 else "on"
            warnings.warn(f"callbacks.profile: steps {self.start}-{end - 1} are not all in this run (steps "
                          f"{trainer.global_step}-{last}), so nothing is profiled; set callbacks.profile.start",
                          stacklevel=2)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if (not self.steps or self._prof is not None or self._done or trainer.global_step != self.start
                or not trainer.is_global_zero):
            return
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()  # the window holds these steps' kernels only
        self._prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._prof is None or trainer.global_step < self.start + self.steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        lines = self.report(self._prof, wall)
        if self.trace:
            path = Path(trainer.default_root_dir) / "profile" / "trace.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(path))
            lines.append(f"  trace: {path}")
        console_print(trainer, "\n".join(lines))
        self._prof, self._done = None, True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._prof is not None:  # the run ended inside the window: no report of a partial one
            self._prof.__exit__(None, None, None)
            self._prof = None
            warnings.warn(f"callbacks.profile: the run ended inside steps {self.start}-{self.start + self.steps - 1}; "
                          "no profile", stacklevel=2)

    def report(self, prof: profile, wall_seconds: float) -> list[str]:
        n = self.steps
        lines = [f"== profile of optimizer steps {self.start}-{self.start + n - 1}: {wall_seconds / n * 1e3:.1f} ms per step"]
        events = prof.events()
        gpu = [(e.time_range.start, e.time_range.end, e.name) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
               and is_kernel(e.name) and not e.is_user_annotation]  # an annotation would hide the gaps it spans
        if not gpu:  # on the CPU: the host's busiest ops
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: self.top]
            return lines + [f"  {e.self_cpu_time_total / 1e3 / n:8.2f} ms  {e.count / n:5.0f}x  {e.key[:120]}" for e in ops]
        lines += ["  " + line for line in kernel_summary(prof, n, self.top)]
        gaps = idle_gaps(gpu)
        lines.append(f"  GPU idle {sum(g.length for g in gaps) / n / 1e3:.2f} ms per step, in {len(gaps) / n:.0f} gaps "
                     f"between kernels; the longest, with what the host ran meanwhile:")
        host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        for gap in sorted(gaps, key=lambda g: -g.length)[: self.gaps]:
            end = gap.start + gap.length
            during = sorted(((min(e.time_range.end, end) - max(e.time_range.start, gap.start), e.name) for e in host
                             if e.time_range.start < end and e.time_range.end > gap.start), reverse=True)
            names = list(dict.fromkeys(name[:50] for _, name in during))[:4]
            lines.append(f"  {gap.length:8.0f} us after {gap.after[:40]} | before {gap.before[:40]} | host: {'; '.join(names)}")
        return lines
