"""Loss functions as pure functions of logits and labels."""

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss(logits: Tensor, labels: Tensor, z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX, plus `z_loss * mean(logsumexp^2)`.

    logits: (batch, seq, vocab); labels: (batch, seq), already shifted. Returns (loss to optimise,
    cross-entropy alone). The z-loss keeps the softmax normaliser near 1 (PaLM), which helps low
    precision training; it is computed over the same unmasked positions.
    """
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if not z_loss:
        return ce, ce
    mask = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits[mask], dim=-1)
    return ce + z_loss * lse.square().mean(), ce
