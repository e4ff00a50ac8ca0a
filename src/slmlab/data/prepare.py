"""Prepare token shards: raw documents -> train/val split -> tokens (+ EOS each) -> shards + manifest.

    python -m slmlab.data.prepare data=de_en   # the tokenizer and shards of conf/data/de_en.yaml

Sources whose shards exist are left alone (an error if their `raw` settings changed since); the same
happens at the start of training.
"""

import fcntl
import hashlib
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
from omegaconf import DictConfig

from slmlab.data.errors import DataError, check_at_least
from slmlab.data.readers import DocumentReader
from slmlab.data.shards import MANIFEST, SPLITS, Manifest, ShardWriter, Split, token_dtype
from slmlab.data.tokenizer import EOS, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

_BATCH_CHARS = 1 << 20  # characters of text per tokenization task: large enough to amortize the IPC
LOCK = ".prepare.lock"
# the DocumentReader settings that decide which documents, and which of their text, reach the shards
# (`split_key` is recorded apart, with `val_fraction`; `on_decode_error` changes only whether a bad
# document fails the run)
_READER_SETTINGS = ("format", "text_key", "hf_dataset", "hf_config", "hf_split", "max_documents")


def is_val_document(split_id: bytes, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split, from its split id (its UTF-8 text, or
    its record's `split_key`; see `DocumentReader`).

    Decided by a hash of that id alone: the split does not depend on document order or on the
    other documents, and exact duplicates (or translations sharing a key) land in the same split.
    """
    digest = hashlib.blake2b(split_id, digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


class _Chunk(NamedTuple):
    """Tokens of some consecutive documents of one split, EOS after each; with their count and bytes."""
    tokens: np.ndarray
    documents: int
    bytes: int


class _Encoder:
    """Splits a batch of documents into train/val and tokenizes each part."""

    def __init__(self, tokenizer_path: Path, val_fraction: float):
        self.tokenizer = load_tokenizer(tokenizer_path)
        # "<|endoftext|>" written in a document is text, not a document boundary
        self.tokenizer.encode_special_tokens = True
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.dtype = token_dtype(self.tokenizer.get_vocab_size())
        self.val_fraction = val_fraction

    def __call__(self, documents: list[tuple[str, bytes]]) -> dict[str, _Chunk]:
        by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
        n_bytes = dict.fromkeys(SPLITS, 0)
        for text, split_id in documents:
            split = "val" if is_val_document(split_id, self.val_fraction) else "train"
            by_split[split].append(text)
            n_bytes[split] += len(text.encode("utf-8"))
        chunks = {}
        for split, docs in by_split.items():
            ids = [encoding.ids for encoding in self.tokenizer.encode_batch_fast(docs)]  # no offsets
            count = sum(map(len, ids)) + len(ids)
            tokens = np.fromiter(chain.from_iterable(i + [self.eos_id] for i in ids), self.dtype, count)
            chunks[split] = _Chunk(tokens, len(docs), n_bytes[split])
        return chunks


def prepare_shards(reader: DocumentReader, out_dir: str | Path, tokenizer_path: str | Path, *,
                   val_fraction: float, shard_tokens: int = 50_000_000, num_proc: int = 1,
                   max_tokens: int | None = None) -> Manifest:
    """Tokenize `reader`'s documents into train/val token shards in `out_dir`; return the manifest.

    Tokenization runs in `num_proc` processes, in order, so the output does not depend on it.
    `max_tokens` stops reading once that many tokens (both splits) are written, at the end of a
    batch of about 1M characters. Every file is written atomically and the manifest last: a run
    killed part way leaves a directory that does not load and is prepared again next time;
    preparing deletes the shards and temp files a previous run left in `out_dir`, so no other
    process may use `out_dir` meanwhile (see `preparation_lock`). The manifest records the reader's
    settings and `max_tokens` (`raw_settings`).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: must be in (0, 1)")
    if num_proc < 1:
        raise DataError(f"num_proc={num_proc}: must be at least 1")
    if max_tokens is not None:  # 0 or -1 stopped after the first batch; a string failed mid-way, naming nothing
        check_at_least(1, max_tokens=max_tokens)
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # while shards are rewritten the directory must not load
    # an earlier preparation's shards, and the temp files of a writer killed mid-shard (`atomic_write`),
    # would otherwise stay on disk beside the new ones, unread
    for split in SPLITS:
        for stale in (*out_dir.glob(f"{split}_*.bin"), *out_dir.glob(f".{split}_*.bin.*.tmp")):
            stale.unlink()
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size()
    writers = {split: ShardWriter(out_dir, split, token_dtype(vocab_size), shard_tokens) for split in SPLITS}
    splits = {split: Split() for split in SPLITS}
    # skipped documents are counted per batch: with num_proc > 1 the reader runs batches ahead of the
    # writer, and those past max_tokens are never written, so `reader.skipped` depends on num_proc
    skipped = 0
    batches = _encoded(_batches(reader), tokenizer_path, val_fraction, num_proc)
    with closing(batches):
        for chunks, batch_skipped in batches:
            for split, chunk in chunks.items():
                writers[split].write(chunk.tokens)
                splits[split].tokens += len(chunk.tokens)
                splits[split].documents += chunk.documents
                splits[split].bytes += chunk.bytes
            skipped += batch_skipped
            if max_tokens is not None and sum(s.tokens for s in splits.values()) >= max_tokens:
                break
    for split, writer in writers.items():
        splits[split].shards = writer.close()
    manifest = Manifest(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash(tokenizer_path),
                        eos_id=tokenizer.token_to_id(EOS), val_fraction=val_fraction, splits=splits,
                        skipped_documents=skipped, split_key=reader.split_key,
                        raw=raw_settings(reader, max_tokens))
    manifest.save(out_dir)
    log.info("prepared %s: %s; skipped %d documents that are not valid UTF-8", out_dir,
             "; ".join(f"{name} {s.tokens:,} tokens, {s.documents:,} documents, {s.bytes:,} bytes"
                       for name, s in splits.items()), skipped)
    return manifest


def raw_settings(reader: DocumentReader, max_tokens: int | None) -> dict:
    """The settings of a raw source that decide what its shards hold, as the manifest records them.

    Files are recorded by name and size, not path: a moved checkout or artifacts shared between
    machines still match, and a file rewritten with other text of the same name does not. `files`
    is None when some configured file is not found (see `check_raw_settings`).
    """
    files = None
    if reader.files is not None:
        try:
            paths = list(reader.paths())
        except DataError:  # a pattern matching no file
            paths = None
        if paths is not None and all(path.is_file() for path in paths):
            files = [{"name": path.name, "bytes": path.stat().st_size} for path in paths]
    return {"files": files, **{key: getattr(reader, key) for key in _READER_SETTINGS}, "max_tokens": max_tokens}


def check_raw_settings(source: str, out_dir: Path, manifest: Manifest, reader: DocumentReader,
                       max_tokens: int | None) -> None:
    """Refuse prepared shards whose recorded raw settings differ from the configured ones: they
    were never read again, so a raised `max_documents` silently kept the old shards."""
    if manifest.raw is None:
        log.info("source %r: %s records no raw settings (prepared by an older slmlab): cannot check them "
                 "against the configured `raw`", source, out_dir / MANIFEST)
        return
    configured, recorded = raw_settings(reader, max_tokens), dict(manifest.raw)
    if reader.files is not None and configured["files"] is None:
        # the raw files are gone (or elsewhere) once prepared: the shards are still usable
        log.info("source %r: some of raw.files are not found: cannot check them against %s", source, out_dir / MANIFEST)
        recorded.pop("files", None)
        configured.pop("files")
    if differ := [f"raw.{key}: {_shown(key, recorded.get(key))} when prepared, {_shown(key, configured.get(key))} now"
                  for key in dict.fromkeys([*recorded, *configured]) if recorded.get(key) != configured.get(key)]:
        raise DataError(f"source {source!r}: the shards in {out_dir} were prepared with other raw settings: "
                        f"{'; '.join(differ)}. Delete {out_dir} to prepare it again, or give the source another `path`")


def _shown(key: str, value: object) -> str:
    if key == "files" and value is not None:
        return "[" + ", ".join(f"{file['name']} ({file['bytes']:,} bytes)" for file in value) + "]"
    return repr(value)


@contextmanager
def preparation_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out_dir` (its file `.prepare.lock`) while preparing it.

    Processes on several nodes, or runs started together, would otherwise delete each other's temp
    files or a manifest just loaded. flock, not a file created and deleted: the kernel releases it
    when its holder dies, so a killed preparation leaves no stale lock, and the file is never
    deleted (deleting it while another process waits on it would let two processes hold the lock).
    On shared storage this needs flock support across nodes (NFS and Lustre's flock mount option).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", out_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _batches(reader: DocumentReader) -> Iterator[tuple[list[tuple[str, bytes]], int]]:
    """The reader's documents in batches of about `_BATCH_CHARS` characters, each with the number of
    documents skipped since the previous batch; the last batch may be empty, carrying only the
    documents skipped after the last one read."""
    batch, chars, skipped = [], 0, 0
    for doc in reader.with_split_ids():
        batch.append(doc)
        chars += len(doc[0])
        if chars >= _BATCH_CHARS:
            yield batch, reader.skipped - skipped
            batch, chars, skipped = [], 0, reader.skipped
    if batch or reader.skipped > skipped:
        yield batch, reader.skipped - skipped


def _encoded(batches: Iterable[tuple[list[tuple[str, bytes]], int]], tokenizer_path: Path, val_fraction: float,
             num_proc: int) -> Iterator[tuple[dict[str, _Chunk], int]]:
    """Encode batches in order, passing each one's skipped count along; with `num_proc` > 1 in worker
    processes, at most 2 batches each in flight (so a huge streamed source is never read far ahead
    of what is written)."""
    if num_proc == 1:
        encode = _Encoder(tokenizer_path, val_fraction)
        yield from ((encode(batch), skipped) for batch, skipped in batches)
        return
    # spawn, not fork: the parent may already run tokenizer and torch threads
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, _start_worker, (tokenizer_path, val_fraction)) as pool:
        pending = deque()
        for batch, skipped in batches:
            pending.append((pool.apply_async(_encode_in_worker, (batch,)), skipped))
            if len(pending) >= 2 * num_proc:
                result, skipped = pending.popleft()
                yield result.get(), skipped
        while pending:
            result, skipped = pending.popleft()
            yield result.get(), skipped


_worker_encoder: _Encoder | None = None


def _start_worker(tokenizer_path: Path, val_fraction: float) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes of one thread each
    _worker_encoder = _Encoder(tokenizer_path, val_fraction)


def _encode_in_worker(documents: list[tuple[str, bytes]]) -> dict[str, _Chunk]:
    return _worker_encoder(documents)


@hydra.main(config_path=str(Path(__file__).resolve().parents[3] / "conf"), config_name="config",
            version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Train the tokenizer and prepare the shards of `cfg.data`, where they are missing."""
    hydra.utils.instantiate(cfg.data).prepare_data()


if __name__ == "__main__":
    # imported here, not at the top: tokenizer worker processes import this module and need no torch
    from slmlab.config import register_configs

    register_configs()
    main()
