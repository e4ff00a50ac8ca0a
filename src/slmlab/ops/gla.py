"""Gated linear attention (GLA): linear attention whose state decays by a data-dependent gate.

Per head, with a log-decay g_t <= 0 for every key channel (fla's `chunk_gla` convention):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: [d_k, d_v]
    o_t = S_t^T (q_t * scale)                       scale = d_k^-0.5 unless given

A scalar log-decay per head (g of shape [B, T, H]) is the special case "simple GLA", which is also
Mamba-2's SSD (see `ops/ssd.py`).

Layout everywhere: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] or [B, T, H], states [B, H, K, V].

    gla_recurrent   step-by-step recurrence, the oracle
    gla_chunked     chunked PyTorch reference, the CPU training path
    gla             dispatch: fla's kernels on CUDA, else `gla_chunked`
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from slmlab.ops.backend import resolve_backend

# fla's chunk kernels work in blocks of 64 time steps: the chunk length behind `gla_flops_per_token`
KERNEL_CHUNK = 64


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on this device, or None where it is off (or cannot be on: meta)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of recurrent states and of what is summed over the sequence (log-decays): float32
    for half-precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def gla_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One time step at a time: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] or [B, T, H].

    Returns o [B, T, H, V] in v's dtype and, if asked, the final state [B, H, K, V].
    """
    B, T, H, K = q.shape
    out_dtype, dtype = v.dtype, compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    decay = (g if g.dim() == 4 else g.unsqueeze(-1)).exp()  # [B, T, H, K or 1]
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        S = decay[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append((q[:, t, :, :, None] * scale * S).sum(-2))
    return torch.stack(outputs, dim=1).to(out_dtype), S if output_final_state else None


def gla_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form of `gla_recurrent` (same arguments and returns): parallel inside chunks of
    `chunk_size` steps, the state carried from chunk to chunk.

    Inside a chunk, with b = the cumulative log-decay from the chunk start (inclusive),
        o_i = sum_{j<=i} (q_i . (k_j * exp(b_i - b_j))) v_j  +  (q_i * exp(b_i)) S_prev
    Every exponent here is <= 0, so nothing overflows however strong the decay: per key channel
    this costs a [C, C, K] tensor per chunk (hence the small default chunk), with a scalar decay
    per head it factors out of q.k and becomes a [C, C] mask.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = v.dtype, compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    C = min(chunk_size, T)  # short inputs (decoding) need no padding
    n = -(-T // C)
    pad = n * C - T  # padded steps: k = v = 0 and no decay, so they leave the state untouched

    def chunks(t: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, n, C, D]
        t = F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad))
        return t.view(B, n, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v = chunks(q * scale), chunks(k), chunks(v)
    b = chunks(g if g.dim() == 4 else g.unsqueeze(-1)).cumsum(dim=3)  # [B, H, n, C, K or 1]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # pairwise decay exp(b_i - b_j), masked before exp so that j > i never overflows
    decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf")).exp()
    if b.shape[-1] == 1:
        scores = (q @ k.transpose(-1, -2)) * decay.squeeze(-1)
    else:
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)
    o_intra = scores @ v  # [B, H, n, C, V]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    o_inter = []
    for c in range(n):
        b_c = b[:, :, c]  # [B, H, C, K or 1]
        o_inter.append((q[:, :, c] * b_c.exp()) @ S)
        b_end = b_c[:, :, -1:]  # decay over the whole chunk
        S = b_end.transpose(-1, -2).exp() * S + (k[:, :, c] * (b_end - b_c).exp()).transpose(-1, -2) @ v[:, :, c]
    o = o_intra + torch.stack(o_inter, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o.to(out_dtype), S if output_final_state else None


def gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """GLA on the backend `kernel` selects (see `ops/backend.py`); arguments as `gla_recurrent`.

    fla: `chunk_gla` / `chunk_simple_gla` (per-channel / per-head decay), or their fused recurrent
    kernels for inputs of at most 64 steps, as fla's own layers do (decoding, short prompts).
    Final states come back in float32 (float64 for float64 inputs on the reference).
    """
    if resolve_backend(kernel, q.device, ("fla",), "GLA") == "torch":
        return gla_chunked(q, k, v, g, scale, initial_state, output_final_state)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()  # fla keeps states in float32
    short = q.shape[1] <= 64
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if g.dim() == 4:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        return fused_recurrent_gla(q, k, v, gk=g, **kwargs) if short else chunk_gla(q, k, v, g, **kwargs)
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    return (fused_recurrent_simple_gla if short else chunk_simple_gla)(q, k, v, g=g, **kwargs)


def gla_flops_per_token(n_heads: int, key_dim: int, value_dim: int, seq_len: int, chunk: int = KERNEL_CHUNK) -> float:
    """Forward FLOPs per token (2 per multiply-accumulate) of the chunked GLA algorithm, per layer.

    Per head and token: the causal half of a chunk of C = min(chunk, seq_len) steps in q.k and in
    scores @ v (C/2 * (K + V)), plus reading the carried state (q S: K*V) and adding to it (k^T v: K*V).
    The elementwise decay work is not counted, as attention's softmax is not.
    """
    C = min(chunk, seq_len)
    return 2 * n_heads * (C / 2 * (key_dim + value_dim) + 2 * key_dim * value_dim)
