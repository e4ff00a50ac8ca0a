"""The Triton kernels behind `ops/causal_conv.py`'s CUDA path. Imported only where Triton is installed.

Each program owns a tile of BT positions x BC channels of one sequence and reads the width shifted
input tiles it needs straight from the input's own strides (neighbouring programs' reads hit the
cache), so nothing is transposed, padded or copied. The backward recomputes the pre-activation
instead of saving it and writes its gradient once, in float32, for a second kernel to gather the
input gradient from: recomputing it at all K shifted positions in one kernel took 1.0 ms on an H200
against 0.63 ms for the two, at helix_hybrid's shape. The weight and bias gradients are summed per
tile, then over tiles in a fixed order (deterministic, no atomics). BT, BC and WARPS: the fastest of
six tile shapes tried there."""

import torch
import triton
import triton.language as tl
from torch import Tensor

BT, BC, WARPS = 32, 128, 4


@triton.jit
def _preactivation(x_ptr, w_ptr, bias, t, c, c_mask, T, sxt, K: tl.constexpr):
    """conv(x)[t] + bias for the positions t (BT,) and channels c (BC,) of one sequence, in float32."""
    acc = tl.zeros((t.shape[0], c.shape[0]), tl.float32) + bias[None, :]
    for i in tl.static_range(K):
        ti = t - (K - 1) + i
        mask = ((ti >= 0) & (ti < T))[:, None] & c_mask[None, :]
        xi = tl.load(x_ptr + ti[:, None] * sxt + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += xi * tl.load(w_ptr + c * K + i, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _causal_conv_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, T, C, sxb, sxt, syb, syt,
                                K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)  # positions x strides can pass 2**31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_mask = c < C
    bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    a = _preactivation(x_ptr + batch * sxb, w_ptr, bias, t, c, c_mask, T, sxt, K)
    y = a * tl.sigmoid(a)
    mask = (t < T)[:, None] & c_mask[None, :]
    tl.store(y_ptr + batch * syb + t[:, None] * syt + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _causal_conv_preactivation_grad_kernel(x_ptr, w_ptr, b_ptr, g_ptr, da_ptr, dwb_ptr, T, C, sxb, sxt, sgb,
                                           sgt, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """da = grad * silu'(a), the pre-activation recomputed; this tile's sums for the weight and bias
    gradients into its row of dwb."""
    batch = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)  # positions x strides can pass 2**31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_mask = c < C
    x_ptr += batch * sxb
    bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    a = _preactivation(x_ptr, w_ptr, bias, t, c, c_mask, T, sxt, K)
    mask = (t < T)[:, None] & c_mask[None, :]
    g = tl.load(g_ptr + batch * sgb + t[:, None] * sgt + c[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = g * s * (1 + a * (1 - s))
    tl.store(da_ptr + (batch * T + t[:, None]) * C + c[None, :], da, mask=mask)
    row = dwb_ptr + (batch * tl.num_programs(0) + tl.program_id(0)) * (K + 1) * C
    for i in tl.static_range(K):
        ti = t - (K - 1) + i
        xmask = ((ti >= 0) & (ti < T))[:, None] & c_mask[None, :]
        xi = tl.load(x_ptr + ti[:, None] * sxt + c[None, :], mask=xmask, other=0.0).to(tl.float32)
        tl.store(row + i * C + c, tl.sum(da * xi, axis=0), mask=c_mask)
    tl.store(row + K * C + c, tl.sum(da, axis=0), mask=c_mask)


@triton.jit
def _causal_conv_input_grad_kernel(da_ptr, w_ptr, dx_ptr, T, C, sdb, sdt,
                                   K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dx[t] = sum_j w[K-1-j] * da[t+j]: each input reaches the K outputs after it."""
    batch = tl.program_id(2).to(tl.int64)
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)  # positions x strides can pass 2**31
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_mask = c < C
    dx = tl.zeros((BT, BC), tl.float32)
    for j in tl.static_range(K):
        p = t + j
        mask = (p < T)[:, None] & c_mask[None, :]
        da = tl.load(da_ptr + (batch * T + p[:, None]) * C + c[None, :], mask=mask, other=0.0)
        dx += da * tl.load(w_ptr + c * K + (K - 1 - j), mask=c_mask, other=0.0).to(tl.float32)[None, :]
    mask = (t < T)[:, None] & c_mask[None, :]
    tl.store(dx_ptr + batch * sdb + t[:, None] * sdt + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(x: Tensor) -> tuple[int, int, int]:
    batch, T, C = x.shape
    return triton.cdiv(T, BT), triton.cdiv(C, BC), batch


def _unit_channel_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def causal_conv1d_silu_forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x: (batch, seq, channels) with any batch and seq strides; weight: (channels, width); bias:
    (channels,) -> silu(causal conv + bias), (batch, seq, channels) contiguous, in x's dtype."""
    x, weight = _unit_channel_stride(x), weight.contiguous()
    batch, T, C = x.shape
    y = torch.empty(batch, T, C, device=x.device, dtype=x.dtype)
    _causal_conv_forward_kernel[_grid(x)](x, weight, bias, y, T, C, x.stride(0), x.stride(1), y.stride(0),
                                          y.stride(1), K=weight.shape[-1], BT=BT, BC=BC, num_warps=WARPS)
    return y


def causal_conv1d_silu_backward(x: Tensor, weight: Tensor, bias: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of <grad, causal_conv1d_silu_forward(x, weight, bias)> for x, weight and bias."""
    x, grad, weight = _unit_channel_stride(x), _unit_channel_stride(grad), weight.contiguous()
    batch, T, C = x.shape
    K = weight.shape[-1]
    grid = _grid(x)
    da = torch.empty(batch, T, C, device=x.device, dtype=torch.float32)
    # per tile of positions: K weight-gradient rows and the bias gradient, float32
    dwb = torch.empty(batch * grid[0], K + 1, C, device=x.device, dtype=torch.float32)
    _causal_conv_preactivation_grad_kernel[grid](x, weight, bias, grad, da, dwb, T, C, x.stride(0), x.stride(1),
                                                 grad.stride(0), grad.stride(1), K=K, BT=BT, BC=BC, num_warps=WARPS)
    dx = torch.empty(batch, T, C, device=x.device, dtype=x.dtype)
    _causal_conv_input_grad_kernel[grid](da, weight, dx, T, C, dx.stride(0), dx.stride(1), K=K, BT=BT, BC=BC,
                                         num_warps=WARPS)
    dwb = dwb.sum(0)
    return dx, dwb[:K].t().to(weight.dtype), dwb[K].to(bias.dtype)
