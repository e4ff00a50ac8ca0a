"""The Triton kernels behind `ops/qk_norm_rope.py`, registered as custom ops so that torch.compile
calls them from compiled graphs. Imported only where Triton is installed.

A row is one head of one token: head_dim values, split into the halves RoPE pairs up. The forward reads
a row of the QKV projection's output and writes it normalised and rotated. The backward reads the row
and its gradient, recomputes the row's rms (cheaper than storing it: the row is read anyway), undoes
the rotation and the norm, and writes the input gradient into the QKV gradient; each program sums
the norm weight's gradient over its rows, and the programs' sums are added in a fixed order (no atomics:
deterministic).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# 32 rows (heads of tokens) per program; on an H200 at helios_nova's shape the fastest of the
# 16-128 rows and 2-8 warps tried (query backward 68 us, forward 37 us)
ROWS = 32


@triton.jit
def _rstd(x1, x2, eps, HALF: tl.constexpr):
    # in float32: torch.compile passes eps as a float64 constant, which would promote the whole row
    mean_square = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF)
    return tl.rsqrt((mean_square + eps).to(tl.float32))[:, None]


@triton.jit
def _cos_sin(cs_ptr, token, seq, cs_len, mask, HALF: tl.constexpr):
    angle = cs_ptr + ((token % seq) * HALF)[:, None] + tl.arange(0, HALF)[None, :]
    return tl.load(angle, mask=mask, other=0.0), tl.load(angle + cs_len * HALF, mask=mask, other=0.0)


@triton.jit
def _qk_norm_rope_forward_kernel(x_ptr, w_ptr, cs_ptr, y_ptr, column, n_rows, heads, seq, cs_len, x_token_stride, eps,
                                 NORM: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = (rows < n_rows)[:, None]
    token = rows // heads
    cols = tl.arange(0, HALF)[None, :]
    src = x_ptr + column + (token * x_token_stride + (rows % heads) * 2 * HALF)[:, None] + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        r = _rstd(x1, x2, eps, HALF)
        x1 = x1 * r * tl.load(w_ptr + cols).to(tl.float32)
        x2 = x2 * r * tl.load(w_ptr + HALF + cols).to(tl.float32)
    if ROTATE:
        cos, sin = _cos_sin(cs_ptr, token, seq, cs_len, mask, HALF)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    dst = y_ptr + (rows * 2 * HALF)[:, None] + cols
    tl.store(dst, x1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, x2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_backward_kernel(x_ptr, w_ptr, cs_ptr, dy_ptr, dx_ptr, dw_ptr, column, n_rows, heads, seq, cs_len,
                                  x_token_stride, dy_batch_stride, dy_seq_stride, dy_head_stride, eps,
                                  NORM: tl.constexpr, ROTATE: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask = (rows < n_rows)[:, None]
    token, head = rows // heads, rows % heads
    cols = tl.arange(0, HALF)[None, :]
    row = column + (token * x_token_stride + head * 2 * HALF)[:, None] + cols
    grad = dy_ptr + ((token // seq) * dy_batch_stride + (token % seq) * dy_seq_stride
                     + head * dy_head_stride)[:, None] + cols
    d1 = tl.load(grad, mask=mask, other=0.0).to(tl.float32)
    d2 = tl.load(grad + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:  # rotating back by the same angle is RoPE's transpose
        cos, sin = _cos_sin(cs_ptr, token, seq, cs_len, mask, HALF)
        d1, d2 = d1 * cos + d2 * sin, d2 * cos - d1 * sin
    if NORM:
        x1 = tl.load(x_ptr + row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + row + HALF, mask=mask, other=0.0).to(tl.float32)
        r = _rstd(x1, x2, eps, HALF)
        xn1, xn2 = x1 * r, x2 * r
        partial = dw_ptr + tl.program_id(0) * 2 * HALF + tl.arange(0, HALF)
        tl.store(partial, tl.sum(d1 * xn1, 0))
        tl.store(partial + HALF, tl.sum(d2 * xn2, 0))
        g1 = d1 * tl.load(w_ptr + cols).to(tl.float32)
        g2 = d2 * tl.load(w_ptr + HALF + cols).to(tl.float32)
        mean = ((tl.sum(g1 * xn1, 1) + tl.sum(g2 * xn2, 1)) / (2 * HALF))[:, None]
        d1, d2 = r * (g1 - xn1 * mean), r * (g2 - xn2 * mean)
    tl.store(dx_ptr + row, d1.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + row + HALF, d2.to(dx_ptr.dtype.element_ty), mask=mask)


def _parts(head_dim: int, n_heads: int, n_kv_heads: int, q_weight: Tensor | None, k_weight: Tensor | None) -> list:
    """For q, k and v: (column where its heads start in qkv, number of heads, norm weight, rotated)."""
    return [(0, n_heads, q_weight, True), (n_heads * head_dim, n_kv_heads, k_weight, True),
            ((n_heads + n_kv_heads) * head_dim, n_kv_heads, None, False)]


@triton_op("slmlab::qk_norm_rope_forward", mutates_args=())
def qk_norm_rope_forward(qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos_sin: Tensor,
                         n_heads: int, n_kv_heads: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """`ops/qk_norm_rope.py`'s `qk_norm_rope` forward: q and k normalised and rotated, v copied out.
    Each kernel gets whole tensors and a column offset: slices of them would be copied by torch.compile."""
    qkv, cos_sin = qkv.contiguous(), cos_sin.contiguous()
    batch, seq, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    outs = []
    for column, heads, weight, rotate in _parts(head_dim, n_heads, n_kv_heads, q_weight, k_weight):
        y = qkv.new_empty(batch, seq, heads, head_dim)
        n_rows = batch * seq * heads
        wrap_triton(_qk_norm_rope_forward_kernel)[(triton.cdiv(n_rows, ROWS),)](
            qkv, cos_sin if weight is None else weight, cos_sin, y, column, n_rows, heads, seq, cos_sin.shape[1],
            width, eps, NORM=weight is not None, ROTATE=rotate, HALF=head_dim // 2, ROWS=ROWS, num_warps=4)
        outs.append(y)
    return outs[0], outs[1], outs[2]


@triton_op("slmlab::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(qkv: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, cos_sin: Tensor,
                          dq: Tensor, dk: Tensor, dv: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(the gradient of qkv, of q_weight, of k_weight); the weights' gradients are empty without QK-norm."""
    qkv, cos_sin = qkv.contiguous(), cos_sin.contiguous()
    batch, seq, width = qkv.shape
    n_heads, n_kv_heads, head_dim = dq.shape[2], dk.shape[2], dq.shape[3]
    dqkv = torch.empty_like(qkv)
    dweights = []
    for (column, heads, weight, rotate), dy in zip(_parts(head_dim, n_heads, n_kv_heads, q_weight, k_weight),
                                                   (dq, dk, dv)):
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        n_rows = batch * seq * heads
        programs = triton.cdiv(n_rows, ROWS)
        partials = qkv.new_empty((programs if weight is not None else 0, head_dim), dtype=torch.float32)
        wrap_triton(_qk_norm_rope_backward_kernel)[(programs,)](
            qkv, cos_sin if weight is None else weight, cos_sin, dy, dqkv, partials, column, n_rows, heads, seq,
            cos_sin.shape[1], width, dy.stride(0), dy.stride(1), dy.stride(2), eps,
            NORM=weight is not None, ROTATE=rotate, HALF=head_dim // 2, ROWS=ROWS, num_warps=2)
        dweights.append(partials.sum(0).to(weight.dtype) if weight is not None else partials)
    return dqkv, dweights[0], dweights[1]
