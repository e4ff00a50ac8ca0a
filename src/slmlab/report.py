"""Compare runs: a markdown table of what differs between them and their final metrics, and plots.

    python -m slmlab.report outputs/multirun/2026-11-23_14-00-00       # every job of a multirun
    python -m slmlab.report outputs/base outputs/sft --out report/     # any run directories
    python -m slmlab.report wandb:my-team/slmlab --out report/         # a W&B project (or entity/project/sweep_id)

A run directory is what train.py writes: `.hydra/config.yaml` and `.hydra/overrides.yaml` (Hydra)
and `csv/metrics.csv` (the CSV logger). The report is `<out>/report.md`, also printed, with
`<out>/loss_curves.png` and, for SFT runs at several `stage.epochs`, `<out>/sft_tradeoff.png`: the
instruction loss against the held-out pretraining loss, one point per stopping point. Plots need
matplotlib (`pip install -e ".[report]"`), W&B projects need wandb (`pip install -e ".[wandb]"`).
"""

import argparse
import csv
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

# table columns after the config keys: (header, metric, how its logged values become one number)
SUMMARY = [("val/loss", "val/loss", "last"), ("val/bpb", "val/bpb", "last"),
           ("val/pretrain/loss", "val/pretrain/loss", "last"), ("val/pass_rate", "val/pass_rate", "last"),
           ("tokens/s", "perf/tokens_per_s", "median")]  # median: the first interval includes start-up
CURVES = ("train/loss", "val/loss")
# name the run, which the table's first column already does
IGNORED_KEYS = {"run_name", "logger.wandb.name"}
ABSENT = "–"


@dataclass
class Run:
    name: str
    config: dict[str, object]  # flattened: {"optim.lr": 0.001, "schedule._target_": ..., ...}
    overrides: list[str]  # the command line's, e.g. ["model.mixer=gla"]
    history: dict[str, list[tuple[int, float]]]  # metric -> (step, value) in logging order

    def last(self, metric: str) -> float | None:
        series = self.history.get(metric)
        return series[-1][1] if series else None

    def summary(self, metric: str, how: str) -> float | None:
        if how == "last" or metric not in self.history:
            return self.last(metric)
        return statistics.median(v for _, v in self.history[metric])


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """CSVLogger's metrics.csv (one row per logging call, empty cells for metrics not logged then). A
    resumed run appends the steps it redoes after its checkpoint: their later values replace those."""
    history: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:  # an empty file: a job killed while the logger rewrote it
            return history
        if "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'step' column, so not a metrics.csv of Lightning's CSVLogger")
        for row in reader:
            for key, value in row.items():
                if key not in ("step", "epoch") and value:
                    points, step = history.setdefault(key, []), int(row["step"])
                    while points and points[-1][0] >= step:
                        points.pop()
                    points.append((step, float(value)))
    return history


def _natural(path: Path) -> list:
    # job dirs start with their number: 2_... before 10_...
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> list[Path]:
    """`root` if it is a run directory, else the run directories below it (a multirun's jobs) in job order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    if (root / ".hydra" / "config.yaml").is_file():
        return [root]
    runs = sorted((p.parent.parent for p in root.rglob(".hydra/config.yaml")), key=_natural)
    if not runs:
        raise FileNotFoundError(f"{root}: no run directory in it (none has .hydra/config.yaml)")
    return runs


def load_run(run_dir: Path, name: str) -> Run:
    config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    metrics = run_dir / "csv" / "metrics.csv"
    history = read_metrics(metrics) if metrics.is_file() else {}
    if not history:  # a job that failed or has not logged yet still gets its row
        print(f"note: {metrics} is missing or empty", file=sys.stderr)
    return Run(name, flatten(config), [str(o) for o in overrides], history)


def load_wandb(path: str) -> list[Run]:
    """The runs of `entity/project`, or of one sweep: `entity/project/sweep_id`."""
    try:
        import wandb
    except ImportError:
        raise ImportError(f'reading wandb:{path} needs wandb: pip install -e ".[wandb]"') from None
    api = wandb.Api()
    runs = api.sweep(path).runs if path.count("/") == 2 else api.runs(path)
    out = []
    for run in runs:
        history: dict[str, list[tuple[int, float]]] = {}
        for row in run.scan_history():
            step = row.get("trainer/global_step", row.get("_step"))  # WandbLogger logs the trainer's step
            for key, value in row.items():
                if (not key.startswith("_") and key not in ("trainer/global_step", "epoch")
                        and isinstance(value, (int, float)) and not isinstance(value, bool)):
                    history.setdefault(key, []).append((int(step), float(value)))
        config = flatten(dict(run.config))
        # W&B keeps the resolved config, where every path under the run's own folder differs from run to run
        own = config.get("paths.output_dir")
        config = {k: v for k, v in config.items() if not (own and isinstance(v, str) and v.startswith(str(own)))}
        out.append(Run(run.name, config, [], history))
    if not out:
        raise ValueError(f"wandb:{path}: no runs")
    return out


def gather(sources: list[str]) -> list[Run]:
    """Runs from run directories, multirun directories and `wandb:<entity>/<project>[/<sweep_id>]`."""
    runs = []
    for source in sources:
        if source.startswith("wandb:"):
            runs += load_wandb(source.removeprefix("wandb:"))
            continue
        root = Path(source)
        runs += [load_run(d, d.name if d == root else str(d.relative_to(root))) for d in find_runs(root)]
    return runs


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a key some runs lack counts)."""
    keys = sorted(set().union(*(r.config for r in runs)) - IGNORED_KEYS)
    return [k for k in keys if len({repr(r.config.get(k, ABSENT)) for r in runs}) > 1]


def _cell(value: object, metric: str | None = None) -> str:
    if value is None or value == ABSENT:
        return ABSENT
    if metric == "perf/tokens_per_s":
        return f"{value:,.0f}"
    if metric is not None:
        return f"{value:.4f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(runs: list[Run]) -> str:
    """Markdown: one row per run; the config keys that differ, then the summary metrics any run has."""
    keys = differing_keys(runs)
    metrics = [(header, m, how) for header, m, how in SUMMARY if any(m in r.history for r in runs)]
    lines = ["| " + " | ".join(["run", *keys, *(h for h, _, _ in metrics)]) + " |",
             "|" + "---|" * (1 + len(keys) + len(metrics))]
    for run in runs:
        cells = [run.name, *(_cell(run.config.get(k, ABSENT)) for k in keys),
                 *(_cell(run.summary(m, how), m) for _, m, how in metrics)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def sft_tradeoff(runs: list[Run]) -> list[tuple[float, float, float]]:
    """(stage.epochs, final held-out pretraining loss, final instruction loss) of each SFT run, by epochs."""
    points = [(float(r.config["stage.epochs"]), r.last("val/pretrain/loss"), r.last("val/loss"))
              for r in runs if "stage.epochs" in r.config]
    return sorted(p for p in points if None not in p)


def _labels(runs: list[Run]) -> list[str]:
    """Legend entries: the overrides not shared by every run ("model.mixer=gla"), else the run's name."""
    shared = set.intersection(*(set(r.overrides) for r in runs))
    return [",".join(o for o in r.overrides if o not in shared) or r.name for r in runs]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('the plots need matplotlib: pip install -e ".[report]"') from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[Run], path: Path) -> Path | None:
    """train/loss and val/loss against the step, one line per run."""
    metrics = [m for m in CURVES if any(m in r.history for r in runs)]
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run, label in zip(runs, _labels(runs)):
            if metric in run.history:
                steps, values = zip(*run.history[metric])
                ax.plot(steps, values, label=label, marker="o" if metric.startswith("val/") else None, markersize=3)
        ax.set(title=metric, xlabel="step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sft_tradeoff(runs: list[Run], path: Path) -> Path | None:
    """The forgetting trade-off: instruction loss against held-out pretraining loss across stage.epochs."""
    points = sft_tradeoff(runs)
    if len(points) < 2:
        return None
    plt = _pyplot()
    epochs, pretrain, instruction = zip(*points)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(pretrain, instruction, "-o")
    for e, x, y in points:
        ax.annotate(f"{e:g} ep", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(title="SFT stopping point", xlabel="held-out pretraining loss (val/pretrain/loss): forgetting",
           ylabel="instruction loss (val/loss)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: list[Run], out: Path) -> Path:
    """Writes `out/report.md` and the plots it links; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    plots = [plot_curves(runs, out / "loss_curves.png"), plot_sft_tradeoff(runs, out / "sft_tradeoff.png")]
    report = out / "report.md"
    report.write_text(text + "\n" + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots if p is not None))
    print(text)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slmlab.report", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+",
                        help="run or multirun directories, or wandb:<entity>/<project>[/<sweep_id>]")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go "
                                                 "(default: <the one directory given>/report, else ./report)")
    args = parser.parse_args(argv)
    local = len(args.sources) == 1 and not args.sources[0].startswith("wandb:")
    out = args.out or (Path(args.sources[0]) / "report" if local else Path("report"))
    try:
        report = write_report(gather(args.sources), out)
    except (FileNotFoundError, ImportError, ValueError) as err:
        parser.error(str(err))
    print(f"\nwrote {report}")


if __name__ == "__main__":
    main()
