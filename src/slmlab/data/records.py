"""Records of JSON-lines files (optionally gzipped) for post-training data: conversations,
preference pairs, prompts. Every record is known by its file and line, so that a bad one is named.
"""

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from slmlab.data.errors import DataError
from slmlab.data.prepare import is_val_document
from slmlab.data.readers import BOM, GZIP_ERRORS, key_split_id

BAD_ROW_POLICIES = ("error", "skip")
T = TypeVar("T")


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """("<path>:<line>", record) for every non-blank line of a `.jsonl` or `.jsonl.gz` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        try:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:  # decoded here, not by the file object: its error would name neither file nor line
                    line = (raw.removeprefix(BOM) if line_no == 1 else raw).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield where, record
        except GZIP_ERRORS as e:
            raise DataError(f"{path}: truncated or corrupt gzip file ({e})") from None


def parse_jsonl(path: str | Path, parse: Callable[[dict[str, Any], str], T],
                on_bad_row: str = "error") -> tuple[list[T], int]:
    """`parse(record, where)` of every record, and the number of bad records skipped.

    `parse` raises `DataError` for a bad record, naming `where` (and the record's id); with
    `on_bad_row="skip"` such records are counted instead. Invalid JSON is always an error.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise DataError(f"on_bad_row={on_bad_row!r} is not one of {BAD_ROW_POLICIES}")
    parsed, skipped = [], 0
    for where, record in read_jsonl(path):
        try:
            parsed.append(parse(record, where))
        except DataError:
            if on_bad_row == "error":
                raise
            skipped += 1
    if not parsed:
        raise DataError(f"{path}: no usable records" + (f" ({skipped} bad ones skipped)" if skipped else ""))
    return parsed, skipped


def record_name(record: dict[str, Any], where: str) -> str:
    """`where` and the record's id, for error messages: "data.jsonl:12 (id '1.2/en/about')"."""
    return f"{where} (id {record['id']!r})" if "id" in record else where


def is_val_record(record: dict[str, Any], split_key: str, val_fraction: float, where: str) -> bool:
    """Whether a record is held out: the rule of `is_val_document` on its `split_key` field, so that
    records sharing a key (a section's conversations in both languages) share the split."""
    if record.get(split_key) is None:
        raise DataError(f"{record_name(record, where)}: no {split_key!r} (split_key) in the record")
    return is_val_document(key_split_id(record[split_key]), val_fraction)
