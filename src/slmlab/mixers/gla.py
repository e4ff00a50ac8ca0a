"""Gated linear attention (Yang et al. 2024, arXiv:2312.06635) as a mixer: a fixed-size state per head.

Per head (n_heads heads of head_dim), with a log-decay per key channel:

    alpha_t = logsigmoid(W_a x_t + b_a)                            [head_dim]
    S_t     = diag(exp(alpha_t)) S_{t-1} + k_t v_t^T               [head_dim, head_dim]
    o_t     = S_t^T q_t / sqrt(head_dim)
    out_t   = W_o (sigmoid(W_g x_t) * o_t)

Full-rank q, k, v, g (output gate) and decay projections, no biases but the decay's and no norm:
6 d (n_heads head_dim) + n_heads head_dim parameters.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmlab.models.config import ModelConfig
from slmlab.models.layers import linear_flops
from slmlab.ops import compute_dtype, gla, gla_flops_per_token
from slmlab.ops.gla import GLA_PACKAGES


@dataclass
class RecurrentState:
    """The state of a linear-attention mixer: S (batch, heads, key_dim, value_dim), float32 for
    half-precision models, and the number of positions it has absorbed (for RoPE; a 0-dim device
    tensor for CUDA-graph decoding, `models/decode_graph.py`)."""

    S: Tensor
    pos: int | Tensor = 0


class GLA(nn.Module):
    compiles_kernels = True  # fla's Triton kernels
    kernel_op = ("GLA", GLA_PACKAGES)  # the op `model.kernel` chooses an implementation of

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.kernel = cfg.n_heads, cfg.head_dim, cfg.kernel
        inner = self.n_heads * self.head_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.g = nn.Linear(cfg.d_model, inner, bias=False)
        self.decay = nn.Linear(cfg.d_model, inner, bias=True)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        # every key channel starts out keeping gla_decay_init of its state per step (a memory of
        # about 1 / (1 - 0.9) = 10 tokens); the weights then learn to make it data-dependent
        p = cfg.gla_decay_init
        nn.init.constant_(self.decay.bias, math.log(p / (1 - p)))

    def forward(self, x: Tensor, state: RecurrentState | None = None, positions: Tensor | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With `state`, continues it and updates it in
        place. positions (batch, seq): as `Attention`'s; the state is cleared where a document starts."""
        B, T, _ = x.shape
        heads = (B, T, self.n_heads, self.head_dim)
        q, k, v = self.q(x).view(heads), self.k(x).view(heads), self.v(x).view(heads)
        alpha = F.logsigmoid(self.decay(x).to(compute_dtype(x.dtype))).view(heads)  # summed over the sequence
        o, S = gla(q, k, v, alpha, initial_state=None if state is None else state.S,
                   output_final_state=state is not None, kernel=self.kernel,
                   starts=None if positions is None else positions == 0)
        if state is not None:
            state.S.copy_(S)
        return self.o(torch.sigmoid(self.g(x)) * o.reshape(B, T, -1))

    def init_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        """A zero state; its size does not depend on `max_len`."""
        shape = (batch_size, self.n_heads, self.head_dim, self.head_dim)
        return RecurrentState(torch.zeros(shape, device=device, dtype=compute_dtype(dtype)))

    def flops_per_token(self, seq_len: int, positions: Tensor | None = None) -> float | Tensor:
        """Forward FLOPs per token: the six projections plus chunked GLA (`ops.gla.gla_flops_per_token`)."""
        proj = linear_flops(self.q, self.k, self.v, self.g, self.decay, self.o)
        return proj + gla_flops_per_token(self.n_heads, self.head_dim, self.head_dim, seq_len, positions=positions)
