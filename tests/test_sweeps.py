"""The W&B sweeps of sweeps/ and the sweep recipes of conf/experiment/: W&B's schema, every parameter a
valid override of train.py's config (in every combination), matched parameter counts, and one
sampled configuration of each W&B sweep trained at tiny size. wandb itself is not needed."""

import itertools
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Transformer
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from slmlab.config import CONF_DIR, compose_config, short_dirname
from slmlab.training.schedules import WSD, Cosine
from tests.conftest import ROOT, lowercase_prompts, metric, tiny_run_overrides
from train import train

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

# W&B's sweep schema (github.com/wandb/sweeps, src/sweeps/config/schema.json), the parts a sweep here can use
TOP_LEVEL = {"program", "method", "metric", "parameters", "early_terminate", "command", "name", "description",
             "project", "entity", "run_cap"}
DISTRIBUTIONS = {  # name -> (required keys, optional keys), besides `distribution`
    "constant": ({"value"}, set()), "categorical": ({"values"}, set()),
    "categorical_w_probabilities": ({"values", "probabilities"}, set()),
    "int_uniform": ({"min", "max"}, set()), "uniform": ({"min", "max"}, set()), "q_uniform": ({"min", "max"}, {"q"}),
    "log_uniform": ({"min", "max"}, set()), "log_uniform_values": ({"min", "max"}, set()),
    "q_log_uniform": ({"min", "max"}, {"q"}), "q_log_uniform_values": ({"min", "max"}, {"q"}),
    "inv_log_uniform": ({"min", "max"}, set()), "inv_log_uniform_values": ({"min", "max"}, set()),
    "normal": (set(), {"mu", "sigma"}), "q_normal": (set(), {"mu", "sigma", "q"}),
    "log_normal": (set(), {"mu", "sigma"}), "q_log_normal": (set(), {"mu", "sigma", "q"}),
    "beta": (set(), {"a", "b"}), "q_beta": (set(), {"a", "b", "q"}),
}
GRID = {"constant", "categorical", "int_uniform", "q_uniform"}  # the distributions method=grid can enumerate
HYPERBAND = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]  # parameters -> key=value overrides


def distribution(name: str, spec: object) -> str:
    """A parameter's W&B distribution, inferred as W&B does when not named; raises naming the parameter."""
    if not isinstance(spec, dict):
        raise ValueError(f"parameter {name}: a spec is a mapping, got {spec!r}")
    if "distribution" in spec:
        dist = spec["distribution"]
    elif "value" in spec:
        dist = "constant"
    elif "values" in spec:
        dist = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    elif {"min", "max"} <= spec.keys():
        dist = "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"
    else:
        raise ValueError(f"parameter {name}: give value, values, or min and max (got {sorted(spec)})")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"parameter {name}: unknown distribution {dist!r}")
    required, optional = DISTRIBUTIONS[dist]
    keys = spec.keys() - {"distribution"}
    if not required <= keys <= required | optional:
        raise ValueError(f"parameter {name}: {dist} takes {sorted(required)} and optionally {sorted(optional)}, "
                         f"got {sorted(keys)}")
    if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
        raise ValueError(f"parameter {name}: values must be a non-empty list")
    if "min" in spec and not spec["min"] < spec["max"]:
        raise ValueError(f"parameter {name}: min {spec['min']} is not below max {spec['max']}")
    if dist.endswith("_values") and spec["min"] <= 0:
        raise ValueError(f"parameter {name}: {dist} needs min > 0")
    return dist


def check_sweep(sweep: dict) -> None:
    """W&B's schema, and this repo's conventions: train.py, parameters as Hydra overrides, val/loss minimised."""
    if unknown := sweep.keys() - TOP_LEVEL:
        raise ValueError(f"unknown top-level keys {sorted(unknown)}")
    if missing := {"program", "method", "metric", "parameters", "command"} - sweep.keys():
        raise ValueError(f"missing keys {sorted(missing)}")
    if sweep["program"] != "train.py" or sweep["command"] != COMMAND:
        raise ValueError(f"program must be train.py and command {COMMAND}, so parameters arrive as Hydra overrides")
    if sweep["method"] not in ("grid", "random", "bayes"):
        raise ValueError(f"method {sweep['method']!r} is not grid, random or bayes")
    if sweep["metric"] != {"name": "val/loss", "goal": "minimize"}:
        raise ValueError(f"metric {sweep['metric']} is not val/loss, minimize")
    stop = sweep.get("early_terminate")
    if stop is not None and (stop.get("type") != "hyperband" or not stop.keys() <= HYPERBAND
                             or not ("min_iter" in stop or {"max_iter", "s"} <= stop.keys())):
        raise ValueError(f"early_terminate {stop}: hyperband with min_iter, or with max_iter and s")
    if not sweep["parameters"]:
        raise ValueError("no parameters")
    for name, spec in sweep["parameters"].items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise ValueError(f"parameter {name!r}: W&B names hold letters, digits, '_', '.' and '-' (no Hydra +/~)")
        dist = distribution(name, spec)
        if sweep["method"] == "grid" and dist not in GRID:
            raise ValueError(f"parameter {name}: method grid cannot enumerate {dist}")


def configurations(parameters: dict) -> list[dict]:
    """Parameter sets that try every value (a range: both ends) of every parameter under every combination
    of config-group options, which decide what keys exist; plain keys do not interact, so they advance
    side by side."""
    groups = {k: s["values"] for k, s in parameters.items() if "values" in s and (CONF_DIR / k).is_dir()}
    plain = {k: s.get("values") or ([s["min"], s["max"]] if "min" in s else [s["value"]])
             for k, s in parameters.items() if k not in groups}
    n = max(map(len, plain.values()), default=1)
    return [{**dict(zip(groups, combo)), **{k: v[i % len(v)] for k, v in plain.items()}}
            for combo in itertools.product(*groups.values()) for i in range(n)]


def sample(parameters: dict, rng: random.Random) -> dict:
    """One configuration drawn as W&B's random search would, from the distributions these sweeps use."""
    out = {}
    for name, spec in parameters.items():
        dist = distribution(name, spec)
        if dist == "constant":
            out[name] = spec["value"]
        elif dist == "categorical":
            out[name] = rng.choice(spec["values"])
        elif dist == "int_uniform":
            out[name] = rng.randint(spec["min"], spec["max"])
        elif dist == "uniform":
            out[name] = rng.uniform(spec["min"], spec["max"])
        elif dist == "log_uniform_values":
            out[name] = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        else:
            raise NotImplementedError(f"parameter {name}: sampling {dist}")
    return out


def as_overrides(params: dict) -> list[str]:
    return [f"{k}={v}" for k, v in params.items()]  # what ${args_no_hyphens} passes


def check_overrides(params: dict) -> DictConfig:
    """Composes the overrides and checks that each value landed where its key says."""
    cfg = compose_config(as_overrides(params))
    for key, value in params.items():
        # a config group's option, or an interpolation, is checked by composing at all
        if not (CONF_DIR / key).is_dir() and "${" not in str(value):
            assert OmegaConf.select(cfg, key) == value, key
    return cfg


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(autouse=True)
def wandb_run_id(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")  # what `wandb agent` sets for each run it starts


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_follows_wandb_schema(path):
    check_sweep(load(path))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_combination_of_sweep_parameters_is_an_override_of_the_config(path):
    sweep = load(path)
    configs = [check_overrides(params) for params in configurations(sweep["parameters"])]
    assert len(configs) > 1
    assert {c.run_name for c in configs} == {"wandb/abc123"}  # one output directory per W&B run


@pytest.mark.parametrize("change, message", [
    ({"method": "hyperopt"}, "method 'hyperopt'"),
    ({"metric": {"name": "val/loss", "goal": "lowest"}}, "metric"),
    ({"command": ["${env}", "${interpreter}", "${program}", "${args}"]}, "command"),
    ({"early_terminate": {"type": "hyperband", "eta": 3}}, "early_terminate"),
    ({"parameters": {"optim.lr": {"distribution": "loguniform", "min": 1e-4, "max": 1e-2}}}, "unknown distribution"),
    ({"parameters": {"optim.lr": {"min": 1e-2, "max": 1e-4}}}, "min 0.01 is not below max"),
    ({"parameters": {"optim.lr": {"values": []}}}, "non-empty"),
    ({"parameters": {"optim.lr": {"distribution": "normal", "min": 0, "max": 1}}}, "normal takes"),
    ({"method": "grid"}, "grid cannot enumerate log_uniform_values"),
    ({"parameters": {"+trainer.limit_val_batches": {"value": 2}}}, "W&B names hold"),
])
def test_a_malformed_sweep_is_refused_with_the_reason(change, message):
    sweep = {**load(ROOT / "sweeps" / "lr_schedule.yaml"), **change}
    with pytest.raises(ValueError, match=message):
        check_sweep(sweep)


def test_a_parameter_that_is_not_a_config_key_fails_to_compose():
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        check_overrides({"optim.learning_rate": 1e-3})
    # the decay fraction exists for WSD only: a sweep crossing it with schedule=cosine breaks half its runs
    parameters = {"schedule": {"values": ["wsd", "cosine"]}, "schedule.decay_fraction": {"values": [0.1, 0.2]}}
    with pytest.raises(ConfigCompositionException, match="decay_fraction"):
        for params in configurations(parameters):
            check_overrides(params)


def test_wsd_without_a_stable_phase_is_the_cosine_schedule():
    """The claim of sweeps/wsd_decay.yaml: decay_fraction = 1 - warmup/steps with a cosine decay is schedule=cosine."""
    def lrs(schedule_cls, **kwargs) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = schedule_cls(optimizer, total_steps=300, warmup_steps=30, min_lr_ratio=0.1, **kwargs)
        out = []
        for _ in range(300):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return out

    assert lrs(WSD, decay_fraction=0.9, decay_shape="cosine") == pytest.approx(lrs(Cosine), abs=1e-12)


def test_wandb_logger_is_offline_without_an_account_and_logs_no_checkpoints_by_default(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    wandb = compose_config(["logger=wandb"]).logger.wandb
    assert wandb.offline is True and wandb.log_model is False
    assert OmegaConf.to_container(wandb)["name"] == "${hydra:job.override_dirname}"  # named by its overrides
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert compose_config(["logger=wandb"]).logger.wandb.offline is False


# -- the Hydra multirun recipes ------------------------------------------------------------------


def hydra_config(overrides: list[str]) -> DictConfig:
    """Like compose_config, with the `hydra` node, which holds the sweeper and its search space."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def sweep_values(experiment: str) -> dict[str, list]:
    """The recipe's hydra.sweeper.params as key -> values, as overrides write them: a choice's options,
    an interval's two ends."""
    params = hydra_config([f"experiment={experiment}"]).hydra.sweeper.params
    out = {}
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        value = override.value()
        if override.is_interval_sweep():
            out[override.key_or_group] = [value.start, value.end]
        else:
            out[override.key_or_group] = list(override.sweep_iterator(transformer=Transformer.encode))
    return out


def non_embedding_params(cfg: DictConfig) -> int:
    with torch.device("meta"):
        return instantiate(cfg.stage).model.num_params(non_embedding=True)


def test_mixer_ablation_matches_parameters_within_a_tenth_of_a_percent():
    widths = compose_config(["experiment=mixer_ablation"]).ffn_hidden_by_mixer
    assert set(sweep_values("mixer_ablation")["model.mixer"]) <= set(widths)
    counts = {m: non_embedding_params(compose_config(["experiment=mixer_ablation", f"model.mixer={m}"]))
              for m in widths}
    assert counts["attention"] == 787_840
    for mixer, n in counts.items():
        assert abs(n / counts["attention"] - 1) < 1e-3, (mixer, n, counts)


def test_hybrid_layouts_of_one_mix_have_equal_parameters_and_other_ratios_stay_within_six_percent():
    layouts = sweep_values("hybrid_layout_ablation")["model.layout"]
    assert len(layouts) == 6
    mixes, counts = {}, {}
    for layout in layouts:
        cfg = compose_config(["experiment=hybrid_layout_ablation", f"model.layout={layout}"])
        mixes[layout] = tuple(sorted(instantiate(cfg.model).layer_mixers))
        counts[layout] = non_embedding_params(cfg)
    assert counts[layouts[0]] == 1_424_752
    for layout, n in counts.items():
        assert abs(n / counts[layouts[0]] - 1) < 0.06, (layout, n)
        assert all(counts[other] == n for other in layouts if mixes[other] == mixes[layout])
    assert len(set(mixes.values())) == 4  # one mix in three orders, three other ratios


def test_sft_epochs_recipe_sweeps_fractional_stopping_points():
    assert sweep_values("sft_epochs") == {"stage.epochs": [0.25, 0.5, 1, 2, 3]}
    cfg = compose_config(["experiment=sft_epochs", "stage.epochs=0.25"])
    assert cfg.stage._target_ == "lightning_modules.SFTModule" and cfg.stage.epochs == 0.25


def test_lr_schedule_recipe_selects_optuna_and_its_search_space_composes():
    sweeper = hydra_config(["experiment=lr_schedule"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    space = sweep_values("lr_schedule")
    assert space == {"optim.lr": [1e-4, 1e-2], "schedule": ["wsd", "cosine"], "schedule.warmup_steps": [10, 100]}
    for params in configurations({key: {"values": values} for key, values in space.items()}):
        check_overrides({"experiment": "lr_schedule", **params})


def test_a_failed_trial_of_the_lr_schedule_study_does_not_end_the_study(tmp_path):
    """A learning rate the optimizer refuses (as one that diverges) fails its trial; the study goes on
    to its other trials and reports the best of those that finished."""
    sweep_dir = tmp_path / "study"
    tiny = [o for o in tiny_run_overrides(sweep_dir) if not o.startswith("paths.")]  # each trial has its own dir
    done = subprocess.run([sys.executable, "train.py", "-m", "experiment=lr_schedule", "hydra.sweeper.n_trials=3",
                           "optim.lr=choice(-1.0,0.001)", *tiny, "+trainer.limit_val_batches=2",
                           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra:job.num}"],
                          cwd=ROOT, env={**os.environ, "SLMLAB_ARTIFACTS": str(ROOT / ".pytest_cache" / "artifacts")},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Invalid learning rate: -1.0" in done.stdout  # the seeded sampler tries the failing value too
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"]["optim.lr"] == 0.001 and math.isfinite(results["best_value"])


# -- one sampled configuration of each W&B sweep, trained at tiny size ------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    train(compose_config(tiny_run_overrides(tmp, steps=8, val_every=8) + ["+trainer.limit_val_batches=2"]))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_sampled_configuration_of_each_sweep_trains(path, tmp_path, request):
    params = sample(load(path)["parameters"], random.Random(0))
    assert params.pop("logger") == "wandb"  # how the metric reaches W&B; the tiny run logs to CSV only
    params.pop("run_name")  # the tiny run has its own output dir
    for budget in ("trainer.max_steps", "trainer.val_check_interval"):  # the tiny run's budget replaces the sweep's
        params.pop(budget, None)
    steps = max(8, 2 * int(params.get("schedule.warmup_steps", 0)))  # warmup must fit the run
    overrides = dict(o.split("=", 1) for o in tiny_run_overrides(tmp_path, steps=steps, val_every=steps // 2))
    overrides["+trainer.limit_val_batches"] = 2
    if "init_from" in params:
        params["init_from"] = request.getfixturevalue("pretrained")
    if params.get("experiment") == "sft_epochs":  # constraint prompts short enough for the tiny model's 32 positions
        overrides |= {"data.constraint_val.prompts": lowercase_prompts(tmp_path), "stage.max_new_tokens": 6}
    overrides.update(params)
    val_loss = train(compose_config(as_overrides(overrides)))
    run = tmp_path / "run"
    assert val_loss is not None and math.isfinite(val_loss) and metric(run, "val/loss")[-1] == pytest.approx(val_loss)
    if params.get("experiment") == "sft_epochs":  # the trade-off's other axes: forgetting, constraint-following
        assert metric(run, "val/pretrain/loss") and metric(run, "val/pretrain/en/loss") and metric(run, "val/pass_rate")


def test_multirun_folder_names_stay_short_and_distinct():
    overrides = ",".join(f"trainer.some_long_setting_{i}=value_{i}" for i in range(15))
    other = overrides.replace("value_14", "value_15")
    assert len(overrides) > 255 and short_dirname("optim.lr=0.001") == "optim.lr=0.001"
    names = {short_dirname(overrides), short_dirname(other)}
    assert len(names) == 2 and all(len(n) == 120 for n in names)
    umlauts = "schedule.name=" + "ä" * 200  # 414 bytes: file systems count bytes, not characters
    assert len(short_dirname(umlauts).encode()) <= 120 and short_dirname(umlauts) != short_dirname(umlauts + "x")
    subdir = (CONF_DIR / "hydra" / "default.yaml").read_text()
    assert "short_dirname:${hydra:job.override_dirname}" in subdir  # what names each multirun job's folder
