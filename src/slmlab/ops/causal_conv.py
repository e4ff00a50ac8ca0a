"""Mamba-2's short convolution: silu(causal depthwise conv1d(x) + bias) over (batch, seq, channels).

Run as `F.conv1d` on a copy of the input transposed to (batch, channels, seq) and zero-padded in
front, it took 2.8 of helix_hybrid's 7 ms per Mamba-2 layer forward+backward on an H200 (the copies,
cuDNN's depthwise kernels and the weight gradient). The CUDA path here reads the input where the
in-projection wrote it, in Triton kernels (`ops/causal_conv_triton.py`: one forward, two backward);
mamba-ssm's own layer uses the `causal_conv1d` CUDA extension for this, which is used instead where
it is installed.

    causal_conv1d_silu_reference   F.conv1d, optionally continuing from earlier inputs (decoding):
                                   the oracle the kernel is tested against, and the CPU path
    causal_conv1d_silu             the op: the extension or the Triton kernel on CUDA, else the reference
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from slmlab.ops.backend import HAS_TRITON, kernel_available


def causal_conv1d_silu_reference(x: Tensor, weight: Tensor, bias: Tensor, history: Tensor | None = None,
                                 starts: Tensor | None = None) -> Tensor:
    """x: (batch, seq, channels); weight: (channels, width); bias: (channels,); history: the width - 1
    inputs before x, (batch, channels, width - 1), zeros when None -> (batch, seq, channels): output t
    sees inputs t - width + 1 .. t. starts (batch, seq), True at each packed document's first step:
    output t then sees only the inputs of its own document (the history is the first one's)."""
    batch, T, channels = x.shape
    width = weight.shape[-1]
    xt = x.transpose(1, 2)
    if history is None:
        history = xt.new_zeros(batch, channels, width - 1)
    xt = torch.cat([history.to(xt.dtype), xt], dim=-1)
    if starts is None:
        return F.silu(F.conv1d(xt, weight.unsqueeze(1), bias, groups=channels)).transpose(1, 2)
    doc = F.pad(starts.long().cumsum(1), (width - 1, 0))[:, None]  # (batch, 1, width - 1 + seq)
    out = bias[:, None].to(xt.dtype)
    for tap in range(width):  # tap `width - 1` reads step t itself
        same = doc[..., tap : tap + T] == doc[..., width - 1 :]
        out = out + weight[:, tap, None] * xt[..., tap : tap + T] * same
    return F.silu(out).transpose(1, 2)


class _CausalConv1dSilu(torch.autograd.Function):
    """The Triton forward and backward (CUDA tensors, Triton installed)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        from slmlab.ops.causal_conv_triton import causal_conv1d_silu_forward  # imports Triton

        ctx.save_for_backward(x, weight, bias)
        return causal_conv1d_silu_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from slmlab.ops.causal_conv_triton import causal_conv1d_silu_backward

        return causal_conv1d_silu_backward(*ctx.saved_tensors, grad)


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`causal_conv1d_silu_reference` from zero history, differentiable: on CUDA through the
    `causal_conv1d` extension if installed, else the Triton kernels; elsewhere the reference."""
    if x.is_cuda and kernel_available("causal_conv1d"):
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)
    if x.is_cuda and HAS_TRITON:
        return _CausalConv1dSilu.apply(x, weight, bias)
    return causal_conv1d_silu_reference(x, weight, bias)
