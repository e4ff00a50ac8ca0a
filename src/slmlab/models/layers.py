"""Building blocks shared by the backbone and the mixers: RMSNorm, SwiGLU, rotary embeddings."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmlab.ops.backend import fused_mlp_usable
from slmlab.ops.gla import compute_dtype
from slmlab.ops.swiglu import silu_mul


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for stability under bf16 (float64 stays float64).

    zero_centred: the parameter is stored as an offset from 1 (scale = 1 + weight, initialised to 0),
    so weight decay or a zero init pulls the scale towards 1 rather than 0 (OdinNext's ZC-RMSNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centred: bool = False) -> None:
        super().__init__()
        self.eps, self.zero_centred = eps, zero_centred
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x.dtype)
        scale = self.weight.to(dtype) + 1 if self.zero_centred else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), (x.shape[-1],), scale, self.eps).to(x.dtype)


def linear_flops(*linears: nn.Linear) -> int:
    """Forward FLOPs per token of these linears (2 per multiply-accumulate), from their shapes: under
    FSDP a weight is a 1-D view of this rank's shard, and its numel() only that shard's."""
    return 2 * sum(m.in_features * m.out_features for m in linears)


def concat_linear(x: Tensor, *linears: nn.Linear) -> Tensor:
    """Several bias-free linears of one input as one matmul over their concatenated weights: one larger
    GEMM (and one input gradient) instead of several, their outputs side by side in the last dim. The
    parameters keep their own names and shapes, so checkpoints, export and per-matrix optimizers see
    them as before."""
    return F.linear(x, torch.cat([m.weight for m in linears]))


def fused_linear(x: Tensor, *linears: nn.Linear) -> tuple[Tensor, ...]:
    """The outputs of several bias-free linears of one input, from `concat_linear`. Without autograd
    (decoding, evaluation) each runs on its own: at a decoding step the concatenation would copy every
    weight, more memory traffic than the matmuls themselves."""
    if not torch.is_grad_enabled():
        return tuple(F.linear(x, m.weight) for m in linears)
    return concat_linear(x, *linears).split([m.out_features for m in linears], dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases.

    gate and up run as one matmul, and inside it the hidden width is zero-padded to a multiple of
    `PAD_TO`: a width like Helium-Nano's 1365 leaves the rows of the bf16 hidden activations out of
    16-byte alignment, which keeps cuBLAS off its fast kernels. The zero rows and columns add exact
    zeros and get no parameters: the computation is the unpadded one. The activation's backward is
    `ops/swiglu.py`'s (one pass over the fused output). Without autograd the three run as they are
    (see `fused_linear`).

    With `kernel="quack"` (`mlp_kernel`) training runs quack's GEMMs (package quack-kernels) on a Hopper
    or newer GPU: the gate+up GEMM applies the activation as it writes its output, and in the backward
    the GEMM of the hidden gradient applies the activation's gradient and recomputes the activation for
    the down projection's weight gradient. The separate passes over the hidden activations go, and
    the hidden activation is not kept for the backward."""

    PAD_TO = 64

    def __init__(self, dim: int, hidden: int, kernel: str = "torch") -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.down(F.silu(self.gate(x)) * self.up(x))
        pad = -self.down.in_features % self.PAD_TO
        gate, up, down = self.gate.weight, self.up.weight, self.down.weight
        if pad:
            gate, up, down = F.pad(gate, (0, 0, 0, pad)), F.pad(up, (0, 0, 0, pad)), F.pad(down, (0, pad))
        gate_up = torch.cat([gate, up])
        if self.runs_fused_kernels(x):
            from quack.mlp import mlp_func

            # concat_layout: the weight's rows are [gate; up]
            return mlp_func(x, gate_up, down, activation="swiglu", concat_layout=True)
        return F.linear(silu_mul(F.linear(x, gate_up)), down)

    def runs_fused_kernels(self, x: Tensor) -> bool:
        """Whether this training forward runs quack's GEMMs (`mlp_kernel`): bf16 or fp16 matmuls (under
        autocast, or inputs and weights of that dtype), model width a multiple of 8 (16-byte rows)."""
        if not fused_mlp_usable(self.kernel, x.device):
            return False
        autocast = torch.is_autocast_enabled(x.device.type)
        dtypes = {torch.get_autocast_dtype(x.device.type)} if autocast else {x.dtype, self.gate.weight.dtype}
        return len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} and x.shape[-1] % 8 == 0


class Rotary(nn.Module):
    """Rotary position embedding (half-split layout, as in Llama/Qwen/HF `rotate_half`), in float32
    (float64 inputs in float64, by the float32 angles).

    cos/sin of positions below max_len come from a table built once: computed inside a compiled
    kernel they were recomputed for every head, in backward again, and made RoPE compute-bound on
    the GPU. Positions past the table (a recurrent model decoding on) and device-tensor offsets
    (CUDA-graph decoding) compute theirs per call.
    """

    def __init__(self, head_dim: int, theta: float, max_len: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_len = head_dim, theta, max_len
        self._build_tables(None)  # None: the default device (meta when the model is built there)

    def _build_tables(self, device: torch.device | None) -> None:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                        / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_sin", self.angles(torch.arange(self.max_len, dtype=torch.float32, device=device)),
                             persistent=False)

    def _apply(self, fn, recurse: bool = True) -> "Rotary":
        # `model.to(torch.bfloat16)` would round the tables too, and a bf16 inv_freq times a position in
        # the thousands is off by radians. Rebuilt, they stay float32 on whichever device `fn` chose.
        super()._apply(fn, recurse)
        self._build_tables(self.inv_freq.device)
        return self

    def angles(self, pos: Tensor) -> Tensor:
        """positions (seq,) -> their cos and sin stacked, (2, seq, head_dim / 2)."""
        freqs = torch.outer(pos, self.inv_freq.float())
        return torch.stack((freqs.cos(), freqs.sin()))

    def forward(self, x: Tensor, offset: int | Tensor = 0, positions: Tensor | None = None) -> Tensor:
        """x: (batch, seq, heads, head_dim), the layout projections give and flash attention reads ->
        same shape, rotated by position offset..offset+seq (an int, or a 0-dim device tensor for
        CUDA-graph decoding), or by each token's own position (batch, seq) (packed documents)."""
        T = x.shape[1]
        if positions is not None:
            cos_sin = self.cos_sin[:, positions]  # (2, batch, seq, head_dim / 2)
        elif isinstance(offset, int) and offset + T <= self.cos_sin.shape[1]:
            cos_sin = self.cos_sin[:, offset : offset + T].float()
        else:
            cos_sin = self.angles(offset + torch.arange(T, device=x.device, dtype=torch.float32))
        cos, sin = cos_sin.unsqueeze(-2)  # broadcast over heads
        x1, x2 = x.to(compute_dtype(x.dtype)).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
