"""Causal attention through FlashAttention 4's CuTe-DSL kernels (package `flash-attn-4`, module
`flash_attn.cute`) on Hopper and newer GPUs.

At helios_nova's shape (batch 16, seq 2048, 16 query and 4 key/value heads of 64) forward+backward took
1.44 ms against 1.63 ms for cuDNN's kernels behind `F.scaled_dot_product_attention` (H100; the forwards
are equal, the backward is faster). FlashAttention 4's Hopper kernels read GQA's shared key/value heads
as they are and take q, k and v in the projections' (batch, seq, heads, head_dim) layout, strided views
included.

    flash_attn_causal   the forward as a custom op: a compiled block calls it as one opaque op each way
                        (FlashAttention's own autograd function would split the block's graph)

The reference is SDPA itself (`mixers/attention.py`): the GPU tests compare the two.
"""

import torch
from torch import Tensor


@torch.library.custom_op("slmlab::flash_attn_causal", mutates_args=())
def flash_attn_causal(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """q: (batch, seq, heads, head_dim), k and v: (batch, seq, kv_heads, head_dim), bf16 or fp16 on CUDA
    -> causal attention's output (batch, seq, heads, head_dim) and the softmax's log-sum-exp per row
    (batch, heads, seq) in float32, which the backward reads."""
    from flash_attn.cute.interface import _flash_attn_fwd

    with torch.cuda.device(q.device):
        out, lse, *_ = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)
    return out, lse


@flash_attn_causal.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("slmlab::flash_attn_causal_backward", mutates_args=())
def flash_attn_causal_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of `flash_attn_causal`, contiguous, in the inputs' dtype."""
    from flash_attn.cute.interface import _flash_attn_bwd

    with torch.cuda.device(q.device):
        dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True)[:3]
    return dq, dk, dv


@flash_attn_causal_backward.register_fake
def _(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs, out, lse)


def _backward(ctx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return flash_attn_causal_backward(dout.contiguous(), q, k, v, out, lse)


flash_attn_causal.register_autograd(_backward, setup_context=_save_for_backward)
