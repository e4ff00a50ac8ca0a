"""What datamodules with an endless training stream share: the stream position, saved in
checkpoints for an exact resume, and the split of the stream over ranks; and for a finite training
set visited once per epoch (conversations, pairs, prompts), the epoch stream itself."""

import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from slmlab.data.errors import DataError, check_at_least
from slmlab.data.streams import EpochBatches, OrderedItems, SampleStream


class TimedDataLoader(DataLoader):
    """A DataLoader that adds up the wall time its iterators spend producing batches: reading, collating,
    pinning, or waiting for workers (`loading_seconds`). Time between batches measured from outside
    would also hold the waits for the GPU's queue whenever the host runs ahead of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loading_seconds = 0.0

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.loading_seconds += time.perf_counter() - start
            yield batch


class StreamDataModule(L.LightningDataModule):
    """Base class: subclasses build their training stream in `train_stream`.

    `samples_consumed` counts training samples delivered to the model on all ranks: it is the
    stream position a resumed run starts from, whatever the number of ranks or workers then.
    """

    def __init__(self, num_workers: int = 0):
        super().__init__()
        self.num_workers = num_workers
        self.batches_consumed = 0  # training batches delivered to the model on this rank
        self.samples_consumed = 0  # training samples delivered on all ranks: the stream position
        self._world_size = 1
        self._train_loader: TimedDataLoader | None = None

    def train_stream(self, rank: int, world_size: int, start: int) -> SampleStream:
        """This rank's endless training stream from global sample `start` on."""
        raise NotImplementedError

    def rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        """The endless training stream of this rank, from the sample after the last one consumed."""
        rank, self._world_size = self.rank_and_world_size()
        self._train_loader = self.loader(self.train_stream(rank, self._world_size, start=self.samples_consumed))
        return self._train_loader

    @property
    def train_loading_seconds(self) -> float:
        """Wall time this process has spent waiting for training batches (`TimedDataLoader`)."""
        return self._train_loader.loading_seconds if self._train_loader is not None else 0.0

    def loader(self, dataset: IterableDataset) -> TimedDataLoader:
        # batch_size=None: the datasets yield collated batches
        return TimedDataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available())

    # -- exact resume --------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # counts what reached the model, not what the loader's workers have prefetched
        if self.trainer is not None and self.trainer.training:
            self.batches_consumed += 1
            self.samples_consumed += _num_samples(batch) * self._world_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_consumed = state_dict["batches_consumed"]
        self.samples_consumed = state_dict["samples_consumed"]


class EpochDataModule(StreamDataModule):
    """Base class for a finite training set: epoch e visits every training sample once, in an order
    seeded by (seed, e). Subclasses set, in `setup`, `train_collate` and `val_collate`: picklable
    callables from sample indices to a batch, with `len()` the number of samples."""

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0):
        super().__init__(num_workers)
        check_at_least(1, batch_size=batch_size)
        check_at_least(0, seed=seed, num_workers=num_workers)
        self.batch_size, self.seed = batch_size, seed
        self.train_collate: Callable[[np.ndarray], Any] | None = None
        self.val_collate: Callable[[np.ndarray], Any] | None = None

    @property
    def train_size(self) -> int:
        """Training samples per epoch."""
        if self.train_collate is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the training set's size")
        return len(self.train_collate)

    def steps_per_epoch(self, world_size: int, accumulate: int) -> float:
        """Optimizer steps in one epoch: fractional, so that a stage can train for exactly
        `epochs * steps_per_epoch` steps (0.5 epochs = half of the samples)."""
        return self.train_size / (self.batch_size * world_size * accumulate)

    def train_stream(self, rank: int, world_size: int, start: int) -> EpochBatches:
        return EpochBatches(self.train_size, self.train_collate, self.batch_size, self.seed, rank, world_size, start)

    def val_loader(self) -> DataLoader:
        """Every validation sample once, in order, split over the ranks."""
        rank, world_size = self.rank_and_world_size()
        return self.loader(OrderedItems(len(self.val_collate), self.val_collate, self.batch_size, rank, world_size))


def _num_samples(batch: Any) -> int:
    """Samples in a batch: a dict of tensors with the batch first, or a list of samples."""
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def check_fraction(**values: float) -> None:
    """DataError naming the first argument that is not a number in (0, 1)."""
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
            raise DataError(f"{key}={value!r}: must be a number in (0, 1)")
