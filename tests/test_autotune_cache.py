"""The shipped Triton autotune results: which GPU folder applies, how they reach the Triton cache,
what `python -m slmlab.tune_kernels` tunes; and the start-up time the throughput monitor reports."""

import json
import subprocess
import sys
import types

import pytest

from slmlab.ops import autotune_cache
from slmlab.ops.autotune_cache import (PATTERN, PREHOOK_FILE, QUACK_FOLDER, SHIPPED, gpu_dirname, quack_cache_dir,
                                       seed_autotune_cache, seed_quack_cache)
from slmlab.tune_kernels import remove_triton_results, tuning_jobs


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    root = tmp_path / "kernel_configs"
    write(root / "NVIDIA_H100_80GB_HBM3" / "abc123" / "chunk_gla_fwd_kernel.autotune.json", '{"h100": 1}')
    write(root / "NVIDIA_H100_80GB_HBM3" / "def456" / "chunk_scan_bwd.autotune.json", '{"h100": 2}')
    write(root / "NVIDIA_H200" / "abc123" / "chunk_gla_fwd_kernel.autotune.json", '{"h200": 1}')
    write(root / "NVIDIA_H100_80GB_HBM3" / "quack" / "q1" / "gemm_tuned.autotune.json", '{"quack": 1}')
    monkeypatch.setattr(autotune_cache, "SHIPPED", root)
    for name in ("TRITON_CACHE_AUTOTUNING", "TRITON_CACHE_DIR"):  # seeding sets them: restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return root


def test_gpu_folder_names_are_the_device_names_made_safe():
    assert gpu_dirname("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert gpu_dirname("NVIDIA H200") == "NVIDIA_H200"
    assert gpu_dirname("  ") == "unknown_gpu"


def test_seeding_copies_this_gpus_results_into_the_triton_cache_layout(shipped, tmp_path, monkeypatch):
    cache = tmp_path / "triton"
    assert seed_autotune_cache("NVIDIA H100 80GB HBM3", cache) == 2
    assert (cache / "abc123" / "chunk_gla_fwd_kernel.autotune.json").read_text() == '{"h100": 1}'
    assert (cache / "def456" / "chunk_scan_bwd.autotune.json").read_text() == '{"h100": 2}'
    assert not list(cache.rglob("*.tmp"))
    # the switch that makes mamba-ssm's autotuners (not only fla's) read and write these files
    assert autotune_cache.os.environ["TRITON_CACHE_AUTOTUNING"] == "1"


def test_quacks_results_go_to_quacks_cache_only_and_keep_what_is_there(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv("QUACK_CACHE_DIR", str(tmp_path / "quack"))
    assert seed_quack_cache("NVIDIA H100 80GB HBM3") == 1
    assert (tmp_path / "quack" / "q1" / "gemm_tuned.autotune.json").read_text() == '{"quack": 1}'
    write(tmp_path / "quack" / "q1" / "gemm_tuned.autotune.json", '{"tuned here": 1}')
    assert seed_quack_cache("NVIDIA H100 80GB HBM3") == 0
    assert (tmp_path / "quack" / "q1" / "gemm_tuned.autotune.json").read_text() == '{"tuned here": 1}'
    assert seed_quack_cache("NVIDIA H200") == 0
    assert seed_autotune_cache("NVIDIA H100 80GB HBM3", tmp_path / "triton") == 2  # not quack's
    assert not list((tmp_path / "triton").rglob("gemm_tuned*"))


def test_quacks_cache_is_where_quack_looks(tmp_path, monkeypatch):
    monkeypatch.delenv("QUACK_CACHE_DIR", raising=False)
    monkeypatch.delenv("QUACK_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert quack_cache_dir() == tmp_path / ".quack" / "cache"
    monkeypatch.setenv("QUACK_HOME", str(tmp_path / "qh"))
    assert quack_cache_dir() == tmp_path / "qh" / ".quack" / "cache"
    monkeypatch.setenv("QUACK_CACHE_DIR", str(tmp_path / "qc"))
    assert quack_cache_dir() == tmp_path / "qc"


def test_quacks_results_are_seeded_once_quack_imports_on_a_gpu(shipped, tmp_path, monkeypatch):
    from slmlab.ops import backend

    monkeypatch.setenv("QUACK_CACHE_DIR", str(tmp_path / "quack"))
    monkeypatch.setenv("QUACK_CACHE_AUTOTUNING", "1")
    monkeypatch.delenv("SLMLAB_TUNED_CONFIGS", raising=False)
    monkeypatch.setattr(backend.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend.torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(backend, "seed_autotune_cache", lambda *_: 0)
    monkeypatch.setattr(backend.kernel_available, "results", {})
    monkeypatch.setattr(backend.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    assert not backend.kernel_available("quack")  # not installed: nothing written
    assert not (tmp_path / "quack").exists()
    monkeypatch.setattr(backend.kernel_available, "results", {})
    monkeypatch.setattr(backend.importlib, "import_module", lambda name: types.ModuleType(name))
    assert backend.kernel_available("quack")
    assert (tmp_path / "quack" / "q1" / "gemm_tuned.autotune.json").read_text() == '{"quack": 1}'


def test_the_shipped_quack_results_are_helios_novas_mlp_at_batch_16():
    """The six GEMMs of quack's MLP at 16 x 2048 tokens, d_model 1024, width 3072 ([gate; up] 6144): the
    shape `mlp_kernel=quack` was measured at, which the README names."""
    files = sorted((SHIPPED / "NVIDIA_H100_80GB_HBM3" / QUACK_FOLDER).glob(PATTERN))
    assert sorted(f.name.split("_")[0] for f in files) == ["gemm"] * 4 + ["mod"] * 2
    keys = [json.loads(f.read_text())["key"] for f in files]
    assert all("(32768, " in key or ", 32768)" in key for key in keys)
    assert all(any(f"({a}, {b})" in key for a, b in ((1024, 3072), (3072, 1024), (6144, 1024), (32768, 6144)))
               for key in keys)


def test_the_shipped_h200_quack_results_are_helios_novas_mlp_at_batch_24_and_32():
    """The same six GEMMs at 24 x 2048 (the recipe's micro-batch) and 32 x 2048 tokens, where the H200's
    throughput rows in the README were measured."""
    files = sorted((SHIPPED / "NVIDIA_H200" / QUACK_FOLDER).glob(PATTERN))
    keys = [json.loads(f.read_text())["key"] for f in files]
    for tokens in (49152, 65536):
        at = [f for f, key in zip(files, keys) if f"({tokens}, " in key or f", {tokens})" in key]
        assert sorted(f.name.split("_")[0] for f in at) == ["gemm"] * 4 + ["mod"] * 2
    assert len(files) == 12
    assert all(any(f"({a}, {b})" in key for a, b in ((1024, 3072), (3072, 1024), (6144, 1024))) for key in keys)


def test_a_full_tuning_run_clears_the_triton_results_and_keeps_quacks(tmp_path):
    write(tmp_path / "abc123" / "chunk_gla_fwd_kernel.autotune.json", "{}")
    write(tmp_path / PREHOOK_FILE, "[]")
    write(tmp_path / QUACK_FOLDER / "q1" / "gemm_tuned.autotune.json", "{}")
    remove_triton_results(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")] == ["quack/q1/gemm_tuned.autotune.json"]


def test_seeding_keeps_results_already_in_the_cache(shipped, tmp_path):
    cache = tmp_path / "triton"
    write(cache / "abc123" / "chunk_gla_fwd_kernel.autotune.json", '{"tuned here": 1}')
    assert seed_autotune_cache("NVIDIA H100 80GB HBM3", cache) == 1
    assert (cache / "abc123" / "chunk_gla_fwd_kernel.autotune.json").read_text() == '{"tuned here": 1}'
    assert seed_autotune_cache("NVIDIA H100 80GB HBM3", cache) == 0


def test_another_gpu_gets_its_own_results_and_an_unknown_one_none(shipped, tmp_path):
    cache = tmp_path / "triton"
    assert seed_autotune_cache("NVIDIA H200", cache) == 1
    assert (cache / "abc123" / "chunk_gla_fwd_kernel.autotune.json").read_text() == '{"h200": 1}'
    assert seed_autotune_cache("NVIDIA A100-SXM4-80GB", tmp_path / "other") == 0
    assert not (tmp_path / "other").exists()


def test_the_triton_cache_is_where_triton_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert autotune_cache.triton_cache_dir() == tmp_path
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.delenv("TRITON_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune_cache.triton_cache_dir() == tmp_path / ".triton" / "cache"
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "th"))
    assert autotune_cache.triton_cache_dir() == tmp_path / "th" / ".triton" / "cache"


def test_seeding_pins_the_cache_folder_that_inductor_would_otherwise_move(shipped, tmp_path, monkeypatch):
    # inductor sets TRITON_CACHE_DIR to its own folder on its first kernel unless it is set; Triton then
    # looks there, past the seeded results
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert seed_autotune_cache("NVIDIA H100 80GB HBM3") == 2
    assert autotune_cache.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / ".triton" / "cache")
    assert (tmp_path / ".triton" / "cache" / "abc123" / "chunk_gla_fwd_kernel.autotune.json").is_file()


def test_tuning_covers_each_kernel_backed_mixer_of_the_presets_once():
    jobs = tuning_jobs(["helix_hybrid", "odinnext", "helios_nova"], seq_len=2048, tokens=16384)
    assert jobs == [("helix_hybrid", "mamba2", 8, 2048), ("helix_hybrid", "gla", 8, 2048),
                    ("odinnext", "hgrn2", 8, 2048)]
    assert tuning_jobs(["helios_nova"], seq_len=2048, tokens=16384) == []  # attention: nothing to tune


# --- winners of kernels with pre_hooks (Triton does not write them) -------------------------------


class FakeConfig:
    """What the code reads of a triton.Config."""

    def __init__(self, block: int, num_warps: int, pre_hook=None) -> None:
        self.kwargs, self.num_warps, self.pre_hook = {"BLOCK": block}, num_warps, pre_hook

    def all_kwargs(self) -> dict:
        return {**self.kwargs, "num_warps": self.num_warps}


def zero_grad_hook(nargs):  # a kernel zeroing an output before each launch, as mamba-ssm's do
    pass


def fake_bwd_kernel():  # the kernel's source: its hash guards the shipped winners
    pass


class FakeAutotuner:
    def __init__(self, with_pre_hook: bool = True) -> None:
        hook = zero_grad_hook if with_pre_hook else None
        self.configs = [FakeConfig(64, 4, hook), FakeConfig(128, 8, hook)]
        self.cache, self.base_fn = {}, fake_bwd_kernel


class FakeHeuristics:  # triton.heuristics around an autotuner
    def __init__(self, fn) -> None:
        self.fn = fn


KEY = (256, 64, "torch.bfloat16")


@pytest.fixture
def kernels(monkeypatch, tmp_path):
    """A loaded kernel package `fakekern` with a pre_hook kernel (also reachable through a wrapper and
    a second module) and one without; Triton 3.6.0; SHIPPED in tmp_path."""
    tuner, plain = FakeAutotuner(), FakeAutotuner(with_pre_hook=False)
    ops = types.ModuleType("fakekern.ops")
    ops.bwd, ops.wrapped, ops.plain = tuner, FakeHeuristics(tuner), plain
    other = types.ModuleType("fakekern.combined")
    other.bwd = tuner  # `from fakekern.ops import bwd`
    stub = types.ModuleType("missing_extension")  # a stub of an extension that is not built: any attribute raises
    stub.__getattr__ = lambda name: (_ for _ in ()).throw(ImportError("missing_extension is not built"))
    other.missing_extension = stub
    monkeypatch.setitem(sys.modules, "fakekern.ops", ops)
    monkeypatch.setitem(sys.modules, "fakekern.combined", other)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(autotune_cache, "SHIPPED", tmp_path / "kernel_configs")
    return ops


def record_and_ship(ops, tmp_path) -> list[dict]:
    ops.bwd.cache[KEY] = ops.bwd.configs[1]
    ops.plain.cache[KEY] = ops.plain.configs[0]
    entries = autotune_cache.prehook_winners(("fakekern",))
    path = tmp_path / "kernel_configs" / "NVIDIA_H200" / autotune_cache.PREHOOK_FILE
    autotune_cache.merge_prehook_winners(path, entries)
    ops.bwd.cache.clear()  # a fresh process
    return entries


def test_pre_hook_winners_are_recorded_once_per_kernel_and_key(kernels, tmp_path):
    entries = record_and_ship(kernels, tmp_path)
    assert [(e["kernel"], e["key"], e["config"], e["triton"]) for e in entries] == [
        (f"{__name__}.fake_bwd_kernel", list(KEY), {"BLOCK": 128, "num_warps": 8}, "3.6.0")]


def test_shipped_pre_hook_winners_fill_the_autotune_cache_with_the_packages_own_config(kernels, tmp_path):
    record_and_ship(kernels, tmp_path)
    assert autotune_cache.seed_prehook_winners("NVIDIA H200", ("fakekern",)) == 1
    assert kernels.bwd.cache[KEY] is kernels.bwd.configs[1]  # its pre_hook still runs at each launch
    assert autotune_cache.seed_prehook_winners("NVIDIA H200", ("fakekern",)) == 0  # already there: kept
    assert autotune_cache.seed_prehook_winners("NVIDIA H100 80GB HBM3", ("fakekern",)) == 0  # not tuned there


@pytest.mark.parametrize("change", ["triton", "source_sha256", "config"])
def test_pre_hook_winners_of_another_triton_or_kernel_source_are_ignored(kernels, tmp_path, change):
    record_and_ship(kernels, tmp_path)
    path = tmp_path / "kernel_configs" / "NVIDIA_H200" / autotune_cache.PREHOOK_FILE
    entries = json.loads(path.read_text())
    entries[0][change] = {"triton": "3.7.0", "source_sha256": "0" * 64, "config": {"BLOCK": 32, "num_warps": 2}}[change]
    path.write_text(json.dumps(entries))
    assert autotune_cache.seed_prehook_winners("NVIDIA H200", ("fakekern",)) == 0
    assert kernels.bwd.cache == {}


def test_merging_pre_hook_winners_replaces_a_kernels_key_and_keeps_the_others(tmp_path):
    path = tmp_path / "prehook_configs.json"
    entry = {"kernel": "k", "source_sha256": "s", "triton": "3.6.0", "config": {"BLOCK": 64}}
    assert autotune_cache.merge_prehook_winners(path, [entry | {"key": [1]}, entry | {"key": [2]}]) == 2
    assert autotune_cache.merge_prehook_winners(path, [entry | {"key": [1], "config": {"BLOCK": 128}}]) == 2
    by_key = {tuple(e["key"]): e["config"] for e in json.loads(path.read_text())}
    assert by_key == {(1,): {"BLOCK": 128}, (2,): {"BLOCK": 64}}


def test_tuning_a_subset_of_mixers():
    assert tuning_jobs(["helix_hybrid", "odinnext"], seq_len=2048, tokens=16384, mixers=("mamba2",)) == [
        ("helix_hybrid", "mamba2", 8, 2048)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_start_up_time_counts_from_the_launch_of_the_process():
    code = ("import time; time.sleep(1.5); from slmlab.training.callbacks import seconds_since_launch; "
            "print(seconds_since_launch())")
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= seconds < 60  # the sleep, plus the imports after it


class FakeTuningPool:
    """The worker pool of `tune_kernels.main` without a GPU: each job 'autotunes' one result file into
    the scratch Triton cache, named after its mixer."""

    def __init__(self, processes):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        for name, mixer, _, _ in jobs:
            write(autotune_cache.triton_cache_dir() / f"new_{mixer}" / f"{mixer}_kernel.autotune.json", "{}")
            yield name, mixer, 1.0, []


@pytest.mark.parametrize("models,kept", [(["odinnext"], True), (["helix_hybrid", "odinnext"], False)])
def test_tuning_replaces_the_gpu_folder_only_when_every_mixer_was_tuned(tmp_path, monkeypatch, models, kept):
    """`--models odinnext` tunes hgrn2 only: the shipped GLA and Mamba-2 results must stay."""
    import multiprocessing

    import torch

    from slmlab import tune_kernels

    folder = tmp_path / "configs" / "NVIDIA_H200"
    old = [folder / "gla_hash" / "chunk_gla_fwd_kernel.autotune.json",
           folder / "ssd_hash" / "_bmm_chunk_fwd_kernel.autotune.json"]
    for path in old:
        write(path, "{}")
    # main sets these for its workers: set here, so that they are restored after the test
    for name in ("TRITON_CACHE_AUTOTUNING", "SLMLAB_TUNED_CONFIGS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "user_cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "NVIDIA H200")
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: types.SimpleNamespace(Pool=FakeTuningPool))
    monkeypatch.setattr(sys, "argv", ["tune_kernels", "--models", *models, "--out", str(tmp_path / "configs")])
    tune_kernels.main()
    tuned = {p.parent.name for p in folder.glob(autotune_cache.PATTERN) if p.parent.name.startswith("new_")}
    assert tuned == {f"new_{mixer}" for _, mixer, _, _ in tuning_jobs(models, 2048, 16384)}
    assert all(path.exists() == kept for path in old)
    assert (tmp_path / "user_cache" / "new_hgrn2" / "hgrn2_kernel.autotune.json").exists()
