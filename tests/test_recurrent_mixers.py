"""GLA, HGRN2 and Mamba-2 mixers on the CPU (float64): each against a step-by-step reference written
from its equations, decoding, causality, parameter layouts and counts, FLOPs, backend selection."""

import math

import pytest
import torch
import torch.nn.functional as F

from slmlab.mixers.gla import GLA
from slmlab.mixers.hgrn2 import HGRN2
from slmlab.mixers.mamba2 import Mamba2
from slmlab.models.config import ModelConfig
from slmlab.training.profiling import saved_activation_bytes
from tests.test_ops import kernels  # noqa: F401 (fixture)

D_MODEL = 32


def config(**overrides) -> ModelConfig:
    """Tiny shapes: GLA 4 heads of 8, HGRN2 4 heads of 8 x 8, Mamba-2 4 heads of 16 in 2 groups of d_state 8.
    No RoPE: the references below are the bare recurrences (RoPE'd HGRN2 is tested in a full model)."""
    cfg = dict(vocab_size=11, d_model=D_MODEL, n_layers=1, n_heads=4, ffn_hidden=8, hgrn2_expand_ratio=8,
               ssm_d_state=8, ssm_headdim=16, ssm_ngroups=2, rope_layers="none")
    return ModelConfig(**{**cfg, **overrides})


def make(mixer: type, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mixer(config(**overrides), layer_idx=0).double()


def inputs(T: int = 21, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, T, D_MODEL, dtype=torch.float64)


MIXERS = [GLA, HGRN2, Mamba2]

# --- step-by-step references, written from each mixer's equations -----------------------------------


def naive_gla(m: GLA, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    H, Dh = m.n_heads, m.head_dim
    q, k, v = (proj(x).view(B, T, H, Dh) for proj in (m.q, m.k, m.v))
    keep = torch.sigmoid(m.decay(x)).view(B, T, H, Dh)  # exp(logsigmoid(a)) = sigmoid(a)
    S, outs = torch.zeros(B, H, Dh, Dh, dtype=x.dtype), []
    for t in range(T):
        S = keep[:, t, :, :, None] * S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] / math.sqrt(Dh), S))
    return m.o(torch.sigmoid(m.g(x)) * torch.stack(outs, 1).reshape(B, T, -1))


def naive_hgrn2(m: HGRN2, x: torch.Tensor) -> torch.Tensor:
    B, T, d = x.shape
    H, K, V = m.n_heads, m.key_dim, m.value_dim
    q = F.silu(m.q(x)).view(B, T, H, K)
    forget = torch.sigmoid(m.f(x)).view(B, T, H, K)
    v = m.i(x).view(B, T, H, V)
    S, outs = torch.zeros(B, H, K, V, dtype=x.dtype), []
    for t in range(T):  # per key channel, S is a moving average of the values
        S = forget[:, t, :, :, None] * S + torch.einsum("bhk,bhv->bhkv", 1 - forget[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] / math.sqrt(K), S))
    return m.o(torch.stack(outs, 1).reshape(B, T, d))


def naive_mamba2(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's `Mamba2.step` one token at a time (its conv state holds the last d_conv inputs),
    with groups and the group-wise gated RMSNorm of `rms_norm_ref(norm_before_gate=False)`."""
    batch, T, _ = u.shape
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    conv_state = torch.zeros(batch, m.conv_dim, m.d_conv, dtype=u.dtype)
    S, A, outs = torch.zeros(batch, H, P, N, dtype=u.dtype), -torch.exp(m.A_log), []
    for t in range(T):
        z, xBC, dt = m.in_proj(u[:, t]).split([m.d_inner, m.conv_dim, H], dim=-1)
        conv_state = torch.cat([conv_state[:, :, 1:], xBC[:, :, None]], dim=-1)
        xBC = F.silu((conv_state * m.conv1d.weight[:, 0]).sum(-1) + m.conv1d.bias)
        x, B, C = xBC.split([m.d_inner, G * N, G * N], dim=-1)
        x = x.view(batch, H, P)
        B, C = (t.view(batch, G, N).repeat_interleave(H // G, dim=1) for t in (B, C))
        dt = F.softplus(dt + m.dt_bias)
        S = torch.exp(dt * A)[..., None, None] * S + torch.einsum("bh,bhp,bhn->bhpn", dt, x, B)
        y = torch.einsum("bhpn,bhn->bhp", S, C) + m.D[:, None] * x
        y = (y.reshape(batch, -1) * F.silu(z)).view(batch, G, -1)
        y = (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + m.norm.eps)).view(batch, -1) * m.norm.weight
        outs.append(m.out_proj(y))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("mixer,naive", [(GLA, naive_gla), (HGRN2, naive_hgrn2), (Mamba2, naive_mamba2)],
                         ids=["gla", "hgrn2", "mamba2"])
def test_mixer_matches_its_step_by_step_reference(mixer, naive):
    m, x = make(mixer), inputs()
    torch.testing.assert_close(m(x), naive(m, x), rtol=1e-10, atol=1e-10)


# --- the mixer contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS, ids=["gla", "hgrn2", "mamba2"])
@pytest.mark.parametrize("prefill", [1, 9])
def test_prefill_then_token_by_token_decoding_equals_the_full_forward(mixer, prefill):
    m, x = make(mixer), inputs(T=21)
    state = m.init_state(2, 21, x.device, x.dtype)
    steps = [m(x[:, :prefill], state)] + [m(x[:, t : t + 1], state) for t in range(prefill, 21)]
    torch.testing.assert_close(torch.cat(steps, dim=1), m(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", MIXERS, ids=["gla", "hgrn2", "mamba2"])
def test_decoding_state_has_a_fixed_size(mixer):
    m = make(mixer)
    short, long = (m.init_state(2, n, torch.device("cpu"), torch.bfloat16) for n in (8, 100_000))
    shapes = [[t.shape for t in vars(state).values() if isinstance(t, torch.Tensor)] for state in (short, long)]
    assert shapes[0] == shapes[1]


def test_saved_activation_bytes_count_what_autograd_keeps_except_the_parameters():
    linear, x = torch.nn.Linear(8, 16), torch.randn(5, 8, requires_grad=True)
    assert saved_activation_bytes(lambda: linear(x), linear.parameters()) == x.nbytes  # its input, not its weight
    assert saved_activation_bytes(lambda: linear(x).exp(), linear.parameters()) == x.nbytes + 5 * 16 * 4  # + exp's output


@pytest.mark.parametrize("mixer", MIXERS, ids=["gla", "hgrn2", "mamba2"])
def test_activation_memory_per_token_does_not_grow_with_the_sequence(mixer):
    """The same number of tokens as 16 sequences of 64 and as 2 of 512 (from the chunk length on: inside
    a chunk the scores grow with it): a layer that kept anything quadratic in the sequence (scores over
    the whole context) would save 8x more per token."""
    m = make(mixer)
    short, long = (inputs(T, batch).requires_grad_() for T, batch in ((64, 16), (512, 2)))
    per_token = [saved_activation_bytes(lambda: m(x), m.parameters()) / x.shape[:2].numel() for x in (short, long)]
    assert per_token[1] == pytest.approx(per_token[0], rel=0.1)


@pytest.mark.parametrize("mixer", MIXERS, ids=["gla", "hgrn2", "mamba2"])
def test_changing_an_input_never_changes_earlier_outputs(mixer):
    m, x = make(mixer), inputs(T=21)
    y = x.clone()
    y[:, 12] += 1.0
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("mixer", MIXERS, ids=["gla", "hgrn2", "mamba2"])
def test_state_dict_loads_across_kernel_settings_with_identical_outputs(mixer):
    source, x = make(mixer, seed=0, kernel="auto"), inputs()
    for kernel in ("torch", "fla", "mamba_ssm"):
        target = make(mixer, seed=1, kernel=kernel)
        target.load_state_dict(source.state_dict())  # strict: same names and shapes
        if kernel == "torch":  # the kernels need CUDA; on the CPU, auto runs this reference too
            torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


# --- layouts, parameter counts, initialisation ----------------------------------------------------


def test_parameter_counts_of_the_published_layouts():
    big = dict(vocab_size=11, n_layers=1, ffn_hidden=8)
    with torch.device("meta"):
        gla = GLA(ModelConfig(d_model=1280, n_heads=10, head_dim=128, **big), 0)  # Helix v2
        hgrn2 = HGRN2(ModelConfig(d_model=768, n_heads=6, hgrn2_expand_ratio=128, **big), 0)  # OdinNext
        mamba2 = Mamba2(ModelConfig(d_model=1280, n_heads=10, **big), 0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(gla) == 5 * 1280**2 + 1280**2 + 1280 == 9_831_680
    assert (hgrn2.n_heads, hgrn2.key_dim, hgrn2.value_dim) == (6, 128, 128)
    assert count(hgrn2) == 4 * 768**2 == 2_359_296
    assert count(mamba2) == 10_226_040


def test_mamba2_parameters_are_named_and_shaped_as_mamba_ssm_mamba2():
    # mamba_ssm.modules.mamba2.Mamba2(d_model=1280, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1)
    mamba_ssm_layout = {
        "in_proj.weight": (5416, 1280),  # z 2560 | x 2560 | B 128 | C 128 | dt 40
        "conv1d.weight": (2816, 1, 4),
        "conv1d.bias": (2816,),
        "dt_bias": (40,),
        "A_log": (40,),
        "D": (40,),
        "norm.weight": (2560,),
        "out_proj.weight": (1280, 2560),
    }
    with torch.device("meta"):
        m = Mamba2(ModelConfig(vocab_size=11, d_model=1280, n_layers=1, n_heads=10, ffn_hidden=8), 0)
    assert {name: tuple(t.shape) for name, t in m.state_dict().items()} == mamba_ssm_layout


def test_initial_decays_and_steps():
    gla = make(GLA)
    torch.testing.assert_close(torch.sigmoid(gla.decay.bias), torch.full_like(gla.decay.bias, 0.9))
    m, cfg = make(Mamba2, ssm_headdim=4), config()  # 16 heads
    dt = F.softplus(m.dt_bias)
    assert ((dt >= cfg.ssm_dt_min) & (dt <= cfg.ssm_dt_max)).all() and dt.std() > 0
    A = -torch.exp(m.A_log)
    assert ((A >= -16) & (A <= -1)).all() and A.std() > 0
    assert (m.D == 1).all() and (m.norm.weight == 1).all()


# --- FLOPs ----------------------------------------------------------------------------------------


def test_flops_per_token_match_a_hand_count():
    d = 64
    gla = GLA(config(d_model=d, n_heads=4), 0)  # 4 heads of 16
    # projections 2 * 6 * 64 * 64 = 49152; per head 2 * (C/2 * (16 + 16) + 2 * 16 * 16) with C = min(64, seq)
    assert gla.flops_per_token(4096) == 49152 + 4 * 2 * (32 * 32 + 512) == 61440
    assert gla.flops_per_token(10) == 49152 + 4 * 2 * (5 * 32 + 512) == 54528
    hgrn2 = HGRN2(config(d_model=d, hgrn2_expand_ratio=16), 0)  # 4 heads of 16 x 16
    assert hgrn2.flops_per_token(4096) == 2 * 4 * 64 * 64 + 4 * 2 * (32 * 32 + 512) == 45056
    mamba2 = Mamba2(config(d_model=d), 0)  # d_inner 128: 8 heads of 16, 2 groups of d_state 8
    in_proj = 2 * 64 * (2 * 128 + 2 * 2 * 8 + 8)
    out_proj = 2 * 128 * 64
    conv = 2 * (128 + 2 * 2 * 8) * 4
    ssd = 2 * (2 * 128 * 8 + 8 * (128 * 16 + 2 * 16 * 8))  # chunk 256: C.B per group, the rest per head
    assert mamba2.flops_per_token(4096) == in_proj + out_proj + conv + ssd == 96512


# --- backend selection through the mixers ---------------------------------------------------------


@pytest.mark.parametrize("mixer,kernel", [(GLA, "fla"), (HGRN2, "fla"), (Mamba2, "mamba_ssm"), (Mamba2, "fla")])
def test_a_forced_kernel_that_is_missing_or_off_cuda_is_a_clear_error(kernels, mixer, kernel):  # noqa: F811
    m, x = make(mixer, kernel=kernel), inputs(T=4)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[cuda\]"'):
        m(x)
    kernels.add(kernel)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        m(x)


def test_hgrn2_needs_d_model_divisible_by_the_expand_ratio():
    with pytest.raises(ValueError, match="hgrn2_expand_ratio"):
        HGRN2(config(hgrn2_expand_ratio=5), 0)
