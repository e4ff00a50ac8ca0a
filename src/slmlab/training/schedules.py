"""Learning-rate schedules as real `LRScheduler`s, stepped once per optimizer step.

Each is linear warmup to the peak LR followed by its own shape; `min_lr_ratio` is the floor as a
fraction of the peak (Helios Nova: 3e-5 / 3e-4 = 0.1).
"""

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

DECAY_SHAPES = ("cosine", "linear", "sqrt")
# what this run's settings decide on resume (base_lrs: the peak LR of each parameter group, optim.lr)
SHAPE_KEYS = ("schedule", "base_lrs", "total_steps", "warmup_steps", "min_lr_ratio", "decay_steps", "decay_shape")


class WarmupSchedule(LRScheduler):
    """lr(step) = peak * factor(step): linear warmup over `warmup_steps`, then `after_warmup`."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"schedule.warmup_steps={warmup_steps} must lie in [0, trainer.max_steps={total_steps}] "
                             "(the schedule spans the run's optimizer steps): lower schedule.warmup_steps")
        if not 0 <= min_lr_ratio <= 1:  # below 0 the LR turns negative (gradient ascent), above 1 it rises
            raise ValueError(f"schedule.min_lr_ratio={min_lr_ratio} must lie in [0, 1] (the floor as a fraction "
                             "of the peak LR)")
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        self.schedule = type(self).__name__  # in the checkpoint: a resumed run may switch schedule=...
        super().__init__(optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        """The position in the schedule from a checkpoint, its shape from this run's settings: a run resumed
        with a larger trainer.max_steps (or other schedule.* values, or another optim.lr) follows the new
        schedule from there."""
        shape = {k for k in state_dict if k in SHAPE_KEYS}
        # a key of another schedule's shape (WSD's decay_steps, resumed with schedule=cosine) reads "-> none"
        if changed := [f"{k} {state_dict[k]} -> {getattr(self, k, 'none')}" for k in sorted(shape)
                       if state_dict[k] != getattr(self, k, None)]:
            warnings.warn(f"the LR schedule differs from the checkpoint's ({', '.join(changed)}): the LR follows "
                          f"this run's schedule from step {state_dict['last_epoch']}", stacklevel=2)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in shape})
        if changed:  # the optimizer, restored before, holds the old schedule's LR for the next step
            self._last_lr = self.get_lr()
            for group, lr in zip(self.optimizer.param_groups, self._last_lr):
                group["lr"] = lr

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.after_warmup(step)

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]

    def _anneal(self, progress: float, shape: str) -> float:
        """Factor going from 1 (progress 0) to min_lr_ratio (progress 1) along `shape`."""
        progress = min(max(progress, 0.0), 1.0)
        if shape == "cosine":
            down = 0.5 * (1 + math.cos(math.pi * progress))
        elif shape == "linear":
            down = 1 - progress
        elif shape == "sqrt":  # "1 - sqrt", the cooldown of the WSD papers
            down = 1 - math.sqrt(progress)
        else:
            raise ValueError(f"unknown decay shape {shape!r}; use {', '.join(DECAY_SHAPES)}")
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * down


class WSD(WarmupSchedule):
    """Warmup-stable-decay: hold the peak, then anneal over the last `decay_fraction` of training."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.1,
                 decay_shape: str = "cosine", min_lr_ratio: float = 0.0) -> None:
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"schedule.decay_fraction={decay_fraction} must lie in (0, 1] (the share of "
                             "trainer.max_steps spent decaying)")
        if decay_shape not in DECAY_SHAPES:  # else the typo would surface only when the decay starts
            raise ValueError(f"schedule.decay_shape={decay_shape!r}: use {', '.join(DECAY_SHAPES)}")
        self.decay_steps = max(1, round(decay_fraction * total_steps))
        self.decay_shape = decay_shape
        super().__init__(optimizer, total_steps, warmup_steps, min_lr_ratio)

    def after_warmup(self, step: int) -> float:
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return 1.0
        return self._anneal((step - decay_start + 1) / self.decay_steps, self.decay_shape)


class Cosine(WarmupSchedule):
    """Cosine from the peak after warmup down to min_lr_ratio at `total_steps`."""

    def after_warmup(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        return self._anneal((step - self.warmup_steps + 1) / span, "cosine")


class Constant(WarmupSchedule):
    def after_warmup(self, step: int) -> float:
        return 1.0
