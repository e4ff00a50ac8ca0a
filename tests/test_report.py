"""python -m slmlab.report: on a real tiny Hydra multirun, on hand-made SFT runs, on W&B runs through a
stand-in API, and its errors."""

import csv
import os
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from slmlab.report import differing_keys, gather, main, read_metrics, sft_tradeoff, write_report
from tests.conftest import ROOT, metric, tiny_run_overrides

PNG = b"\x89PNG\r\n\x1a\n"


def rows(report: Path) -> list[list[str]]:
    """The rows of the markdown table in report.md as cells, the header first."""
    lines = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000, path


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    """Two jobs of the mixer ablation at tiny size, run as `python train.py -m` runs them."""
    sweep_dir = tmp_path_factory.mktemp("multirun")
    tiny = [o for o in tiny_run_overrides(sweep_dir) if not o.startswith("paths.")]  # each job has its own dir
    subprocess.run([sys.executable, "train.py", "-m", "experiment=mixer_ablation", "model.mixer=attention,gla",
                    *tiny, "+trainer.limit_val_batches=2", f"hydra.sweep.dir={sweep_dir}",
                    "hydra.sweep.subdir=${hydra:job.num}"],  # runs named 0, 1 in the table
                   cwd=ROOT, env={**os.environ, "SLMLAB_ARTIFACTS": str(ROOT / ".pytest_cache" / "artifacts")},
                   check=True, capture_output=True)
    return sweep_dir


@pytest.mark.slow
def test_report_of_a_multirun_tabulates_what_differs_and_the_final_metrics(multirun, tmp_path, capsys):
    main([str(multirun), "--out", str(tmp_path)])
    table = rows(tmp_path / "report.md")
    assert table[0] == ["run", "model.mixer", "val/loss", "val/bpb", "tokens/s"]
    assert [r[:2] for r in table[1:]] == [["0", "attention"], ["1", "gla"]]
    for row in table[1:]:
        job = multirun / row[0]
        assert row[2] == f"{metric(job, 'val/loss')[-1]:.4f}" and row[3] == f"{metric(job, 'val/bpb')[-1]:.4f}"
        assert row[4] == f"{statistics.median(metric(job, 'perf/tokens_per_s')):,.0f}"
        # once per job, not again on each later row of the training metrics
        assert len(metric(job, "perf/startup_s")) == 1 < len(metric(job, "perf/tokens_per_s"))
    assert_png(tmp_path / "loss_curves.png")
    assert not (tmp_path / "sft_tradeoff.png").exists()  # no SFT runs
    assert "| 1 | gla |" in capsys.readouterr().out


def fake_run(root: Path, name: str, config: dict, overrides: list[str], metrics: list[dict] | None) -> Path:
    """A run directory as train.py writes it; `metrics` None leaves out csv/metrics.csv (a failed job)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run / "csv").mkdir()
        keys = ["epoch", "step", *dict.fromkeys(k for m in metrics for k in m if k != "step")]
        with open(run / "csv" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows({"epoch": 0, **m} for m in metrics)
    return run


def test_steps_a_resumed_run_redid_keep_their_later_values(tmp_path):
    # resumed from step 20's checkpoint after logging up to step 40: the CSV log holds 20-40 twice
    run = fake_run(tmp_path, "run", {}, [], [{"step": s, "train/loss": v} for s, v in
                                             [(10, 5.0), (20, 4.0), (30, 3.5), (40, 3.3), (30, 3.6), (40, 3.4)]])
    assert read_metrics(run / "csv" / "metrics.csv")["train/loss"] == [(10, 5.0), (20, 4.0), (30, 3.6), (40, 3.4)]


def test_a_job_killed_with_an_empty_metrics_file_still_gets_its_row(tmp_path, capsys):
    # the CSV logger rewrites metrics.csv from scratch when new columns appear: a kill then leaves it empty
    fake_run(tmp_path, "0", {"seed": 1}, ["seed=1"], [{"step": 10, "val/loss": 2.5}])
    empty = fake_run(tmp_path, "1", {"seed": 2}, ["seed=2"], [])
    (empty / "csv" / "metrics.csv").write_text("")
    table = rows(write_report(gather([str(tmp_path)]), tmp_path / "report"))
    assert table[1:] == [["0", "1", "2.5000"], ["1", "2", "–"]]
    assert f"{empty / 'csv' / 'metrics.csv'} is missing or empty" in capsys.readouterr().err


def sft_runs(root: Path) -> Path:
    """An SFT multirun over stage.epochs: instruction loss falls as forgetting rises; one job failed."""
    for i, (epochs, instruction, pretrain) in enumerate([(2.0, 2.1, 4.9), (0.5, 2.9, 4.4), (1.0, 2.5, 4.6)]):
        config = {"run_name": f"r{i}", "stage": {"_target_": "lightning_modules.SFTModule", "epochs": epochs},
                  "optim": {"lr": 3e-4}}
        fake_run(root, f"{i}_stage.epochs={epochs}", config, [f"stage.epochs={epochs}", "init_from=base.ckpt"], [
            {"step": 5, "train/loss": 3.5, "val/loss": instruction + 0.5, "val/pretrain/loss": 4.3},
            {"step": 10, "train/loss": 3.0},
            {"step": 10, "val/loss": instruction, "val/pretrain/loss": pretrain, "perf/tokens_per_s": 1000.0}])
    fake_run(root, "3_stage.epochs=3.0", {"run_name": "r3", "stage": {"epochs": 3.0}, "optim": {"lr": 3e-4}},
             ["stage.epochs=3.0"], None)
    return root


def test_sft_report_plots_instruction_loss_against_forgetting_by_stopping_point(tmp_path):
    runs = gather([str(sft_runs(tmp_path / "multirun"))])
    assert [r.name for r in runs] == ["0_stage.epochs=2.0", "1_stage.epochs=0.5", "2_stage.epochs=1.0",
                                      "3_stage.epochs=3.0"]
    assert sft_tradeoff(runs) == [(0.5, 4.4, 2.9), (1.0, 4.6, 2.5), (2.0, 4.9, 2.1)]  # the failed job has no point
    report = write_report(runs, tmp_path / "report")
    table = rows(report)
    assert table[0] == ["run", "stage._target_", "stage.epochs", "val/loss", "val/pretrain/loss", "tokens/s"]
    assert table[1:] == [
        ["0_stage.epochs=2.0", "lightning_modules.SFTModule", "2", "2.1000", "4.9000", "1,000"],
        ["1_stage.epochs=0.5", "lightning_modules.SFTModule", "0.5", "2.9000", "4.4000", "1,000"],
        ["2_stage.epochs=1.0", "lightning_modules.SFTModule", "1", "2.5000", "4.6000", "1,000"],
        ["3_stage.epochs=3.0", "–", "3", "–", "–", "–"]]
    assert_png(tmp_path / "report" / "sft_tradeoff.png")
    assert_png(tmp_path / "report" / "loss_curves.png")
    assert "![sft_tradeoff](sft_tradeoff.png)" in report.read_text()


class FakeWandbRun:
    def __init__(self, name: str, lr: float) -> None:
        out = f"/runs/outputs/{name}"  # resolved, as train.py logs the config to W&B
        self.name, self.config = name, {"optim": {"lr": lr}, "model": {"mixer": "gla"}, "run_name": name,
                                        "paths": {"output_dir": out, "log_dir": "/runs/outputs"},
                                        "trainer": {"default_root_dir": out},
                                        "callbacks": {"checkpoint": {"dirpath": f"{out}/checkpoints"}},
                                        "logger": {"wandb": {"name": name, "save_dir": out}}}
        self.rows = [{"_step": 0, "_runtime": 1.0, "trainer/global_step": 49, "train/loss": 5.0, "epoch": 0},
                     {"_step": 1, "trainer/global_step": 99, "val/loss": 4.5, "val/bpb": 1.8}]

    def scan_history(self):
        return iter(self.rows)


def test_wandb_runs_are_read_through_the_api(monkeypatch):
    project = [FakeWandbRun("optim.lr=0.001", 1e-3), FakeWandbRun("optim.lr=0.003", 3e-3)]
    api = types.SimpleNamespace(runs=lambda path: project,
                                sweep=lambda path: types.SimpleNamespace(runs=[FakeWandbRun("s", 1e-3)]))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=lambda: api))
    runs = gather(["wandb:team/slmlab"])
    assert [r.name for r in runs] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert runs[1].config == {"optim.lr": 3e-3, "model.mixer": "gla", "run_name": "optim.lr=0.003",
                              "paths.log_dir": "/runs/outputs", "logger.wandb.name": "optim.lr=0.003"}
    assert differing_keys(runs) == ["optim.lr"]  # not the paths and names of each run's own
    assert runs[0].history == {"train/loss": [(49, 5.0)], "val/loss": [(99, 4.5)], "val/bpb": [(99, 1.8)]}
    assert [r.name for r in gather(["wandb:team/slmlab/sweep123"])] == ["s"]


def test_bad_sources_are_named(monkeypatch, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        gather([str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="none has .hydra/config.yaml"):
        gather([str(tmp_path)])
    bad = fake_run(tmp_path, "bad", {"seed": 1}, [], [])
    (bad / "csv" / "metrics.csv").write_text("loss\n1.0\n")
    with pytest.raises(ValueError, match="bad/csv/metrics.csv: no 'step' column"):
        gather([str(bad)])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as when wandb is not installed
    with pytest.raises(SystemExit):
        main(["wandb:team/slmlab"])
    assert 'needs wandb: pip install -e ".[wandb]"' in capsys.readouterr().err
