"""A LoRA run's adapters as a PEFT adapter folder, over its base model as a Hugging Face folder.

    python -m slmlab.export ckpt=<checkpoint of a stage.lora_rank run> format=peft tokenizer=... out=DIR

writes DIR/adapter_config.json and DIR/adapter_model.safetensors (PEFT's LoRA format: `lora_A` and
`lora_B` of each adapted projection, DoRA's row magnitudes as `lora_magnitude_vector`) and DIR/base/,
the checkpoint's frozen base weights as `format=hf` writes a model. Then
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR / "base"), DIR)` computes what the
merged model computes, and the adapters can be shared, swapped or merged without the whole model.
Dense models only, as `format=hf`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from slmlab.checkpoint import adapted_state, read_checkpoint
from slmlab.export.hf import export_hf, hf_name, require_dense
from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.lora import ADAPTER, ORIGINAL, base_state

PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model as `base_model.model`


def export_peft(ckpt_path: str | Path, tokens: TokenizerFiles, out_dir: str | Path,
                dtype: torch.dtype = torch.float32) -> Path:
    """Writes the adapter folder and its base model (module docstring); ValueError for a checkpoint
    without adapters, UnsupportedModelError for a model Hugging Face has no architecture for."""
    ckpt = read_checkpoint(ckpt_path)
    cfg = ModelConfig(**ckpt["model_config"])
    require_dense(cfg, "a PEFT adapter of a Hugging Face model")
    state = adapted_state(ckpt)
    layers = sorted(key.removesuffix(ORIGINAL) for key in state if key.endswith(ORIGINAL))
    if not layers:
        raise ValueError(f"{ckpt_path} holds no LoRA adapters (its run had stage.lora_rank=0): "
                         "format=hf exports the whole model")
    adapters, ranks, scales, modules = {}, set(), set(), set()
    for layer in layers:
        module = PEFT_PREFIX + hf_name(layer + ".weight").removesuffix(".weight")
        a, b, scale = (state[layer + ADAPTER + name] for name in ("lora_A", "lora_B", "scale"))
        adapters[module + ".lora_A.weight"], adapters[module + ".lora_B.weight"] = a, b
        if (magnitude := state.get(layer + ADAPTER + "magnitude")) is not None:
            adapters[module + ".lora_magnitude_vector"] = magnitude
        ranks.add(a.shape[0])
        scales.add(float(scale))
        modules.add(module.rsplit(".", 1)[-1])
    if len(ranks) > 1 or len(scales) > 1:  # `add_lora` gives every layer one rank and alpha
        raise ValueError(f"{ckpt_path}: adapters of ranks {sorted(ranks)} and scales {sorted(scales)}; "
                         "a PEFT config holds one of each")
    rank, scale = ranks.pop(), scales.pop()
    base = CausalLM(cfg)
    base.load_state_dict(base_state(state))
    out = Path(out_dir)
    export_hf(base.to(dtype), tokens, out / "base")
    save_file({k: v.to(dtype).contiguous() for k, v in adapters.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str((out / "base").resolve()),
              "r": rank, "lora_alpha": scale * rank, "target_modules": sorted(modules),
              "use_dora": any(k.endswith("lora_magnitude_vector") for k in adapters), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
