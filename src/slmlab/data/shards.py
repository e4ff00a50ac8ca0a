"""Token shards on disk: flat little-endian token arrays (`.bin`) described by `manifest.json`.

    out_dir/
      train_00000.bin  train_00001.bin ...  val_00000.bin ...
      manifest.json    written last: a directory without it is "not prepared"

Each split is one token stream (documents separated by EOS), cut into shards of at most
`shard_tokens` tokens. The manifest records every shard's size and sha256, the tokenizer the
tokens belong to, and the UTF-8 bytes of the split's source text (for bits-per-byte).
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_origin

import numpy as np

from slmlab.data.atomic import atomic_write
from slmlab.data.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
VERIFY_MODES = ("size", "hash")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32; always little-endian so shards move between machines."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def check_field_types(record: object) -> None:
    """TypeError naming the field whose value is not of its declared type (a hand-edited or damaged
    manifest: a null file name, a vocab_size written as a string); lists and dicts are checked item by item."""
    for f in fields(record):
        value, expected = getattr(record, f.name), f.type
        if get_origin(expected) in (list, dict):
            continue
        if expected is float:
            expected = int | float
        if isinstance(value, bool) or not isinstance(value, expected):
            name = getattr(f.type, "__name__", f.type)  # int, not <class 'int'>; unions as written
            raise TypeError(f"{type(record).__name__.lower()} field {f.name}={value!r} is not {name}")


@dataclass
class Shard:
    """One `.bin` file."""
    file: str  # relative to the shard directory
    tokens: int
    sha256: str


@dataclass
class Split:
    """One split's token stream, shard after shard, and the text it came from."""
    shards: list[Shard] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text, before normalization


@dataclass
class Manifest:
    """`manifest.json`: how to read the shards and which tokenizer made them."""
    vocab_size: int
    tokenizer_hash: str
    eos_id: int
    val_fraction: float
    splits: dict[str, Split]
    skipped_documents: int = 0  # not valid UTF-8, in neither split
    split_key: str | None = None  # the record field that decided the split (None: the text)
    # the raw source's settings that decided what the shards hold (`prepare.raw_settings`); None in
    # manifests written before they were recorded
    raw: dict | None = None

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def save(self, out_dir: str | Path) -> None:
        record = {"format_version": FORMAT_VERSION, "dtype": self.dtype.name, **asdict(self)}
        with atomic_write(Path(out_dir) / MANIFEST) as f:
            f.write(json.dumps(record, indent=2).encode())

    @classmethod
    def load(cls, out_dir: str | Path) -> "Manifest":
        path = Path(out_dir) / MANIFEST
        if not path.is_file():
            raise DataError(f"{path} not found: {out_dir} holds no prepared shards "
                            "(never prepared, or preparation was interrupted)")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            # a list or scalar where an object belongs would fail below with an AttributeError, or a
            # TypeError that does not say what is wrong
            if not isinstance(record, dict):
                raise TypeError(f"the top level is a {type(record).__name__}, expected an object")
            version, dtype, splits = record.pop("format_version"), record.pop("dtype"), record.pop("splits")
            if not isinstance(splits, dict) or not all(isinstance(split, dict) for split in splits.values()):
                raise TypeError("`splits` must be an object of objects, one per split")
            splits = {name: Split([Shard(**s) for s in split.pop("shards")], **split)
                      for name, split in splits.items()}
            manifest = cls(splits=splits, **record)
            for part in (manifest, *splits.values(), *(shard for split in splits.values() for shard in split.shards)):
                check_field_types(part)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: format_version {version}, this code reads {FORMAT_VERSION}; "
                            f"delete {out_dir} to prepare it again")
        if dtype != manifest.dtype.name:
            raise DataError(f"{path}: dtype {dtype} does not fit vocab_size {manifest.vocab_size}")
        if missing := set(SPLITS) - set(manifest.splits):
            raise DataError(f"{path}: no split {sorted(missing)}")
        for name, split in manifest.splits.items():  # bits-per-byte and the logs read the split's total
            if split.tokens != (listed := sum(shard.tokens for shard in split.shards)):
                raise DataError(f"{path}: split {name!r} counts {split.tokens} tokens, its shards {listed}")
        return manifest


class ShardWriter:
    """Append token arrays to `{split}_{i:05d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens={shard_tokens}: must be positive")
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, dtype, shard_tokens
        self.shards: list[Shard] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def write(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens.astype(self.dtype, copy=False))
        self._buffered += len(tokens)
        if self._buffered >= self.shard_tokens:
            pending = np.concatenate(self._buffer)
            full = len(pending) // self.shard_tokens * self.shard_tokens
            for start in range(0, full, self.shard_tokens):
                self._write_shard(pending[start:start + self.shard_tokens])
            self._buffer, self._buffered = [pending[full:]], len(pending) - full

    def close(self) -> list[Shard]:
        """Write the last, partial shard; return all shards written."""
        if self._buffered:
            self._write_shard(np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0
        return self.shards

    def _write_shard(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        with atomic_write(self.out_dir / name) as f:
            f.write(memoryview(tokens))
        self.shards.append(Shard(name, len(tokens), hashlib.sha256(memoryview(tokens)).hexdigest()))


def open_shards(out_dir: str | Path, verify: str = "size") -> Manifest:
    """Load a manifest and check its shards: `"size"` compares file sizes (cheap), `"hash"` also sha256s."""
    if verify not in VERIFY_MODES:
        raise DataError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    out_dir = Path(out_dir)
    manifest = Manifest.load(out_dir)
    itemsize = manifest.dtype.itemsize
    for split in manifest.splits.values():
        for shard in split.shards:
            path = out_dir / shard.file
            if not path.is_file():
                raise DataError(f"{path}: shard listed in {out_dir / MANIFEST} is missing")
            size, expected = path.stat().st_size, shard.tokens * itemsize
            if size != expected:
                raise DataError(f"{path}: {size} bytes, the manifest says {expected} "
                                f"({shard.tokens} {manifest.dtype} tokens); the shard is corrupt, prepare again")
            if verify == "hash" and _sha256(path) != shard.sha256:
                raise DataError(f"{path}: sha256 differs from the manifest's; the shard is corrupt, prepare again")
    return manifest


def check_tokenizer(manifest: Manifest, out_dir: str | Path, tokenizer_hash: str, vocab_size: int) -> None:
    """Refuse shards made with a tokenizer other than the configured one."""
    if (manifest.tokenizer_hash, manifest.vocab_size) != (tokenizer_hash, vocab_size):
        raise DataError(
            f"{Path(out_dir) / MANIFEST}: shards were made with tokenizer {manifest.tokenizer_hash} "
            f"(vocab {manifest.vocab_size}), but the configured tokenizer is {tokenizer_hash} (vocab {vocab_size}); "
            f"delete {out_dir} to prepare it again with this tokenizer")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
