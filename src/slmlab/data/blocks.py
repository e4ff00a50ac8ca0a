"""Fixed-length blocks of tokens, read straight from memory-mapped shards."""

from pathlib import Path

import numpy as np

from slmlab.data.shards import Manifest


class Blocks:
    """The blocks of one split: block i of a shard is `tokens[i*seq_len : i*seq_len + seq_len + 1]`.

    Consecutive blocks share one token (the last label of one is the first input of the next), and
    blocks never cross shards, so a shard's tail of fewer than `seq_len + 1` tokens is never read.
    Global block ids run over the shards in order. Shards are memory-mapped on first read, so
    pickling a `Blocks` (to a dataloader worker) sends paths, not tokens.
    """

    def __init__(self, out_dir: str | Path, manifest: Manifest, split: str, seq_len: int):
        self.out_dir, self.manifest, self.split = Path(out_dir), manifest, split
        shards = manifest.splits[split].shards
        self.paths = [Path(out_dir) / s.file for s in shards]
        self.dtype, self.seq_len = manifest.dtype, seq_len
        per_shard = [max(0, (s.tokens - 1) // seq_len) for s in shards]
        self.first_block = np.cumsum([0] + per_shard)  # first global id of each shard, then the total
        self.num_blocks = int(self.first_block[-1])
        self._maps: list[np.memmap] | None = None

    def with_seq_len(self, seq_len: int) -> "Blocks":
        """The same shards in blocks of seq_len + 1 tokens."""
        return Blocks(self.out_dir, self.manifest, self.split, seq_len)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of blocks `ids`: array[len(ids), seq_len + 1] of the shard dtype."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and not (0 <= ids.min() and ids.max() < self.num_blocks):
            raise IndexError(f"block ids must be in [0, {self.num_blocks}), got {ids.min()}..{ids.max()}")
        maps = self._open()
        shard = np.searchsorted(self.first_block, ids, side="right") - 1
        starts = (ids - self.first_block[shard]) * self.seq_len
        out = np.empty((len(ids), self.seq_len + 1), dtype=self.dtype)
        for row, (s, start) in enumerate(zip(shard.tolist(), starts.tolist())):
            out[row] = maps[s][start:start + self.seq_len + 1]  # one contiguous copy per block
        return out

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # each process maps the files itself

