"""Hydra set-up shared by every entry point: OmegaConf resolvers and typed schemas for config groups.

The schemas make a wrong type in an override fail at composition with the key named
(`optim.lr=abc` -> "Value 'abc' of type 'str' could not be converted to Float, full_key: optim.lr").
Presets extend them through their defaults list (`defaults: [schema, _self_]`).
"""

import hashlib
import inspect
import netrc
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from slmlab import CORPUS_DIR
from slmlab.models.config import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's config tree


@dataclass
class ModelSchema(ModelConfig):
    _target_: str = "slmlab.models.ModelConfig"
    vocab_size: int = MISSING
    d_model: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    ffn_hidden: int = MISSING

    def __post_init__(self) -> None:  # derived fields are filled by ModelConfig when instantiated
        pass


@dataclass
class AdamWSchema:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool = True  # one kernel per step, on CUDA and CPU alike


@dataclass
class MuonSchema:
    _target_: str = "slmlab.training.muon.Muon"
    _partial_: bool = True
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    neuron_beta2: float | None = 0.95
    adamw_lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class ScheduleSchema:
    _target_: str = MISSING
    _partial_: bool = True
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class WSDSchema(ScheduleSchema):
    _target_: str = "slmlab.training.schedules.WSD"
    decay_fraction: float = 0.1
    decay_shape: str = "cosine"


def _wandb_offline() -> bool:
    """Offline unless W&B can reach an account: WANDB_MODE=online, an API key, or `wandb login`."""
    if os.environ.get("WANDB_MODE") == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def short_dirname(name: str, limit: int = 120) -> str:
    """A directory name of at most `limit` UTF-8 bytes (what file systems count): a longer one keeps its
    start and gets a hash of the whole, so the multirun folders of many overrides stay distinct and
    within file-system limits."""
    encoded = name.encode()
    if len(encoded) <= limit:
        return name
    start = encoded[: limit - 9].decode(errors="ignore")  # not through the middle of a character
    return f"{start}_{hashlib.sha1(encoded).hexdigest()[:8]}"


def _auto_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _auto_workers() -> int:
    # With a GPU, two loader processes take reading, collating and pinning off the thread that launches
    # the kernels (helios_nova on one H100: data wait 0.9% of step time with none, 0.05% with two). On a
    # CPU they would take cores from the model itself.
    return 2 if torch.cuda.is_available() else 0


def register_configs() -> None:
    """Idempotent; call before composing any config."""
    if not OmegaConf.has_resolver("corpus"):
        # `${corpus:name}`: a file of the embedded corpus, wherever slmlab is installed
        OmegaConf.register_new_resolver("corpus", lambda name: str(CORPUS_DIR / name))
        # `${auto_precision:}`: bf16 mixed precision where the GPU has it, float32 elsewhere
        OmegaConf.register_new_resolver("auto_precision", _auto_precision)
        # `${auto_workers:}`: DataLoader worker processes, 2 where there is a GPU to keep fed, else 0
        OmegaConf.register_new_resolver("auto_workers", _auto_workers)
        OmegaConf.register_new_resolver("wandb_offline", _wandb_offline)
        # `${short_dirname:${hydra:job.override_dirname}}`: multirun folders within 255 characters
        OmegaConf.register_new_resolver("short_dirname", short_dirname)
    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelSchema)
    cs.store(group="optim", name="schema", node=AdamWSchema)
    cs.store(group="optim", name="muon_schema", node=MuonSchema)
    cs.store(group="schedule", name="schema", node=ScheduleSchema)
    cs.store(group="schedule", name="wsd_schema", node=WSDSchema)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python train.py <overrides>` would run, composed without running it."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def training_config(model: ModelConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config at a trained model's vocabulary and context: it names the data and the
    tokenizer the model was trained with (checkpoints do not record the tokenizer)."""
    return compose_config([f"model.vocab_size={model.vocab_size}", f"model.max_seq_len={model.max_seq_len}",
                           *overrides])


def tokenizer_path(data: DictConfig) -> str:
    """The tokenizer file a data config names: pretraining data gives a table (path, vocabulary, what to
    train it on), post-training data (chat, preferences, prompts) just the path."""
    return data.tokenizer if isinstance(data.tokenizer, str) else data.tokenizer.path


_SIMPLE = (bool, int, float, str, type(None))


def _accepts(hint: object, value: object) -> bool:
    """Whether `value` (a scalar from a config) fits a simple annotation. Annotations other than
    bool/int/float/str/None and unions of them are not checked."""
    if hint in _SIMPLE:
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if all(o in _SIMPLE for o in options):
            return any(_accepts(o, value) for o in options)
    return True


def _init_hints(cls: type) -> dict[str, object]:
    """The annotated parameters of `cls.__init__` and of the bases its `**kwargs` reach."""
    hints: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            found = typing.get_type_hints(init)
        except Exception:  # annotations that do not resolve here are not checked
            continue
        parameters = inspect.signature(init).parameters
        hints.update({k: v for k, v in found.items() if k in parameters})
    return hints


def check_argument_types(cfg: DictConfig, groups: Sequence[str] | None = None) -> None:
    """ValueError naming the key when a scalar setting of a group without a schema (its options are
    the constructor's arguments) does not fit the constructor's annotation: `trainer.max_steps=abc`
    or `stage.z_loss=abc` fail here, not deep inside Lightning or torch. `groups` (dotted keys) defaults
    to stage, trainer and every callback: `callbacks.sample.max_new_tokens=abc` failed only once
    training had ended."""
    if groups is None:
        groups = ["stage", "trainer", *(f"callbacks.{name}" for name in cfg.get("callbacks") or {})]
    for group in groups:
        node = OmegaConf.select(cfg, group)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue
        target = get_object(node._target_)
        if not isinstance(target, type):  # a factory function: its annotations are not read
            continue
        hints = _init_hints(target)
        for key, hint in hints.items():
            # interpolations are typed where they point; None is "not set", which each module checks
            if key not in node or OmegaConf.is_interpolation(node, key) or OmegaConf.is_config(node[key]):
                continue
            value = node[key]
            if value is not None and not _accepts(hint, value):
                raise ValueError(f"{group}.{key}={value!r}: {node._target_} takes {_name(hint)} for {key}")


def _name(hint: object) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
