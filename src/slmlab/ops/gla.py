"""Gated linear attention (GLA): linear attention whose state decays by a data-dependent gate.

Per head, with a log-decay g_t <= 0 for every key channel (fla's `chunk_gla` convention):

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S: [d_k, d_v]
    o_t = S_t^T (q_t * scale)                       scale = d_k^-0.5 unless given

A scalar log-decay per head (g of shape [B, T, H]) is the special case "simple GLA", which is also
Mamba-2's SSD (see `ops/ssd.py`).

Layout everywhere: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] or [B, T, H], states [B, H, K, V].
Packed rows of several documents pass `starts` [B, T] (bool, True at each document's first step): the
state is cleared before such a step, so no document sees another (S_{t-1} is dropped at a start).

    gla_recurrent   step-by-step recurrence, the oracle
    gla_chunked     chunked PyTorch reference, the CPU training path
    gla             dispatch: fla's kernels on CUDA, else `gla_chunked`
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from slmlab.ops.backend import custom_op_usable, resolve_backend

# fla's chunk kernels work in blocks of 64 time steps: the chunk length behind `gla_flops_per_token`
KERNEL_CHUNK = 64
GLA_PACKAGES = ("fla",)  # the kernel packages that implement `gla`, in the order kernel=auto tries them


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
    starts: Tensor | None = None,
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
    if starts is not None:  # a start keeps none of the state before it
        decay = decay.masked_fill(starts[:, :, None, None], 0.0)
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
    starts: Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form of `gla_recurrent` (same arguments and returns): parallel inside chunks of
    `chunk_size` steps, the state carried from chunk to chunk.

    Inside a chunk, with b = the cumulative log-decay from the chunk start (inclusive),
        o_i = sum_{j<=i} (q_i . (k_j * exp(b_i - b_j))) v_j  +  (q_i * exp(b_i)) S_prev
    Every exponent here is <= 0, so nothing overflows however strong the decay: per key channel
    this costs a [C, C, K] tensor per chunk (hence the small default chunk), with a scalar decay
    per head it factors out of q.k and becomes a [C, C] mask. With `starts`, a pair (i, j) counts
    only inside one document, and S_prev only for the steps of the document it ends in.
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
    doc = None  # with starts: each step's document, [B, 1, n, C]; 0 is the one the initial state belongs to
    if starts is not None:
        doc = starts.long().cumsum(1)
        doc = torch.cat([doc, doc[:, -1:].expand(B, pad)], dim=1).view(B, 1, n, C)  # padding: the last one's
    # pairwise decay exp(b_i - b_j), masked before exp so that j > i never overflows
    decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf")).exp()
    if b.shape[-1] == 1:
        scores = (q @ k.transpose(-1, -2)) * decay.squeeze(-1)
    else:
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)
    if doc is not None:
        scores = scores * (doc.unsqueeze(-1) == doc.unsqueeze(-2))
    o_intra = scores @ v  # [B, H, n, C, V]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    o_inter = []
    doc_before = None if doc is None else doc.new_zeros(B, 1, 1)  # the document S belongs to
    for c in range(n):
        b_c, k_c = b[:, :, c], k[:, :, c]  # [B, H, C, K or 1], [B, H, C, K]
        b_end = b_c[:, :, -1:]  # decay over the whole chunk
        o_c = (q[:, :, c] * b_c.exp()) @ S
        S = b_end.transpose(-1, -2).exp() * S
        if doc is not None:  # S reaches its own document's steps; only the chunk's last document carries on
            d = doc[:, :, c]  # [B, 1, C]
            o_c = o_c * (d == doc_before).unsqueeze(-1)
            S = S * (d[..., -1:] == doc_before).unsqueeze(-1)
            k_c = k_c * (d == d[..., -1:]).unsqueeze(-1)
            doc_before = d[..., -1:]
        o_inter.append(o_c)
        S = S + (k_c * (b_end - b_c).exp()).transpose(-1, -2) @ v[:, :, c]
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
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """GLA on the backend `kernel` selects (see `ops/backend.py`); arguments as `gla_recurrent`.

    fla: `chunk_gla` / `chunk_simple_gla` (per-channel / per-head decay), or their fused recurrent
    kernels for inputs of at most 64 steps, as fla's own layers do (decoding, short prompts). Without
    states (training), per-channel decay runs as the custom op `fla_chunk_gla`, which torch.compile
    keeps inside a block's graph (where the installed fla still takes its arguments, `custom_op_usable`).
    With `starts` (packed documents, training only), fla runs its variable-length kernels on the batch
    flattened into one row of sequences (`cu_seqlens`).
    Final states come back in float32 (float64 for float64 inputs on the reference).
    """
    if resolve_backend(kernel, q.device, GLA_PACKAGES, "GLA") == "torch":
        return gla_chunked(q, k, v, g, scale, initial_state, output_final_state, starts)
    if starts is not None:
        if initial_state is not None or output_final_state:
            raise ValueError("GLA over packed documents (starts) takes no initial state and returns no final state")
        return fla_gla_varlen(q, k, v, g, scale, starts), None
    short = q.shape[1] <= 64
    training = initial_state is None and not output_final_state
    if g.dim() == 4 and not short and training and custom_op_usable("fla_chunk_gla"):
        o, _, _ = fla_chunk_gla(q, k, v, g.float(), q.shape[-1] ** -0.5 if scale is None else scale)
        return o, None
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()  # fla keeps states in float32
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if g.dim() == 4:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        return fused_recurrent_gla(q, k, v, gk=g, **kwargs) if short else chunk_gla(q, k, v, g, **kwargs)
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    return (fused_recurrent_simple_gla if short else chunk_simple_gla)(q, k, v, g=g, **kwargs)


def fla_gla_varlen(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None, starts: Tensor) -> Tensor:
    """fla's chunked GLA over the documents of packed rows: the batch as one row of sequences whose
    boundaries (`cu_seqlens`) are the rows' and the documents' starts. Not a custom op: the boundaries'
    count depends on the data, and fla reads them on the host."""
    B, T = starts.shape
    bounds = starts.clone()
    bounds[:, 0] = True
    cu_seqlens = F.pad(bounds.flatten().nonzero().flatten(), (0, 1), value=B * T)
    q, k, v, g = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, g.float()))
    if g.dim() == 4:
        from fla.ops.gla import chunk_gla

        o, _ = chunk_gla(q, k, v, g, scale=scale, cu_seqlens=cu_seqlens)
    else:
        from fla.ops.simple_gla import chunk_simple_gla

        o, _ = chunk_simple_gla(q, k, v, g=g, scale=scale, cu_seqlens=cu_seqlens)
    return o.view(B, T, *o.shape[2:])


# fla's chunked GLA as custom ops: a compiled block calls them as one opaque op each way. fla marks its
# `chunk_gla` as not to be compiled, which broke the graph around every GLA and HGRN2 layer; the host
# work of the broken-up graphs left the GPU idle for a fifth of a compiled helix_hybrid step.
@torch.library.custom_op("slmlab::fla_chunk_gla", mutates_args=())
def fla_chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """fla's `chunk_gla` forward from a zero state (g float32): o [B, T, H, V] in v's dtype and, for the
    backward, g's chunk-local cumulative sum and the intra-chunk scores, as `ChunkGLAFunction` keeps them."""
    from fla.ops.gla.chunk import chunk_gla_fwd

    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    with torch.cuda.device(q.device):
        g_cumsum, A, _, _, o = chunk_gla_fwd(q, k, v, g, g_cumsum=None, scale=scale, initial_state=None,
                                             output_final_state=False, chunk_size=KERNEL_CHUNK)
    return o, g_cumsum, A


@fla_chunk_gla.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T, H, _ = q.shape
    return torch.empty_like(v), torch.empty_like(g), q.new_empty(B, T, H, KERNEL_CHUNK, dtype=torch.float32)


@torch.library.custom_op("slmlab::fla_chunk_gla_backward", mutates_args=())
def fla_chunk_gla_backward(q: Tensor, k: Tensor, v: Tensor, g_cumsum: Tensor, A: Tensor, do: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, dg of `fla_chunk_gla`, each in its input's dtype."""
    from fla.ops.gla.chunk import chunk_gla_bwd

    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    with torch.cuda.device(q.device):
        dq, dk, dv, dg, _ = chunk_gla_bwd(q, k, v, g=None, g_cumsum=g_cumsum, scale=scale, initial_state=None,
                                          h=None, A=A, do=do, dht=None, chunk_size=KERNEL_CHUNK)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_cumsum.dtype)


@fla_chunk_gla_backward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, g_cumsum: Tensor, A: Tensor, do: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g_cumsum)


def _save_for_gla_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, _, ctx.scale = inputs
    _, g_cumsum, A = output
    ctx.mark_non_differentiable(g_cumsum, A)
    ctx.save_for_backward(q, k, v, g_cumsum, A)


def _gla_backward(ctx, do: Tensor, _g_cumsum: Tensor, _A: Tensor) -> tuple[Tensor | None, ...]:
    return *fla_chunk_gla_backward(*ctx.saved_tensors, do, ctx.scale), None


fla_chunk_gla.register_autograd(_gla_backward, setup_context=_save_for_gla_backward)


def causal_half(seq_len: int, positions: Tensor | None = None, chunk: int | None = None) -> float | Tensor:
    """Keys per query that causal attention over seq_len tokens computes, or a chunked kernel within its
    chunks of `chunk` steps, counted as half the score matrix: min(chunk, seq_len) / 2. With packed
    documents (`positions`: each token's position in its own document, where attention and the
    variable-length kernels' chunks restart) the mean of p + 1/2 over the tokens, p counted from the
    start of its chunk: seq_len / 2 again for a row of one document. A tensor then, on positions' device
    (no wait for it)."""
    if positions is None:
        return min(chunk or seq_len, seq_len) / 2
    within = positions if chunk is None else positions % chunk
    return within.double().mean() + 0.5


def gla_flops_per_token(n_heads: int, key_dim: int, value_dim: int, seq_len: int, chunk: int = KERNEL_CHUNK,
                        positions: Tensor | None = None) -> float | Tensor:
    """Forward FLOPs per token (2 per multiply-accumulate) of the chunked GLA algorithm, per layer.

    Per head and token: the causal half of a chunk of C = min(chunk, seq_len) steps in q.k and in
    scores @ v (C/2 * (K + V)), plus reading the carried state (q S: K*V) and adding to it (k^T v: K*V).
    The elementwise decay work is not counted, as attention's softmax is not. `positions`: packed
    documents (`causal_half`).
    """
    return 2 * n_heads * (causal_half(seq_len, positions, chunk) * (key_dim + value_dim) + 2 * key_dim * value_dim)
