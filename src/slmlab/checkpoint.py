"""Reading Lightning checkpoints: the model for inference or the next stage, the path to resume from.

Exporting to other formats is `slmlab.export`.
"""

import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from slmlab.models import CausalLM, ModelConfig

MODEL_PREFIX = "model."  # the LightningModule holds the network as `self.model`


def check_checkpoint_file(path: str | Path) -> Path:
    """Cheap check that a checkpoint exists and is a complete torch zip archive (its directory sits at
    the end of the file, so a truncated write fails here) without loading any tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({e})") from e
    return path


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with errors that name the file: missing, truncated/corrupt, or not from slmlab."""
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip/pickle errors say nothing about which file is bad
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})") from e
    if "model_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an slmlab checkpoint (no 'model_config' / 'state_dict')")
    return ckpt


def resolve_ckpt_path(ckpt_path: str | None, resume: bool, trainer) -> str | None:
    """What `trainer.fit` should resume from. `ckpt_path=last` must find a checkpoint (a typo'd run
    name must not silently start over); `resume=true` takes `last` when there is one."""
    last = None
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        candidate = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        last = str(candidate) if candidate.is_file() else None
    if ckpt_path == "last":
        if last is None:
            raise FileNotFoundError(f"ckpt_path=last, but there is no last.ckpt in {trainer.checkpoint_callback.dirpath}; "
                                    "pass the run_name of the run to resume")
        return last
    if ckpt_path is not None:
        check_checkpoint_file(ckpt_path)  # a clear error before any set-up
        return str(ckpt_path)
    return last if resume else None


def _model_state(ckpt: dict) -> dict:
    return {k.removeprefix(MODEL_PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def load_model(path: str | Path) -> CausalLM:
    """The network of a checkpoint, in float32 on the CPU, in eval mode."""
    ckpt = read_checkpoint(path)
    model = CausalLM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(_model_state(ckpt))
    return model.eval()


# fields that do not change what the weights mean: a later stage may set them differently
FREE_FIELDS = {"kernel", "max_seq_len", "init_std"}


def load_weights(model: CausalLM, path: str | Path) -> None:
    """Copies the weights of `path` into `model` (init_from): a Lightning checkpoint, or a folder
    exported by `slmlab.export` (ours or Hugging Face). Its model must be the configured one: any other
    difference (vocabulary, width, mixers...) is an error naming it."""
    if Path(path).is_dir():
        from slmlab.export import load_pretrained  # imported here: slmlab.export imports this module

        source = load_pretrained(path)
        theirs, state = asdict(source.cfg), source.state_dict()
    else:
        ckpt = read_checkpoint(path)
        theirs, state = ckpt["model_config"], _model_state(ckpt)
    ours = asdict(model.cfg)
    diff = [f"{key}: checkpoint {theirs.get(key)!r}, config {value!r}" for key, value in ours.items()
            if key not in FREE_FIELDS and theirs.get(key) != value]
    if diff:
        raise ValueError(f"init_from={path}: the checkpoint holds another architecture than model=... configures "
                         f"({'; '.join(diff)})")
    model.load_state_dict(state)
