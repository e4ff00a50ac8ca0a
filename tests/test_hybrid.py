"""Sparse attention, per-layer layouts, gated residuals and zero-centred norms."""

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from slmlab.mixers.sparse_attention import SparseAttention, sparse_block_mask, visible
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.layers import RMSNorm


def cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=96,
                sliding_window=8, global_tokens=3)
    return ModelConfig(**{**base, **overrides})


def test_sparse_attention_sees_the_window_and_the_global_tokens_only():
    torch.manual_seed(0)
    attn = SparseAttention(cfg(), 0).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    y = x.clone()
    y[:, 5] += 1.0  # position 5: outside the window of queries >= 13, not a global token
    z = x.clone()
    z[:, 1] += 1.0  # position 1: a global token, seen by every later query
    a, b, c = attn(x), attn(y), attn(z)
    torch.testing.assert_close(a[:, 13:], b[:, 13:], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:13], b[:, 5:13])
    assert (a[:, 13:] - c[:, 13:]).abs().amax(dim=-1).min() > 0


@pytest.mark.parametrize("offset,q_len", [(0, 70), (30, 40)], ids=["prefill", "continued prefill"])
def test_flex_attention_block_mask_equals_the_sdpa_reference(offset, q_len):
    """The block mask the CUDA path builds (compiled, block by block) against the boolean-mask reference."""
    torch.manual_seed(0)
    attn = SparseAttention(cfg(), 0).double()
    q = torch.randn(2, 4, q_len, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 4, offset + q_len, 8, dtype=torch.float64) for _ in range(2))
    mask = sparse_block_mask(8, 3, offset, q_len, offset + q_len, torch.device("cpu"))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask), attn.masked_attend(q, k, v, offset))


def test_sparse_attention_flops_count_only_visible_keys():
    attn = SparseAttention(cfg(sliding_window=4, global_tokens=2), 0)
    proj = 2 * sum(m.weight.numel() for m in (attn.q, attn.k, attn.v, attn.o))
    # visible keys for positions 0..7: 1,2,3,4, then 4 + min(2, pos-3) = 5,6,6,6 -> mean 4.125
    assert attn.flops_per_token(8) == pytest.approx(proj + 4 * 4 * 8 * 4.125)


def test_layouts_expand_letters_names_and_counts():
    c = cfg(n_layers=6, layout="M*2, gla, S ,attention*2")
    assert c.layer_mixers == ["mamba2", "mamba2", "gla", "sparse_attention", "attention", "attention"]
    with pytest.raises(ValueError, match="gives 5 layers but model.n_layers=6"):
        cfg(n_layers=6, layout="A*5")
    with pytest.raises(ValueError, match="cannot read 'A\\*x'"):
        cfg(layout="A*x")
    with pytest.raises(ValueError, match="unknown mixer 'lstm'"):
        CausalLM(cfg(layout="lstm,A"))


def test_checkpoints_of_the_same_computation_load_however_their_config_was_written():
    """init_from compares what shapes the weights and the computation: the mixer of each layer (not how
    `layout` spells it) and a mixer's own fields only where a model has that mixer. A Hugging Face
    export holds no `layout` or sparse-attention fields: its attention model was refused."""
    from dataclasses import asdict

    from slmlab.checkpoint import check_architecture

    exported = asdict(cfg())  # what a Hugging Face folder gives back: defaults beyond its config.json
    check_architecture(exported, cfg(layout="A*2", sliding_window=64, ssm_d_state=16, gla_decay_init=0.5), "hf")
    # which kernels run is free, and a checkpoint written before a kernel setting existed lacks it
    older = {k: v for k, v in asdict(cfg(layout="A*2")).items() if k not in ("attention_kernel", "mlp_kernel")}
    check_architecture(older, cfg(layout="A*2", attention_kernel="sdpa", mlp_kernel="quack", kernel="torch"), "ckpt")
    with pytest.raises(ValueError, match="layer mixers: checkpoint attention,gla, config gla,gla"):
        check_architecture(asdict(cfg(layout="A,G")), cfg(mixer="gla"), "ckpt")
    with pytest.raises(ValueError, match="sliding_window: checkpoint 8, config 16"):
        check_architecture(asdict(cfg(layout="S,A")), cfg(layout="S,A", sliding_window=16), "ckpt")


def test_a_typo_in_the_kernel_is_named_even_where_no_layer_dispatches():
    # an all-attention model never asks ops/backend.py, and on CUDA 'troch' ran slmlab's Triton kernels
    with pytest.raises(ValueError, match="model.kernel='troch' is not one of"):
        cfg(layout="A*2", kernel="troch")
    with pytest.raises(ValueError, match="model.attention_kernel='flash' is not one of"):
        cfg(layout="G*2", attention_kernel="flash")
    with pytest.raises(ValueError, match="model.mlp_kernel='quak' is not one of"):
        cfg(layout="A*2", mlp_kernel="quak")


def test_gated_residual_block_by_hand():
    torch.manual_seed(0)
    model = CausalLM(cfg(n_layers=1, residual="gated", norm="zc_rms")).double()
    block = model.blocks[0]
    with torch.no_grad():
        block.mixer_gate.fill_(1.5)
        block.mlp_gate.fill_(-0.5)
        block.mixer_norm.weight.normal_()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    h = x + torch.sigmoid(torch.tensor(1.5)) * block.mixer(block.mixer_norm(x))
    want = h + torch.sigmoid(torch.tensor(-0.5)) * block.mlp(block.mlp_norm(h))
    torch.testing.assert_close(block(x), want)
    assert sum(p.numel() for n, p in block.named_parameters() if "gate" in n and "mlp.gate" not in n) == 2


def test_zero_centred_norm_scales_by_one_plus_weight():
    zc, plain = RMSNorm(8, zero_centred=True).double(), RMSNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(zc(x), plain(x))  # both start as the identity scale
    with torch.no_grad():
        zc.weight.fill_(0.25)
        plain.weight.fill_(1.25)
    torch.testing.assert_close(zc(x), plain(x))


def test_rope_layers_even_rotates_only_even_attention_layers():
    model = CausalLM(cfg(n_layers=3, rope_layers="even"))
    assert [b.mixer.rotary is not None for b in model.blocks] == [True, False, True]
    assert all(b.mixer.rotary is None for b in CausalLM(cfg(rope_layers="none")).blocks)


MODELS = {
    "attention": dict(mixer="attention"),
    "sparse_attention": dict(mixer="sparse_attention"),
    "gla": dict(mixer="gla"),
    "hgrn2_rope_even": dict(mixer="hgrn2", hgrn2_expand_ratio=8, rope_layers="even", residual="gated", norm="zc_rms"),
    "mamba2": dict(mixer="mamba2", ssm_d_state=8, ssm_headdim=16),
    "hybrid": dict(n_layers=5, layout="M,G,H,S,A", hgrn2_expand_ratio=8, ssm_d_state=8, ssm_headdim=16, rope_layers="even"),
}


def full_model(name: str) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(cfg(n_kv_heads=4, **MODELS[name])).double().eval()
    with torch.no_grad():  # non-zero gates and norms, so every parameter shapes the output
        for n, p in model.named_parameters():
            if p.dim() < 2 and ("gate" in n or "norm" in n):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", MODELS)
def test_incremental_decoding_equals_the_full_forward(name):
    model = full_model(name)
    x = torch.randint(0, 61, (2, 37))  # longer than the sparse window (8)
    full = model(x)
    state = model.init_state(2, 37)
    steps = [model(x[:, :13], state)] + [model(x[:, t : t + 1], state) for t in range(13, 37)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_every_mixer_is_causal_in_a_full_model(name):
    model = full_model(name)
    x = torch.randint(0, 61, (2, 30))
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % 61
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=0, atol=0)
    assert not torch.allclose(a[:, 17:], b[:, 17:])


def test_hgrn2_rope_makes_the_even_layers_position_dependent():
    torch.manual_seed(0)
    rope = CausalLM(cfg(**MODELS["hgrn2_rope_even"])).double()
    plain = CausalLM(cfg(**{**MODELS["hgrn2_rope_even"], "rope_layers": "none"})).double()
    plain.load_state_dict(rope.state_dict())  # RoPE has no parameters: same weights, other function
    x = torch.randint(0, 61, (1, 12))
    assert torch.equal(rope(x)[:, 0], plain(x)[:, 0])  # position 0 is not rotated
    assert not torch.allclose(rope(x)[:, 1:], plain(x)[:, 1:])


def test_a_mixer_beside_a_layout_is_an_error_not_dropped():
    """`model=tiny_hybrid model.mixer=gla` once trained the layout's mixers without a word."""
    with pytest.raises(ValueError, match=r"model.mixer='gla' is not used where model.layout='M,G\*2,S'.*"
                                         r"model.layout=null"):
        cfg(n_layers=4, layout="M,G*2,S", mixer="gla")
    assert cfg(layout="G,S").layer_mixers == ["gla", "sparse_attention"]
