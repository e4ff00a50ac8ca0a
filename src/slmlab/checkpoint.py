"""Load the model out of a Lightning checkpoint (for inference or the next stage) and export it.

    python -m slmlab.checkpoint outputs/<run>/checkpoints/last.ckpt exported/   # safetensors + config.json
"""

import argparse
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_model

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
    """Copies the weights of checkpoint `path` into `model` (init_from). The checkpoint's model must
    be the configured one: any other difference (vocabulary, width, mixers...) is an error naming it."""
    ckpt = read_checkpoint(path)
    theirs, ours = ckpt["model_config"], asdict(model.cfg)
    diff = [f"{key}: checkpoint {theirs.get(key)!r}, config {value!r}" for key, value in ours.items()
            if key not in FREE_FIELDS and theirs.get(key) != value]
    if diff:
        raise ValueError(f"init_from={path}: the checkpoint holds another architecture than model=... configures "
                         f"({'; '.join(diff)})")
    model.load_state_dict(_model_state(ckpt))


def export_safetensors(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Writes `model.safetensors` (tied weights stored once) and `config.json` (the ModelConfig)."""
    model = load_model(ckpt_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Export the weights of an slmlab checkpoint to safetensors.")
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt)")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    args = parser.parse_args()
    print(export_safetensors(args.ckpt, args.out_dir))


if __name__ == "__main__":
    main()
