"""Raw documents (str) from local files or a Hugging Face dataset.

Local formats, by file name or `format`:
  txt      the whole file is one document
  jsonl    one JSON object per line, text under `text_key`
  parquet  column `text_key`, read one row group batch at a time
`.gz` files are decompressed on the fly (`.txt.gz`, `.jsonl.gz`). An empty text is no document, and a
file's UTF-8 byte-order mark is not text.

Each document also has a *split id*, the bytes that decide its train/val split (see
`prepare.is_val_document`): its text, or with `split_key` a field of its record, so that records
sharing a key (a section and its translation) always land in the same split.
"""

import glob
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from slmlab.data.errors import DataError, check_at_least

FORMATS = ("txt", "jsonl", "parquet")
DECODE_ERROR_POLICIES = ("skip", "error")
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a .gz cut short (an interrupted download) or damaged
BOM = "\ufeff".encode()  # the UTF-8 byte-order mark some Windows tools put at the start of a file
_PARQUET_BATCH_ROWS = 1024


class DocumentReader:
    """Iterate the documents of one raw source; every pass restarts from the first document.

    Exactly one of `files` (paths or glob patterns, read in the given order, each pattern's matches
    sorted) or `hf_dataset` (streamed with `datasets.load_dataset(hf_dataset, hf_config, split=hf_split)`).
    Documents that are not valid UTF-8 are counted in `skipped` (`on_decode_error="skip"`) or raise
    a `DataError` naming the file and line (`"error"`). `max_documents` stops after that many documents.
    """

    def __init__(self, files: str | Sequence[str] | None = None, format: str | None = None,
                 text_key: str = "text", hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_split: str = "train", on_decode_error: str = "skip", max_documents: int | None = None,
                 split_key: str | None = None):
        if (files is None) == (hf_dataset is None):
            raise DataError(f"raw source: give exactly one of `files` or `hf_dataset` "
                            f"(got files={files!r}, hf_dataset={hf_dataset!r})")
        if format is not None and format not in FORMATS:
            raise DataError(f"raw source: format={format!r} is not one of {FORMATS}")
        if on_decode_error not in DECODE_ERROR_POLICIES:
            raise DataError(f"raw source: on_decode_error={on_decode_error!r} is not one of {DECODE_ERROR_POLICIES}")
        if max_documents is not None:  # islice() named no key for -1, and 0 read nothing
            check_at_least(1, **{"raw source: max_documents": max_documents})
        if isinstance(files, str):
            files = [files]
        self.files = None if files is None else list(files)
        self.format, self.text_key = format, text_key
        self.hf_dataset, self.hf_config, self.hf_split = hf_dataset, hf_config, hf_split
        self.on_decode_error, self.max_documents, self.split_key = on_decode_error, max_documents, split_key
        self.skipped = 0
        """Documents skipped as invalid UTF-8 in the current (or last) pass."""

    def __iter__(self) -> Iterator[str]:
        return (text for text, _ in self.with_split_ids())

    def with_split_ids(self) -> Iterator[tuple[str, bytes]]:
        """(text, split id) of every document: the split id is the text's UTF-8 bytes, or the
        `split_key` field of its record."""
        self.skipped = 0
        documents = self._hf_documents() if self.hf_dataset else self._file_documents()
        yield from islice(documents, self.max_documents)

    def paths(self) -> Iterator[Path]:
        """The files read, in order: each glob pattern's matches sorted (DataError if none), others as given."""
        for pattern in self.files:
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise DataError(f"{pattern}: no file matches this pattern")
                yield from map(Path, matches)
            else:
                yield Path(pattern)

    def _file_documents(self) -> Iterator[tuple[str, bytes]]:
        for path in self.paths():
            if not path.is_file():
                raise DataError(f"{path}: raw data file not found")
            read = getattr(self, f"_read_{self.format or _infer_format(path)}")
            found, skipped_before = False, self.skipped
            try:
                for document in read(path):
                    found = True
                    yield document
            except GZIP_ERRORS as e:
                raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None
            if not found and self.skipped == skipped_before:
                raise DataError(f"{path}: empty file, no documents")

    def _decode(self, raw: bytes, where: str) -> str | None:
        """`raw` as text, or None when it is not UTF-8 (see `_reject`)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._reject(f"{where}: not valid UTF-8 (byte {e.start})")
            return None

    def _reject(self, problem: str) -> None:
        """Count a document that is not valid UTF-8, or raise, as `on_decode_error` says."""
        if self.on_decode_error == "error":
            raise DataError(f"{problem}; set on_decode_error: skip to drop such documents")
        self.skipped += 1

    def _read_txt(self, path: Path) -> Iterator[tuple[str, bytes]]:
        if self.split_key is not None:
            raise DataError(f"{path}: split_key={self.split_key!r} needs records (jsonl, parquet or a dataset), not txt")
        with _open(path) as f:
            text = self._decode(f.read().removeprefix(BOM), str(path))
        if text:
            yield text, text.encode("utf-8")

    def _read_jsonl(self, path: Path) -> Iterator[tuple[str, bytes]]:
        with _open(path) as f:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                line = self._decode(raw.removeprefix(BOM) if line_no == 1 else raw, where)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                text = self._text_of(record, where)
                if not text:  # a document of no text would be a lone EOS in the shards
                    continue
                try:  # JSON escapes can encode lone surrogates ("\ud800"), which UTF-8 cannot
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    self._reject(f"{where}: not valid UTF-8 (lone surrogate at character {e.start})")
                    continue
                yield text, self._split_id(record, text, where)

    def _read_parquet(self, path: Path) -> Iterator[tuple[str, bytes]]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading parquet files needs `pyarrow`: pip install -e '.[hf]'") from None
        try:  # pyarrow names no file when one is cut short (an interrupted download) or damaged
            parquet = pq.ParquetFile(path)
            columns = list(dict.fromkeys([self.text_key] + ([self.split_key] if self.split_key else [])))
            for column in columns:
                if column not in parquet.schema_arrow.names:
                    raise DataError(f"{path}: no column {column!r} (columns: {parquet.schema_arrow.names})")
            row = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                keys = batch.column(self.split_key).to_pylist() if self.split_key else None
                column = batch.column(self.text_key)
                if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                    # as bytes: decoding ourselves applies on_decode_error to invalid UTF-8 too
                    column = column.cast(pa.large_binary())
                elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                    raise DataError(f"{path}: column {self.text_key!r} has type {column.type}, expected string")
                for i, raw in enumerate(column.to_pylist()):
                    row += 1
                    if raw is None:
                        raise DataError(f"{path}: row {row} has no {self.text_key!r} (null)")
                    where = f"{path}: row {row}"
                    text = self._decode(raw, where)
                    if text:  # None: not UTF-8; "": no document
                        # through _split_id, as jsonl records: a null key is an error, not the split id "None"
                        yield text, self._split_id({} if keys is None else {self.split_key: keys[i]}, text, where)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: truncated or corrupt parquet file ({e})") from None

    def _hf_documents(self) -> Iterator[tuple[str, bytes]]:
        try:
            import datasets
        except ImportError:
            raise ImportError("reading a Hugging Face dataset needs `datasets`: pip install -e '.[hf]'") from None
        name = f"{self.hf_dataset} (config {self.hf_config}, split {self.hf_split})"
        stream = datasets.load_dataset(self.hf_dataset, self.hf_config, split=self.hf_split, streaming=True)
        for row_no, record in enumerate(stream, 1):
            where = f"{name}: row {row_no}"
            text = self._text_of(record, where)
            if text:
                yield text, self._split_id(record, text, where)

    def _text_of(self, record: object, where: str) -> str:
        if not isinstance(record, dict) or self.text_key not in record:
            keys = list(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no key {self.text_key!r} (found {keys})")
        text = record[self.text_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: {self.text_key!r} is {type(text).__name__}, expected a string")
        return text

    def _split_id(self, record: dict, text: str, where: str) -> bytes:
        if self.split_key is None:
            return text.encode("utf-8")
        if record.get(self.split_key) is None:
            raise DataError(f"{where}: no {self.split_key!r} (split_key) in the record")
        return key_split_id(record[self.split_key])


def key_split_id(value: object) -> bytes:
    """The split id of a record's `split_key` value. Only hashed, never decoded: a lone surrogate (which
    JSON escapes can hold and UTF-8 cannot) passes through rather than failing."""
    return str(value).encode("utf-8", "surrogatepass")


def _infer_format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in FORMATS:
        raise DataError(f"{path}: cannot tell the format from the name; set format: one of {FORMATS}")
    return suffix


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
