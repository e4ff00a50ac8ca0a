"""Compiles a model's GPU kernels in parallel processes while `train.py` imports Lightning, builds the
model and sets up the trainer, so that its first training step finds them compiled.

On a fresh machine the first forward+backward of a hybrid compiles Triton kernels (fla's GLA and HGRN2,
mamba-ssm's SSD) and FlexAttention one mixer after another. Here one process per mixer kind runs a
layer of that kind once, forward and backward, at the training shape and precision; what it compiles
lands in the on-disk Triton and inductor caches, which the training process then reads. helix_hybrid
reached its first optimizer step 44.2 s after launch instead of 52.8 s on an H200 (48.6 s instead of
55.9 s on an H100). It only saves time: a warm-up process that fails is reported, and training
compiles what is missing itself.

    warmup = start_kernel_warmup(model_config, batch_size=1, seq_len=2048, precision="bf16-mixed")
    ...                      # imports, data, trainer, model
    warmup.wait()            # before the first step: no two processes compile the same kernel
"""

import atexit
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from slmlab.mixers import mixer_class
from slmlab.models import ModelConfig
from slmlab.models.transformer import BACKBONE, Block, to_residual_stream

log = logging.getLogger(__name__)

# Lightning's precision settings, long and short forms -> (parameter dtype, autocast dtype)
PRECISIONS = {
    "32-true": (torch.float32, None), "32": (torch.float32, None),
    "64-true": (torch.float64, None), "64": (torch.float64, None),
    "bf16-mixed": (torch.float32, torch.bfloat16), "bf16": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16), "16": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None),
}


def compiles_each_block(compile_blocks: bool | str) -> bool:
    """`stage.compile` compiles blocks one by one (the blocks as one graph fuse across blocks: a block
    compiled alone would make kernels that run does not use)."""
    return bool(compile_blocks) and compile_blocks != BACKBONE


def warmup_layers(cfg: ModelConfig, compile_blocks: bool | str = False) -> dict[str, list[int]]:
    """Mixer kind -> the layers its warm-up process runs, one after the other: the first layer of each
    variant of that kind (with and without RoPE). Only for models with two or more kinds whose CUDA
    path compiles kernels at its first call (every kind when blocks are compiled), else empty: the
    gain is compiling kinds side by side. A single kind compiled in a process of its own gains only the
    overlap with the trainer's set-up, and measured it lost more than that to the process's own start
    (odinnext on an H200: 32.2 s to the first step without warm-up, 44.8 s with it)."""
    first: dict[tuple[str, bool], int] = {}
    for i, kind in enumerate(cfg.layer_mixers):
        first.setdefault((kind, cfg.rope_on(i)), i)
    jobs: dict[str, list[int]] = {}
    for (kind, _), i in first.items():
        if compiles_each_block(compile_blocks) or (cfg.kernel != "torch" and mixer_class(kind).compiles_kernels):
            jobs.setdefault(kind, []).append(i)
    return jobs if len(jobs) > 1 else {}


@dataclass
class KernelWarmup:
    """The running warm-up processes, one per mixer kind; empty where there is nothing to warm up."""

    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, object] = field(default_factory=dict)  # each process's stderr, a temporary file
    started: float = field(default_factory=time.perf_counter)

    def wait(self, timeout_s: float = 900.0) -> dict[str, float | None]:
        """Waits for every process; returns each one's compile seconds (None: it failed or was stopped
        at the timeout, with a warning quoting its stderr)."""
        seconds: dict[str, float | None] = {}
        waited = time.perf_counter()
        for name, process in self.processes.items():
            try:
                stdout, _ = process.communicate(timeout=max(0.0, timeout_s - (time.perf_counter() - waited)))
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, _ = process.communicate()
            seconds[name] = _reported_seconds(stdout) if process.returncode == 0 else None
            if seconds[name] is None:
                self.logs[name].seek(0)
                tail = self.logs[name].read().decode(errors="replace")[-2000:]
                log.warning("kernel warm-up of %s failed (exit %s); training compiles its kernels itself. "
                            "Its stderr ends:\n%s", name, process.returncode, tail)
            self.logs[name].close()
        if self.processes:
            log.info("kernel warm-up: %s; %.1f s after it started, %.1f s spent waiting for it",
                     ", ".join(f"{k} {'failed' if s is None else f'{s:.1f} s'}" for k, s in seconds.items()),
                     time.perf_counter() - self.started, time.perf_counter() - waited)
        self.processes = {}
        return seconds

    def stop(self) -> None:
        """Kills what still runs (at exit, when training never reached `wait`)."""
        for process in self.processes.values():
            process.kill()


def _reported_seconds(stdout: bytes) -> float | None:
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        return float(json.loads(lines[-1])["seconds"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def start_kernel_warmup(model_config: ModelConfig, batch_size: int | None, seq_len: int | None,
                        precision: str | int, compile_blocks: bool | str = False, accelerator: str = "gpu",
                        device: str | None = None) -> KernelWarmup:
    """Starts one warm-up process per mixer kind of `warmup_layers`, on the first visible GPU. Nothing
    starts on the CPU, without CUDA, on a process other than a node's first rank (the others find the
    node's caches), without a batch shape, or at a precision Lightning does not name. `device` forces
    one ("cpu" runs the PyTorch references: what the tests use)."""
    if batch_size is None or seq_len is None:
        return KernelWarmup()
    if device is None:
        if accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
            return KernelWarmup()
        # set on every rank but a node's first by Lightning's launcher and torchrun (LOCAL_RANK) or SLURM
        if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
            return KernelWarmup()
        device = "cuda"
    if str(precision) not in PRECISIONS:
        log.warning("kernel warm-up skipped: unknown precision %r (one of %s)", precision, sorted(PRECISIONS))
        return KernelWarmup()
    warmup = KernelWarmup()
    for kind, layers in warmup_layers(model_config, compile_blocks).items():
        job = {"model": asdict(model_config), "layers": layers, "batch_size": batch_size, "seq_len": seq_len,
               "precision": str(precision), "compile_blocks": compiles_each_block(compile_blocks), "device": device}
        warmup.logs[kind] = tempfile.TemporaryFile()
        warmup.processes[kind] = subprocess.Popen([sys.executable, "-m", __name__, json.dumps(job)],
                                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                  stderr=warmup.logs[kind])
    atexit.register(warmup.stop)
    return warmup


def run_layers(job: dict) -> float:
    """One warm-up process's work: builds the job's layers and runs each forward and backward once, as
    a training step runs them; returns the seconds it took (from after torch's import: the kernel
    packages import at the first forward, as in training)."""
    start = time.perf_counter()
    cfg = ModelConfig(**job["model"])
    param_dtype, autocast = PRECISIONS[job["precision"]]
    device = torch.device(job["device"])
    for i in job["layers"]:
        with torch.device(device):
            block = Block(cfg, i).to(param_dtype)
        if job["compile_blocks"]:
            block.compile()  # in any mode: CUDA graphs (reduce-overhead) change no kernel
        x = torch.randn(job["batch_size"], job["seq_len"], cfg.d_model, device=device, dtype=param_dtype,
                        requires_grad=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            y = block(to_residual_stream(x))
        y.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    print(json.dumps({"seconds": run_layers(json.loads(sys.argv[1]))}), flush=True)
