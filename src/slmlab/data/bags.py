"""Which samples of the training stream are read as bags of tokens (token superposition training).

A bag step of bag size s reads s times the tokens of a next-token step into the same number of
positions, at about the same compute (TST as published): each row is s * (seq_len + 1) contiguous
tokens, folded into seq_len positions of s tokens, each predicting the next bag. Which step a sample
belongs to is fixed by its index, so the stream stays a pure function of the sample index (exact resume).
"""

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class BagSchedule:
    """phases: (bag, end) pairs, bags shrinking: samples before `end` (a global sample index) read bags of
    `bag` tokens, those after the last `end` single tokens. Phases end on optimizer-step boundaries."""

    phases: tuple[tuple[int, int], ...]

    @classmethod
    def from_steps(cls, phases: list[tuple[int, float]], total_steps: int, samples_per_step: int) -> "BagSchedule":
        """`stage.superposition` phases, [(bag, until)] with `until` a fraction of the run's optimizer
        steps (a phase holds the steps before that fraction), at `samples_per_step` samples per optimizer
        step on all ranks."""
        # as the decimal written: in floats 0.3 * 10 is 3.0000000000000004, which would give the phase a
        # fourth step, and Fraction(0.2) is a hair above 1/5 (61 bag steps of 300)
        return cls(tuple((bag, math.ceil(Fraction(str(until)) * total_steps) * samples_per_step)
                         for bag, until in phases))

    def bag(self, sample: int) -> int:
        """Tokens per position of the step that global sample `sample` belongs to."""
        return next((bag for bag, end in self.phases if sample < end), 1)

    def bags(self) -> list[int]:
        return [bag for bag, _ in self.phases]


def bag_row_len(seq_len: int, bag: int) -> int:
    """Tokens of one row of a bag step (inputs plus the last bag of labels) for seq_len positions."""
    return bag * (seq_len + 1)
