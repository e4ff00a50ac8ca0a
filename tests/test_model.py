import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slmlab.models import CausalLM, ModelConfig
from slmlab.models.layers import Rotary, SwiGLU, fused_linear
from slmlab.models.transformer import Block


def tiny(**overrides) -> ModelConfig:
    cfg = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64, qk_norm=True)
    return ModelConfig(**{**cfg, **overrides})


@pytest.fixture
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny()).double().eval()


def test_changing_a_future_token_never_changes_past_logits(model):
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def naive_attention_layer(attn, x: torch.Tensor) -> torch.Tensor:
    """Reference: every q head with its kv head repeated, RoPE by explicit 2x2 rotations, masked softmax."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q(x).view(B, T, H, D)
    k = attn.k(x).view(B, T, Hkv, D)
    v = attn.v(x).view(B, T, Hkv, D)
    q, k = attn.q_norm(q), attn.k_norm(k)
    theta = attn.rotary.inv_freq.double()

    def rotate(t):  # pair (i, i + D/2) rotated by angle pos * theta_i
        out = t.clone()
        for pos in range(T):
            c, s = torch.cos(pos * theta), torch.sin(pos * theta)
            a, b = t[:, pos, :, : D // 2], t[:, pos, :, D // 2 :]
            out[:, pos, :, : D // 2] = a * c - b * s
            out[:, pos, :, D // 2 :] = b * c + a * s
        return out

    q, k = rotate(q), rotate(k)
    group = H // Hkv
    out = torch.empty(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, h // group]
    return attn.o(out.reshape(B, T, H * D))


def test_attention_matches_naive_gqa_rope_reference(model):
    attn = model.blocks[0].mixer
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_attention_layer(attn, x))


def test_attention_hands_flash_attention_the_projections_layout_and_reads_its_output(model, monkeypatch):
    """On a Hopper GPU with flash-attn-4 the mixer calls `ops.flash_attention.flash_attn_causal` on q, k, v
    as (batch, seq, heads, head_dim). Here a stand-in in that layout (SDPA) takes the kernel's place;
    decoding keeps SDPA over the cache."""
    from slmlab.mixers import attention as attention_module

    calls = []

    def stand_in(q, k, v):
        calls.append((q.shape, k.shape))
        out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2).double() for t in (q, k, v)), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).to(q.dtype), None

    monkeypatch.setattr(attention_module, "flash_attention_usable", lambda kernel, device: kernel != "sdpa")
    monkeypatch.setattr(attention_module, "custom_op_usable", lambda op: True)
    monkeypatch.setattr(attention_module, "flash_attn_causal", stand_in)
    attn = model.blocks[0].mixer
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    want = naive_attention_layer(attn, x)
    attn.to(torch.bfloat16)  # the kernels take bf16 and fp16
    got = attn(x.bfloat16())
    assert calls == [((2, 11, 4, 16), (2, 11, 2, 16))]
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    state = attn.init_state(2, 11, x.device, torch.bfloat16)
    attn(x[:, :5].bfloat16(), state)
    assert len(calls) == 1
    attn.attention_kernel = "sdpa"
    attn(x.bfloat16())
    assert len(calls) == 1


@pytest.mark.parametrize("hidden", [64, 37])
def test_swiglu_fused_and_padded_matmuls_compute_the_plain_formula(hidden):
    torch.manual_seed(0)
    mlp = SwiGLU(16, hidden).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    plain = mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    fused = mlp(x)
    torch.testing.assert_close(fused, plain)
    grads = torch.autograd.grad(fused.square().sum(), [x, *mlp.parameters()])
    plain_grads = torch.autograd.grad(plain.square().sum(), [x, *mlp.parameters()])
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p)
    assert [p.shape for p in mlp.parameters()] == [(hidden, 16), (hidden, 16), (16, hidden)]


def test_swiglu_hands_quack_the_padded_gate_up_and_down_weights_in_training_only(monkeypatch):
    """mlp_kernel=quack: training forwards call quack's fused MLP (a stand-in here) with [gate; up] and down,
    padded as cuBLAS gets them; float32 matmuls, decoding and mlp_kernel=torch keep the matmuls."""
    import sys
    import types

    from slmlab.models import layers

    calls = []

    def stand_in(x, gate_up, down, activation, concat_layout):
        calls.append((gate_up.shape, down.shape, activation, concat_layout))
        gate, up = gate_up.double().chunk(2)
        return F.linear(F.silu(F.linear(x.double(), gate)) * F.linear(x.double(), up), down.double()).to(x.dtype)

    monkeypatch.setitem(sys.modules, "quack.mlp", types.SimpleNamespace(mlp_func=stand_in))
    monkeypatch.setattr(layers, "fused_mlp_usable", lambda kernel, device: kernel == "quack")
    torch.manual_seed(0)
    mlp = SwiGLU(16, 37, kernel="quack").bfloat16()
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    gate, up, down = (w.double() for w in (mlp.gate.weight, mlp.up.weight, mlp.down.weight))
    plain = F.linear(F.silu(F.linear(x.double(), gate)) * F.linear(x.double(), up), down)
    got = mlp(x)
    assert calls == [((128, 16), (16, 64), "swiglu", True)]  # 37 padded to 64, gate rows then up rows
    torch.testing.assert_close(got.double(), plain, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        mlp(x)
    mlp.float()(x.float())  # float32 without autocast: the quack GEMMs take bf16 and fp16
    mlp.kernel = "torch"
    mlp.bfloat16()(x)
    assert len(calls) == 1
    # the blocks take the setting; kernel=torch (every op's PyTorch path) overrides it
    assert CausalLM(tiny(mlp_kernel="quack")).blocks[0].mlp.kernel == "quack"
    assert CausalLM(tiny(mlp_kernel="quack", kernel="torch")).blocks[0].mlp.kernel == "torch"


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_without_autograd_the_fused_projections_copy_no_weights():
    """Decoding runs without autograd: concatenating or padding the weights there would copy all of them
    at every generated token. The results are those of the fused path."""
    torch.manual_seed(0)
    mlp, q, k = SwiGLU(16, 37).double(), nn.Linear(16, 8, bias=False).double(), nn.Linear(16, 4, bias=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    fused = (mlp(x), *fused_linear(x, q, k))
    with torch.no_grad(), RecordOps() as ops:
        separate = (mlp(x), *fused_linear(x, q, k))
    for a, b in zip(separate, fused, strict=True):
        torch.testing.assert_close(a, b)
    assert "mm" in ops.names, ops.names  # the mode saw the matmuls
    assert not {"cat", "constant_pad_nd", "pad"} & ops.names, ops.names


def test_rotary_preserves_norm_and_is_relative():
    rot = Rotary(16, theta=10_000.0, max_len=12).double()  # offsets 13 and 10 + 1 > 12: past the table
    q, k = torch.randn(1, 1, 2, 16, dtype=torch.float64), torch.randn(1, 1, 2, 16, dtype=torch.float64)
    torch.testing.assert_close(rot(q, offset=7).norm(), q.norm())
    # <rot(q, m), rot(k, n)> depends on m - n only
    dot = lambda m, n: (rot(q, offset=m) * rot(k, offset=n)).sum()  # noqa: E731
    torch.testing.assert_close(dot(5, 2), dot(13, 10), rtol=1e-6, atol=1e-6)  # RoPE computes in float32
    assert not torch.isclose(dot(5, 2), dot(5, 3))


def test_rotary_table_gives_the_angles_computed_per_call():
    x = torch.randn(2, 6, 3, 16)  # (batch, seq, heads, head_dim)
    table, no_table = Rotary(16, 10_000.0, max_len=32), Rotary(16, 10_000.0, max_len=0)
    for offset in (0, 5, 26, torch.tensor(5)):  # 26 + 6 = 32: the table's last row
        torch.testing.assert_close(table(x, offset), no_table(x, int(offset)), rtol=0, atol=1e-6)


def test_rotary_keeps_float32_tables_when_the_model_is_cast_to_bfloat16():
    # A bf16 inv_freq times position 1900 is off by radians: CUDA-graph decoding (tensor offsets) of a
    # model cast with .to(bfloat16) disagreed with its own forward by 0.8 in the logits.
    exact = Rotary(64, 10_000.0, max_len=2048)
    cast = Rotary(64, 10_000.0, max_len=2048).to(torch.bfloat16)
    assert cast.inv_freq.dtype == cast.cos_sin.dtype == torch.float32
    x = torch.randn(1, 1, 2, 64)
    for offset in (1900, torch.tensor(1900)):  # the table, and the per-call angles
        torch.testing.assert_close(cast(x, offset), exact(x, 1900), rtol=0, atol=1e-6)


def test_cached_decoding_equals_full_forward(model):
    x = torch.randint(0, 97, (3, 17))
    full = model(x)
    state = model.init_state(3, 17)
    steps = [model(x[:, :5], state), model(x[:, 5:9], state)] + [model(x[:, t : t + 1], state) for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied, untied = CausalLM(tiny()), CausalLM(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 64


def test_logit_softcap_squashes_the_uncapped_logits():
    torch.manual_seed(0)
    capped = CausalLM(tiny(logit_softcap=2.0, init_std=1.0)).double()
    plain = CausalLM(tiny(init_std=1.0)).double()
    plain.load_state_dict(capped.state_dict())
    x = torch.randint(0, 97, (1, 8))
    raw = plain(x)
    assert raw.abs().max() > 4  # large init, so the cap matters
    torch.testing.assert_close(capped(x), 2.0 * torch.tanh(raw / 2.0))


def test_flops_per_token_matches_a_hand_count():
    cfg = tiny()
    m = CausalLM(cfg)
    d, hd, H, Hkv, f, V, T = 64, 16, 4, 2, 96, 97, 32
    attn_proj = 2 * (d * H * hd + 2 * d * Hkv * hd + H * hd * d)
    attn_scores = 2 * H * hd * T  # QK^T and AV, 2 FLOPs per MAC, over the causal half: 4 * H * hd * T / 2
    forward = cfg.n_layers * (attn_proj + attn_scores + 2 * 3 * d * f) + 2 * d * V
    assert m.flops_per_token(T) == 3 * forward


def test_flops_per_token_count_from_shapes_not_from_fsdp_shards():
    """Under FSDP each weight is a 1-D view of this rank's shard (numel: the shard's) when MFU is logged."""
    m = CausalLM(tiny(layout="A,S,G,H,M", n_layers=5, hgrn2_expand_ratio=8, ssm_d_state=8, ssm_headdim=16))
    want = m.flops_per_token(32)
    for p in m.parameters():
        p.data = p.data.flatten()[: p.numel() // 3]  # as a rank holding a third of each would see them
    assert m.flops_per_token(32) == want


def test_bad_head_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="model.ssm_d_conv=1 must be at least 2"):  # decoding failed
        tiny(layout="M,A", ssm_d_conv=1)
    tiny(ssm_d_conv=1)  # no Mamba-2 layer: unused
    for key in ("n_heads", "n_kv_heads", "hgrn2_expand_ratio", "ssm_headdim", "ssm_ngroups"):  # a ZeroDivisionError once
        with pytest.raises(ValueError, match=f"model.{key}=0 must be at least 1"):
            tiny(**{key: 0})


def test_an_odd_dimension_that_rope_rotates_is_a_clear_error():
    """RoPE rotates pairs of channels; an odd head once failed at the first forward with a shape mismatch."""
    with pytest.raises(ValueError, match=r"model.head_dim=15 must be even.*attention"):
        tiny(head_dim=15)
    with pytest.raises(ValueError, match=r"model.hgrn2_expand_ratio=1 must be even.*hgrn2"):
        tiny(layout="A,H", hgrn2_expand_ratio=1, rope_layers="all")
    model = CausalLM(tiny(head_dim=15, rope_layers="none"))  # nothing rotated: an odd head is fine
    assert model(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)
    tiny(layout="A,H", hgrn2_expand_ratio=1, rope_layers="even")  # the HGRN2 layer (1) is not rotated


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = CausalLM(tiny(layout="A,G")).double().train()
    recomputed = CausalLM(tiny(layout="A,G", activation_checkpointing=True)).double().train()
    recomputed.load_state_dict(plain.state_dict())
    ids, labels = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    grads, saved = [], []
    for model in (plain, recomputed):
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model.loss(ids, labels)
        saved.append(count[0])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    assert saved[1] < saved[0] / 2  # the blocks' activations were not kept for the backward pass


def test_initialisation_draws_each_weight_once_and_leaves_nn_defaults_alone():
    """CausalLM builds its Linear/Embedding layers without their own init (reset_parameters draws them):
    every weight has the configured std (the residual outputs scaled down), the GLA decay bias its set
    value, and modules built afterwards get PyTorch's default init again."""
    cfg = tiny(d_model=128, n_layers=4, layout="A,G,M,H", hgrn2_expand_ratio=32, ssm_d_state=16, ssm_headdim=16,
               ffn_hidden=256, init_std=0.05, vocab_size=512)
    model = CausalLM(cfg)
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2 and "conv" not in name:
            residual = name.removesuffix(".weight").endswith(("mixer.o", "mixer.out_proj", "mlp.down"))
            std = 0.05 / math.sqrt(2 * cfg.n_layers) if residual else 0.05
            assert p.std().item() == pytest.approx(std, rel=0.15), name
    gla = model.blocks[1].mixer
    assert torch.allclose(gla.decay.bias, gla.decay.bias[0].expand_as(gla.decay.bias))  # the constant decay init
    fresh = torch.nn.Linear(1000, 1000)
    assert fresh.weight.abs().max().item() <= 1 / math.sqrt(1000)  # kaiming-uniform's bound
    assert fresh.weight.std().item() == pytest.approx(1 / math.sqrt(3000), rel=0.05)
    assert torch.nn.Embedding(100, 100).weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_the_backbone_compiles_as_one_graph_and_decodes_eagerly():
    """`compile_blocks("backbone")`: one dynamo frame runs every block (no block is compiled alone), the
    forward equals the eager one, and decoding with a state runs the blocks as they are."""
    torch.manual_seed(0)
    model = CausalLM(tiny(n_layers=3)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        eager = model(ids)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model.compile_blocks("backbone")
        assert all(b._compiled_call_impl is None for b in model.blocks)  # what `nn.Module.compile` sets
        torch.testing.assert_close(model(ids), eager, rtol=1e-5, atol=1e-5)
        assert torch._dynamo.utils.counters["frames"]["ok"] == 1
        torch.testing.assert_close(model(ids[:, :5], state=model.init_state(2, 12)), eager[:, :5], rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["frames"]["ok"] == 1  # decoding compiled nothing


@pytest.mark.parametrize("norm", ["rms", "zc_rms"])
def test_a_float64_block_computes_its_norms_and_rope_in_float64(norm):
    """A float64 model is what gradcheck and reference comparisons need: RMSNorm, QK-norm and RoPE once
    rounded to float32 whatever the input, and gradcheck failed on every block."""
    torch.manual_seed(0)
    block = Block(tiny(d_model=16, n_heads=2, n_kv_heads=1, ffn_hidden=8, norm=norm), 0).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("overrides,named", [
    (dict(vocab_size=0), "model.vocab_size=0 must be at least 1"),
    (dict(max_seq_len=0), "model.max_seq_len=0 must be at least 1"),
    (dict(head_dim=0), "model.head_dim=0 must be at least 1"),
    (dict(norm_eps=-1e-6), "model.norm_eps=-1e-06 must be at least 0"),
    (dict(rope_theta=0.0), "model.rope_theta=0.0 must be positive"),
    (dict(layout="S,A", sliding_window=0), "model.sliding_window=0 must be at least 1"),
    (dict(layout="S,A", global_tokens=-1), "model.global_tokens=-1 at least 0"),
    (dict(layout="G,A", gla_decay_init=1.0), "model.gla_decay_init=1.0 must lie strictly between 0 and 1"),
    (dict(layout="M,A", ssm_dt_min=0.0), "model.ssm_dt_min=0.0 and model.ssm_dt_max=0.1 must satisfy"),
    (dict(layout="M,A", ssm_d_state=0), "model.ssm_d_state=0 must be at least 1"),
])
def test_a_setting_out_of_its_range_is_an_error_naming_it(overrides, named):
    """Each of these once built a model: one that ran on (a sparse window of 0 attended to nothing, a zero
    RoPE theta gave NaNs), or one that failed with a bare ZeroDivisionError or math domain error."""
    with pytest.raises(ValueError, match=re.escape(named)):
        tiny(**overrides)


def test_the_settings_of_a_mixer_no_layer_has_are_not_checked():
    attention_only = tiny(sliding_window=0, gla_decay_init=1.0, ssm_dt_min=0.0, ssm_d_state=0)
    assert attention_only.layer_mixers == ["attention"] * 2
    assert tiny(mixer="gla", rope_theta=0.0).layer_mixers == ["gla"] * 2  # GLA rotates nothing
