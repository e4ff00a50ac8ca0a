"""Export to safetensors / Hugging Face / GGUF and back: same logits, same greedy text, same tensors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slmlab.export import UnsupportedModelError, export_hf, export_safetensors_folder, load_pretrained
from slmlab.export.__main__ import main as export_main
from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.generate import generate
from slmlab.models.layers import Rotary

pytest_plugins = ["tests.model_fixtures"]  # `tiny_runs`, trained once for both test modules

QK_NORM = pytest.mark.parametrize("qk_norm", [True, False], ids=["qwen3", "llama"])
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def export(run, tmp_path, fmt: str, *extra: str, tokenizer: Path | None = None) -> Path:
    export_main([f"ckpt={run.ckpt}", f"format={fmt}", f"tokenizer={tokenizer or run.tokenizer}",
                 f"out={tmp_path / fmt}", *extra])
    return tmp_path / fmt


def chat_tokenizer(run, tmp_path) -> Path:
    """The run's tokenizer.json beside a tokenizer_config.json with a chat template, as SFT writes one."""
    folder = tmp_path / "chat_tokenizer"
    folder.mkdir()
    shutil.copyfile(run.tokenizer, folder / "tokenizer.json")
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@QK_NORM
def test_hf_export_gives_our_logits_and_greedy_text(tiny_runs, tmp_path, qk_norm):
    transformers = pytest.importorskip("transformers")
    run = tiny_runs[qk_norm]
    ours = load_pretrained(run.ckpt)
    folder = export(run, tmp_path, "hf", tokenizer=chat_tokenizer(run, tmp_path))
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    cfg, c = ours.cfg, hf.config
    assert (c.head_dim, c.num_key_value_heads, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == \
        (cfg.head_dim, cfg.n_kv_heads, cfg.norm_eps, cfg.max_seq_len, cfg.tie_embeddings)
    assert c.rope_parameters["rope_theta"] == cfg.rope_theta and c.attention_bias is False

    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)
    hf.generation_config.eos_token_id = None  # run the full length, as ours does without eos_id
    hf_text = hf.generate(tokens[:, :6], max_new_tokens=20, do_sample=False)
    assert torch.equal(hf_text, generate(ours, tokens[:, :6], 20, temperature=0))

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Das Debian-Paketsystem: apt install <|im_end|>"
    assert tokenizer(text)["input_ids"] == TokenizerFiles.load(run.tokenizer).tokenizer.encode(text).ids
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")  # the config's eos wins
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hallo"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHallo<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [3, 0]


def test_hf_tokenizer_defaults_without_a_tokenizer_config(tiny_runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tiny_runs[False]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copyfile(run.tokenizer, folder / "tokenizer.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export(run, tmp_path, "hf", tokenizer=folder))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (None, "<|endoftext|>", "<|pad|>")
    assert tokenizer.model_max_length == 32 and tokenizer.chat_template is None


def test_hf_export_in_bfloat16_stores_rounded_weights(tiny_runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tiny_runs[True]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export(run, tmp_path, "hf", "dtype=bfloat16"))
    assert hf.dtype == torch.bfloat16
    ours = load_pretrained(run.ckpt)
    torch.testing.assert_close(hf.model.layers[1].self_attn.k_norm.weight,
                               ours.blocks[1].mixer.k_norm.weight.bfloat16(), rtol=0, atol=0)


@QK_NORM
def test_load_pretrained_reads_hf_and_safetensors_folders_back(tiny_runs, tmp_path, qk_norm):
    run = tiny_runs[qk_norm]
    ours = load_pretrained(run.ckpt)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expected = ours(tokens)
        for fmt in ("hf", "safetensors"):
            back = load_pretrained(export(run, tmp_path, fmt))
            assert back.cfg == ours.cfg, fmt
            torch.testing.assert_close(back(tokens), expected, rtol=0, atol=0, msg=fmt)
    assert (tmp_path / "safetensors" / "tokenizer.json").read_bytes() == run.tokenizer.read_bytes()


@QK_NORM
def test_an_hf_folder_gives_back_every_config_value_it_was_written_with(tiny_runs, tmp_path, qk_norm):
    """config.json records the initialisation's std as `initializer_range`; it came back as the default."""
    tokens = TokenizerFiles.load(tiny_runs[qk_norm].tokenizer)
    cfg = ModelConfig(vocab_size=tokens.tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=12, ffn_hidden=48, max_seq_len=40, rope_theta=5e5, qk_norm=qk_norm, norm_eps=1e-5,
                      tie_embeddings=False, init_std=0.05)
    model = CausalLM(cfg).eval()
    back = load_pretrained(export_hf(model, tokens, tmp_path / "hf"))
    assert back.cfg == cfg
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_load_pretrained_reads_a_sharded_folder_saved_by_transformers(tiny_runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tiny_runs[False]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export(run, tmp_path, "hf"))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")  # transformers' own config.json and shards
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, back = load_pretrained(run.ckpt), load_pretrained(tmp_path / "sharded")
    assert back.cfg == ours.cfg
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours(tokens), rtol=0, atol=0)


def test_the_weights_file_of_an_exported_folder_is_not_called_a_corrupt_checkpoint(tmp_path):
    """chat.py ckpt=exported/model.safetensors: once "checkpoint ... is truncated or corrupt (BadZipFile)"."""
    model = CausalLM(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32))
    folder = export_safetensors_folder(model, tmp_path / "native")
    with pytest.raises(ValueError, match=r"model.safetensors holds an exported model's weights alone; pass the folder"):
        load_pretrained(folder / "model.safetensors")


def test_an_hf_folder_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "vocab_size": 8}))
    with pytest.raises(UnsupportedModelError, match="model_type='gemma3'"):
        load_pretrained(tmp_path)


def test_features_without_an_hf_equivalent_are_named(tmp_path, tiny_runs):
    hybrid = CausalLM(ModelConfig(vocab_size=512, d_model=32, n_layers=3, n_heads=2, ffn_hidden=64, layout="A,G,M",
                                  ssm_d_state=8, ssm_headdim=16))
    tokens = TokenizerFiles.load(tiny_runs[True].tokenizer)
    with pytest.raises(UnsupportedModelError, match=r"mixers \['gla', 'mamba2'\].*format=safetensors"):
        export_hf(hybrid, tokens, tmp_path / "hf")
    dense = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64)
    for feature, message in (({"residual": "gated"}, "residual='gated'"), ({"norm": "zc_rms"}, "norm='zc_rms'"),
                             ({"rope_layers": "even"}, "rope_layers='even'"),
                             ({"logit_softcap": 30.0}, "logit_softcap")):
        with pytest.raises(UnsupportedModelError, match=message):
            export_hf(CausalLM(ModelConfig(**dense, **feature)), tokens, tmp_path / "hf")
    # the native format holds any model
    back = load_pretrained(export_safetensors_folder(hybrid, tmp_path / "native"))
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(back(x), hybrid.eval()(x), rtol=0, atol=0)


def test_a_checkpoint_written_before_a_config_field_existed_initialises_the_same_model(tiny_runs, tmp_path):
    """Its model_config lacks the field: the model is the one with that field's default, as load_model
    builds it, not "another architecture" (residual: checkpoint None, config 'plain')."""
    from slmlab.checkpoint import load_model, load_weights, read_checkpoint

    ckpt = read_checkpoint(tiny_runs[True].ckpt)
    for key in ("residual", "rope_layers"):
        del ckpt["model_config"][key]
    torch.save(ckpt, tmp_path / "older.ckpt")
    older = load_model(tmp_path / "older.ckpt")
    model = CausalLM(older.cfg)
    load_weights(model, tmp_path / "older.ckpt")
    tokens = torch.randint(0, older.cfg.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), older(tokens), rtol=0, atol=0)


def test_a_model_trained_on_named_kernels_loads_and_runs_on_the_cpu(tiny_runs, tmp_path):
    """model.kernel=fla / attention_kernel=flash_attn ask for GPU kernels by name; the checkpoint and its
    exported folder still evaluate on the CPU, with the same logits."""
    from slmlab.checkpoint import load_model, read_checkpoint

    ckpt = read_checkpoint(tiny_runs[True].ckpt)
    ckpt["model_config"].update(kernel="fla", attention_kernel="flash_attn")
    torch.save(ckpt, tmp_path / "gpu.ckpt")
    model = load_model(tmp_path / "gpu.ckpt")
    folder = export_safetensors_folder(model, tmp_path / "native")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "kernel": "fla", "attention_kernel": "flash_attn"}))
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 8))
    want = load_model(tiny_runs[True].ckpt)(tokens)
    with torch.no_grad():
        for loaded in (model, load_pretrained(folder)):
            torch.testing.assert_close(loaded(tokens), want, rtol=0, atol=0)


def test_export_cli_names_what_is_wrong(tiny_runs, tmp_path):
    with pytest.raises(SystemExit, match="model not found: .*nope.ckpt"):
        export_main([f"ckpt={tmp_path / 'nope.ckpt'}", "format=safetensors", f"out={tmp_path}"])
    with pytest.raises(SystemExit, match="format=hf needs tokenizer="):
        export_main([f"ckpt={tiny_runs[True].ckpt}", "format=hf", f"out={tmp_path}"])
    with pytest.raises(SystemExit, match="format='onnx'"):
        export_main([f"ckpt={tiny_runs[True].ckpt}", "format=onnx", f"out={tmp_path}"])


def lora_checkpoint(run, tmp_path, dora: bool, targets: list[str] | None = None) -> tuple[Path, CausalLM]:
    """A checkpoint of the run's model with trained-looking LoRA (or DoRA) adapters, as a `stage.lora_rank`
    run saves one, and the merged model it stands for."""
    from slmlab.checkpoint import read_checkpoint
    from slmlab.models.lora import add_lora, merge_lora

    ckpt = read_checkpoint(run.ckpt)
    model = load_pretrained(run.ckpt)
    add_lora(model, rank=4, alpha=12.0, targets=targets, dora=dora)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:  # B starts at zero and the magnitudes at the row norms: move both
            p.data += 0.05 * torch.randn_like(p) if "lora_B" in name or "magnitude" in name else 0
    ckpt["state_dict"] = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save(ckpt, tmp_path / "lora.ckpt")
    return tmp_path / "lora.ckpt", merge_lora(model).eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_export_loads_over_its_base_and_gives_the_merged_models_logits(tiny_runs, tmp_path, dora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = tiny_runs[True]
    ckpt, merged = lora_checkpoint(run, tmp_path, dora, targets=None if dora else ["q", "v", "down"])
    export_main([f"ckpt={ckpt}", "format=peft", f"tokenizer={run.tokenizer}", f"out={tmp_path / 'peft'}"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 12.0, dora)
    if not dora:
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    tokens = torch.randint(0, merged.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        logits = adapted(tokens).logits
        torch.testing.assert_close(logits, merged(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base_logits, logits, atol=1e-3)  # the adapters change the model


def test_peft_export_needs_adapters(tiny_runs, tmp_path):
    with pytest.raises(SystemExit, match="holds no LoRA adapters .*stage.lora_rank=0"):
        export_main([f"ckpt={tiny_runs[True].ckpt}", "format=peft", f"tokenizer={tiny_runs[True].tokenizer}",
                     f"out={tmp_path}"])
    with pytest.raises(SystemExit, match="format=peft reads the Lightning checkpoint"):
        export_main([f"ckpt={tmp_path}", "format=peft", f"tokenizer={tiny_runs[True].tokenizer}", f"out={tmp_path}"])


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's `llama` (NORM) RoPE: rotates pairs (x[2j], x[2j+1]) by position * theta^(-2j/d)."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[-2])[:, None] * theta ** (-torch.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)


def test_gguf_vocab_of_a_tokenizer_without_our_special_tokens_leaves_their_ids_out(tmp_path):
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from slmlab.export.gguf import _add_vocab
    from slmlab.export.tokenizer import TokenizerFiles

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["apt install dpkg"] * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    _add_vocab(writer, TokenizerFiles.load(tmp_path), vocab_size=300)
    assert not {key for key in writer.kv_data[0] if key.endswith(("bos_token_id", "eos_token_id", "padding_token_id"))}
    assert len(writer.kv_data[0]["tokenizer.ggml.tokens"].value) == 300


def test_llama_gguf_permutation_turns_our_rope_into_llama_cpps():
    gguf_export = pytest.importorskip("slmlab.export.gguf")
    heads, head_dim, d_model, seq = 3, 8, 16, 5
    w, x = torch.randn(heads * head_dim, d_model), torch.randn(seq, d_model)
    per_head = lambda y: y.view(seq, heads, head_dim).transpose(0, 1)  # noqa: E731
    ours = Rotary(head_dim, 10_000.0, max_len=seq)((x @ w.T).view(1, seq, heads, head_dim))[0]  # (seq, heads, dim)
    theirs = interleaved_rope(per_head(x @ gguf_export.half_split_to_interleaved(w, heads).T), 10_000.0)
    # llama.cpp's rotated q (or k) is ours with each head's coordinates reordered alike, so q.k is unchanged
    order = gguf_export.half_split_to_interleaved(torch.arange(heads * head_dim), heads)
    torch.testing.assert_close(theirs, per_head(ours.reshape(seq, -1)[:, order]))


@QK_NORM
@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0"])
def test_gguf_tensors_and_metadata_read_back(tiny_runs, tmp_path, qk_norm, gguf_type):
    gguf = pytest.importorskip("gguf")
    from slmlab.export.gguf import half_split_to_interleaved

    run = tiny_runs[qk_norm]
    ours = load_pretrained(run.ckpt)
    cfg = ours.cfg
    folder = export(run, tmp_path, "gguf", f"gguf_type={gguf_type}", tokenizer=chat_tokenizer(run, tmp_path))
    reader = gguf.GGUFReader(folder / f"model-{gguf_type}.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    arch = "qwen3" if qk_norm else "llama"
    assert field("general.architecture") == arch
    hparams = ("attention.head_count", "attention.head_count_kv", "block_count", "embedding_length",
               "feed_forward_length", "context_length", "attention.key_length", "vocab_size")
    assert [field(f"{arch}.{key}") for key in hparams] == [cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.d_model,
                                                           cfg.ffn_hidden, cfg.max_seq_len, cfg.head_dim, cfg.vocab_size]
    assert field(f"{arch}.rope.freq_base") == cfg.rope_theta
    assert field(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps, rel=1e-6)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    vocab = field("tokenizer.ggml.tokens")
    assert len(vocab) == cfg.vocab_size and vocab[:4] == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id"),
            field("tokenizer.ggml.padding_token_id")) == (0, 3, 1)
    assert field("tokenizer.chat_template") == CHATML
    assert field("tokenizer.ggml.merges")[0] == " ".join(json.loads(run.tokenizer.read_text())["model"]["merges"][0])

    state = ours.state_dict()
    expected = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layers):
        q, k = state[f"blocks.{i}.mixer.q.weight"], state[f"blocks.{i}.mixer.k.weight"]
        if not qk_norm:  # llama.cpp's llama rotates interleaved pairs
            q, k = half_split_to_interleaved(q, cfg.n_heads), half_split_to_interleaved(k, cfg.n_kv_heads)
        expected |= {f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k,
                     f"blk.{i}.attn_v.weight": state[f"blocks.{i}.mixer.v.weight"],
                     f"blk.{i}.attn_output.weight": state[f"blocks.{i}.mixer.o.weight"],
                     f"blk.{i}.attn_norm.weight": state[f"blocks.{i}.mixer_norm.weight"],
                     f"blk.{i}.ffn_norm.weight": state[f"blocks.{i}.mlp_norm.weight"],
                     f"blk.{i}.ffn_gate.weight": state[f"blocks.{i}.mlp.gate.weight"],
                     f"blk.{i}.ffn_up.weight": state[f"blocks.{i}.mlp.up.weight"],
                     f"blk.{i}.ffn_down.weight": state[f"blocks.{i}.mlp.down.weight"]}
        if qk_norm:
            expected |= {f"blk.{i}.attn_q_norm.weight": state[f"blocks.{i}.mixer.q_norm.weight"],
                         f"blk.{i}.attn_k_norm.weight": state[f"blocks.{i}.mixer.k_norm.weight"]}
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == expected.keys()  # tied: no output.weight
    for name, want in expected.items():
        t, want = tensors[name], want.numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
        elif gguf_type == "F16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and np.array_equal(got, want.astype(np.float16)), name
        else:  # Q8_0: 32 values share a step max|w| / 127: half a step of rounding, plus the step's float16 error
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(-1, 32) <= (0.5 + 127 * 2**-11) * step).all(), name
