"""Helix v2's sparse attention: a causal sliding window plus global tokens.

Query i sees key j when j <= i and (i - j < sliding_window or j < global_tokens): local context
plus the first `global_tokens` positions as attention sinks. Everything else (projections, RoPE,
GQA, KV cache) is `Attention`'s.

On CUDA the mask is a FlexAttention block mask, so blocks outside the window are never computed;
elsewhere, and with `kernel: torch`, SDPA with the same boolean mask (`Attention.masked_attend`) is
the reference. Both paths compute the same function (tested).
"""

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from slmlab.mixers.attention import Attention, compiled_create_block_mask, compiled_flex_attention
from slmlab.models.config import ModelConfig


def visible(q_pos: Tensor, kv_pos: Tensor, window: int, global_tokens: int) -> Tensor:
    """Boolean mask (broadcast of q_pos against kv_pos): which keys each query attends to."""
    return (kv_pos <= q_pos) & ((q_pos - kv_pos < window) | (kv_pos < global_tokens))


def sparse_mask_mod(window: int, global_tokens: int, offset: int) -> Callable:
    """FlexAttention's mask_mod of `visible` for queries starting at position `offset`."""
    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx + offset, kv_idx, window, global_tokens)

    return mask_mod


@cache
def sparse_block_mask(window: int, global_tokens: int, offset: int, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    # compiled, the mask is evaluated block by block; eagerly it materialises [q_len, kv_len] int64
    # intermediates (8 GiB at 32k tokens)
    return compiled_create_block_mask()(sparse_mask_mod(window, global_tokens, offset), B=None, H=None,
                                         Q_LEN=q_len, KV_LEN=kv_len, device=device)


class SparseAttention(Attention):
    compiles_kernels = True  # FlexAttention, compiled by inductor

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.window, self.global_tokens = cfg.sliding_window, cfg.global_tokens
        self.attention_kernel = "sdpa"  # not plain causal: its mask runs through FlexAttention (`attend`)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, offset: int | Tensor) -> Tensor:
        q_len, kv_len = q.shape[2], k.shape[2]
        if q.is_cuda and self.use_kernels and q_len > 1 and isinstance(offset, int):
            gqa = self.n_heads != self.n_kv_heads
            if torch.compiler.is_compiling():
                # inside a compiled block: traced into its graph, where calling the separately compiled
                # functions below broke it; inductor fuses the mask's construction
                mask_mod = sparse_mask_mod(self.window, self.global_tokens, offset)
                block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=q.device)
                return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
            # compiled even where decoding runs compiled blocks eagerly (`models/generate.py: eager_blocks`)
            with torch.compiler.set_stance("default"):
                block_mask = sparse_block_mask(self.window, self.global_tokens, offset, q_len, kv_len, q.device)
                return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        return self.masked_attend(q, k, v, offset)  # the reference; decoding; CUDA-graph (tensor) positions

    def visible(self, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        return visible(q_pos, kv_pos, self.window, self.global_tokens)

    def flops_per_token(self, seq_len: int, positions: Tensor | None = None) -> float | Tensor:
        """Projections plus QK^T and AV over the keys each position actually sees, averaged over the sequence
        (over the tokens of packed documents, with `positions`: a tensor on their device)."""
        if positions is None:
            pos = torch.arange(seq_len, dtype=torch.float64, device="cpu")  # a count, whatever the default device
        else:
            pos = positions.double()
        local = torch.clamp(pos + 1, max=self.window)
        sinks = torch.clamp(pos + 1 - self.window, min=0).clamp(max=self.global_tokens)
        keys = (local + sinks).mean()
        keys = keys if positions is not None else float(keys)
        return self.projection_flops() + 2 * 2 * self.n_heads * self.head_dim * keys
