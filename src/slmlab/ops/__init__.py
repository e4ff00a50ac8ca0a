"""Sequence-mixing ops of the recurrent mixers: a step-by-step oracle, a chunked PyTorch reference
and a dispatch to the CUDA kernels (fla, mamba-ssm) for each; `backend.py` chooses among them.
`swiglu.py`: SwiGLU's activation with a one-pass Triton backward on CUDA; `causal_conv.py`: Mamba-2's
short causal convolution, with Triton kernels on CUDA; `qk_norm_rope.py`: attention's QK-norm and RoPE
over the fused QKV projection, one Triton pass each way on CUDA."""

from slmlab.ops.backend import KERNELS, kernel_available, resolve_backend
from slmlab.ops.gla import (autocast_dtype, causal_half, compute_dtype, gla, gla_chunked, gla_flops_per_token,
                            gla_recurrent)
from slmlab.ops.ssd import ssd, ssd_chunked, ssd_flops_per_token, ssd_recurrent

__all__ = [
    "KERNELS",
    "autocast_dtype",
    "causal_half",
    "compute_dtype",
    "gla",
    "gla_chunked",
    "gla_flops_per_token",
    "gla_recurrent",
    "kernel_available",
    "resolve_backend",
    "ssd",
    "ssd_chunked",
    "ssd_flops_per_token",
    "ssd_recurrent",
]
