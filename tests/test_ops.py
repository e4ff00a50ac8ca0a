"""The recurrent ops on the CPU: chunked references against step-by-step oracles (float64), state
carrying, and the choice of backend."""

import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from slmlab.ops import backend, gla, gla_chunked, gla_recurrent, resolve_backend, ssd, ssd_chunked, ssd_recurrent
from slmlab.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from slmlab.ops.swiglu import silu_mul, silu_mul_backward_reference

f64 = dict(dtype=torch.float64)


def gla_inputs(B=2, T=63, H=3, K=5, V=4, per_channel=True, decay_scale=3.0, seed=0) -> dict:
    """Random GLA inputs with gradients; decays from ~0 to ~e^-10 per step."""
    torch.manual_seed(seed)
    g_shape = (B, T, H, K) if per_channel else (B, T, H)
    inputs = dict(
        q=torch.randn(B, T, H, K, **f64), k=torch.randn(B, T, H, K, **f64), v=torch.randn(B, T, H, V, **f64),
        g=F.logsigmoid(decay_scale * torch.randn(g_shape, **f64)), initial_state=torch.randn(B, H, K, V, **f64),
    )
    return {name: t.requires_grad_() for name, t in inputs.items()}


def ssd_inputs(b=2, T=63, H=4, P=3, G=2, N=5, seed=0) -> dict:
    torch.manual_seed(seed)
    inputs = dict(
        x=torch.randn(b, T, H, P, **f64), dt=F.softplus(torch.randn(b, T, H, **f64) - 1),
        A=-torch.empty(H, **f64).uniform_(1, 16), B=torch.randn(b, T, G, N, **f64), C=torch.randn(b, T, G, N, **f64),
        D=torch.randn(H, **f64), initial_state=torch.randn(b, H, P, N, **f64),
    )
    return {name: t.requires_grad_() for name, t in inputs.items()}


def outputs_and_grads(fn, inputs: dict) -> list[torch.Tensor]:
    """Output, final state, and the gradients of every input under a loss that weighs both outputs."""
    out, state = fn(**inputs, output_final_state=True)
    torch.manual_seed(1)  # (randn_like would follow the outputs' strides, which differ between implementations)
    loss = (out * torch.randn(out.shape, **f64)).sum() + (state * torch.randn(state.shape, **f64)).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return [out, state, *grads]


def assert_all_close(actual: list, expected: list, tol: float = 1e-10) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_head"])
@pytest.mark.parametrize("T,chunk", [(63, 16), (63, 64), (63, 7), (64, 16), (1, 16), (5, 64)])
def test_chunked_gla_matches_recurrence_forward_state_and_grads(per_channel, T, chunk):
    inputs = gla_inputs(T=T, per_channel=per_channel)
    expected = outputs_and_grads(gla_recurrent, inputs)
    actual = outputs_and_grads(lambda **kw: gla_chunked(**kw, chunk_size=chunk), inputs)
    assert_all_close(actual, expected)


def test_gla_without_decay_is_causal_linear_attention():
    q, k, v, _, _ = gla_inputs(T=9).values()
    o, _ = gla_recurrent(q, k, v, torch.zeros_like(q))
    scores = torch.einsum("bihd,bjhd->bhij", q, k).tril() / q.shape[-1] ** 0.5
    torch.testing.assert_close(o, torch.einsum("bhij,bjhd->bihd", scores, v))


def test_chunked_gla_stays_finite_under_decays_that_overflow_a_factorised_form():
    # e^-60 per step: over a chunk of 64 the cumulative decay is e^-3840, whose inverse overflows float64
    inputs = gla_inputs(T=64)
    inputs["g"] = torch.full_like(inputs["g"], -60.0).requires_grad_()
    actual = outputs_and_grads(lambda **kw: gla_chunked(**kw, chunk_size=64), inputs)
    assert all(t.isfinite().all() for t in actual)
    assert_all_close(actual, outputs_and_grads(gla_recurrent, inputs))


def test_gla_state_carried_across_calls_equals_one_call():
    q, k, v, g, h0 = (t.detach() for t in gla_inputs(T=50).values())
    o, S = gla_chunked(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, S1 = gla_chunked(q[:, :21], k[:, :21], v[:, :21], g[:, :21], initial_state=h0, output_final_state=True)
    o2, S2 = gla_chunked(q[:, 21:], k[:, 21:], v[:, 21:], g[:, 21:], initial_state=S1, output_final_state=True)
    assert_all_close([torch.cat([o1, o2], dim=1), S2], [o, S])


def test_gla_dispatch_runs_the_reference_on_cpu():
    q, k, v, g, h0 = (t.detach() for t in gla_inputs(T=20).values())
    assert_all_close(gla(q, k, v, g, initial_state=h0, output_final_state=True),
                     gla_chunked(q, k, v, g, initial_state=h0, output_final_state=True), tol=0)


@pytest.mark.parametrize("T,chunk", [(63, 64), (63, 8), (64, 16), (1, 64)])
def test_chunked_ssd_matches_recurrence_forward_state_and_grads(T, chunk):
    inputs = ssd_inputs(T=T)
    expected = outputs_and_grads(ssd_recurrent, inputs)
    actual = outputs_and_grads(lambda **kw: ssd_chunked(**kw, chunk_size=chunk), inputs)
    assert_all_close(actual, expected)


def test_ssd_groups_share_B_and_C_between_their_heads():
    x, dt, A, B, C, D, h0 = (t.detach() for t in ssd_inputs(H=4, G=2).values())
    y, S = ssd_recurrent(x, dt, A, B, C, D, h0, output_final_state=True)
    # heads 2 and 3 belong to group 1: alone, with one group, they give the same result
    y23, S23 = ssd_recurrent(x[:, :, 2:], dt[:, :, 2:], A[2:], B[:, :, 1:], C[:, :, 1:], D[2:], h0[:, 2:], True)
    assert_all_close([y[:, :, 2:], S[:, 2:]], [y23, S23], tol=0)


def test_ssd_state_carried_across_calls_equals_one_call():
    x, dt, A, B, C, D, h0 = (t.detach() for t in ssd_inputs(T=50).values())
    y, S = ssd_chunked(x, dt, A, B, C, D, h0, output_final_state=True)
    first = [t[:, :30] for t in (x, dt)] + [A] + [t[:, :30] for t in (B, C)]
    rest = [t[:, 30:] for t in (x, dt)] + [A] + [t[:, 30:] for t in (B, C)]
    y1, S1 = ssd_chunked(*first, D, h0, output_final_state=True)
    y2, S2 = ssd_chunked(*rest, D, S1, output_final_state=True)
    assert_all_close([torch.cat([y1, y2], dim=1), S2], [y, S])


# --- choosing the backend -------------------------------------------------------------------------


@pytest.fixture
def kernels(monkeypatch):
    """Pretend that exactly the packages in the returned set import."""
    installed: set[str] = set()
    monkeypatch.setattr(backend, "kernel_available", lambda package: package in installed)
    monkeypatch.setattr(backend, "_warned", set())
    return installed


def test_asking_for_a_missing_kernel_says_how_to_install_it(kernels):
    q, k, v, g, _ = (t.detach() for t in gla_inputs(T=4).values())
    with pytest.raises(ImportError, match=r'pip install -e "\.\[cuda\]"'):
        gla(q, k, v, g, kernel="fla")
    x, dt, A, B, C, D, _ = (t.detach() for t in ssd_inputs(T=4).values())
    with pytest.raises(ImportError, match=r"mamba_ssm does not import.*pip install"):
        ssd(x, dt, A, B, C, D, kernel="mamba_ssm")


def test_asking_for_a_kernel_on_cpu_tensors_is_an_error(kernels):
    kernels.update({"fla", "mamba_ssm"})
    q, k, v, g, _ = (t.detach() for t in gla_inputs(T=4).values())
    with pytest.raises(ValueError, match="CUDA tensors only"):
        gla(q, k, v, g, kernel="fla")


def test_kernel_availability_is_decided_in_python_and_compiles_without_a_graph_break(tmp_path, monkeypatch):
    """Inside torch.compile the check once came out False although the package imported, and a compiled
    hybrid ran GLA's PyTorch reference: the import must run as plain Python, not be traced. Run at a
    graph break instead, it split every compiled recurrent block: the answer is a trace-time constant."""
    (tmp_path / "probe_kernels.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backend._PROBES, "probe", "probe_kernels")
    monkeypatch.setattr(backend.kernel_available, "results", {})

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if backend.kernel_available("probe") else x - 1

    assert torch.equal(torch.compile(pick, backend="eager", fullgraph=True)(torch.zeros(2)), torch.ones(2))
    assert sys.modules["probe_kernels"].IMPORTED


def test_auto_picks_the_first_installed_kernel_on_cuda_and_the_reference_on_cpu(kernels):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    kernels.update({"fla", "mamba_ssm"})
    assert resolve_backend("auto", cuda, ("mamba_ssm", "fla"), "SSD") == "mamba_ssm"
    assert resolve_backend("auto", cpu, ("mamba_ssm", "fla"), "SSD") == "torch"
    assert resolve_backend("torch", cuda, ("mamba_ssm", "fla"), "SSD") == "torch"
    kernels.remove("mamba_ssm")
    assert resolve_backend("auto", cuda, ("mamba_ssm", "fla"), "SSD") == "fla"


def test_auto_on_cuda_without_kernels_warns_once_and_runs_the_reference(kernels):
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match=r"slow PyTorch reference.*pip install"):
        assert resolve_backend("auto", cuda, ("fla",), "GLA") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        assert resolve_backend("auto", cuda, ("fla",), "GLA") == "torch"


# the private kernel functions behind the custom ops, with fla 0.6.0's and mamba-ssm 2.3.2's parameters
def chunk_gla_fwd(q, k, v, g, g_cumsum, scale, initial_state, output_final_state, state_v_first=False,
                  cu_seqlens=None, chunk_size=64, chunk_indices=None): ...


def chunk_gla_bwd(q, k, v, g, g_cumsum, scale, initial_state, h, A, do, dht, state_v_first=False,
                  cu_seqlens=None, chunk_size=64, chunk_indices=None): ...


def chunk_gla_fwd_renamed(q, k, v, gk, gk_cumsum, scale, initial_state, output_final_state, chunk_size=64): ...


def _mamba_chunk_scan_combined_fwd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None): ...


def _mamba_chunk_scan_combined_bwd(dout, x, dt, A, B, C, out, chunk_size, D=None, z=None): ...


@pytest.fixture
def private_kernels(monkeypatch):
    """Installs fake kernel modules holding the given functions; the checks start afresh."""
    monkeypatch.setattr(backend.custom_op_usable, "results", {})

    def install(module: str, **functions) -> None:
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(**functions))

    return install


def test_custom_ops_run_where_the_private_kernel_functions_take_their_arguments(private_kernels):
    private_kernels("fla.ops.gla.chunk", chunk_gla_fwd=chunk_gla_fwd, chunk_gla_bwd=chunk_gla_bwd)
    private_kernels("mamba_ssm.ops.triton.ssd_combined", _mamba_chunk_scan_combined_fwd=_mamba_chunk_scan_combined_fwd,
                    _mamba_chunk_scan_combined_bwd=_mamba_chunk_scan_combined_bwd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.custom_op_usable("mamba_chunk_scan")

    # decided at trace time, as `kernel_available` is: no graph break in a compiled block
    def pick(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if backend.custom_op_usable("fla_chunk_gla") else x - 1

    assert torch.equal(torch.compile(pick, backend="eager", fullgraph=True)(torch.zeros(2)), torch.ones(2))


def test_a_changed_private_kernel_function_turns_its_custom_op_off_with_one_warning(private_kernels):
    private_kernels("fla.ops.gla.chunk", chunk_gla_fwd=chunk_gla_fwd_renamed, chunk_gla_bwd=chunk_gla_bwd)
    with pytest.warns(RuntimeWarning, match=r"fla\.ops\.gla\.chunk\.chunk_gla_fwd of fla .*'gk'.*tested with fla 0\.6\.0"):
        assert not backend.custom_op_usable("fla_chunk_gla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per process
        assert not backend.custom_op_usable("fla_chunk_gla")
    # a function that is gone, or whose positional parameters moved
    private_kernels("mamba_ssm.ops.triton.ssd_combined", _mamba_chunk_scan_combined_fwd=_mamba_chunk_scan_combined_fwd)
    with pytest.warns(RuntimeWarning, match="_mamba_chunk_scan_combined_bwd of mamba_ssm .*no such function"):
        assert not backend.custom_op_usable("mamba_chunk_scan")
    backend.custom_op_usable.results.clear()
    private_kernels("mamba_ssm.ops.triton.ssd_combined", _mamba_chunk_scan_combined_fwd=_mamba_chunk_scan_combined_bwd,
                    _mamba_chunk_scan_combined_bwd=_mamba_chunk_scan_combined_bwd)
    with pytest.warns(RuntimeWarning, match="_mamba_chunk_scan_combined_fwd"):
        assert not backend.custom_op_usable("mamba_chunk_scan")


def test_unknown_or_unsupported_kernels_are_errors(kernels):
    kernels.update({"fla", "mamba_ssm"})
    with pytest.raises(ValueError, match="unknown kernel 'triton'"):
        resolve_backend("triton", torch.device("cuda"), ("fla",), "GLA")
    with pytest.raises(ValueError, match="GLA has no mamba_ssm kernel"):
        resolve_backend("mamba_ssm", torch.device("cuda"), ("fla",), "GLA")


def test_silu_mul_backward_reference_equals_autograd_through_chunk_and_silu():
    """The oracle of the CUDA kernel's test (tests/test_kernels_gpu.py), in float64."""
    torch.manual_seed(0)
    gu = (3 * torch.randn(2, 7, 2 * 6, **f64)).requires_grad_()
    grad = torch.randn(2, 7, 6, **f64)
    gate, up = gu.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(F.silu(gate) * up, gu, grad)
    torch.testing.assert_close(silu_mul_backward_reference(gu.detach(), grad), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(silu_mul(gu), F.silu(gate) * up, rtol=0, atol=0)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "rope_only"])
def test_qk_norm_rope_reference_equals_the_attention_modules(norm):
    """The oracle of the Triton kernels' test (complex rotation) against QK-norm then `Rotary` (the
    modules attention runs on the CPU and while decoding); `Rotary` rotates in float32."""
    from slmlab.models.layers import RMSNorm, Rotary

    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, 16, **f64)
    rotary, rms = Rotary(16, 10_000.0, max_len=12).double(), RMSNorm(16, eps=1e-6).double()
    rms.weight.data = 1 + 0.3 * torch.randn(16, **f64)
    want = rotary(rms(x) if norm else x)
    got = qk_norm_rope_reference(x, rms.weight if norm else None, rotary.cos_sin, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_qk_norm_rope_wants_both_norm_weights_or_neither():
    with pytest.raises(ValueError, match="both QK-norm weights or neither"):
        qk_norm_rope(torch.zeros(1, 2, 48), 1, 1, torch.ones(16), None, torch.zeros(2, 2, 8), 1e-6)


# --- FlashAttention 4 ------------------------------------------------------------------------------


@pytest.fixture
def hopper(monkeypatch):
    """Pretend the CUDA device is of compute capability 9.0 (or older, after `hopper.clear()`)."""
    answer = {"cuda"}
    monkeypatch.setattr(backend, "_hopper_or_newer", lambda device: device in answer)
    return answer


def test_attention_runs_flash_attention_on_hopper_where_the_package_imports(kernels, hopper):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not backend.flash_attention_usable("auto", cuda)  # not installed: SDPA, silently
    kernels.add("flash_attn")
    assert backend.flash_attention_usable("auto", cuda) and backend.flash_attention_usable("flash_attn", cuda)
    assert not backend.flash_attention_usable("sdpa", cuda)
    assert not backend.flash_attention_usable("auto", cpu)
    hopper.clear()
    assert not backend.flash_attention_usable("auto", cuda)


@pytest.mark.parametrize("usable,asked,named,typo,other", [
    ("flash_attention_usable", "flash_attn", r"attention_kernel='flash_attn'.*flash-attn-4", "flash", "sdpa"),
    ("fused_mlp_usable", "quack", r"mlp_kernel='quack'.*quack-kernels", "auto", "torch"),
])
def test_asking_for_a_cute_kernel_where_it_cannot_run_says_why(kernels, hopper, usable, asked, named, typo, other):
    usable, cuda = getattr(backend, usable), torch.device("cuda")
    with pytest.raises(ImportError, match=rf"{named}.*pip install"):
        usable(asked, cuda)
    kernels.add(asked)
    assert usable(asked, cuda) and not usable(other, cuda)
    with pytest.raises(ValueError, match=f"{asked}' runs on CUDA tensors only, got cpu"):
        usable(asked, torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"unknown \w+_kernel '{typo}'"):
        usable(typo, cuda)
    hopper.clear()
    with pytest.raises(ValueError, match=rf"compute capability 9\.0.*Use \w+_kernel=.*{other}"):
        usable(asked, cuda)


def test_kernel_settings_are_checked_before_training_naming_the_key(tmp_path, kernels, hopper):
    """What the layers would raise at their first forward comes at set-up, as `model.<key>=...`; a
    setting no layer reads is a warning, not silence."""
    from dataclasses import replace

    from hydra.utils import instantiate

    from slmlab.mixers import check_kernel_settings
    from tests.conftest import compose_config, tiny_run_overrides
    from train import train

    dense, hybrid = (instantiate(compose_config([f"model={m}"]).model) for m in ("tiny", "tiny_hybrid"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match=r"^model.attention_kernel=flash_attn: .* runs on CUDA tensors only, got cpu"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["model.attention_kernel=flash_attn"]))
    assert not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(ImportError, match=r"^model.kernel=fla: kernel='fla' was asked for, but fla does not import"):
        check_kernel_settings(replace(hybrid, kernel="fla"), cuda)
    with pytest.raises(ValueError, match=r"^model.kernel=mamba_ssm: GLA has no mamba_ssm kernel"):
        check_kernel_settings(replace(hybrid, kernel="mamba_ssm"), cuda)
    with pytest.raises(ValueError, match=r"^model.mlp_kernel=quack: .*quack.* runs on CUDA tensors only"):
        check_kernel_settings(replace(dense, mlp_kernel="quack"), cpu)
    with pytest.warns(UserWarning, match=r"model.kernel=fla is not used: no layer .* \(mixers: attention\)"):
        check_kernel_settings(replace(dense, kernel="fla"), cpu)
    with pytest.warns(UserWarning, match="model.mlp_kernel=quack is not used: model.kernel=torch"):
        check_kernel_settings(replace(dense, kernel="torch", mlp_kernel="quack"), cuda)
    kernels.update({"fla", "quack", "flash_attn"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # usable settings: silent
        check_kernel_settings(replace(hybrid, kernel="fla", mlp_kernel="quack", attention_kernel="flash_attn"), cuda)
        check_kernel_settings(hybrid, cpu)


def test_before_any_kernel_package_imports_quack_is_told_to_keep_its_autotuning_winners(monkeypatch):
    """quack reads the switch when its autotuners are made, at import, and flash-attn-4 imports quack too:
    without it every process would autotune each GEMM shape again (minutes)."""
    monkeypatch.setenv("QUACK_CACHE_AUTOTUNING", "unset")
    monkeypatch.delenv("QUACK_CACHE_AUTOTUNING")
    backend.kernel_available.__wrapped__("flash_attn")  # the answer is not cached: the probe runs
    assert os.environ["QUACK_CACHE_AUTOTUNING"] == "1"
    monkeypatch.setenv("QUACK_CACHE_AUTOTUNING", "0")  # a user's own choice stays
    backend.kernel_available.__wrapped__("quack")
    assert os.environ["QUACK_CACHE_AUTOTUNING"] == "0"


def test_flash_attention_op_gives_shapes_and_gradients_of_its_inputs_on_the_meta_device():
    """What torch.compile plans a block from: the op's fake and its autograd registration (the real
    kernels need a Hopper GPU: tests/test_kernels_gpu.py)."""
    from slmlab.ops.flash_attention import flash_attn_causal

    q = torch.empty(2, 16, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(2, 16, 2, 8, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out, lse = flash_attn_causal(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 16) and lse.dtype == torch.float32 and not lse.requires_grad
    out.sum().backward()
    assert [t.grad.shape for t in (q, k, v)] == [q.shape, k.shape, v.shape]
