"""slmlab's own Triton kernels against their PyTorch references (float64): on a CUDA device where
there is one, else on the CPU through Triton's interpreter, which runs each program of a kernel in
numpy (conftest turns it on before any kernel is defined). The interpreter checks what a kernel
computes (indexing, masks, strides, reductions, dtypes), not how fast it runs or how it compiles;
the shapes it would take minutes over run on CUDA only."""

import pytest
import torch

from tests.test_kernels_gpu import check

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(DEVICE == "cpu", reason="minutes in Triton's interpreter; runs on CUDA")


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


@pytest.mark.parametrize("hidden", [pytest.param(1408, marks=cuda_only), 1365])  # helium_nano's padded width; one the blocks do not divide
def test_triton_silu_mul_backward_matches_the_reference(hidden):
    from slmlab.ops.swiglu import silu_mul_backward_reference
    from slmlab.ops.swiglu_triton import silu_mul_backward

    torch.manual_seed(0)
    rows = 50 if DEVICE == "cuda" else 4
    gu = (3 * randn(3, rows, 2 * hidden)).bfloat16()
    grad = randn(3, rows, hidden).bfloat16()
    want = silu_mul_backward_reference(gu.double(), grad.double())
    got = silu_mul_backward(gu, grad)
    assert got.dtype == torch.bfloat16
    check("dgu", got, want, 5e-3)  # bf16 rounding of the output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,C,width", [pytest.param(2048, 2816, 4, marks=cuda_only),  # helix_hybrid's
                                       (37, 200, 4), (70, 130, 3)])  # ragged tiles
def test_triton_causal_conv_matches_the_reference(dtype, T, C, width):
    """Forward and all three gradients, the input a strided slice of a wider tensor as the
    in-projection's split gives it."""
    from slmlab.ops.causal_conv import _CausalConv1dSilu, causal_conv1d_silu_reference

    torch.manual_seed(0)
    wide = randn(2, T, C + 50)
    w = (0.5 * randn(C, width)).requires_grad_()
    b = randn(C).requires_grad_()
    x = wide.to(dtype)[..., 10 : 10 + C].requires_grad_()
    x64 = x.detach().double().requires_grad_()
    want = causal_conv1d_silu_reference(x64, w.double(), b.double())
    got = _CausalConv1dSilu.apply(x, w, b)  # what causal_conv1d_silu runs on CUDA without the extension
    grad = randn(*want.shape).to(dtype)
    want_grads = torch.autograd.grad(want, [x64, w, b], grad.double())
    got_grads = torch.autograd.grad(got, [x, w, b], grad)
    assert got.dtype == dtype and got_grads[0].dtype == dtype
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-5
    check("y", got, want, tol)
    for name, g, ref in zip(("dx", "dweight", "dbias"), got_grads, want_grads):
        check(name, g, ref, tol)


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "rope_only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,H,Hkv,hd", [pytest.param(2, 2048, 16, 4, 64, marks=cuda_only),  # helios_nova's
                                          (3, 37, 5, 1, 128)])  # ragged tiles
def test_triton_qk_norm_rope_matches_the_reference(norm, dtype, B, T, H, Hkv, hd):
    """q, k, v and the gradients of qkv and both norm weights; the gradients of q come in attention's
    (batch, heads, seq, dim) memory layout, as cuDNN returns them."""
    from slmlab.models.layers import Rotary
    from slmlab.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    torch.manual_seed(0)
    cos_sin = Rotary(hd, 10_000.0, max_len=T + 5).to(DEVICE).cos_sin
    qkv = randn(B, T, (H + 2 * Hkv) * hd).to(dtype).requires_grad_()
    weights = [(1 + 0.3 * randn(hd)).requires_grad_() for _ in range(2)] if norm else [None, None]
    got = qk_norm_rope(qkv, H, Hkv, *weights, cos_sin, 1e-6)
    x64 = qkv.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights] if norm else [None, None]
    q64, k64, v64 = x64.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    want = (qk_norm_rope_reference(q64.unflatten(-1, (H, hd)), w64[0], cos_sin, 1e-6),
            qk_norm_rope_reference(k64.unflatten(-1, (Hkv, hd)), w64[1], cos_sin, 1e-6), v64.unflatten(-1, (Hkv, hd)))
    grads = [randn(*w.shape).to(dtype) for w in want]
    grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)
    inputs, inputs64 = [qkv, *weights] if norm else [qkv], [x64, *w64] if norm else [x64]
    got_grads = torch.autograd.grad(got, inputs, grads)
    want_grads = torch.autograd.grad(want, inputs64, [g.double() for g in grads])
    assert [t.dtype for t in (*got, got_grads[0])] == [dtype] * 4
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-5
    for name, g, w in zip(("q", "k", "v", "dqkv", "dq_weight", "dk_weight"), (*got, *got_grads), (*want, *want_grads)):
        check(name, g, w, tol)


def test_swiglu_with_the_triton_backward_trains_as_with_autograd(monkeypatch):
    """The MLP as CUDA runs it (`_SiluMul`: autograd's forward, the Triton backward) against plain autograd,
    at a hidden width the fused matmul pads (40 -> 64): the input's and all three weights' gradients."""
    from slmlab.models import layers
    from slmlab.models.layers import SwiGLU
    from slmlab.ops.swiglu import _SiluMul

    torch.manual_seed(0)
    mlp = SwiGLU(16, 40).to(DEVICE)
    x = randn(2, 5, 16).requires_grad_()
    runs = []
    for silu_mul in (layers.silu_mul, _SiluMul.apply):
        monkeypatch.setattr(layers, "silu_mul", silu_mul)
        out = mlp(x)
        runs.append((out, *torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])))
    for name, got, want in zip(("out", "dx", "dgate", "dup", "ddown"), runs[1], runs[0]):
        check(name, got, want, 1e-5)
