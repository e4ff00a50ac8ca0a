"""Batches for the DataLoader: an endless shuffled mixture for training, ordered blocks for validation.

Both datasets yield whole collated batches (use `DataLoader(batch_size=None)`). Dataloader worker
w of W yields batches w, w + W, ...; the DataLoader takes one batch from each worker in turn, so
the batch sequence is the same for any number of workers.
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from slmlab.data.blocks import Blocks
from slmlab.data.mixture import Mixture, ShuffledBlocks

Batch = dict[str, torch.Tensor]


def to_batch(tokens: np.ndarray) -> Batch:
    """tokens[B, T+1] -> {"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}, labels shifted by one."""
    return {"input_ids": torch.from_numpy(tokens[:, :-1].astype(np.int64)),
            "labels": torch.from_numpy(tokens[:, 1:].astype(np.int64))}


class TrainBatches(IterableDataset):
    """Endless training batches from a weighted mixture of sources, from global sample `start` on.

    Global batch b holds samples start + b*batch_size*world_size onwards, and rank r takes the r-th
    `batch_size` of them. Each sample's source comes from `mixture` and its block from a per-source
    `ShuffledBlocks`, so every batch is a pure function of (start, its index): starting anywhere
    costs nothing, and ranks and workers never read the same sample.
    """

    def __init__(self, sources: Sequence[Blocks], mixture: Mixture, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.sources, self.mixture = sources, mixture
        self.orders = [ShuffledBlocks(blocks.num_blocks, seed, i) for i, blocks in enumerate(sources)]
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start
        self.seq_len = sources[0].seq_len
        self.dtype = np.result_type(*(blocks.dtype for blocks in sources))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        batch = worker
        while True:
            yield self.batch(batch)
            batch += workers

    def batch(self, index: int) -> Batch:
        """This rank's `index`-th batch."""
        first = self.start + (index * self.world_size + self.rank) * self.batch_size
        sources, within = self.mixture.locate(np.arange(first, first + self.batch_size))
        tokens = np.empty((self.batch_size, self.seq_len + 1), dtype=self.dtype)
        for s in np.unique(sources).tolist():
            rows = sources == s
            tokens[rows] = self.sources[s].read(self.orders[s](within[rows]))
        return to_batch(tokens)


class ValBatches(IterableDataset):
    """Every block of one split, in order, in batches; rank r of W takes blocks r, r + W, ...

    The last batch of a rank may be short, and ranks may differ by one batch: no block is dropped
    or repeated, so summed losses over all ranks cover the split exactly once.
    """

    def __init__(self, blocks: Blocks, batch_size: int, rank: int = 0, world_size: int = 1):
        self.blocks, self.batch_size = blocks, batch_size
        self.ids = np.arange(rank, blocks.num_blocks, world_size)

    def __iter__(self) -> Iterator[Batch]:
        # no __len__: Lightning would refuse a rank with no batch (there can be more ranks than blocks)
        worker, workers = _worker()
        for b in range(worker, math.ceil(len(self.ids) / self.batch_size), workers):
            yield to_batch(self.blocks.read(self.ids[b * self.batch_size:(b + 1) * self.batch_size]))


def _worker() -> tuple[int, int]:
    """(this dataloader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)
