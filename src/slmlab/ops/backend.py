"""Which implementation of a sequence-mixing op runs: a CUDA kernel package or the PyTorch reference.

    kernel = "auto"       the first kernel package that implements the op and imports, when the
                          inputs are on CUDA; else the PyTorch reference (warned about once on CUDA,
                          where it is slow and memory-hungry)
    kernel = "torch"      always the PyTorch reference
    kernel = "fla" | "mamba_ssm"   that package's kernel; an error if it is missing or the inputs are on the CPU

Causal softmax attention chooses apart (`attention_kernel`, `flash_attention_usable`): FlashAttention 4
(package flash-attn-4) on a Hopper or newer GPU where it imports, else SDPA, which needs no package.
So does the SwiGLU MLP (`mlp_kernel`, `fused_mlp_usable`): quack's GEMMs with the activation in their
epilogues when asked for, else torch's matmuls around slmlab's activation op.

The kernel packages are imported lazily, here and in the ops: slmlab imports and runs its CPU path
without them. Before the first import, the tuned Triton configs slmlab ships for this GPU are put
into the Triton cache, so the kernels start without autotuning (`ops/autotune_cache.py`).
"""

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import warnings
from collections.abc import Callable

import torch

from slmlab.ops.autotune_cache import KERNEL_PACKAGES, seed_autotune_cache, seed_prehook_winners, seed_quack_cache

KERNELS = ("auto", "torch", "fla", "mamba_ssm")
ATTENTION_KERNELS = ("auto", "sdpa", "flash_attn")
MLP_KERNELS = ("torch", "quack")
INSTALL_HINT = 'pip install -e ".[cuda]"'

# the module whose import proves that a package's kernels can run (mamba_ssm's top-level import
# also needs its compiled selective-scan extension, which the SSD kernels do not use)
_PROBES = {
    "fla": "fla.ops.gla",
    "mamba_ssm": "mamba_ssm.ops.triton.ssd_combined",
    "causal_conv1d": "causal_conv1d",
    "flash_attn": "flash_attn.cute.interface",
    "quack": "quack.mlp",
}
_warned: set[str] = set()
HAS_TRITON = importlib.util.find_spec("triton") is not None  # CUDA builds of torch on Linux bring it


def _use_tuned_configs() -> bool:
    # SLMLAB_TUNED_CONFIGS=0 leaves the Triton cache alone (python -m slmlab.tune_kernels does)
    return torch.cuda.is_available() and os.environ.get("SLMLAB_TUNED_CONFIGS", "1") != "0"


@functools.cache
def seed_tuned_configs() -> None:
    """Seeds the shipped Triton autotune results for this GPU (`ops/autotune_cache.py`), once per process."""
    # before the first kernel package loads: its autotuners then find the shipped results
    if _use_tuned_configs():
        seed_autotune_cache(torch.cuda.get_device_name())


def trace_time_constant(check: Callable[[str], bool]) -> Callable[[str], bool]:
    """`check` answered once per argument (the answers in `.results`), and called by torch.compile at
    trace time, its answer kept as a constant. Traced through, `kernel_available` came out False under
    torch 2.11 (GLA ran its PyTorch reference), and run at a graph break it split every compiled
    recurrent block. The mark is what torch.compiler.assume_constant_result sets, without importing
    dynamo (1.5 s) when slmlab is imported."""
    @functools.wraps(check)
    def answered_once(arg: str) -> bool:
        if arg not in answered_once.results:
            answered_once.results[arg] = check(arg)
        return answered_once.results[arg]

    answered_once.results = {}
    answered_once._dynamo_marked_constant = True
    return answered_once


@trace_time_constant
def kernel_available(package: str) -> bool:
    """Whether `package` (a key of `_PROBES`) imports. Once it has, the shipped winners of its pre_hook
    kernels, or quack's, go into their autotune caches (`ops/autotune_cache.py`)."""
    seed_tuned_configs()
    # quack (which flash-attn-4 imports too) reads this as its GEMMs' autotuners are made, at import:
    # keep each shape's winner on disk (~/.quack), so a shape is tuned once per machine
    os.environ.setdefault("QUACK_CACHE_AUTOTUNING", "1")
    try:
        importlib.import_module(_PROBES[package])
    except Exception:  # ImportError, or a broken Triton/CUDA install failing at import time
        return False
    if package in KERNEL_PACKAGES and _use_tuned_configs():
        seed_prehook_winners(torch.cuda.get_device_name(), (package,))
    if package == "quack" and _use_tuned_configs():
        seed_quack_cache(torch.cuda.get_device_name())
    return True


def flash_attention_usable(kernel: str, device: torch.device) -> bool:
    """Whether causal attention on `device` runs FlashAttention 4 (`ops/flash_attention.py`) for
    `attention_kernel` = `kernel` (see `ATTENTION_KERNELS`): its CuTe kernels need a Hopper or newer GPU."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention_kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
    if kernel == "sdpa":
        return False
    return _hopper_package_usable("flash_attn", device, "attention_kernel='flash_attn'" if kernel == "flash_attn" else None,
                                  "Use attention_kernel=auto or sdpa")


def fused_mlp_usable(kernel: str, device: torch.device) -> bool:
    """Whether the SwiGLU MLP's training forward and backward on `device` run quack's fused GEMMs for
    `mlp_kernel` = `kernel` (see `MLP_KERNELS`). Asked for where they cannot run, an error says why."""
    if kernel not in MLP_KERNELS:
        raise ValueError(f"unknown mlp_kernel {kernel!r}; choose one of {MLP_KERNELS}")
    return kernel == "quack" and _hopper_package_usable("quack", device, "mlp_kernel='quack'", "Use mlp_kernel=torch")


def _hopper_package_usable(package: str, device: torch.device, asked_by: str | None, instead: str) -> bool:
    """Whether `package`'s CuTe-DSL kernels can run on `device`: a CUDA GPU of compute capability 9.0 or
    newer, the package importing. Where the setting `asked_by` named the package, a no is an error that
    says why and what to use `instead`."""
    on_cuda = torch.device(device).type == "cuda"
    usable = on_cuda and _hopper_or_newer(str(device)) and kernel_available(package)
    if asked_by and not usable:
        if not on_cuda:
            raise ValueError(f"{asked_by} runs on CUDA tensors only, got {device}")
        if not kernel_available(package):
            raise ImportError(f"{asked_by} was asked for, but {_PROBES[package]} (package {_DISTRIBUTIONS[package][0]}) "
                              f"does not import; install it: {INSTALL_HINT}")
        raise ValueError(f"{asked_by} needs a GPU of compute capability 9.0 or newer (Hopper); {device} is older. "
                         f"{instead}")
    return usable


@trace_time_constant
def _hopper_or_newer(device: str) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


# The kernel packages' private functions behind slmlab's custom ops (`ops/gla.py: fla_chunk_gla`,
# `ops/ssd.py: mamba_chunk_scan`, `ops/flash_attention.py: flash_attn_causal`): module, function, the
# leading parameters each call passes by position and those it passes by name, as of fla 0.6.0,
# mamba-ssm 2.3.2 and flash-attn-4 4.0.0b40. Private functions change without
# notice; `custom_op_usable` checks them before an op first runs.
PRIVATE_CALLS: dict[str, tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "fla_chunk_gla": (
        ("fla.ops.gla.chunk", "chunk_gla_fwd", ("q", "k", "v", "g"),
         ("g_cumsum", "scale", "initial_state", "output_final_state", "chunk_size")),
        ("fla.ops.gla.chunk", "chunk_gla_bwd", ("q", "k", "v"),
         ("g", "g_cumsum", "scale", "initial_state", "h", "A", "do", "dht", "chunk_size")),
    ),
    "flash_attn_causal": (
        ("flash_attn.cute.interface", "_flash_attn_fwd", ("q", "k", "v"), ("causal", "return_lse")),
        ("flash_attn.cute.interface", "_flash_attn_bwd", ("q", "k", "v", "out", "dout", "lse"), ("causal",)),
    ),
    "mamba_chunk_scan": (
        ("mamba_ssm.ops.triton.ssd_combined", "_mamba_chunk_scan_combined_fwd",
         ("x", "dt", "A", "B", "C", "chunk_size"), ("D",)),
        ("mamba_ssm.ops.triton.ssd_combined", "_mamba_chunk_scan_combined_bwd",
         ("dout", "x", "dt", "A", "B", "C", "out", "chunk_size"), ("D",)),
    ),
}
_DISTRIBUTIONS = {"fla": ("fla-core", "flash-linear-attention"), "mamba_ssm": ("mamba-ssm",),
                  "flash_attn": ("flash-attn-4",), "quack": ("quack-kernels",)}


@trace_time_constant
def custom_op_usable(op: str) -> bool:
    """Whether the private functions behind custom op `op` (a key of `PRIVATE_CALLS`) still take the
    arguments it passes. Where an installed version changed them, warns once and returns False; the
    op's caller then runs the package's public function, which is as correct but splits a compiled
    block's graph around it (attention runs SDPA). (Only parameters are checked, not what the functions
    return.)"""
    for module, name, positional, keywords in PRIVATE_CALLS[op]:
        fn = getattr(importlib.import_module(module), name, None)
        params = [] if fn is None else list(inspect.signature(fn).parameters)
        if params[:len(positional)] != list(positional) or not set(keywords) <= set(params):
            package = module.split(".")[0]
            warnings.warn(
                f"{module}.{name} of {package} {_installed_version(package)} does not take the arguments "
                f"slmlab's custom op {op} passes (positional {positional}, keywords {keywords}; found "
                f"{tuple(params) if fn else 'no such function'}). slmlab was tested with fla 0.6.0, "
                f"mamba-ssm 2.3.2 and flash-attn-4 4.0.0b40. Running instead: for attention SDPA, else "
                f"{package}'s public function, which compiled blocks cannot trace into (a graph break around "
                f"every such layer).",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
    return True


def _installed_version(package: str) -> str:
    for distribution in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def resolve_backend(kernel: str, device: torch.device, supported: tuple[str, ...], op: str) -> str:
    """The backend ("torch" or a package name) that runs `op` on inputs living on `device`.

    `supported`: the kernel packages implementing `op`, in the order `auto` tries them.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "torch":
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "auto":
        if not on_cuda:
            return "torch"
        for package in supported:
            if kernel_available(package):
                return package
        if op not in _warned:
            _warned.add(op)
            warnings.warn(
                f"{op}: no kernel package imports ({', '.join(supported)}), running the slow PyTorch "
                f"reference on CUDA. Install the kernels with `{INSTALL_HINT}`.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if kernel not in supported:
        choices = ", ".join(map(repr, ("auto", "torch", *supported)))
        raise ValueError(f"{op} has no {kernel} kernel; choose kernel from {choices}")
    if not kernel_available(kernel):
        raise ImportError(f"kernel={kernel!r} was asked for, but {kernel} does not import; install it: {INSTALL_HINT}")
    if not on_cuda:
        raise ValueError(f"kernel={kernel!r} runs on CUDA tensors only, got {device}; elsewhere use 'auto' or 'torch'")
    return kernel
