import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from slmlab.config import compose_config  # noqa: F401  (the tests' way to compose, re-exported)

ROOT = Path(__file__).resolve().parents[1]

# Without a CUDA device, slmlab's Triton kernels run in Triton's interpreter (tests/test_triton_kernels.py).
# Triton reads the switch when a kernel is defined, so it is set before any test imports one.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def metric(run_dir: Path, key: str) -> list[float]:
    """The values a run logged for `key`, in order (its CSV log)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def lowercase_prompts(tmp_path: Path) -> Path:
    """Constraint prompts with a reward a tiny model can learn in a few dozen steps."""
    prompts = tmp_path / "prompts.jsonl"
    questions = ["what is debian?", "how do i install a package?", "what does apt do?", "wie installiere ich ein paket?"]
    prompts.write_text("".join(json.dumps({"id": f"q{i}/{split}", "section": str(i), "prompt": q, "language": "en",
                                           "constraints": [{"kind": "all_lowercase"}], "split": split}) + "\n"
                               for i, q in enumerate(questions) for split in ("train", "heldout")))
    return prompts


def tiny_run_overrides(tmp_path: Path, steps: int = 8, val_every: int = 4) -> list[str]:
    """A seconds-long CPU run of the tiny model; tokenizer and shards are cached for the session."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.artifacts={ROOT / '.pytest_cache' / 'artifacts'}",
        "model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=64", "model.max_seq_len=32", "data.batch_size=4",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}", "trainer.log_every_n_steps=2",
        "callbacks.progress_bar=null", "callbacks.sample.max_new_tokens=4", "schedule.warmup_steps=2",
    ]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return tiny_run_overrides(tmp_path)
