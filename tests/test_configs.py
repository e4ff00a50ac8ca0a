"""Every preset, experiment and group option composes; typos and wrong types fail at composition."""

import re

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf.errors import ValidationError

from slmlab.config import CONF_DIR as CONF
from slmlab.config import check_argument_types
from tests.conftest import compose_config, tiny_run_overrides
from train import train

# parameter counts recomputed from the seed specs (../specs/systems.md)
PRESET_PARAMS = {"helios_nova": (305_844_224, 0.0), "helium_nano": (47_846_912, 0.0), "helium_2b": (2_141_308_928, 0.0),
                 "helix_hybrid": (899_409_360, 0.0), "odinnext": (138_438_944, 0.0)}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))  # _x: shared parts


@pytest.mark.parametrize("preset", options("model"))
def test_every_model_preset_builds_on_the_meta_device(preset):
    cfg = compose_config([f"model={preset}"])
    with torch.device("meta"):
        module = instantiate(cfg.stage)
    n = module.model.num_params()
    if preset in PRESET_PARAMS:
        want, tol = PRESET_PARAMS[preset]
        assert abs(n - want) <= tol * want, f"{preset}: {n:,} parameters, spec {want:,}"
    logits = module.model(torch.zeros(2, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 16, cfg.model.vocab_size)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_instantiates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    with torch.device("meta"):
        module = instantiate(cfg.stage)
    assert module.model_config.vocab_size == cfg.model.vocab_size
    check_argument_types(cfg)  # every recipe's settings fit the constructors' annotations
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    instantiate(cfg.data)  # constructing a datamodule reads nothing yet


@pytest.mark.parametrize("group", ["data", "optim", "schedule", "trainer", "logger", "callbacks", "stage"])
def test_every_group_option_composes(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group] is not None


def test_odinnext_non_embedding_count_and_hybrid_layout():
    with torch.device("meta"):
        odin = instantiate(compose_config(["model=odinnext"]).stage).model
        helix = instantiate(compose_config(["model=helix_hybrid"]).stage).model
    assert odin.num_params(non_embedding=True) == 113_271_584
    assert [type(b.mixer).__name__ for b in helix.blocks] == ["Mamba2"] * 6 + ["GLA"] * 16 + ["SparseAttention"] * 6
    assert helix.blocks[0].mixer.nheads == 40 and helix.blocks[6].mixer.n_heads == 10


def test_the_mixer_of_a_preset_can_be_swapped_from_the_command_line():
    with torch.device("meta"):
        model = instantiate(compose_config(["model.mixer=gla"]).stage).model
    assert {type(b.mixer).__name__ for b in model.blocks} == {"GLA"}


def test_helios_recipe_overrides_the_base():
    cfg = compose_config(["experiment=helios_nova_pretrain"])
    assert (cfg.model.d_model, cfg.optim.lr, cfg.schedule.warmup_steps, cfg.trainer.accumulate_grad_batches) == (1024, 3e-4, 4000, 8)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.data.seq_len == 393_216
    # the card's 50B tokens of FineWeb-Edu sample-100BT, read once (not five passes over the 10BT sample)
    source = cfg.data.sources.fineweb_edu
    assert source.raw.hf_config == "sample-100BT" and "100bt" in source.path
    assert cfg.trainer.max_steps * 393_216 <= source.raw.max_tokens


def test_odinnext_recipe_trains_as_its_card_says():
    cfg = compose_config(["experiment=odinnext_pretrain"])
    with torch.device("meta"):
        module = instantiate(cfg.stage)
    optimizer = module.optimizer_factory(module.param_groups)
    assert type(optimizer).__name__ == "Muon" and optimizer.defaults["neuron_beta2"] == 0.95  # NorMuon
    ema = instantiate(cfg.callbacks.ema)
    assert type(ema).__name__ == "AveragedWeights" and cfg.callbacks.ema.multi_avg_fn.decay == 0.999
    assert (cfg.trainer.precision, cfg.stage.z_loss, cfg.stage.compile, cfg.data.seq_len) == ("16-mixed", 1e-4, True, 2048)


def test_muon_settings_are_typed():
    assert compose_config(["optim=muon", "optim.neuron_beta2=null"]).optim.neuron_beta2 is None  # plain Muon
    with pytest.raises(ConfigCompositionException, match="optim.adamw_lr"):
        compose_config(["optim=muon", "optim.adamw_lr=fast"])


@pytest.mark.parametrize("cuda,workers,precision", [(False, 0, "32-true"), (True, 2, "bf16-mixed")])
def test_loader_workers_and_precision_follow_the_machine(cuda, workers, precision, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    cfg = compose_config(["trainer=gpu"])
    assert (cfg.data.num_workers, cfg.trainer.precision) == (workers, precision)
    assert compose_config(["data.num_workers=1"]).data.num_workers == 1


def test_a_typo_in_a_group_option_names_it():
    with pytest.raises(MissingConfigException, match="helios_nvoa"):
        compose_config(["model=helios_nvoa"])


def test_a_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["optim.lr=abc"])
    assert isinstance(err.value.__cause__, ValidationError) and "optim.lr" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="model.d_model"):
        compose_config(["model.d_model=wide"])


@pytest.mark.parametrize("overrides,named", [
    (["trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    (["stage.z_loss=abc"], "stage.z_loss='abc'"),
    (["stage=sft", "stage.epochs=half"], "stage.epochs='half'"),
    (["stage=grpo", "stage.group_size=1.5"], "stage.group_size=1.5"),
])
def test_a_wrong_type_in_a_group_without_a_schema_names_the_key_before_anything_runs(overrides, named, tmp_path):
    with pytest.raises(ValueError, match=re.escape(named)):
        train(compose_config([f"paths.output_dir={tmp_path}", *overrides]))
    assert not any(tmp_path.iterdir())  # nothing was set up or written


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigCompositionException, match="d_modle"):
        compose_config(["model.d_modle=64"])
    with pytest.raises(ConfigCompositionException, match="learning_rate"):
        compose_config(["learning_rate=1e-3"])


def test_the_run_prints_the_model_in_one_line_with_the_flops_mfu_counts():
    from slmlab.training.callbacks import model_line

    with torch.device("meta"):  # as under trainer.init_module(): the FLOPs count makes no tensor there
        helix = instantiate(compose_config(["model=helix_hybrid"]).stage).model
        line, flops = model_line(helix), helix.flops_per_token(8192)
    assert line == (
        f"model: 899,409,360 parameters ({helix.num_params(non_embedding=True):,} without the embedding), 28 layers "
        f"(mamba2 x6, gla x16, sparse_attention x6), d_model 1280; {flops / 1e9:.3g} GFLOPs per token trained at seq 8192")


@pytest.mark.parametrize("override,named", [
    ("callbacks.sample.max_new_tokens=abc", "callbacks.sample.max_new_tokens='abc'"),
    ("callbacks.profile.steps=1.5", "callbacks.profile.steps=1.5"),
    ("callbacks.periodic.every_n_train_steps=ten", "callbacks.periodic.every_n_train_steps='ten'"),
])
def test_a_wrong_type_in_a_callback_setting_names_the_key_before_anything_runs(override, named, tmp_path):
    """The end-of-run sample read its settings only once training had ended: a TypeError after the run."""
    with pytest.raises(ValueError, match=re.escape(named)):
        train(compose_config(tiny_run_overrides(tmp_path, steps=2, val_every=2) + [override]))
    assert not (tmp_path / "run").exists()  # nothing was set up or written
