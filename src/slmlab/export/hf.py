"""Our dense models as Hugging Face `Qwen3ForCausalLM` / `LlamaForCausalLM` folders, and back.

A dense slmlab model (attention in every layer, plain residuals, RMSNorm, RoPE everywhere, no
logit soft-cap) is exactly a Llama; with QK-norm (one RMSNorm over head_dim shared by the heads)
it is exactly a Qwen3. Both use the same half-split `rotate_half` RoPE as ours, so the weights
map one to one by name with no permutation. The folder is written without importing
transformers: `config.json` is plain JSON.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models import CausalLM, ModelConfig

# our parameter path (without `.weight`) -> the Hugging Face one; `{i}` is the layer index
_LAYER_NAMES = {
    "mixer_norm": "input_layernorm",
    "mixer.q": "self_attn.q_proj",
    "mixer.k": "self_attn.k_proj",
    "mixer.v": "self_attn.v_proj",
    "mixer.o": "self_attn.o_proj",
    "mixer.q_norm": "self_attn.q_norm",
    "mixer.k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_TOP_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_OURS_TO_HF = {**_TOP_NAMES, **{f"blocks.{{i}}.{k}": f"model.layers.{{i}}.{v}" for k, v in _LAYER_NAMES.items()}}

HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


class UnsupportedModelError(ValueError):
    """The model uses a feature the target format cannot express."""


def dense_incompatibilities(cfg: ModelConfig) -> list[str]:
    """The features of `cfg` that a Llama / Qwen3 (in transformers or llama.cpp) does not have."""
    problems = []
    if others := sorted(set(cfg.layer_mixers) - {"attention"}):
        problems.append(f"mixers {others} (layout {cfg.layout or cfg.mixer!r}; only attention in every layer maps)")
    if cfg.residual != "plain":
        problems.append(f"residual={cfg.residual!r} (sigmoid-gated residual branches)")
    if cfg.norm != "rms":
        problems.append(f"norm={cfg.norm!r} (zero-centred RMSNorm)")
    if cfg.rope_layers != "all":
        problems.append(f"rope_layers={cfg.rope_layers!r} (RoPE on only some layers)")
    if cfg.logit_softcap:
        problems.append(f"logit_softcap={cfg.logit_softcap} (tanh soft-capped logits)")
    return problems


def require_dense(cfg: ModelConfig, target: str) -> None:
    if problems := dense_incompatibilities(cfg):
        raise UnsupportedModelError(f"cannot export to {target}: {'; '.join(problems)} has no equivalent there. "
                                    "format=safetensors exports any slmlab model.")


def hf_model_type(cfg: ModelConfig) -> str:
    return "qwen3" if cfg.qk_norm else "llama"


def hf_name(ours: str) -> str:
    """`blocks.3.mixer.q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    return _rename(ours, _OURS_TO_HF)


def slmlab_name(hf: str) -> str:
    """The inverse of `hf_name`."""
    return _rename(hf, {v: k for k, v in _OURS_TO_HF.items()})


def _rename(name: str, table: dict[str, str]) -> str:
    path, leaf = name.rsplit(".", 1)
    layer = re.search(r"\.(\d+)\.", path)
    key = re.sub(r"\.\d+\.", ".{i}.", path, count=1)
    if key not in table:
        raise UnsupportedModelError(f"parameter {name!r} has no counterpart")
    return f"{table[key].format(i=layer[1] if layer else '')}.{leaf}"


def hf_config(cfg: ModelConfig, tokens: TokenizerFiles | None, dtype: torch.dtype) -> dict:
    """config.json of the equivalent `Qwen3ForCausalLM` / `LlamaForCausalLM` (without special-token
    ids when there is no tokenizer).

    RoPE theta is written both as `rope_theta` (transformers 4) and `rope_parameters` (5).
    """
    model_type = hf_model_type(cfg)
    config = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **(tokens.model_token_ids() if tokens is not None else {}),
    }
    if model_type == "llama":
        config |= {"mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers,
                   "layer_types": ["full_attention"] * cfg.n_layers}
    return config


def hf_twin(cfg: ModelConfig) -> torch.nn.Module:
    """Hugging Face's model of this configuration, freshly initialised, with SDPA attention: the
    baseline the benchmarks compare against."""
    from transformers import AutoConfig, AutoModelForCausalLM  # optional: pip install -e ".[export]"

    config = AutoConfig.for_model(**hf_config(cfg, None, torch.float32))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names; a tied `lm_head` is left out (transformers re-ties it)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    return {hf_name(name): tensor.contiguous() for name, tensor in state.items()}


def export_hf(model: CausalLM, tokens: TokenizerFiles, out_dir: str | Path) -> Path:
    """Writes a folder `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load
    with no custom code: config.json, model.safetensors (in the model's dtype), generation_config.json
    and the tokenizer."""
    require_dense(model.cfg, "Hugging Face transformers")
    tokens.check_fits(model.cfg.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(model.cfg, tokens, model.embed.weight.dtype))
    _write_json(out / "generation_config.json", tokens.generation_config())
    tokens.write_hf(out, model_max_length=model.cfg.max_seq_len)
    return out


def model_config_from_hf(config: dict) -> ModelConfig:
    """The ModelConfig of a Llama / Qwen3 config.json; an error names what has no slmlab equivalent."""
    model_type = config.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise UnsupportedModelError(f"model_type={model_type!r}: only {sorted(HF_ARCHITECTURES)} folders load")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = [f"{key}={config[key]!r}" for key in ("attention_bias", "mlp_bias", "use_sliding_window")
                if config.get(key)]
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r}")
    if problems:
        raise UnsupportedModelError(f"{model_type} config with {', '.join(problems)}: slmlab has no equivalent")
    n_heads = config["num_attention_heads"]
    return ModelConfig(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
        qk_norm=model_type == "qwen3",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02),
    )


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face weights under our names, float32; `lm_head` is dropped when tied (some tied
    checkpoints store a copy of the embedding)."""
    ours = {slmlab_name(name): tensor.float() for name, tensor in state.items()
            if not name.endswith("rotary_emb.inv_freq")}  # a buffer older transformers saved
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    return ours


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
