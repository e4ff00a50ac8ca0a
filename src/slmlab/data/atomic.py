"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn write."""

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary temp file beside `path`; on success fsync it and rename it onto `path`.

    The temp file lives in the same directory so that `os.replace` is a rename within one file
    system (atomic on POSIX). Its name is hidden and unique per process, so concurrent writers of
    the same file never share a temp file; on error it is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
