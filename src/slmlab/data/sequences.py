"""Token sequences with a loss mask (tokenized conversations): stored flat, packed into blocks, and
collated into right-padded batches of inputs and labels."""

from collections.abc import Sequence

import numpy as np
import torch

from slmlab.data.streams import Batch
from slmlab.training.losses import IGNORE_INDEX


class Sequences:
    """n token sequences of varying length, each token with a mask bit (True: its prediction is learnt).

    Stored as flat arrays, so that millions of conversations take little memory and pickle to
    dataloader workers quickly. Packed sequences (`packed`) also keep each token's position in the
    document it came from (`positions`, [total]); None for unpacked ones, whose positions are 0, 1, ...
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray, positions: np.ndarray | None = None):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets  # [total], [total], [n + 1]
        self.positions = positions

    @classmethod
    def from_lists(cls, sequences: Sequence[tuple[Sequence[int], Sequence[bool]]]) -> "Sequences":
        lengths = [len(ids) for ids, _ in sequences]
        tokens = np.fromiter((t for ids, _ in sequences for t in ids), np.int32, sum(lengths))
        mask = np.fromiter((m for _, mask in sequences for m in mask), np.bool_, sum(lengths))
        return cls(tokens, mask, np.cumsum([0] + lengths, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) of sequence i."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:end], self.mask[start:end]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def packed(self, groups: Sequence[Sequence[int]]) -> "Sequences":
        """One sequence per group: its sequences concatenated, in order, each token keeping its position
        in its own sequence."""
        order = [i for group in groups for i in group]
        tokens = np.concatenate([self[i][0] for i in order]) if order else self.tokens[:0]
        mask = np.concatenate([self[i][1] for i in order]) if order else self.mask[:0]
        positions = np.concatenate([self.positions_of(i) for i in order]) if order else np.zeros(0, np.int32)
        sizes = [sum(self.offsets[i + 1] - self.offsets[i] for i in group) for group in groups]
        return Sequences(tokens, mask, np.cumsum([0] + sizes, dtype=np.int64), positions)

    def positions_of(self, i: int) -> np.ndarray:
        """The position of each token of sequence i in its document."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return np.arange(end - start, dtype=np.int32) if self.positions is None else self.positions[start:end]


def pack_greedily(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the sequences in each block: next-fit in the given order, a sequence goes into the
    current block while it fits, else it starts a new one. No sequence is split; one longer than
    `capacity` gets a block of its own (cut the sequences to `capacity` first)."""
    groups: list[list[int]] = []
    free = 0
    for i, length in enumerate(lengths):
        if not groups or length > free:
            groups.append([])
            free = capacity
        groups[-1].append(i)
        free -= length
    return groups


class PaddedBatches:
    """Collate: sequence indices [B] -> {"input_ids": LongTensor[B, seq_len], "labels": LongTensor[B, seq_len]}.

    Row b holds the first seq_len + 1 tokens of its sequence t: input_ids = t[:-1], labels = t[1:]
    where the *label's* token is masked True, IGNORE_INDEX elsewhere; right-padded with `pad_id`
    (inputs) and IGNORE_INDEX (labels). The fixed width keeps shapes static across steps.
    Packed sequences add "positions": LongTensor[B, seq_len], each input token's position in its own
    document (the padding is a document of its own), which keeps the model's documents apart.
    """

    def __init__(self, sequences: Sequences, seq_len: int, pad_id: int):
        self.sequences, self.seq_len, self.pad_id = sequences, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.sequences)

    def __call__(self, items: np.ndarray) -> Batch:
        input_ids = torch.full((len(items), self.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), self.seq_len), IGNORE_INDEX, dtype=torch.long)
        positions = None if self.sequences.positions is None else torch.empty_like(input_ids)
        for row, i in enumerate(np.asarray(items).tolist()):
            tokens, mask = self.sequences[i]
            tokens, mask = torch.from_numpy(tokens[:self.seq_len + 1].astype(np.int64)), mask[:self.seq_len + 1]
            n = len(tokens) - 1
            input_ids[row, :n] = tokens[:-1]
            labels[row, :n] = tokens[1:].masked_fill(torch.from_numpy(~mask[1:]), IGNORE_INDEX)
            if positions is not None:
                positions[row, :n] = torch.from_numpy(self.sequences.positions_of(i)[:n].astype(np.int64))
                positions[row, n:] = torch.arange(self.seq_len - n)
        batch = {"input_ids": input_ids, "labels": labels}
        return batch if positions is None else batch | {"positions": positions}


class PairBatches:
    """Collate: pair indices [B] -> {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"},
    each LongTensor[B, seq_len], as `PaddedBatches` makes them, and "pair_index" [B] (the indices, for
    values kept per pair such as a reference's log-probs)."""

    def __init__(self, chosen: Sequences, rejected: Sequences, seq_len: int, pad_id: int):
        self.chosen = PaddedBatches(chosen, seq_len, pad_id)
        self.rejected = PaddedBatches(rejected, seq_len, pad_id)

    def __len__(self) -> int:
        return len(self.chosen)

    def __call__(self, items: np.ndarray) -> Batch:
        chosen, rejected = self.chosen(items), self.rejected(items)
        return {"chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
                "pair_index": torch.as_tensor(np.asarray(items), dtype=torch.long)}
