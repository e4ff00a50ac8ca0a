"""Building blocks shared by the backbone and the mixers: RMSNorm, SwiGLU, rotary embeddings."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for stability under bf16.

    zero_centred: the parameter is stored as an offset from 1 (scale = 1 + weight, initialised to 0),
    so weight decay or a zero init pulls the scale towards 1 rather than 0 (OdinNext's ZC-RMSNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centred: bool = False) -> None:
        super().__init__()
        self.eps, self.zero_centred = eps, zero_centred
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.float() + 1 if self.zero_centred else self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Rotary(nn.Module):
    """Rotary position embedding (half-split layout, as in Llama/Qwen/HF `rotate_half`).

    cos/sin are computed per call from the positions, in float32: no max-length table to outgrow,
    and cached decoding only needs the offset.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x: (batch, heads, seq, head_dim) -> same shape, rotated by position offset..offset+seq
        (offset: an int, or a 0-dim device tensor for CUDA-graph decoding)."""
        pos = offset + torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
