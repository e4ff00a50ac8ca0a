"""End-to-end runs of train.py at tiny size: the Quickstart, exact resume, DDP, export."""

import math
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from slmlab.checkpoint import load_model as load_checkpoint_model, load_weights, resolve_ckpt_path
from slmlab.export import export_safetensors_folder
from slmlab.models import CausalLM
from tests.conftest import ROOT, compose_config, metric, tiny_run_overrides
from train import train

pytestmark = pytest.mark.slow


def run_train(overrides: list[str], timeout: int = 300) -> str:
    """`python train.py <overrides>` in a subprocess, as a user runs it; returns its output."""
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_quickstart_command_trains_and_reports(tmp_path):
    out = run_train(tiny_run_overrides(tmp_path, steps=30, val_every=10) + ["optim.lr=3e-3", f"hydra.run.dir={tmp_path / 'hydra'}"])
    for text in ("model: ", "FLOPs per token", "val loss", "bits-per-byte", "en ", "de ", "tokens/s", "== summary",
                 "== samples"):
        assert text in out, f"{text!r} missing from the output"
    # Lightning's messages once on the console, and in Hydra's log file
    assert out.count("Seed set to 1234") == 1 and "Seed set to 1234" in (tmp_path / "hydra" / "train.log").read_text()
    assert "litlogger" not in out and "is deprecated" not in out  # Lightning's advertisement; its use of torch
    val = metric(tmp_path / "run", "val/loss")
    # an untrained model scores about ln(vocab); each validation must improve on the last
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[2] < math.log(512) - 0.5, val
    assert all(b > 0 for b in metric(tmp_path / "run", "val/bpb"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_resume_is_exact(tmp_path: Path, extra: list[str], steps: int, val_every: int, stop_at: int) -> None:
    """A tiny run with `extra` straight through (tmp_path / "a") and one stopped after step `stop_at`, then
    resumed from its last checkpoint (tmp_path / "b"), end with the same weights, bit for bit."""
    train(compose_config(tiny_run_overrides(tmp_path / "a", steps=steps, val_every=val_every) + extra))
    interrupted = tiny_run_overrides(tmp_path / "b", steps=steps, val_every=val_every) + extra
    train(compose_config(interrupted + ["+callbacks.stop._target_=tests.helpers.StopAtStep",
                                        f"+callbacks.stop.step={stop_at}"]))
    train(compose_config(interrupted + ["ckpt_path=last"]))
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_mid_run_matches_the_uninterrupted_run(tmp_path):
    # (resume across a pass over a source's blocks is tested on the datamodule itself)
    straight = tiny_run_overrides(tmp_path / "a", steps=12, val_every=6)
    train(compose_config(straight))
    interrupted = tiny_run_overrides(tmp_path / "b", steps=12, val_every=6)
    train(compose_config(interrupted + ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=6"]))
    assert torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    train(compose_config(interrupted + ["ckpt_path=last"]))
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the resumed run's CSV keeps the rows logged before the stop, and continues them
    assert metric(tmp_path / "a" / "run", "train/loss") == metric(tmp_path / "b" / "run", "train/loss")


def test_a_run_with_compiled_blocks_trains_as_the_eager_run_does(tmp_path):
    """`stage.compile=true` (the GPU recipes' setting) and `backbone` (the blocks as one graph, activation
    checkpointing inside it) on the CPU: the same losses as the eager run, the sample callback decoding
    through the compiled blocks, and a checkpoint with the eager model's names."""
    runs, graphs = {}, {}
    for name, extra in (("eager", []), ("compiled", ["stage.compile=true"]),
                        ("backbone", ["stage.compile=backbone", "model.activation_checkpointing=true"])):
        torch._dynamo.reset()  # earlier tests' compiled blocks of the same shapes would be reused
        torch._dynamo.utils.counters.clear()
        train(compose_config(tiny_run_overrides(tmp_path / name, steps=6, val_every=6) + extra))
        runs[name] = tmp_path / name / "run"
        graphs[name] = torch._dynamo.utils.counters["frames"]["ok"]
    assert graphs["eager"] == 0 and graphs["compiled"] > 0 and graphs["backbone"] > 0
    eager_weights = final_weights(runs["eager"])
    for compiled in ("compiled", "backbone"):
        for key in ("train/loss", "val/loss"):
            torch.testing.assert_close(metric(runs[compiled], key), metric(runs["eager"], key), rtol=1e-4, atol=0)
        assert final_weights(runs[compiled]).keys() == eager_weights.keys()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_replayed_as_cuda_graphs_train_as_the_eager_run_does(tmp_path, monkeypatch):
    """`stage.compile=reduce-overhead`: each compiled block replays its kernels from CUDA graphs, whose
    outputs reuse the same memory at every replay. Validation and sampling in between; the losses and
    final weights must be the eager run's. The PyTorch mixers (no kernel package's autotuning) at the
    tiny hybrid's shapes."""
    from torch._inductor import cudagraph_trees

    recorded = []  # CUDA graphs recorded: the compiled blocks did not all fall back to running without
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda self, *args: recorded.append(1) or record(self, *args))
    runs = {}
    for name, extra in (("eager", []), ("graphs", ["stage.compile=reduce-overhead"])):
        train(compose_config(tiny_run_overrides(tmp_path / name, steps=8, val_every=4) + [
            "model=tiny_hybrid", "model.n_layers=4", "model.kernel=torch", "trainer.accelerator=gpu", *extra]))
        runs[name] = tmp_path / name / "run"
    for key in ("train/loss", "val/loss"):
        torch.testing.assert_close(metric(runs["graphs"], key), metric(runs["eager"], key), rtol=1e-3, atol=0)
    assert recorded
    eager, graphs = final_weights(runs["eager"]), final_weights(runs["graphs"])
    moved = sum((graphs[name] - weight).norm() for name, weight in eager.items())
    assert moved < 1e-3 * sum(weight.norm() for weight in eager.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Lightning's FSDP refuses the CPU)")
@pytest.mark.parametrize("compile", ["false", "true"])
def test_an_fsdp_run_trains_checkpoints_and_resumes_as_a_single_device_run(tmp_path, compile):
    """`trainer=fsdp` (one unit per block) on one GPU: the single-device run's losses; a checkpoint holding
    the full state dict under the model's own names, which resume, `init_from` and export read; and a run
    stopped halfway and resumed that ends with the uninterrupted run's weights."""
    def run(name: str, *extra: str) -> Path:
        train(compose_config(tiny_run_overrides(tmp_path / name, steps=8, val_every=4) + [
            "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=32-true", f"stage.compile={compile}",
            *extra]))
        return tmp_path / name / "run"

    # FSDP builds the model on the CPU, a single device on the GPU: other random initial weights. Both
    # start from the weights of a 1-step run
    start = f"init_from={run('init', 'trainer.max_steps=1', 'trainer.val_check_interval=1', 'schedule.warmup_steps=0')}/checkpoints/last.ckpt"
    single, fsdp = run("single", start), run("fsdp", "trainer=fsdp", start)
    for key in ("train/loss", "val/loss"):
        torch.testing.assert_close(metric(fsdp, key), metric(single, key), rtol=1e-4, atol=0)
    assert final_weights(fsdp).keys() == final_weights(single).keys()
    run("stopped", "trainer=fsdp", start, "+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=4")
    resumed = run("stopped", "trainer=fsdp", start, "ckpt_path=last")
    straight = final_weights(fsdp)
    for name, weight in final_weights(resumed).items():
        torch.testing.assert_close(weight, straight[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ema_weights_fill_the_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """`+callbacks/ema=default`: the checkpoint's weights (what init_from, eval and export read) are the
    average of the training weights after each step; the training weights resume."""
    ema = ["+callbacks/ema=default", "callbacks.ema.multi_avg_fn.decay=0.8"]
    record = tmp_path / "weights.pt"
    with warnings.catch_warnings(record=True) as caught:
        train(compose_config(tiny_run_overrides(tmp_path / "a", steps=8, val_every=4) + ema + [
            "+callbacks.record._target_=tests.helpers.RecordWeights", f"+callbacks.record.path={record}"]))
    # Lightning's warning that configure_model may shard layers the average misses: slmlab's only compiles
    assert not [w for w in caught if "configure_model" in str(w.message)]
    after_each_step = torch.load(record)
    expected = after_each_step[0]  # the average starts at the first step's weights
    for weights in after_each_step[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * weights[k] for k in weights}
    ckpt = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in expected.items():
        torch.testing.assert_close(ckpt["state_dict"][f"model.{k}"], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ckpt["current_model_state"][f"model.{k}"], after_each_step[-1][k], rtol=0, atol=0)
    fresh = CausalLM(load_checkpoint_model(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt").cfg)
    load_weights(fresh, tmp_path / "a" / "run" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(fresh.state_dict(), expected, rtol=1e-5, atol=1e-6)

    interrupted = tiny_run_overrides(tmp_path / "b", steps=8, val_every=4) + ema
    train(compose_config(interrupted + ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=4"]))
    train(compose_config(interrupted + ["ckpt_path=last"]))
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for key in ("state_dict", "current_model_state"):
        for name, weight in ckpt[key].items():
            torch.testing.assert_close(resumed[key][name], weight, rtol=0, atol=0, msg=f"{key} {name}")


def test_the_evaluation_suites_and_the_end_of_run_sample_read_the_average(tmp_path):
    """Lightning swaps the average in and out at the validation epoch's start and end: an evaluation suite
    whose hook came after the swap-back scored the training weights, and the end-of-run sample, its hook
    before the average was copied in, sampled them."""
    from slmlab.eval import load_probes, probe_report
    from slmlab.eval.probes import DEFAULT_PROBES
    from slmlab.export.load import load_pretrained
    from slmlab.export.tokenizer import TokenizerFiles

    sampled = tmp_path / "sampled.pt"
    overrides = tiny_run_overrides(tmp_path, steps=8, val_every=4) + [
        "+callbacks/ema=default", "callbacks.ema.multi_avg_fn.decay=0.8", "+callbacks/eval=probes",
        "callbacks.eval.batch_size=4", "callbacks.sample._target_=tests.helpers.RecordSampledWeights",
        f"+callbacks.sample.path={sampled}"]
    train(compose_config(overrides))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    average = torch.load(last, weights_only=False)["state_dict"]
    for name, weight in torch.load(sampled).items():
        torch.testing.assert_close(weight, average[f"model.{name}"], rtol=0, atol=0, msg=name)
    tokenizer = TokenizerFiles.load(compose_config(overrides).data.tokenizer.path).tokenizer
    report = probe_report(load_pretrained(last), tokenizer, load_probes(DEFAULT_PROBES), batch_size=4)
    assert metric(tmp_path / "run", "eval/probes/all/margin")[-1] == pytest.approx(report["all"]["margin"], rel=1e-5)


@pytest.mark.parametrize("setting,error", [("+callbacks/ema=default", "callbacks.ema.*FSDP.*trainer=ddp"),
                                           ("stage.compile=backbone", "stage.compile=backbone.*FSDP.*stage.compile=true")])
def test_what_fsdp_cannot_do_is_refused_before_the_first_step(tmp_path, setting, error):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config(tiny_run_overrides(tmp_path) + [setting])
    module = instantiate(cfg.stage)
    callbacks = [instantiate(cfg.callbacks.ema)] if "ema" in cfg.callbacks else []
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None, callbacks=callbacks)
    with pytest.raises(ValueError, match=error):
        module.setup("fit")


def test_a_typo_in_the_compile_mode_is_an_error_naming_the_key(tmp_path):
    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage.compile=reduce-overhad"])
    with pytest.raises(Exception, match="stage.compile='reduce-overhad': expected true, false, backbone .* or a torch.compile mode"):
        instantiate(cfg.stage)


@pytest.mark.parametrize("setting,error", [
    ("trainer.accumulate_grad_batches=2", "needs trainer.accumulate_grad_batches=1, not 2"),
    ("model.activation_checkpointing=true", "does not go with model.activation_checkpointing=true"),
])
def test_cuda_graph_blocks_refuse_what_they_would_get_wrong(tmp_path, setting, error):
    """CUDA graphs reuse their outputs' memory: PyTorch sums gradients of micro-batches wrongly there."""
    with pytest.raises(ValueError, match=error):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage.compile=reduce-overhead", setting]))


def test_a_validation_inside_an_optimizer_step_is_refused(tmp_path):
    """val_check_interval counts batches: 3 with 2 micro-batches a step would validate (and checkpoint) in the
    middle of step 2, with its first micro-batch read and not applied."""
    with pytest.raises(ValueError, match="trainer.val_check_interval=3 counts batches: with "
                                         "trainer.accumulate_grad_batches=2 it must be a multiple of 2"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["trainer.accumulate_grad_batches=2",
                                                             "trainer.val_check_interval=3"]))
    # a time: validates after whichever batch it runs out on; it crashed set-up with an AttributeError
    timed = ["trainer.val_check_interval='00:00:00:01'"]
    with pytest.raises(ValueError, match="a time-based trainer.val_check_interval .* give a number of batches"):
        train(compose_config(tiny_run_overrides(tmp_path / "accumulated") + ["trainer.accumulate_grad_batches=2", *timed]))
    train(compose_config(tiny_run_overrides(tmp_path / "timed", steps=4) + timed))
    assert metric(tmp_path / "timed" / "run", "val/loss")


def test_bf16_mixed_clips_gradients_with_the_fused_optimizer(tmp_path):
    """Fused AdamW (the optimizer on every device) under bf16-mixed, where Lightning's own clipping
    refuses it: the module clips. A clip far below the gradient norm leaves Adam's updates at
    lr * g / eps, orders of magnitude below an unclipped run's, so a barely moved model proves it acted."""
    def moved(clip: float, name: str) -> float:
        overrides = tiny_run_overrides(tmp_path / name, steps=3, val_every=3) + [
            "trainer.precision=bf16-mixed", f"trainer.gradient_clip_val={clip}", "callbacks.sample=null"]
        cfg = compose_config(overrides)
        L.seed_everything(cfg.seed, workers=True)  # the initial weights, made as train() makes them
        instantiate(cfg.data)
        start = instantiate(cfg.stage).model.state_dict()
        train(cfg)
        end = final_weights(tmp_path / name / "run")
        return sum((end[f"model.{k}"] - v).norm().item() for k, v in start.items())

    assert moved(1e-12, "clipped") < 0.01 * moved(1.0, "normal")


def test_resuming_with_another_optimizer_is_an_error_naming_both(tmp_path):
    train(compose_config(tiny_run_overrides(tmp_path, steps=4, val_every=4)))
    with pytest.raises(ValueError, match=r"last.ckpt: the checkpoint's optimizer state is of torch.optim.adamw.AdamW "
                                         r".*slmlab.training.muon.Muon.*init_from"):
        train(compose_config(tiny_run_overrides(tmp_path, steps=8, val_every=4) + ["optim=muon", "ckpt_path=last"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Lightning runs 16-mixed as bf16 on the CPU)")
def test_fp16_with_a_gradscaler_trains_clips_and_resumes_with_fused_adamw(tmp_path):
    """Fused AdamW unscales its own gradients; clipping must not unscale them again. A stopped and
    resumed run continues with the loss scale and weights of an uninterrupted one."""
    def overrides(run: str) -> list[str]:
        return tiny_run_overrides(tmp_path / run, steps=12, val_every=6) + [
            "trainer=gpu", "trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0", "optim.lr=3e-3"]

    train(compose_config(overrides("straight")))
    train(compose_config(overrides("resumed") + ["+callbacks.stop._target_=tests.helpers.StopAtStep",
                                                 "+callbacks.stop.step=6"]))
    train(compose_config(overrides("resumed") + ["ckpt_path=last"]))
    # steps that overflow at the initial loss scale (2**16) are skipped while it halves: a modest margin
    loss = metric(tmp_path / "straight" / "run", "train/loss")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.1, loss
    straight, resumed = (torch.load(tmp_path / run / "run" / "checkpoints" / "last.ckpt", weights_only=False)
                         for run in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 12
    assert resumed["MixedPrecision"]["scale"] == straight["MixedPrecision"]["scale"] > 0
    for name, weight in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["ckpt_path=last"]))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(compose_config(tiny_run_overrides(tmp_path) + [f"ckpt_path={tmp_path / 'nope.ckpt'}"]))


def test_ddp_on_cpu_gives_ranks_disjoint_data(tmp_path):
    record = tmp_path / "batches"
    run_train(tiny_run_overrides(tmp_path, steps=4, val_every=2) + [
        "trainer=ddp", "trainer.devices=2",
        "+callbacks.record._target_=tests.helpers.RecordBatches", f"+callbacks.record.out_dir={record}"])
    rank0, rank1 = (json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) == 4 * 4  # steps x batch size
    assert not set(rank0) & set(rank1)



@pytest.mark.parametrize("setting", [["trainer=ddp", "trainer.devices=2", "data.batch_size=2"],
                                     ["trainer.accumulate_grad_batches=2", "data.batch_size=2"]],
                         ids=["ddp", "accumulation"])
def test_train_loss_is_the_mean_over_every_micro_batch_and_rank_of_the_step(tmp_path, setting):
    """Two ranks of 2 rows, or two micro-batches of 2, against one batch of 4: the same rows each step,
    so the same logged train/loss. It was rank 0's last micro-batch: 5e-3 to 3e-2 off under DDP."""
    losses = {}
    for name, extra in (("one_batch", ["data.batch_size=4"]), ("split", setting)):
        run_train(tiny_run_overrides(tmp_path / name, steps=6, val_every=2) + extra)
        losses[name] = metric(tmp_path / name / "run", "train/loss")
    assert len(losses["one_batch"]) == 3  # every trainer.log_every_n_steps=2
    assert losses["split"] == pytest.approx(losses["one_batch"], abs=2e-4)


def test_a_checkpoint_or_its_export_initialises_the_next_stage(tmp_path):
    train(compose_config(tiny_run_overrides(tmp_path, steps=4, val_every=4)))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = load_checkpoint_model(ckpt)
    folder = export_safetensors_folder(model, tmp_path / "export")
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    for source in (ckpt, folder):
        fresh = CausalLM(model.cfg)
        load_weights(fresh, source)
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.ckpt is truncated or corrupt"):
        load_checkpoint_model(bad)
    with pytest.raises(ValueError, match="broken.ckpt"):
        resolve_ckpt_path(str(bad), False, trainer=type("T", (), {"checkpoint_callback": None})())
    gguf = tmp_path / "model-F16.gguf"  # chat.py ckpt=<an export for llama.cpp>: once "corrupt (BadZipFile)"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError, match=r"model-F16.gguf is a GGUF file \(for llama.cpp\); slmlab reads a checkpoint"):
        load_checkpoint_model(gguf)
