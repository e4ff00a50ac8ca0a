"""Where the n-th training sample comes from: which source (mixture) and which block (shuffle).

Both are pure functions of the sample index, so a stream can start at any sample without
replaying the ones before it: that is what makes resuming exact and splitting the stream across
ranks and workers trivial.
"""

import math
from collections.abc import Mapping

import numpy as np

from slmlab.data.errors import DataError

WEIGHT_RESOLUTION = 10_000
"""Weights are rounded to multiples of 1/10,000 of their total: proportions are exact to 1e-4."""


class Mixture:
    """Deterministic interleaving of sources by weight (smooth weighted round-robin).

    With integer weights w_s summing to P, sample n comes from argmax_s (w_s * (n+1) - P * c_s),
    where c_s counts the earlier samples of s (ties: first source). The schedule repeats every P
    samples, in which source s appears exactly w_s times, evenly spread: after any number of
    samples every source is within about one sample of its share (half a sample with two sources).
    """

    def __init__(self, weights: Mapping[str, float]):
        total = sum(weights.values())
        if any(w < 0 or not math.isfinite(w) for w in weights.values()) or total <= 0:
            raise DataError(f"source weights {dict(weights)}: must be finite, >= 0, and not all 0")
        counts = [round(w / total * WEIGHT_RESOLUTION) for w in weights.values()]
        for (name, w), count in zip(weights.items(), counts):
            if w > 0 and count == 0:
                raise DataError(f"source {name!r}: weight {w} is below 1/{WEIGHT_RESOLUTION} of the total {total}")
        gcd = math.gcd(*counts)
        self.counts = np.array(counts, dtype=np.int64) // gcd  # samples of each source per period
        self.period_len = int(self.counts.sum())
        # one period: the source of each slot, and how many samples of each source precede the slot
        self.period = np.empty(self.period_len, dtype=np.int64)
        self.before = np.zeros((self.period_len, len(counts)), dtype=np.int64)
        consumed = np.zeros(len(counts), dtype=np.int64)
        for n in range(self.period_len):
            self.before[n] = consumed
            self.period[n] = np.argmax(self.counts * (n + 1) - self.period_len * consumed)
            consumed[self.period[n]] += 1

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source index, index of the sample within that source's samples)."""
        periods, slots = np.divmod(np.asarray(samples, dtype=np.int64), self.period_len)
        sources = self.period[slots]
        return sources, periods * self.counts[sources] + self.before[slots, sources]


class ShuffledBlocks:
    """Block read by each sample of one source: pass p over the source follows its own permutation,
    seeded by (seed, source index, p), so every block is seen once per pass, in a new order each pass."""

    def __init__(self, num_blocks: int, seed: int, source_index: int):
        self.num_blocks, self.seed, self.source_index = num_blocks, seed, source_index
        self._permutations: dict[int, np.ndarray] = {}

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Indices of samples within this source -> block ids."""
        passes, positions = np.divmod(np.asarray(samples, dtype=np.int64), self.num_blocks)
        blocks = np.empty_like(positions)
        for p in np.unique(passes).tolist():
            here = passes == p
            blocks[here] = self._permutation(p)[positions[here]]
        return blocks

    def _permutation(self, pass_: int) -> np.ndarray:
        if pass_ not in self._permutations:
            if len(self._permutations) == 2:  # a batch spans at most two passes of a large source
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng([self.seed, self.source_index, pass_])
            self._permutations[pass_] = rng.permutation(self.num_blocks)
        return self._permutations[pass_]
