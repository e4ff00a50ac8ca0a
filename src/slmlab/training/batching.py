"""Joining rows of different lengths into one batch."""

import torch
import torch.nn.functional as F
from torch import Tensor


def cat_right_padded(tensors: list[Tensor], value: int) -> Tensor:
    """(n_i, T_i) tensors -> (sum n_i, max T_i), each right-padded with `value`. Right padding never
    changes a causal model's outputs at the real positions."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])
