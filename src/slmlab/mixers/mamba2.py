"""Mamba-2 (Dao & Gu 2024, arXiv:2405.21060) as a mixer, in mamba-ssm's `Mamba2` parameter layout.

    z, xBC, dt = in_proj(u)                          d_inner | d_inner + 2 G N | nheads channels
    x, B, C    = silu(causal depthwise conv(xBC))    x: nheads heads of headdim; B, C: G groups of d_state
    dt         = softplus(dt + dt_bias),  A = -exp(A_log)
    y          = SSD(x, dt, A, B, C) + D x           (`ops/ssd.py`)
    out        = out_proj(rmsnorm(y * silu(z)) * norm.weight)   normalised per group of d_inner / G

Parameter names and shapes are mamba-ssm's (`in_proj.weight`, `conv1d.weight`, `conv1d.bias`,
`dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj.weight`), so its state_dicts load 1:1. Every
backend runs this same composition; only the SSD op and the convolution switch implementation.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmlab.models.config import ModelConfig
from slmlab.models.layers import linear_flops
from slmlab.ops import compute_dtype, kernel_available, ssd, ssd_flops_per_token
from slmlab.ops.ssd import SSD_PACKAGES
from slmlab.ops.causal_conv import causal_conv1d_silu, causal_conv1d_silu_reference


@dataclass
class Mamba2State:
    """conv: the last d_conv - 1 inputs of the convolution (batch, conv_dim, d_conv - 1), model dtype;
    ssm: (batch, nheads, headdim, d_state), float32 for half-precision models."""

    conv: Tensor
    ssm: Tensor


class GatedRMSNorm(nn.Module):
    """mamba-ssm's `RMSNormGated(norm_before_gate=False)`: rmsnorm(y * silu(z)) * weight, each group
    of `group_size` channels normalised on its own, computed in float32 (or float64).

    On CUDA with `kernel` auto or mamba_ssm, mamba-ssm's fused Triton kernel (one pass over y and z
    each way, where the PyTorch composition below makes about ten); the composition is its reference.
    """

    def __init__(self, dim: int, group_size: int, eps: float, kernel: str = "auto") -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.use_kernel = kernel in ("auto", "mamba_ssm")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z: (..., dim) -> (..., dim) in y's dtype."""
        # compiled, inductor fuses the composition below into one kernel each way, as mamba-ssm's does
        fused = self.use_kernel and y.is_cuda and y.dtype != torch.float64 and not torch.compiler.is_compiling()
        if fused and kernel_available("mamba_ssm"):
            from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

            return rmsnorm_fn(y, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=False)
        dtype = compute_dtype(y.dtype)
        h = (y.to(dtype) * F.silu(z.to(dtype))).unflatten(-1, (-1, self.group_size))
        h = F.rms_norm(h, (self.group_size,), eps=self.eps).flatten(-2)
        return (h * self.weight.to(dtype)).to(y.dtype)


class Mamba2(nn.Module):
    compiles_kernels = True  # mamba-ssm's (or fla's) Triton kernels
    kernel_op = ("SSD", SSD_PACKAGES)  # the op `model.kernel` chooses an implementation of

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.d_inner = cfg.ssm_expand * cfg.d_model
        if self.d_inner % cfg.ssm_headdim:
            raise ValueError(f"ssm_expand * d_model = {self.d_inner} is not divisible by ssm_headdim={cfg.ssm_headdim}")
        self.headdim, self.nheads = cfg.ssm_headdim, self.d_inner // cfg.ssm_headdim
        self.ngroups, self.d_state, self.d_conv = cfg.ssm_ngroups, cfg.ssm_d_state, cfg.ssm_d_conv
        if self.nheads % self.ngroups:
            raise ValueError(f"{self.nheads} SSM heads do not split into ssm_ngroups={self.ngroups} groups")
        self.kernel = cfg.kernel
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        # depthwise; the causal padding is done in `_conv`, from the decoding state when there is one
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=True)
        # initial steps dt log-uniform in [dt_min, dt_max], stored through softplus' inverse
        dt = torch.exp(torch.rand(self.nheads) * math.log(cfg.ssm_dt_max / cfg.ssm_dt_min) + math.log(cfg.ssm_dt_min))
        dt = dt.clamp(min=1e-4)  # mamba-ssm's dt_init_floor
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # decay rates A = -exp(A_log) uniform in [-16, -1] per head
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, cfg.norm_eps, cfg.kernel)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, u: Tensor, state: Mamba2State | None = None, positions: Tensor | None = None) -> Tensor:
        """u: (batch, seq, d_model) -> (batch, seq, d_model). With `state`, continues it and updates it in
        place. positions (batch, seq): as `Attention`'s; convolution and state stop where a document starts."""
        batch, T, _ = u.shape
        starts = None if positions is None else positions == 0
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        BC = self.ngroups * self.d_state
        x, B, C = self._conv(xBC, state, starts).split([self.d_inner, BC, BC], dim=-1)
        x = x.view(batch, T, self.nheads, self.headdim)
        B, C = B.view(batch, T, self.ngroups, self.d_state), C.view(batch, T, self.ngroups, self.d_state)
        dtype = compute_dtype(u.dtype)  # the step and decay are summed over the sequence
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        A = -torch.exp(self.A_log.to(dtype))
        y, S = ssd(x, dt, A, B, C, D=self.D, initial_state=None if state is None else state.ssm,
                   output_final_state=state is not None, kernel=self.kernel, starts=starts)
        if state is not None:
            state.ssm.copy_(S)
        return self.out_proj(self.norm(y.reshape(batch, T, self.d_inner), z))

    def _conv(self, xBC: Tensor, state: Mamba2State | None, starts: Tensor | None = None) -> Tensor:
        """silu(causal depthwise conv): (batch, seq, conv_dim) -> same; continues and updates `state.conv`."""
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        if starts is not None:  # packed documents: the reference's masked taps on every device
            return causal_conv1d_silu_reference(xBC, weight, bias, starts=starts)
        if state is None:  # the kernel on CUDA, unless the reference is asked for
            conv = causal_conv1d_silu_reference if self.kernel == "torch" else causal_conv1d_silu
            return conv(xBC, weight, bias)
        out = causal_conv1d_silu_reference(xBC, weight, bias, history=state.conv)
        # the last d_conv - 1 inputs, from the history where x is shorter than that
        recent = torch.cat([state.conv.to(xBC.dtype), xBC[:, -(self.d_conv - 1) :].transpose(1, 2)], dim=-1)
        state.conv.copy_(recent[..., -(self.d_conv - 1) :])
        return out

    def init_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        """Zero states; their size does not depend on `max_len`."""
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm_shape = (batch_size, self.nheads, self.headdim, self.d_state)
        return Mamba2State(conv, torch.zeros(ssm_shape, device=device, dtype=compute_dtype(dtype)))

    def flops_per_token(self, seq_len: int, positions: Tensor | None = None) -> float | Tensor:
        """Forward FLOPs per token: in_proj and out_proj, the depthwise conv (d_conv MACs per channel)
        and chunked SSD (`ops.ssd.ssd_flops_per_token`)."""
        proj = linear_flops(self.in_proj, self.out_proj)
        conv = 2 * self.conv_dim * self.d_conv  # depthwise: d_conv multiply-accumulates per channel
        return proj + conv + ssd_flops_per_token(self.nheads, self.ngroups, self.headdim, self.d_state, seq_len,
                                                 positions=positions)
