"""Tiny dense checkpoints trained in-process (about a second each), for the export and eval tests."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import compose_config, tiny_run_overrides
from train import train


@dataclass
class TinyRun:
    ckpt: Path
    tokenizer: Path
    overrides: list[str]  # the run's config overrides: they also compose its validation data


@pytest.fixture(scope="session", name="tiny_runs")
def tiny_runs_fixture(tmp_path_factory) -> dict[bool, TinyRun]:
    """qk_norm -> a trained run of the tiny GQA model: Qwen3-shaped with QK-norm, Llama-shaped without.
    A high learning rate moves the norm weights away from their initial ones, so a norm exported
    under the wrong name changes the logits."""
    runs = {}
    for qk_norm in (True, False):
        overrides = tiny_run_overrides(tmp_path_factory.mktemp(f"qk_norm_{qk_norm}"), steps=8, val_every=8)
        overrides += [f"model.qk_norm={str(qk_norm).lower()}", "optim.lr=3e-3",
                      "+trainer.limit_val_batches=2"]  # the checkpoint's val loss needs no more
        cfg = compose_config(overrides)
        train(cfg)
        runs[qk_norm] = TinyRun(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt",
                                Path(cfg.data.tokenizer.path), overrides)
    return runs
