"""The start-up kernel warm-up: which layers it runs, when it stays off, and its processes' reports."""

import logging

import pytest
import torch

from slmlab.models import ModelConfig
from slmlab.training import kernel_warmup
from slmlab.training.kernel_warmup import start_kernel_warmup, warmup_layers


def tiny(layout: str, **kw) -> ModelConfig:
    n_layers = sum(int(part.split("*")[1]) if "*" in part else 1 for part in layout.split(","))
    return ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=2, ffn_hidden=64, max_seq_len=64,
                       layout=layout, ssm_d_state=8, ssm_headdim=16, hgrn2_expand_ratio=8, **kw)


def test_one_process_per_compiling_kind_runs_the_first_layer_of_each_rope_variant():
    assert warmup_layers(tiny("M*2,G*3,S*2")) == {"mamba2": [0], "gla": [2], "sparse_attention": [5]}
    # odd layers of hgrn2 have no RoPE: a variant of its own, run in the same process
    assert warmup_layers(tiny("H*3,G", rope_layers="even")) == {"hgrn2": [0, 1], "gla": [3]}
    # attention (flash SDPA) compiles nothing, unless the blocks are compiled
    assert warmup_layers(tiny("A,G,M")) == {"gla": [1], "mamba2": [2]}
    assert warmup_layers(tiny("A,G,M"), compile_blocks=True) == {"attention": [0], "gla": [1], "mamba2": [2]}
    # the blocks as one graph: a block compiled alone would make kernels the run does not use
    assert warmup_layers(tiny("A,G,M"), compile_blocks="backbone") == warmup_layers(tiny("A,G,M"))


def test_nothing_to_run_side_by_side_means_no_warmup():
    assert warmup_layers(tiny("H*4", rope_layers="even")) == {}  # one kind: compiled in the trainer itself
    assert warmup_layers(tiny("A*2,G*2")) == {}
    assert warmup_layers(tiny("A*2"), compile_blocks=True) == {}
    assert warmup_layers(tiny("M*2,G*2", kernel="torch")) == {}  # the references compile nothing


def test_no_processes_on_the_cpu_on_later_ranks_or_without_a_batch_shape(monkeypatch, caplog):
    cfg = tiny("M,G")
    assert start_kernel_warmup(cfg, 2, 32, "bf16-mixed", accelerator="cpu").processes == {}
    assert start_kernel_warmup(cfg, None, 32, "bf16-mixed", device="cpu").processes == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("SLURM_LOCALID", "3")  # the node's first rank warms the caches the others read
    assert start_kernel_warmup(cfg, 2, 32, "bf16-mixed", accelerator="gpu").processes == {}
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("SLURM_LOCALID")
    assert start_kernel_warmup(cfg, 2, 32, "bf16-mixed", accelerator="gpu").processes == {}
    with caplog.at_level(logging.WARNING):
        assert start_kernel_warmup(cfg, 2, 32, "bf17-mixed", device="cpu").processes == {}
    assert "'bf17-mixed'" in caplog.text


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true", "bf16-true"])
def test_each_process_runs_its_layers_forward_and_backward_and_reports_its_time(precision):
    warmup = start_kernel_warmup(tiny("M,G*2,S", rope_layers="even"), 2, 32, precision, device="cpu")
    assert sorted(warmup.processes) == ["gla", "mamba2", "sparse_attention"]
    seconds = warmup.wait(timeout_s=300)
    assert sorted(seconds) == ["gla", "mamba2", "sparse_attention"]
    assert all(isinstance(s, float) and s > 0 for s in seconds.values()), seconds
    assert warmup.processes == {}  # waited for: nothing left to stop at exit


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure below needs a machine without CUDA")
def test_a_failing_process_is_reported_with_its_stderr_and_training_goes_on(caplog):
    warmup = start_kernel_warmup(tiny("M,G"), 2, 32, "bf16-mixed", device="cuda")
    with caplog.at_level(logging.WARNING):
        seconds = warmup.wait(timeout_s=300)
    assert seconds == {"mamba2": None, "gla": None}
    assert "kernel warm-up of mamba2 failed" in caplog.text and "training compiles its kernels itself" in caplog.text
    assert "Traceback" in caplog.text  # the process's own stderr, quoted


def test_a_process_past_the_timeout_is_killed(caplog):
    warmup = start_kernel_warmup(tiny("M,G"), 2, 32, "32-true", device="cpu")
    with caplog.at_level(logging.WARNING):
        seconds = warmup.wait(timeout_s=0)
    assert seconds == {"mamba2": None, "gla": None}
    assert "failed (exit -9)" in caplog.text


def test_reported_seconds_come_from_the_last_stdout_line():
    assert kernel_warmup._reported_seconds(b'a library printed this\n{"seconds": 2.5}\n') == 2.5
    assert kernel_warmup._reported_seconds(b"") is None
    assert kernel_warmup._reported_seconds(b"not json\n") is None
