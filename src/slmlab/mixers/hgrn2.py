"""HGRN2 (Qin et al. 2024, arXiv:2404.07904) as a mixer: GLA whose key is tied to its forget gate.

heads = d_model / hgrn2_expand_ratio; per head the key dim is the expand ratio and the value dim
d_model / heads. Following fla's `HGRN2Attention` (without its short convolutions and output norm):

    g_t = logsigmoid(W_f x_t)            forget log-gate per key channel
    k_t = 1 - exp(g_t)                   the input gate, tied to it
    S_t = diag(exp(g_t)) S_{t-1} + k_t (W_i x_t)^T
    o_t = S_t^T silu(W_q x_t) / sqrt(expand_ratio)
    out_t = W_o o_t

Because input and forget gates sum to one per key channel, each row of S is an exponential
moving average of the values: the state stays bounded without a norm. Four d x d projections,
nothing else: 4 d^2 parameters.

On the layers `rope_layers` selects (OdinNext: the even ones), q and k are rotated by their
positions before the recurrence, as attention's are; the other layers carry no position signal
beyond the recurrence itself.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slmlab.mixers.gla import RecurrentState
from slmlab.models.config import ModelConfig
from slmlab.models.layers import Rotary, linear_flops
from slmlab.ops import compute_dtype, gla, gla_flops_per_token
from slmlab.ops.gla import GLA_PACKAGES


class HGRN2(nn.Module):
    compiles_kernels = True  # fla's Triton kernels
    kernel_op = ("GLA", GLA_PACKAGES)  # the op `model.kernel` chooses an implementation of

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        d, ratio = cfg.d_model, cfg.hgrn2_expand_ratio
        if d % ratio:
            raise ValueError(f"d_model={d} is not divisible by hgrn2_expand_ratio={ratio}")
        self.n_heads, self.key_dim, self.kernel = d // ratio, ratio, cfg.kernel
        self.value_dim = d // self.n_heads
        self.q = nn.Linear(d, d, bias=False)
        self.f = nn.Linear(d, d, bias=False)
        self.i = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(self.key_dim, cfg.rope_theta, cfg.max_seq_len) if cfg.rope_on(layer_idx) else None

    def forward(self, x: Tensor, state: RecurrentState | None = None, positions: Tensor | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With `state`, continues it and updates it in
        place. positions (batch, seq): as `Attention`'s; the state is cleared where a document starts."""
        B, T, d = x.shape
        keys = (B, T, self.n_heads, self.key_dim)
        q = F.silu(self.q(x)).view(keys)
        f = self.f(x).to(compute_dtype(x.dtype))  # the log-gate is summed over the sequence
        g = F.logsigmoid(f).view(keys)
        k = torch.sigmoid(-f).to(q.dtype).view(keys)  # 1 - exp(g), without the cancellation near g = 0
        v = self.i(x).view(B, T, self.n_heads, self.value_dim)
        if self.rotary is not None:
            offset = 0 if state is None else state.pos
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        o, S = gla(q, k, v, g, initial_state=None if state is None else state.S,
                   output_final_state=state is not None, kernel=self.kernel,
                   starts=None if positions is None else positions == 0)
        if state is not None:
            state.S.copy_(S)
            state.pos += T
        return self.o(o.reshape(B, T, d))

    def init_state(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        """A zero state; its size does not depend on `max_len`."""
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return RecurrentState(torch.zeros(shape, device=device, dtype=compute_dtype(dtype)))

    def flops_per_token(self, seq_len: int, positions: Tensor | None = None) -> float | Tensor:
        """Forward FLOPs per token: the four projections plus chunked GLA (`ops.gla.gla_flops_per_token`)."""
        proj = linear_flops(self.q, self.f, self.i, self.o)
        return proj + gla_flops_per_token(self.n_heads, self.key_dim, self.value_dim, seq_len, positions=positions)
