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

Triton never writes that file for a kernel whose candidate configs carry a `pre_hook` (it cannot
serialise one): most of mamba-ssm's SSD backward kernels zero an output that way, and they autotuned on
every fresh machine (about 30 s of helix_hybrid's first step). Their winners go into
`kernel_configs/<GPU model>/prehook_configs.json` instead, one entry per kernel and tuning key with
the kernel's source hash and the Triton version; `seed_prehook_winners` puts them into the kernel's
in-memory autotune cache once its package has loaded (`prehook_winners` records them).

quack's GEMMs (`mlp_kernel=quack`) autotune per shape the same way and keep their winners in the same
layout under quack's own cache folder (`QUACK_CACHE_AUTOTUNING=1`), hashed over quack's version, the
shapes and the candidate configs. `kernel_configs/<GPU model>/quack/` holds those of the shapes slmlab
was measured at, and `seed_quack_cache` copies them into quack's cache once quack has imported.
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

SHIPPED = Path(__file__).parent / "kernel_configs"
PATTERN = "*/*.autotune.json"  # <key hash>/<kernel>.autotune.json, Triton's cache layout
PREHOOK_FILE = "prehook_configs.json"
QUACK_FOLDER = "quack"  # kernel_configs/<GPU model>/quack/<key hash>/<kernel>.autotune.json
KERNEL_PACKAGES = ("fla", "mamba_ssm")


def gpu_dirname(device_name: str) -> str:
    """The folder of a GPU model's configs: "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3"."""
    return re.sub(r"[^0-9A-Za-z]+", "_", device_name).strip("_") or "unknown_gpu"


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels and autotune results: TRITON_CACHE_DIR, else its default,
    .triton/cache under TRITON_HOME or the home folder."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache"


def quack_cache_dir() -> Path:
    """Where quack keeps its autotune results: QUACK_CACHE_DIR, else .quack/cache under QUACK_HOME or the
    home folder (quack's `autotuner.default_cache_dir`)."""
    if os.environ.get("QUACK_CACHE_DIR", "").strip():
        return Path(os.environ["QUACK_CACHE_DIR"].strip())
    return Path(os.environ.get("QUACK_HOME") or Path.home()) / ".quack" / "cache"


def copy_autotune_results(source: Path, dest: Path, overwrite: bool) -> list[Path]:
    """Copies every `<hash>/<kernel>.autotune.json` under `source` (none where it does not exist) to the
    same place under `dest`; returns the files written. Each file is written beside its target and
    renamed, so a Triton process reading the cache never sees half a file."""
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
    when their modules load.

    The cache folder is pinned (TRITON_CACHE_DIR, unless set): inductor sets it to a folder of its own
    when it first loads a kernel it compiled, unless it is set, and Triton reads the variable at every
    lookup, so kernels autotuned after that (the LM loss is compiled) missed the results seeded here,
    and those the kernel warm-up processes wrote."""
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    cache_dir = cache_dir or triton_cache_dir()
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir))
    return len(copy_autotune_results(SHIPPED / gpu_dirname(device_name), cache_dir, overwrite=False))


def seed_quack_cache(device_name: str, cache_dir: Path | None = None) -> int:
    """Copies the shipped quack autotune results for `device_name` into quack's cache, keeping any result
    already there; returns how many files were copied."""
    shipped = SHIPPED / gpu_dirname(device_name) / QUACK_FOLDER
    return len(copy_autotune_results(shipped, cache_dir or quack_cache_dir(), overwrite=False))


def _prehook_autotuners(packages: tuple[str, ...]) -> Iterator[tuple[str, object]]:
    """("module.kernel", Triton Autotuner) for each loaded kernel of `packages` whose configs carry a
    pre_hook, once each (a kernel imported into several modules is one autotuner). An autotuner is
    recognised by what is read from it: `configs`, `cache` and `base_fn`."""
    seen = set()
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in packages:
            continue
        for obj in list(vars(module).values()):
            # an imported module is no kernel (and a stub of a missing extension raises on any attribute)
            if isinstance(obj, types.ModuleType):
                continue
            while obj is not None and not all(hasattr(obj, a) for a in ("configs", "cache", "base_fn")):
                obj = getattr(obj, "fn", None)  # triton.heuristics wraps an autotuner, or is wrapped by one
            if obj is None or id(obj) in seen or not any(c.pre_hook for c in obj.configs):
                continue
            seen.add(id(obj))
            yield f"{obj.base_fn.__module__}.{obj.base_fn.__name__}", obj


def _source_hash(tuner: object) -> str:
    return hashlib.sha256(inspect.getsource(tuner.base_fn).encode()).hexdigest()


def prehook_winners(packages: tuple[str, ...] = KERNEL_PACKAGES) -> list[dict]:
    """The configs this process's autotuning chose for the pre_hook kernels of `packages`, as entries
    of `prehook_configs.json`."""
    import triton

    entries = []
    for name, tuner in _prehook_autotuners(packages):
        for key, config in tuner.cache.items():
            entries.append({"kernel": name, "source_sha256": _source_hash(tuner), "triton": triton.__version__,
                            "key": list(key), "config": config.all_kwargs()})
    return entries


def merge_prehook_winners(path: Path, entries: list[dict]) -> int:
    """Adds `entries` to the json file at `path` (an entry of the same kernel and key is replaced);
    returns how many the file holds."""
    merged = {(e["kernel"], json.dumps(e["key"])): e for e in _read_entries(path) + entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(sorted(merged.values(), key=lambda e: (e["kernel"], str(e["key"]))), indent=1))
    partial.replace(path)
    return len(merged)


def _read_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def seed_prehook_winners(device_name: str, packages: tuple[str, ...] = KERNEL_PACKAGES) -> int:
    """Puts the shipped winners for `device_name` into the autotune caches of the loaded pre_hook
    kernels of `packages`, where the kernel source and the Triton version match the tuning run's.
    Returns how many were seeded; a key autotuned in this process already is kept."""
    import triton

    entries = _read_entries(SHIPPED / gpu_dirname(device_name) / PREHOOK_FILE)
    if not entries:
        return 0
    tuners = dict(_prehook_autotuners(packages))
    seeded = 0
    for e in entries:
        tuner = tuners.get(e["kernel"])
        if tuner is None or e["triton"] != triton.__version__ or e["source_sha256"] != _source_hash(tuner):
            continue
        config = next((c for c in tuner.configs if c.all_kwargs() == e["config"]), None)
        if config is not None and tuple(e["key"]) not in tuner.cache:
            tuner.cache[tuple(e["key"])] = config  # the package's own Config object: its pre_hook runs
            seeded += 1
    return seeded
