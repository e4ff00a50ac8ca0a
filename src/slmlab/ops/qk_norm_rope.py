"""Attention's query/key preparation in one pass: split the fused QKV projection's output, RMS-normalise
each query and key head (QK-norm, optional) and rotate it by its position (RoPE, half-split layout).

Compiled by inductor from the modules (`RMSNorm`, `Rotary`), the backward of this took seven kernels
per layer for helios_nova on an H200 (0.28 ms): RoPE's gradient went out to memory in float32, QK-norm
read it twice (once for its row sums, once for the input gradient), and the three gradients were then
copied into the QKV gradient. The Triton kernels here (`ops/qk_norm_rope_triton.py`) read each input
once and write q, k, v forward, and the QKV gradient backward, with nothing in between.

    qk_norm_rope_reference   one head tensor in PyTorch, RoPE as a complex rotation: the oracle the
                             kernels are tested against (the modules stay the CPU and decoding path)
    qk_norm_rope             the op on CUDA tensors (needs Triton): qkv -> q, k, v
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from slmlab.ops.gla import compute_dtype


def qk_norm_rope_reference(x: Tensor, weight: Tensor | None, cos_sin: Tensor, eps: float) -> Tensor:
    """x: (batch, seq, heads, head_dim); weight: (head_dim,) or None (RoPE only); cos_sin: (2, >= seq,
    head_dim / 2), cos and sin of each position's angles -> x normalised, then each (x_i, x_{i+d/2})
    pair rotated by its angle, in float32 at least."""
    dtype = compute_dtype(x.dtype)
    y = x.to(dtype)
    if weight is not None:
        y = F.rms_norm(y, (y.shape[-1],), weight.to(dtype), eps)
    first, second = y.chunk(2, dim=-1)
    cos, sin = cos_sin[:, : x.shape[1], None].to(dtype)  # broadcast over batch and heads
    rotated = torch.complex(first, second) * torch.complex(cos, sin)
    return torch.cat((rotated.real, rotated.imag), dim=-1).to(x.dtype)


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos_sin: Tensor, n_heads: int,
                n_kv_heads: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        from slmlab.ops.qk_norm_rope_triton import qk_norm_rope_forward  # imports Triton

        ctx.save_for_backward(qkv, q_weight, k_weight, cos_sin)
        ctx.eps = eps
        return qk_norm_rope_forward(qkv, q_weight, k_weight, cos_sin, n_heads, n_kv_heads, eps)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        from slmlab.ops.qk_norm_rope_triton import qk_norm_rope_backward

        qkv, q_weight, k_weight, cos_sin = ctx.saved_tensors
        dqkv, dq_weight, dk_weight = qk_norm_rope_backward(qkv, q_weight, k_weight, cos_sin, dq, dk, dv, ctx.eps)
        norm = q_weight is not None
        return dqkv, dq_weight if norm else None, dk_weight if norm else None, None, None, None, None


def qk_norm_rope(qkv: Tensor, n_heads: int, n_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None,
                 cos_sin: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """qkv: (batch, seq, (n_heads + 2 n_kv_heads) * head_dim), the fused projection's output on CUDA;
    q_weight, k_weight: the QK-norm scales, both None for RoPE only; cos_sin: (2, >= seq, head_dim / 2)
    -> q (batch, seq, n_heads, head_dim), k and v (batch, seq, n_kv_heads, head_dim), each contiguous,
    q and k as `qk_norm_rope_reference` gives them. head_dim / 2 must be a power of two."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope: give both QK-norm weights or neither")
    return _QKNormRope.apply(qkv, q_weight, k_weight, cos_sin, n_heads, n_kv_heads, eps)
