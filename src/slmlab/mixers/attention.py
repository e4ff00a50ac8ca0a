"""Causal softmax attention: GQA, RoPE, optional QK-norm, `F.scaled_dot_product_attention`."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmlab.models.config import ModelConfig
from slmlab.models.layers import RMSNorm, Rotary


@dataclass
class KVCache:
    """Keys and values of the positions seen so far: (batch, kv_heads, max_len, head_dim)."""

    k: Tensor
    v: Tensor
    pos: int = 0


class Attention(nn.Module):
    """Grouped-query attention; SDPA dispatches to the flash kernel on CUDA and to a CPU kernel otherwise."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        # QK-norm: one RMSNorm over head_dim shared by all heads (Qwen3 / Helios Nova)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(self.head_dim, cfg.rope_theta) if cfg.rope_on(layer_idx) else None

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With `state`, appends to the cache."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = state.pos if state is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if state is not None:
            state.k[:, :, offset : offset + T] = k
            state.v[:, :, offset : offset + T] = v
            state.pos += T
            k, v = state.k[:, :, : offset + T], state.v[:, :, : offset + T]
        y = self.attend(q, k, v, offset)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
        """q: (B, H, T, hd) at positions offset..offset+T; k, v: (B, Hkv, offset+T, hd) -> (B, H, T, hd)."""
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # queries at offset..offset+T see every cached key up to their own position
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=offset)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def init_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: projections plus QK^T and AV over the causal half of the sequence."""
        proj = 2 * sum(m.weight.numel() for m in (self.q, self.k, self.v, self.o))
        return proj + 2 * 2 * self.n_heads * self.head_dim * seq_len / 2
