"""Joining rows of different lengths into one batch; the documents inside a row of a token stream."""

import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLED_LENGTH_MULTIPLE = 64
"""Batches of sampled completions (GRPO, on-policy DPO) are padded to a multiple of this many tokens:
a few shapes rather than one per rollout length, for compiled blocks and CUDA graphs (each records per
shape) and for the kernels' autotuning."""


def padded_length(n: int, limit: int, multiple: int = SAMPLED_LENGTH_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple`, but not past `limit` (the model's context) unless n is."""
    return max(n, min(-(-n // multiple) * multiple, limit))


def cat_right_padded(tensors: list[Tensor], value: int, length: int | None = None) -> Tensor:
    """(n_i, T_i) tensors -> (sum n_i, length), each right-padded with `value`; `length` defaults to the
    longest T_i. Right padding never changes a causal model's outputs at the real positions."""
    length = max(t.shape[1] for t in tensors) if length is None else length
    return torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])


def document_positions(input_ids: Tensor, eos_id: int) -> Tensor:
    """(batch, seq) ids of a token stream -> each token's position in its document: 0 at a row's first
    token and after every `eos_id`, counting up in between (the `positions` of `CausalLM.hidden`)."""
    return positions_from_starts(F.pad(input_ids[:, :-1] == eos_id, (1, 0), value=True))


def positions_from_starts(starts: Tensor) -> Tensor:
    """(batch, seq) bool, True where a document starts (at least at each row's first step) -> each step's
    position in its document."""
    steps = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    return steps - torch.where(starts, steps, 0).cummax(dim=1).values
