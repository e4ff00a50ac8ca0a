"""Dense models as one GGUF file for llama.cpp: architecture `qwen3` (QK-norm) or `llama`, F16 or Q8_0.

Follows llama.cpp's `convert_hf_to_gguf.py`, going through the Hugging Face names (`hf.py`) so
that gguf-py's own `TensorNameMap` names the tensors:
- RoPE layout: llama.cpp's `llama` graph rotates interleaved pairs (x[2j], x[2j+1]); ours (and HF's)
  rotates the halves (x[j], x[j + d/2]). As the converter does, the rows of each head of q and k are
  reordered from half-split to interleaved, which gives the same attention scores. The `qwen3`
  graph rotates halves (NEOX mode): no reordering.
- 1-D tensors (norms) stay float32; a matrix whose rows are not a multiple of the 32-value Q8_0
  block is written F16, as the converter falls back.
- A tied `lm_head` is not written: llama.cpp then uses `token_embd` as the output matrix.
- Vocabulary: GPT-2 style byte-level BPE (`gpt2` model, `gpt-2` pre-tokenizer regex, which is
  the one `pre_tokenizers.ByteLevel` applies). llama.cpp does not run our NFKC normaliser:
  text that NFKC would change tokenizes differently there.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

from slmlab.export.hf import hf_model_type, hf_name, require_dense
from slmlab.export.tokenizer import IM_END, TokenizerFiles
from slmlab.models import CausalLM, ModelConfig

GGUF_TYPES = {
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
_ARCHS = {"qwen3": gguf.MODEL_ARCH.QWEN3, "llama": gguf.MODEL_ARCH.LLAMA}


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the output rows of each head of a q/k projection from (x_0..x_{d/2-1}, y_0..y_{d/2-1})
    to (x_0, y_0, x_1, y_1, ...), the pairing of llama.cpp's `llama` RoPE (the converter's `permute`)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 weight, in llama.cpp's layout."""
    cfg, model_type = model.cfg, hf_model_type(model.cfg)
    names = gguf.get_tensor_name_map(_ARCHS[model_type], cfg.n_layers)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.float()
        if model_type == "llama" and name.endswith(("mixer.q.weight", "mixer.k.weight")):
            tensor = half_split_to_interleaved(tensor, cfg.n_heads if ".q." in name else cfg.n_kv_heads)
        out[names.get_name(hf_name(name), try_suffixes=(".weight",))] = tensor
    return out


def _encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    array = tensor.numpy()
    if array.ndim == 1:
        return array, GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and not gguf.quants.Q8_0.can_quantize(array):
        qtype = GGMLQuantizationType.F16
    return gguf.quants.quantize(array, qtype), qtype


def _add_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, file_type: LlamaFileType) -> None:
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer: gguf.GGUFWriter, tokens: TokenizerFiles, vocab_size: int) -> None:
    """Token list padded to the embedding's rows (llama.cpp requires one token per row)."""
    by_id = {i: token for token, i in tokens.tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokens.tokenizer.get_added_tokens_decoder()
    names, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            names.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            names.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = json.loads(tokens.path.read_text(encoding="utf-8"))["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(names)
    writer.add_token_types(types)
    # tokenizers writes merges as "a b" (older files) or ["a", "b"] (newer): GGUF wants "a b"
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    ids = tokens.model_token_ids()
    # a tokenizer not trained here may lack <|endoftext|> or <|pad|>: those keys are left out, not written as None
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if ids[key] is not None:
            add(ids[key])
    if (im_end := tokens.token_id(IM_END)) is not None:
        writer.add_eot_token_id(im_end)  # llama.cpp ends a chat turn there
    writer.add_add_bos_token(False)
    if tokens.chat_template:
        writer.add_chat_template(tokens.chat_template)


def export_gguf(model: CausalLM, tokens: TokenizerFiles, path: str | Path, gguf_type: str = "F16") -> Path:
    """Writes `path` (a .gguf file)."""
    require_dense(model.cfg, "GGUF")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not one of {sorted(GGUF_TYPES)}")
    tokens.check_fits(model.cfg.vocab_size)
    qtype, file_type = GGUF_TYPES[gguf_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[_ARCHS[hf_model_type(model.cfg)]])
    writer.add_name(path.stem)
    _add_hparams(writer, model.cfg, file_type)
    _add_vocab(writer, tokens, model.cfg.vocab_size)
    for name, tensor in gguf_tensors(model).items():
        data, data_type = _encode(tensor, qtype)
        writer.add_tensor(name, data, raw_dtype=data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
