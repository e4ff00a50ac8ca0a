"""The Triton kernel behind `ops/swiglu.py`'s CUDA backward, registered as a custom op so that
torch.compile calls it from compiled backward graphs. Imported only where Triton is installed."""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

BLOCK = 1024


@triton.jit
def _silu_mul_backward_kernel(gu_ptr, grad_ptr, dgu_ptr, hidden, BLOCK: tl.constexpr):
    # one row of `hidden` columns per program along axis 0, BLOCK columns of it along axis 1
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    gu_row = gu_ptr + row * 2 * hidden
    gate = tl.load(gu_row + cols, mask=mask).to(tl.float32)
    up = tl.load(gu_row + hidden + cols, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + row * hidden + cols, mask=mask).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = grad * up * sig * (1 + gate * (1 - sig))
    d_up = grad * gate * sig
    dgu_row = dgu_ptr + row * 2 * hidden
    tl.store(dgu_row + cols, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_row + hidden + cols, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton_op("slmlab::silu_mul_backward", mutates_args=())
def silu_mul_backward(gu: Tensor, grad: Tensor) -> Tensor:
    """`silu_mul_backward_reference` (ops/swiglu.py) in one pass over the inputs."""
    gu, grad = gu.contiguous(), grad.contiguous()
    hidden = grad.shape[-1]
    dgu = torch.empty_like(gu)
    grid = (grad.numel() // hidden, triton.cdiv(hidden, BLOCK))
    wrap_triton(_silu_mul_backward_kernel)[grid](gu, grad, dgu, hidden, BLOCK=BLOCK, num_warps=4)
    return dgu
