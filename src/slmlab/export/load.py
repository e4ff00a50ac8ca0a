"""One loader for every form a model of ours can take, for inference or `init_from`."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from slmlab import checkpoint  # the module, not its names: checkpoint.py may import this one
from slmlab.export.hf import from_hf_state_dict, model_config_from_hf
from slmlab.export.native import CONFIG_FILE, WEIGHTS_FILE
from slmlab.models import CausalLM, ModelConfig

HF_INDEX_FILE = "model.safetensors.index.json"  # the weight map of a sharded Hugging Face model


def to_device(model: CausalLM, device: str) -> CausalLM:
    """`model` moved to the `device=` argument of a command; ValueError naming it where there is no such device."""
    try:
        return model.to(torch.device(device))
    except RuntimeError as e:  # "Invalid device string", "no CUDA GPUs are available", an ordinal out of range
        raise ValueError(f"device={device!r}: {e}") from None


def load_pretrained(path: str | Path) -> CausalLM:
    """A model in float32 on the CPU, in eval mode, from any of:
    - a Lightning checkpoint file (`.ckpt`) of an slmlab run;
    - a folder written by `python -m slmlab.export format=safetensors` (config.json is a ModelConfig);
    - a Hugging Face Qwen3 / Llama folder (config.json has a `model_type`), e.g. one written by
      `format=hf`, sharded or not.
    Kernels named in training are not kept: the model runs on what its device has (`PORTABLE_KERNELS`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file():
        return checkpoint.load_model(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: a folder without {CONFIG_FILE}: not an exported model")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    if "model_type" in config:
        cfg = model_config_from_hf(config)
        state = from_hf_state_dict(_read_weights(path), cfg)
    else:
        cfg = ModelConfig(**{**config, **checkpoint.PORTABLE_KERNELS})
        state = _read_weights(path)
    model = CausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied lm_head is the embedding: stored once, under either name
    tied = {"lm_head.weight", "embed.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - tied or len(missing) > 1:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (index := folder / HF_INDEX_FILE).is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        shards = [WEIGHTS_FILE]
    state = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard}: weights file not found")
        state |= load_file(str(folder / shard))
    return state
