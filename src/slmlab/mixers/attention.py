"""Causal softmax attention: GQA, RoPE, optional QK-norm, `F.scaled_dot_product_attention`."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from slmlab.models.config import ModelConfig
from slmlab.models.layers import RMSNorm, Rotary, concat_linear, fused_linear, linear_flops
from slmlab.ops.backend import HAS_TRITON, custom_op_usable, flash_attention_usable
from slmlab.ops.flash_attention import flash_attn_causal
from slmlab.ops.gla import causal_half
from slmlab.ops.qk_norm_rope import qk_norm_rope


@cache
def compiled_create_block_mask():
    return torch.compile(create_block_mask)  # what its deprecated `_compile=True` did


@cache
def compiled_flex_attention():
    # FlexAttention is only fast compiled; eager runs an unfused reference that materialises scores
    return torch.compile(flex_attention, dynamic=False)


def document_ids(positions: Tensor) -> Tensor:
    """(batch, seq) positions of packed documents -> each token's document, numbered along its row."""
    return (positions == 0).cumsum(1)


def document_mask_mod(positions: Tensor, visible: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """FlexAttention's mask_mod of `Attention.document_attend`: the same document, and `visible` at the
    two tokens' positions in it."""
    doc = document_ids(positions)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & visible(positions[b, q_idx], positions[b, kv_idx])

    return mask_mod


@dataclass
class KVCache:
    """Keys and values of the positions seen so far: (batch, kv_heads, max_len, head_dim).

    `pos` is a Python int, or a 0-dim device tensor for CUDA-graph decoding (`models/decode_graph.py`):
    then every shape is static — keys are written at `pos` on the device and queries attend over the
    whole cache, positions not yet written masked out."""

    k: Tensor
    v: Tensor
    pos: int | Tensor = 0


class Attention(nn.Module):
    """Grouped-query attention; SDPA dispatches to the flash kernel on CUDA and to a CPU kernel otherwise.
    On CUDA, QK-norm and RoPE of a sequence from position 0 run as one Triton pass over the fused QKV
    projection (`ops/qk_norm_rope.py`); the modules are the reference, the CPU path and the decoding path."""

    # whether its CUDA path compiles kernels at the first call (kernel warm-up); the QK-norm/RoPE kernels
    # are small enough to compile in the training process
    compiles_kernels = False
    kernel_op = None  # no op of a kernel package: `model.attention_kernel` chooses causal attention's

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
        self.rotary = Rotary(self.head_dim, cfg.rope_theta, cfg.max_seq_len) if cfg.rope_on(layer_idx) else None
        self.use_kernels = cfg.kernel != "torch"
        self.attention_kernel = cfg.attention_kernel if self.use_kernels else "sdpa"
        half = self.head_dim // 2
        self.one_pass_qk = self.use_kernels and HAS_TRITON and self.rotary is not None and half & (half - 1) == 0

    def forward(self, x: Tensor, state: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With `state`, appends to the cache. positions
        (batch, seq): each token's position in its document, for rows of packed documents (training);
        a token then sees only its own document's."""
        B, T, _ = x.shape
        offset = state.pos if state is not None else 0
        q, k, v = self.heads(x, offset, positions)
        if state is None and positions is None and self.runs_flash_attention(q, k):
            return self.o(flash_attn_causal(q, k, v)[0].view(B, T, self.n_heads * self.head_dim))
        # heads to the front as views: SDPA's flash and cuDNN kernels read (batch, seq, heads, dim) memory
        # as it is, and their gradients come back in it, with no transposing copies
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(offset, Tensor):  # static shapes: write on the device, attend over the whole cache
            slots = offset + torch.arange(T, device=x.device)
            state.k.index_copy_(2, slots, k.to(state.k.dtype))  # float32 caches under autocast
            state.v.index_copy_(2, slots, v.to(state.v.dtype))
            k, v = state.k, state.v
        elif state is not None:
            state.k[:, :, offset : offset + T] = k
            state.v[:, :, offset : offset + T] = v
            k, v = state.k[:, :, : offset + T], state.v[:, :, : offset + T]
        y = self.attend(q, k, v, offset) if positions is None else self.document_attend(q, k, v, positions)
        if state is not None:
            state.pos += T  # after attending: a device position is `offset` itself, advanced in place
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def runs_flash_attention(self, q: Tensor, k: Tensor) -> bool:
        """Whether causal attention over q, k ((batch, seq, heads, head_dim), from position 0) runs
        FlashAttention 4 (`attention_kernel`, `ops/flash_attention.py`); its kernels take bf16 and fp16."""
        return (flash_attention_usable(self.attention_kernel, q.device) and q.dtype in (torch.bfloat16, torch.float16)
                and k.dtype == q.dtype and custom_op_usable("flash_attn_causal"))

    def heads(self, x: Tensor, offset: int | Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x: (batch, seq, d_model) at positions offset.. (or `positions`) -> q, k, v as (batch, seq,
        heads, head_dim), q and k normalised (QK-norm) and rotated (RoPE)."""
        B, T, _ = x.shape
        from_start = isinstance(offset, int) and offset == 0 and positions is None
        if self.one_pass_qk and x.is_cuda and from_start and T <= self.rotary.cos_sin.shape[1]:
            qkv = concat_linear(x, self.q, self.k, self.v)  # the op splits it
            norms = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
            eps = self.q_norm.eps if self.q_norm is not None else 0.0
            return qk_norm_rope(qkv, self.n_heads, self.n_kv_heads, *norms, self.rotary.cos_sin, eps)
        q, k, v = fused_linear(x, self.q, self.k, self.v)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        return q, k, v.view(B, T, self.n_kv_heads, self.head_dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, offset: int | Tensor) -> Tensor:
        """q: (B, H, T, hd) at positions offset..offset+T; k, v: (B, Hkv, L, hd) with keys at positions
        0..L (L = offset + T, or the whole cache) -> (B, H, T, hd)."""
        if isinstance(offset, int) and offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.masked_attend(q, k, v, offset)

    def visible(self, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """Which keys each query sees (broadcast of q_pos against kv_pos): causal."""
        return kv_pos <= q_pos

    def masked_attend(self, q: Tensor, k: Tensor, v: Tensor, offset: int | Tensor) -> Tensor:
        """`attend` with an explicit mask. The G query heads sharing a KV head are stacked along the
        query axis, so GQA needs no copy of the cache (decoding reads it once per step)."""
        B, H, T, hd = q.shape
        kv_heads = k.shape[1]
        groups = H // kv_heads
        q_pos = offset + torch.arange(T, device=q.device)
        mask = self.visible(q_pos[:, None], torch.arange(k.shape[2], device=q.device)[None])  # (T, L)
        y = F.scaled_dot_product_attention(q.reshape(B, kv_heads, groups * T, hd), k, v,
                                           attn_mask=mask.repeat(groups, 1))
        return y.reshape(B, H, T, hd)

    def document_attend(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """`attend` over rows of packed documents: query i sees key j of its own document where `visible`
        at their positions in it. A document starts where its position is 0. On CUDA a FlexAttention
        block mask per batch skips the blocks between documents; elsewhere SDPA with the boolean mask
        is the reference."""
        B, _, T, _ = q.shape
        if q.is_cuda and self.use_kernels:
            mask_mod, gqa = document_mask_mod(positions, self.visible), q.shape[1] != k.shape[1]
            if torch.compiler.is_compiling():  # traced into the compiled block's graph, as sparse attention's
                return flex_attention(q, k, v, block_mask=create_block_mask(mask_mod, B, None, T, T, q.device),
                                      enable_gqa=gqa)
            with torch.compiler.set_stance("default"):
                block_mask = compiled_create_block_mask()(mask_mod, B, None, T, T, device=q.device)
                return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        doc = document_ids(positions)
        mask = (doc[:, :, None] == doc[:, None, :]) & self.visible(positions[:, :, None], positions[:, None, :])
        if q.shape[1] != k.shape[1]:  # SDPA's kernels that take a mask do not take GQA's shared heads
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    def init_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def flops_per_token(self, seq_len: int, positions: Tensor | None = None) -> float | Tensor:
        """Forward FLOPs per token: projections plus QK^T and AV over the causal half of the sequence (of
        each token's document, with `positions`: `ops.gla.causal_half`)."""
        return self.projection_flops() + 2 * 2 * self.n_heads * self.head_dim * causal_half(seq_len, positions)

    def projection_flops(self) -> int:
        return linear_flops(self.q, self.k, self.v, self.o)
