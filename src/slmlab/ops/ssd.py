"""Mamba-2's state-space dual (SSD) layer, in mamba-ssm's notation and layout.

Per head h, with B and C shared by the H / G heads of a group:

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: [P, N] (headdim x d_state)
    y_t = S_t C_t + D_h x_t

This is simple GLA (`ops/gla.py` with one log-decay per head) with q = C, k = B, v = dt * x,
log-decay dt * A and scale 1; its state is GLA's transposed ([K, V] = [N, P]). The chunked
reference and fla's kernels run it that way; mamba-ssm's own kernel runs it directly.

Layout: x [b, T, H, P], dt [b, T, H] (the step, softplus already applied), A [H] (negative),
B, C [b, T, G, N], D [H], states [b, H, P, N] (mamba-ssm's); `starts` [b, T] as in `ops/gla.py` (packed
documents: the state is cleared before each document's first step).

    ssd_recurrent   step-by-step recurrence, the oracle
    ssd_chunked     chunked PyTorch reference (through `gla_chunked`), the CPU training path
    ssd             dispatch: mamba-ssm's `mamba_chunk_scan_combined` or fla's simple GLA on CUDA,
                    else `ssd_chunked`
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from slmlab.ops.backend import custom_op_usable, resolve_backend
from slmlab.ops.gla import causal_half, compute_dtype, gla, gla_chunked

# chunk length of mamba-ssm's kernel as its Mamba2 module calls it: the one behind `ssd_flops_per_token`
MAMBA_CHUNK = 256
SSD_PACKAGES = ("mamba_ssm", "fla")  # the kernel packages that implement `ssd`, in the order kernel=auto tries them


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One time step at a time. Returns y [b, T, H, P] in x's dtype and, if asked, the final state [b, H, P, N]."""
    batch, T, H, P = x.shape
    out_dtype, dtype = x.dtype, compute_dtype(x.dtype)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    B, C = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (B, C))  # one copy per head: [b, T, H, N]
    S = x.new_zeros(batch, H, P, B.shape[-1]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, H, 1, 1]
        if starts is not None:
            decay = decay.masked_fill(starts[:, t, None, None, None], 0.0)
        S = decay * S + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(-2)
        ys.append((S @ C[:, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    return y.to(out_dtype), S if output_final_state else None


def _ssd_as_gla(
    gla_fn: Callable, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
    initial_state: Tensor | None, output_final_state: bool, starts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD through a GLA implementation, by the mapping in the module docstring."""
    heads_per_group = x.shape[2] // B.shape[2]
    q, k = (t.repeat_interleave(heads_per_group, dim=2) for t in (C, B))
    v = (x * dt.unsqueeze(-1)).to(x.dtype)
    h0 = None if initial_state is None else initial_state.transpose(-1, -2)
    y, S = gla_fn(q, k, v, dt * A, scale=1.0, initial_state=h0, output_final_state=output_final_state, starts=starts)
    if D is not None:
        y = (y + D[:, None] * x).to(x.dtype)
    return y, None if S is None else S.transpose(-1, -2)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    starts: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Chunked form of `ssd_recurrent` (same arguments and returns), chunks of `chunk_size` steps."""
    chunked = partial(gla_chunked, chunk_size=chunk_size)
    return _ssd_as_gla(chunked, x, dt, A, B, C, D, initial_state, output_final_state, starts)


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    kernel: str = "auto",
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SSD on the backend `kernel` selects (`auto` tries mamba_ssm, then fla); arguments as `ssd_recurrent`.

    mamba_ssm without states (training) runs as the custom op `mamba_chunk_scan`, which torch.compile
    keeps inside a block's graph (where the installed mamba-ssm still takes its arguments,
    `custom_op_usable`). With `starts`, mamba-ssm's own `seq_idx` (each step's document) resets the state.

    Final states come back in float32 (float64 for float64 inputs on the reference).
    """
    backend = resolve_backend(kernel, x.device, SSD_PACKAGES, "SSD")
    if backend == "torch":
        return ssd_chunked(x, dt, A, B, C, D, initial_state, output_final_state, starts)
    if backend == "fla":
        return _ssd_as_gla(partial(gla, kernel="fla"), x, dt, A, B, C, D, initial_state, output_final_state, starts)
    training = initial_state is None and not output_final_state
    if training and starts is None and custom_op_usable("mamba_chunk_scan"):
        return mamba_chunk_scan(x, dt, A, B, C, x.new_zeros(A.shape) if D is None else D), None
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    if starts is not None and initial_state is not None:
        raise ValueError("SSD over packed documents (starts) takes no initial state")
    out = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size=MAMBA_CHUNK, D=D,
        initial_states=None if initial_state is None else initial_state.float(),
        seq_idx=None if starts is None else starts.int().cumsum(1, dtype=torch.int32),
        return_final_states=output_final_state,
    )
    if not output_final_state:
        return out, None
    y, S = out
    return y, S.float()  # mamba-ssm returns it in C's dtype


# mamba-ssm's chunked scan as custom ops, for the reason `ops/gla.py` gives for fla's: traced into,
# `mamba_chunk_scan_combined` broke a compiled block's graph
@torch.library.custom_op("slmlab::mamba_chunk_scan", mutates_args=())
def mamba_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """mamba-ssm's `mamba_chunk_scan_combined` from a zero state: y [b, T, H, P] in x's dtype."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd

    with torch.cuda.device(x.device):
        out, *_ = _mamba_chunk_scan_combined_fwd(x, dt, A, B, C, MAMBA_CHUNK, D=D)
    return out.to(x.dtype)


@mamba_chunk_scan.register_fake
def _(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("slmlab::mamba_chunk_scan_backward", mutates_args=())
def mamba_chunk_scan_backward(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                              y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of `mamba_chunk_scan`'s inputs, each in its input's dtype."""
    from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd

    with torch.cuda.device(x.device):
        grads = _mamba_chunk_scan_combined_bwd(dy, x, dt, A, B, C, y, MAMBA_CHUNK, D=D)[:6]
    return tuple(g.to(t.dtype) for g, t in zip(grads, (x, dt, A, B, C, D)))


@mamba_chunk_scan_backward.register_fake
def _(dy: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
      y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C, D))


def _save_for_scan_backward(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs, output)


def _scan_backward(ctx, dy: Tensor) -> tuple[Tensor, ...]:
    return mamba_chunk_scan_backward(dy, *ctx.saved_tensors)


mamba_chunk_scan.register_autograd(_scan_backward, setup_context=_save_for_scan_backward)


def ssd_flops_per_token(
    n_heads: int, n_groups: int, headdim: int, d_state: int, seq_len: int, chunk: int = MAMBA_CHUNK,
    positions: Tensor | None = None,
) -> float | Tensor:
    """Forward FLOPs per token (2 per multiply-accumulate) of the chunked SSD algorithm, per layer.

    With C = min(chunk, seq_len): C.B scores over the causal half of a chunk, once per group
    (C/2 * N), scores @ x per head (C/2 * P), and per head reading the carried state (S C: P*N)
    and adding to it (x B^T: P*N). Elementwise decay and D-skip work is not counted. `positions`:
    packed documents (`ops.gla.causal_half`).
    """
    half = causal_half(seq_len, positions, chunk)
    return 2 * (n_groups * half * d_state + n_heads * (half * headdim + 2 * headdim * d_state))
