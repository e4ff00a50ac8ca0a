"""Batches for the DataLoader: endless shuffled streams for training, ordered items for validation.

Every dataset here yields whole collated batches (use `DataLoader(batch_size=None)`). Dataloader
worker w of W yields batches w, w + W, ...; the DataLoader takes one batch from each worker in
turn, so the batch sequence is the same for any number of workers.

    SampleStream   the endless stream of global sample indices, split over ranks and workers
    TrainBatches   ... of token blocks from a weighted mixture of sources (pretraining)
    EpochBatches   ... of items (conversations, pairs, prompts) visited once per epoch
    OrderedStream  every item once, in order, split over ranks and workers
    ValBatches     ... of the token blocks of one split
    OrderedItems   ... of items (held-out conversations, pairs, prompts)
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from slmlab.data.bags import BagSchedule, bag_row_len
from slmlab.data.blocks import Blocks
from slmlab.data.errors import DataError
from slmlab.data.mixture import Mixture, ShuffledBlocks

Batch = dict[str, torch.Tensor]


def to_batch(tokens: np.ndarray) -> Batch:
    """tokens[B, T+1] -> {"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}, labels shifted by one."""
    return {"input_ids": torch.from_numpy(tokens[:, :-1].astype(np.int64)),
            "labels": torch.from_numpy(tokens[:, 1:].astype(np.int64))}


class SampleStream(IterableDataset):
    """Endless batches of global sample indices from sample `start` on, made into batches by the
    subclass's `collate`.

    Global batch b holds samples start + b*batch_size*world_size onwards, and rank r takes the r-th
    `batch_size` of them. When `collate` is a pure function of the sample indices, every batch is a
    pure function of (start, its index): starting anywhere costs nothing (exact resume), and ranks
    and workers never read the same sample.
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[Any]:
        worker, workers = _worker()
        batch = worker
        while True:
            yield self.batch(batch)
            batch += workers

    def batch(self, index: int) -> Any:
        """This rank's `index`-th batch."""
        first = self.start + (index * self.world_size + self.rank) * self.batch_size
        return self.collate(np.arange(first, first + self.batch_size))

    def collate(self, samples: np.ndarray) -> Any:
        """Global sample indices [batch_size] -> one batch."""
        raise NotImplementedError


class TrainBatches(SampleStream):
    """Endless training batches from a weighted mixture of sources, from global sample `start` on.

    Each sample's source comes from `mixture` and its block from a per-source `ShuffledBlocks`. With
    `bags` (token superposition training), a sample of a bag step reads a block of bag * (seq_len + 1)
    tokens instead, from that bag size's own blocking and shuffle of the source.
    """

    def __init__(self, sources: Sequence[Blocks], mixture: Mixture, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: int = 0, bags: BagSchedule | None = None):
        super().__init__(batch_size, rank, world_size, start)
        self.sources, self.mixture, self.bags = sources, mixture, bags
        self.seq_len = sources[0].seq_len
        self.dtype = np.result_type(*(blocks.dtype for blocks in sources))
        self.blockings = {1: sources}  # bag size -> the sources' blocks
        for bag in bags.bags() if bags else []:
            self.blockings[bag] = [blocks.with_seq_len(bag_row_len(self.seq_len, bag) - 1) for blocks in sources]
            for index, blocks in enumerate(self.blockings[bag]):
                if blocks.num_blocks == 0 and mixture.counts[index] > 0:
                    raise DataError(f"{blocks.out_dir}: its train split has no run of {bag_row_len(self.seq_len, bag)} "
                                    f"tokens within a shard, needed for bags of {bag} (stage.superposition)")
        self.orders = {bag: [ShuffledBlocks(blocks.num_blocks, seed, i) for i, blocks in enumerate(blocking)]
                       for bag, blocking in self.blockings.items()}

    def collate(self, samples: np.ndarray) -> Batch:
        bag = self.bags.bag(int(samples[0])) if self.bags else 1
        if self.bags and self.bags.bag(int(samples[-1])) != bag:
            raise DataError(f"samples {samples[0]}..{samples[-1]} straddle the end of a superposition phase")
        sources, within = self.mixture.locate(samples)
        tokens = np.empty((self.batch_size, bag_row_len(self.seq_len, bag)), dtype=self.dtype)
        for s in np.unique(sources).tolist():
            rows = sources == s
            tokens[rows] = self.blockings[bag][s].read(self.orders[bag][s](within[rows]))
        return to_batch(tokens)


class EpochBatches(SampleStream):
    """Endless batches of items 0..num_items-1: epoch e visits every item once, in the permutation
    seeded by (seed, e) (`ShuffledBlocks` of one source); `collate` turns an array of item
    indices into a batch.

    `collate` must be picklable (an object, not a lambda) for dataloader worker processes.
    """

    def __init__(self, num_items: int, collate: Callable[[np.ndarray], Any], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        super().__init__(batch_size, rank, world_size, start)
        self.order = ShuffledBlocks(num_items, seed, 0)  # "blocks" are items here: one source, one order
        self.collate_items = collate

    def collate(self, samples: np.ndarray) -> Any:
        return self.collate_items(self.order(samples))


class OrderedStream(IterableDataset):
    """Every item 0..num_items-1 once, in order, in batches; rank r of W takes items r, r + W, ...

    The last batch of a rank may be short, and ranks may differ by one batch: no item is dropped or
    repeated, so summed losses over all ranks cover the items exactly once.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.batch_size = batch_size
        self.ids = np.arange(rank, num_items, world_size)

    def __iter__(self) -> Iterator[Any]:
        # no __len__: Lightning would refuse a rank with no batch (there can be more ranks than items)
        worker, workers = _worker()
        for b in range(worker, math.ceil(len(self.ids) / self.batch_size), workers):
            yield self.collate(self.ids[b * self.batch_size:(b + 1) * self.batch_size])

    def collate(self, items: np.ndarray) -> Any:
        """Item indices -> one batch."""
        raise NotImplementedError


class ValBatches(OrderedStream):
    """Every block of one split, in order, in batches."""

    def __init__(self, blocks: Blocks, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__(blocks.num_blocks, batch_size, rank, world_size)
        self.blocks = blocks

    def collate(self, items: np.ndarray) -> Batch:
        return to_batch(self.blocks.read(items))


class OrderedItems(OrderedStream):
    """Every item once, in order, collated by `collate` (picklable) from an array of item indices."""

    def __init__(self, num_items: int, collate: Callable[[np.ndarray], Any], batch_size: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(num_items, batch_size, rank, world_size)
        self.collate_items = collate

    def collate(self, items: np.ndarray) -> Any:
        return self.collate_items(items)


def _worker() -> tuple[int, int]:
    """(this dataloader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)
