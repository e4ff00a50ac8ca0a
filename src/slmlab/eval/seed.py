"""One call that fixes every random number generator an evaluation can touch."""

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Reseeds Python, NumPy and torch, so that an evaluation run twice gives the same numbers
    whatever ran before it (sampling, few-shot selection, shuffles)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device: the CPU and each CUDA GPU
