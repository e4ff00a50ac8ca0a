"""Tuned Triton launch configs shipped with slmlab, so a fresh GPU machine does not autotune.

fla's and mamba-ssm's Triton kernels choose their launch configuration by compiling and timing every
candidate on first use: minutes per kernel family (fla's `chunk_gla` forward + backward about 4.5 min
on an H100). Triton can keep each winner on disk, `<cache dir>/<key hash>/<kernel>.autotune.json`
(`TRITON_CACHE_AUTOTUNING=1`, which fla also asks for on its own kernels); the hash covers the Triton
version, the GPU architecture, the kernel's source and its tuning key (head sizes, chunk length, dtypes),
so a result is only found where it applies and anything else autotunes as before.

`kernel_configs/<GPU model>/` holds those files for the presets' shapes; `seed_autotune_cache` copies
the ones for the current GPU into the Triton cache before the kernel packages load, and
`python -m slmlab.tune_kernels` regenerates them.
"""

import os
import re
import shutil
from pathlib import Path

SHIPPED = Path(__file__).parent / "kernel_configs"
PATTERN = "*/*.autotune.json"  # <key hash>/<kernel>.autotune.json, Triton's cache layout


def gpu_dirname(device_name: str) -> str:
    """The folder of a GPU model's configs: "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3"."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels and autotune results (its own default unless TRITON_CACHE_DIR)."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def copy_autotune_results(source: Path, dest: Path, overwrite: bool) -> list[Path]:
    """Copies every `<hash>/<kernel>.autotune.json` under `source` to the same place under `dest`;
    returns the files written. Each file is written beside its target and renamed, so a Triton process
    reading the cache never sees half a file."""
    written = []
    for path in sorted(source.glob(PATTERN)):
        target = dest / path.relative_to(source)
        if target.exists() and not overwrite:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, partial)
        partial.replace(target)
        written.append(target)
    return written


def seed_autotune_cache(device_name: str, cache_dir: Path | None = None) -> int:
    """Turns Triton's on-disk autotune results on and copies the shipped ones for `device_name` into
    the Triton cache, keeping any result already there (one tuned on this machine wins). Returns how
    many files were copied. Must run before fla / mamba_ssm import: their autotuners read the switch
    when their modules load."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    shipped = SHIPPED / gpu_dirname(device_name)
    if not shipped.is_dir():
        return 0
    return len(copy_autotune_results(shipped, cache_dir or triton_cache_dir(), overwrite=False))
