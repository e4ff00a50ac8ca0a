"""LightningDataModule over token shards: a weighted, shuffled, exactly resumable training stream,
and one validation loader per source. See `conf/data/de_en.yaml` for a configuration.
"""

import logging
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from datamodules.stream import StreamDataModule, check_at_least, check_fraction
from slmlab.data.bags import BagSchedule
from slmlab.data.blocks import Blocks
from slmlab.data.errors import DataError
from slmlab.data.mixture import Mixture
from slmlab.data.prepare import check_raw_settings, is_val_document, preparation_lock, prepare_shards
from slmlab.data.readers import DocumentReader
from slmlab.data.shards import MANIFEST, VERIFY_MODES, Manifest, check_tokenizer, open_shards
from slmlab.data.streams import TrainBatches, ValBatches
from slmlab.data.tokenizer import EOS, load_tokenizer, tokenizer_hash, train_tokenizer

log = logging.getLogger(__name__)

_SOURCE_KEYS = {"path", "weight", "raw"}
_TOKENIZER_KEYS = {"path", "vocab_size", "min_frequency", "max_documents"}


class TokenShardDataModule(StreamDataModule):
    """Token shards of named sources, prepared from raw text on first use.

    sources: name -> {path: shard directory, weight: share of training samples (default 1; 0 for a
        validation-only source), raw: DocumentReader arguments plus an optional max_tokens, or None
        for shards prepared elsewhere}.
    tokenizer: {path: tokenizer.json, vocab_size, min_frequency: 2, max_documents: None}. When the
        file is missing it is trained on the train split of every raw source (at most max_documents
        documents of each); its vocabulary can come out smaller than vocab_size, never larger.
    Training batches are {"input_ids", "labels"}: LongTensor[batch_size, seq_len], labels shifted
    by one. The position in the stream is saved in checkpoints, so a resumed run continues with
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, sources: Mapping[str, Mapping], tokenizer: Mapping, seq_len: int, batch_size: int,
                 num_workers: int = 0, seed: int = 1234, val_fraction: float = 0.05,
                 shard_tokens: int = 50_000_000, num_proc: int = 1, verify: str = "size"):
        super().__init__(num_workers)
        check_at_least(1, seq_len=seq_len, batch_size=batch_size, shard_tokens=shard_tokens, num_proc=num_proc)
        check_at_least(0, seed=seed, num_workers=num_workers)
        check_fraction(val_fraction=val_fraction)
        if verify not in VERIFY_MODES:
            raise DataError(f"verify={verify!r} is not one of {VERIFY_MODES}")
        if not sources:
            raise DataError("sources: at least one source is needed")
        for name, source in sources.items():
            _check_keys(source, _SOURCE_KEYS, f"source {name!r}", required={"path"})
        _check_keys(tokenizer, _TOKENIZER_KEYS, "tokenizer", required={"path", "vocab_size"})
        check_at_least(1, **{f"tokenizer.{key}": tokenizer[key] for key in ("vocab_size", "min_frequency")
                             if key in tokenizer})  # int() named no key, and cut 4.5 to 4
        if tokenizer.get("max_documents") is not None:  # islice() named no key for -1, and 0 trained on nothing
            check_at_least(1, **{"tokenizer.max_documents": tokenizer["max_documents"]})

        self.paths = {name: Path(source["path"]) for name, source in sources.items()}
        first_with = {}  # shard directory -> the first source of it
        for name, path in self.paths.items():
            # a second source of the same shards was "already prepared": its raw text was silently never read
            if (other := first_with.setdefault(path.resolve(), name)) != name:
                raise DataError(f"sources {other!r} and {name!r}: both have the shard directory {path.resolve()}; "
                                "each source needs its own path")
        self.readers = {name: _reader(name, source["raw"]) for name, source in sources.items()
                        if source.get("raw") is not None}  # name -> (DocumentReader, max_tokens)
        self.mixture = Mixture({name: _weight(name, source.get("weight", 1.0)) for name, source in sources.items()})
        self.tokenizer_path = Path(tokenizer["path"])
        self.max_vocab_size = tokenizer["vocab_size"]
        self.min_frequency = tokenizer.get("min_frequency", 2)
        self.tokenizer_max_documents = tokenizer.get("max_documents")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.val_fraction, self.shard_tokens, self.num_proc, self.verify = val_fraction, shard_tokens, num_proc, verify

        self.val_sources = list(sources)  # the order of val_dataloader()'s loaders
        # set by setup()
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.eos_id: int | None = None
        self.manifests: dict[str, Manifest] = {}
        self.train_blocks: dict[str, Blocks] = {}
        self.val_blocks: dict[str, Blocks] = {}
        self.bag_schedule: BagSchedule | None = None  # set by a pretraining stage with superposition

    # -- preparation ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Train the tokenizer if its file is missing; prepare every source whose manifest is missing.

        A no-op when all exist; a prepared source whose `raw` settings changed since is an error.
        Lightning calls it on one process per node: on shared storage one process prepares a source
        while the others wait for it and then use its shards (`preparation_lock`). Concurrent
        tokenizer trainings only repeat work, as the file is written atomically and deterministically
        (set `prepare_data_per_node = False` on the datamodule to prepare once for all nodes).
        """
        if not self.tokenizer_path.exists():
            if not self.readers:
                raise DataError(f"{self.tokenizer_path}: tokenizer not found, and no source has `raw` text "
                                "to train one")
            log.info("training a %d-token tokenizer on %s", self.max_vocab_size, ", ".join(self.readers))
            train_tokenizer(self._tokenizer_texts(), self.max_vocab_size, self.tokenizer_path, self.min_frequency)
        for name, out_dir in self.paths.items():
            # locked only to prepare: prepared shards stay usable from a directory this user cannot write
            if name in self.readers and not (out_dir / MANIFEST).exists():
                with preparation_lock(out_dir):
                    if not (out_dir / MANIFEST).exists():  # again: another process may have prepared it meanwhile
                        reader, max_tokens = self.readers[name]
                        prepare_shards(reader, out_dir, self.tokenizer_path, val_fraction=self.val_fraction,
                                       shard_tokens=self.shard_tokens, num_proc=self.num_proc, max_tokens=max_tokens)
                        continue
            if not (out_dir / MANIFEST).exists():
                raise DataError(f"source {name!r}: {out_dir / MANIFEST} not found, and the source has no `raw` "
                                "to prepare it from")
            if name in self.readers:
                check_raw_settings(name, out_dir, Manifest.load(out_dir), *self.readers[name])
            log.info("source %r: shards in %s already prepared", name, out_dir)

    def _tokenizer_texts(self) -> Iterator[str]:
        """The train-split documents of every raw source: validation text must not shape the tokenizer."""
        for reader, _ in self.readers.values():
            train = (text for text, split_id in reader.with_split_ids()
                     if not is_val_document(split_id, self.val_fraction))
            yield from islice(train, self.tokenizer_max_documents)

    def setup(self, stage: str | None = None) -> None:
        """Open the tokenizer and every source's shards, and check that they belong together."""
        if self.tokenizer is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_path)
        vocab_size = tokenizer.get_vocab_size()
        if vocab_size > self.max_vocab_size:
            raise DataError(f"{self.tokenizer_path}: {vocab_size} tokens, more than tokenizer.vocab_size="
                            f"{self.max_vocab_size}; delete it to train a new one, or raise vocab_size")
        expected_hash = tokenizer_hash(self.tokenizer_path)
        for index, (name, out_dir) in enumerate(self.paths.items()):
            manifest = open_shards(out_dir, self.verify)
            check_tokenizer(manifest, out_dir, expected_hash, vocab_size)
            split_key = self.readers[name][0].split_key if name in self.readers else manifest.split_key
            if (manifest.val_fraction, manifest.split_key) != (self.val_fraction, split_key):
                raise DataError(f"{out_dir / MANIFEST}: prepared with val_fraction={manifest.val_fraction}, "
                                f"split_key={manifest.split_key}; configured val_fraction={self.val_fraction}, split_key={split_key}; "
                                f"delete {out_dir} to prepare it again")
            self.manifests[name] = manifest
            self.val_blocks[name] = _nonempty(Blocks(out_dir, manifest, "val", self.seq_len), name, "val")
            self.train_blocks[name] = Blocks(out_dir, manifest, "train", self.seq_len)
            if self.mixture.counts[index] > 0:
                _nonempty(self.train_blocks[name], name, "train")
        self.tokenizer, self.vocab_size, self.eos_id = tokenizer, vocab_size, tokenizer.token_to_id(EOS)

    def bytes_per_token(self, source: str) -> float:
        """UTF-8 bytes of source text per token, measured on the source's validation split:
        bits-per-byte = loss (nats/token) / ln 2 / bytes_per_token."""
        split = self.manifests[source].splits["val"]
        return split.bytes / split.tokens

    # -- loaders -------------------------------------------------------------------------------

    def read_bags(self, schedule: BagSchedule) -> None:
        """Token superposition training: the training stream's samples before each phase's end read
        bag * (seq_len + 1) tokens (`slmlab/data/bags.py`). Set before the training loader is made."""
        self.bag_schedule = schedule

    def train_stream(self, rank: int, world_size: int, start: int) -> TrainBatches:
        return TrainBatches(list(self.train_blocks.values()), self.mixture, self.batch_size, self.seed,
                            rank, world_size, start, self.bag_schedule)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per source, in the order of `val_sources`, over every block of its val split."""
        rank, world_size = self.rank_and_world_size()
        return [self.loader(ValBatches(self.val_blocks[name], self.batch_size, rank, world_size))
                for name in self.val_sources]


def _check_keys(config: Mapping, allowed: set[str], where: str, required: set[str]) -> None:
    if not isinstance(config, Mapping):  # e.g. `data.sources.de=null`: else "'NoneType' object is not iterable"
        raise DataError(f"{where}: expected a mapping with keys {sorted(allowed)}, got {config!r}")
    if unknown := set(config) - allowed:
        raise DataError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    if missing := required - set(config):
        raise DataError(f"{where}: missing keys {sorted(missing)}")


def _weight(name: str, weight: object) -> float:
    """A source's weight as a float; DataError naming the source for a null or a string (float() names neither)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(f"source {name!r}: weight={weight!r} must be a number (0 for a validation-only source)")
    return float(weight)


def _reader(name: str, raw: Mapping) -> tuple[DocumentReader, int | None]:
    if not isinstance(raw, Mapping):  # a file name given as `raw` failed in dict() with a ValueError naming nothing
        raise DataError(f"source {name!r}: raw={raw!r} must be a mapping of DocumentReader arguments, "
                        "e.g. {files: [...], format: jsonl}")
    raw = dict(raw)
    max_tokens = raw.pop("max_tokens", None)
    if max_tokens is not None:  # checked here, not when preparing: that can be after hours of tokenizer training
        check_at_least(1, **{f"source {name!r}: raw.max_tokens": max_tokens})
    try:
        return DocumentReader(**raw), max_tokens
    except TypeError as e:  # an unknown key
        raise DataError(f"source {name!r}: raw {raw}: {e}") from None
    except DataError as e:
        raise DataError(f"source {name!r}: {e}") from None


def _nonempty(blocks: Blocks, source: str, split: str) -> Blocks:
    if blocks.num_blocks == 0:
        hint = "raise val_fraction (then delete the shards to prepare them again)" if split == "val" else "add text"
        raise DataError(f"source {source!r}: its {split} split is shorter than one block of seq_len + 1 = "
                        f"{blocks.seq_len + 1} tokens; {hint}, or lower seq_len")
    return blocks
