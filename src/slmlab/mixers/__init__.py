"""Sequence mixers: each maps (batch, seq, d_model) -> (batch, seq, d_model) behind one contract.

    mixer = MIXERS[name](cfg: ModelConfig, layer_idx: int)
    y = mixer(x, state=None, positions=None)  # training / prefill; with a state, decoding continues it;
                                              # positions: packed documents, each modelled alone
    state = mixer.init_state(batch_size, max_len, device, dtype)
    mixer.flops_per_token(seq_len, positions=None)  # forward FLOPs per token, for an honest MFU
    MIXERS[name].compiles_kernels             # whether its CUDA path compiles kernels at the first call
    MIXERS[name].kernel_op                    # (op, kernel packages implementing it) that model.kernel picks from
"""

import warnings
from collections.abc import Callable

import torch

from slmlab.mixers.attention import Attention
from slmlab.mixers.gla import GLA
from slmlab.mixers.hgrn2 import HGRN2
from slmlab.mixers.mamba2 import Mamba2
from slmlab.mixers.sparse_attention import SparseAttention
from slmlab.models.config import ModelConfig
from slmlab.ops.backend import flash_attention_usable, fused_mlp_usable, resolve_backend

MIXERS = {"attention": Attention, "sparse_attention": SparseAttention, "gla": GLA, "hgrn2": HGRN2, "mamba2": Mamba2}


def mixer_class(name: str) -> type:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {sorted(MIXERS)}")
    return MIXERS[name]


def check_kernel_settings(cfg: ModelConfig, device: torch.device) -> None:
    """Before the first step: an error naming the model.* key whose kernel cannot run on `device` (the
    layers would raise it at their first forward), a warning for a setting no layer reads."""
    kinds = {mixer_class(name) for name in cfg.layer_mixers}
    ops = {kind.kernel_op for kind in kinds if kind.kernel_op}
    if cfg.kernel == "torch":
        for key, value, default in (("attention_kernel", cfg.attention_kernel, "auto"),
                                    ("mlp_kernel", cfg.mlp_kernel, "torch")):
            if value != default:
                warnings.warn(f"model.{key}={value} is not used: model.kernel=torch runs every layer's PyTorch path",
                              stacklevel=2)
        return
    if cfg.kernel != "auto" and not ops:
        warnings.warn(f"model.kernel={cfg.kernel} is not used: no layer of this model runs a kernel package's op "
                      f"(mixers: {', '.join(sorted(set(cfg.layer_mixers)))})", stacklevel=2)
    for op, packages in sorted(ops):
        _named("kernel", cfg.kernel, lambda: resolve_backend(cfg.kernel, device, packages, op))
    if Attention in kinds:
        _named("attention_kernel", cfg.attention_kernel, lambda: flash_attention_usable(cfg.attention_kernel, device))
    _named("mlp_kernel", cfg.mlp_kernel, lambda: fused_mlp_usable(cfg.mlp_kernel, device))


def _named(key: str, value: str, check: Callable[[], object]) -> None:
    try:
        check()
    except (ValueError, ImportError) as e:
        raise type(e)(f"model.{key}={value}: {e}") from None
