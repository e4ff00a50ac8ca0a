"""Hydra set-up shared by every entry point: OmegaConf resolvers and typed schemas for config groups.

The schemas make a wrong type in an override fail at composition with the key named
(`optim.lr=abc` -> "Value 'abc' of type 'str' could not be converted to Float, full_key: optim.lr").
Presets extend them through their defaults list (`defaults: [schema, _self_]`).
"""

import netrc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
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


def _auto_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def register_configs() -> None:
    """Idempotent; call before composing any config."""
    if not OmegaConf.has_resolver("corpus"):
        # `${corpus:name}`: a file of the embedded corpus, wherever slmlab is installed
        OmegaConf.register_new_resolver("corpus", lambda name: str(CORPUS_DIR / name))
        # `${auto_precision:}`: bf16 mixed precision where the GPU has it, float32 elsewhere
        OmegaConf.register_new_resolver("auto_precision", _auto_precision)
        OmegaConf.register_new_resolver("wandb_offline", _wandb_offline)
    cs = ConfigStore.instance()
    cs.store(group="model", name="schema", node=ModelSchema)
    cs.store(group="optim", name="schema", node=AdamWSchema)
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
