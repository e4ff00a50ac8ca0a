from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from slmlab.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """The config `python train.py <overrides>` would run, composed without running it."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_run_overrides(tmp_path: Path, steps: int = 8, val_every: int = 4) -> list[str]:
    """A seconds-long CPU run of the tiny model; tokenizer and shards are cached for the session."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.artifacts={ROOT / '.pytest_cache' / 'artifacts'}",
        "model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=64", "model.max_seq_len=32", "data.batch_size=4",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}", "trainer.log_every_n_steps=2",
        "trainer.enable_progress_bar=false", "callbacks.sample.max_new_tokens=4", "schedule.warmup_steps=2",
    ]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return tiny_run_overrides(tmp_path)
