"""The shipped Triton autotune results: which GPU folder applies, how they reach the Triton cache,
what `python -m slmlab.tune_kernels` tunes; and the start-up time the throughput monitor reports."""

import subprocess
import sys

import pytest

from slmlab.ops import autotune_cache
from slmlab.ops.autotune_cache import gpu_dirname, seed_autotune_cache
from slmlab.tune_kernels import tuning_jobs


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    root = tmp_path / "kernel_configs"
    write(root / "NVIDIA_H100_80GB_HBM3" / "abc123" / "chunk_gla_fwd_kernel.autotune.json", '{"h100": 1}')
    write(root / "NVIDIA_H100_80GB_HBM3" / "def456" / "chunk_scan_bwd.autotune.json", '{"h100": 2}')
    write(root / "NVIDIA_H200" / "abc123" / "chunk_gla_fwd_kernel.autotune.json", '{"h200": 1}')
    monkeypatch.setattr(autotune_cache, "SHIPPED", root)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
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
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune_cache.triton_cache_dir() == tmp_path / ".triton" / "cache"


def test_tuning_covers_each_kernel_backed_mixer_of_the_presets_once():
    jobs = tuning_jobs(["helix_hybrid", "odinnext", "helios_nova"], seq_len=2048, tokens=16384)
    assert jobs == [("helix_hybrid", "mamba2", 8, 2048), ("helix_hybrid", "gla", 8, 2048),
                    ("odinnext", "hgrn2", 8, 2048)]
    assert tuning_jobs(["helios_nova"], seq_len=2048, tokens=16384) == []  # attention: nothing to tune


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_start_up_time_counts_from_the_launch_of_the_process():
    code = ("import time; time.sleep(1.5); from slmlab.training.callbacks import seconds_since_launch; "
            "print(seconds_since_launch())")
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= seconds < 60  # the sleep, plus the imports after it
