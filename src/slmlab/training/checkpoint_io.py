"""Checkpoint files written atomically: whatever kills the process mid-write (SIGKILL, a full disk, a
power cut after the rename), the path holds the previous complete checkpoint or the new one."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from slmlab.data.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temp file beside the target, fsync, rename over the target (`atomic_write`).

    Lightning's own writer serializes the whole checkpoint into memory, then moves a file from the
    system temp directory: a copy, not a rename, when that is another file system, so a kill during
    the copy truncates the target; and it never fsyncs. Remote paths (s3://...) are left to it.
    Each save first deletes the temp files that writers killed mid-write left in the directory.
    Wired in as a trainer plugin (`conf/trainer/default.yaml`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a writer killed mid-write leaves its temp file (atomic_write's ".<name>.<pid>-<hex>.tmp"), as large as a
        # checkpoint; saves are sequential and one process writes a run's checkpoints, so any is such a leftover
        for stale in path.parent.glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)
        with atomic_write(path) as f:
            torch.save(checkpoint, f)
