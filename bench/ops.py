"""slmlab's Triton ops against their PyTorch references compiled by inductor, forward + backward, at a
preset's training shape, all rows from one run.

    python bench/ops.py                                    # helios_nova's shapes, 16 x 2048 tokens
    python bench/ops.py --model helium_nano --tokens 131072
    python bench/ops.py --model helix_hybrid               # and Mamba-2's convolution
    python bench/ops.py --smoke                            # tiny shapes on the CPU, Triton's interpreter, eager

The ops the preset's layers use: SwiGLU's activation, attention's QK-norm/RoPE, Mamba-2's convolution,
and on Hopper with flash-attn-4 causal attention (FlashAttention 4's custom op against SDPA, cuDNN's)
and the whole SwiGLU MLP (quack's fused GEMMs, `mlp_kernel=quack`, against `mlp_kernel=torch`).
Each op runs as the compiled blocks run it (`torch.compile` of the function that calls it) against
`torch.compile` of its reference. Columns: microseconds per forward and per forward + backward;
GB/s of the bytes the pair must move at the least (each input and output read or written once);
the reference's time over ours; the largest error of ours against the reference (outputs and input
gradients, relative to each tensor's largest value), so that a row is known to time the same function.
"""

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

if "--smoke" in sys.argv:  # Triton reads the switch when a kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

from throughput import preset, print_table, timed
from slmlab.models.layers import Rotary, SwiGLU
from slmlab.ops.backend import flash_attention_usable, fused_mlp_usable
from slmlab.ops.causal_conv import _CausalConv1dSilu, causal_conv1d_silu_reference
from slmlab.ops.flash_attention import flash_attn_causal
from slmlab.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from slmlab.ops.swiglu import _SiluMul, silu_mul_forward


@dataclass
class Case:
    """One op: its inputs (gradients wanted), the function as slmlab runs it and its reference, and the
    least bytes a forward + backward moves."""

    name: str
    inputs: list[torch.Tensor]
    ours: Callable[..., tuple[torch.Tensor, ...]]
    reference: Callable[..., tuple[torch.Tensor, ...]]
    min_bytes: int


def swiglu_case(cfg, tokens: int, device: torch.device) -> Case:
    hidden = cfg.ffn_hidden + -cfg.ffn_hidden % SwiGLU.PAD_TO  # the padded width the fused matmul gives
    gu = torch.randn(tokens, 2 * hidden, device=device, dtype=torch.bfloat16)
    # forward reads gate and up and writes the product; backward reads the three and writes both gradients
    return Case("silu_mul", [gu], lambda gu: (_SiluMul.apply(gu),), lambda gu: (silu_mul_forward(gu),),
                8 * tokens * hidden * gu.element_size())


def qk_norm_rope_case(cfg, tokens: int, seq: int, device: torch.device) -> Case:
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv = torch.randn(tokens // seq, seq, (H + 2 * Hkv) * hd, device=device, dtype=torch.bfloat16)
    weights = [1 + 0.1 * torch.randn(hd, device=device) for _ in range(2)] if cfg.qk_norm else []  # else RoPE only
    cos_sin = Rotary(hd, cfg.rope_theta, seq).to(device).cos_sin
    eps = cfg.norm_eps

    def ours(qkv, *weights):
        return qk_norm_rope(qkv, H, Hkv, *(weights or (None, None)), cos_sin, eps)

    def reference(qkv, *weights):
        q_weight, k_weight = weights or (None, None)
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        return (qk_norm_rope_reference(q.unflatten(-1, (H, hd)), q_weight, cos_sin, eps),
                qk_norm_rope_reference(k.unflatten(-1, (Hkv, hd)), k_weight, cos_sin, eps), v.unflatten(-1, (Hkv, hd)))

    # forward reads qkv and writes q, k, v; backward reads qkv and their gradients and writes qkv's
    return Case("qk_norm_rope", [qkv, *weights], ours, reference, 5 * qkv.numel() * qkv.element_size())


def causal_conv_case(cfg, tokens: int, seq: int, device: torch.device) -> Case:
    d_inner = cfg.ssm_expand * cfg.d_model
    channels = d_inner + 2 * cfg.ssm_ngroups * cfg.ssm_d_state
    # the convolution reads its input where Mamba-2's in-projection writes it: a slice of a wider tensor
    wide = torch.randn(tokens // seq, seq, d_inner + channels + 8, device=device, dtype=torch.bfloat16)
    x = wide[..., d_inner : d_inner + channels]
    weight = 0.5 * torch.randn(channels, cfg.ssm_d_conv, device=device)
    bias = torch.randn(channels, device=device)
    # forward reads x and writes y; backward reads x and y's gradient and writes x's
    return Case("causal_conv1d_silu", [x, weight, bias], lambda *a: (_CausalConv1dSilu.apply(*a),),
                lambda *a: (causal_conv1d_silu_reference(*a),), 5 * x.numel() * x.element_size())


def flash_attention_case(cfg, tokens: int, seq: int, device: torch.device) -> Case:
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(tokens // seq, seq, H, hd, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(tokens // seq, seq, Hkv, hd, device=device, dtype=torch.bfloat16) for _ in range(2))

    def sdpa(q, k, v):  # as `Attention.attend` calls it: heads to the front as views
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        return (y.transpose(1, 2),)

    # compute-bound: the bytes are q, k, v and the output, each read or written three times
    return Case("causal_attention", [q, k, v], lambda q, k, v: (flash_attn_causal(q, k, v)[0],), sdpa,
                3 * 2 * (q.numel() + k.numel() + v.numel()) * q.element_size())


def fused_mlp_case(cfg, tokens: int, device: torch.device) -> Case:
    """The whole SwiGLU MLP with quack's fused GEMMs (`mlp_kernel=quack`) against the cuBLAS matmuls
    around slmlab's activation op (`mlp_kernel=torch`), on the same weights."""
    fused, plain = (SwiGLU(cfg.d_model, cfg.ffn_hidden, kernel).to(device) for kernel in ("quack", "torch"))
    x = torch.randn(tokens, cfg.d_model, device=device, dtype=torch.bfloat16)
    weights = [p.detach() for p in plain.parameters()]  # gate, up, down

    def call(mlp: SwiGLU) -> Callable[..., tuple[torch.Tensor, ...]]:
        names = [name for name, _ in mlp.named_parameters()]
        return lambda x, *w: (torch.func.functional_call(mlp, dict(zip(names, w, strict=True)), (x,)),)

    # compute-bound: the bytes are x, the output and the weights, each read or written three times
    return Case("swiglu_mlp", [x, *weights], call(fused), call(plain),
                3 * 2 * (2 * x.numel() + sum(w.numel() for w in weights)))


def quack_runs(device: torch.device) -> bool:
    try:
        return fused_mlp_usable("quack", device)
    except (ImportError, ValueError):  # not installed, or not a Hopper or newer GPU
        return False


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor] | None) -> Callable[[], list]:
    """A call of fn on fresh leaves of `inputs`: forward only (grads None) or forward + backward."""
    leaves = [t.detach().requires_grad_(grads is not None) for t in inputs]

    def step() -> list:
        # under bf16 autocast, as training runs them (float32 weights: the reference's conv casts them)
        with torch.set_grad_enabled(grads is not None), torch.autocast(leaves[0].device.type, torch.bfloat16):
            outs = fn(*leaves)
        if grads is None:
            return list(outs)
        return [*outs, *torch.autograd.grad(outs, leaves, grads)]

    return step


def largest_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)).item()
               for g, w in zip(got, want, strict=True))


def measure(case: Case, args, device: torch.device) -> list[dict]:
    outs = fwd_bwd(case.reference, case.inputs, None)()
    grads = [torch.randn_like(o) for o in outs]
    rows, results = [], {}
    for impl, fn in (("slmlab", case.ours), ("reference", case.reference)):
        fn = fn if args.smoke else torch.compile(fn)
        forward_s, _ = timed(fwd_bwd(fn, case.inputs, None), args.warmup, args.iters, device)
        step = fwd_bwd(fn, case.inputs, grads)
        both_s, _ = timed(step, args.warmup, args.iters, device)
        results[impl] = step()
        rows.append({"op": case.name, "impl": impl + ("" if args.smoke else " +compile"), "fwd_us": forward_s * 1e6,
                     "fwd_bwd_us": both_s * 1e6, "GB_per_s": case.min_bytes / both_s / 1e9})
    rows[0]["ratio"] = rows[1]["fwd_bwd_us"] / rows[0]["fwd_bwd_us"]
    rows[0]["max_error"] = largest_error(results["slmlab"], results["reference"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="helios_nova", help="the preset whose shapes are used")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (batch = tokens // seq)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.model)
    if args.smoke:
        device, args.tokens, args.seq = torch.device("cpu"), 64, 32
        cfg = preset(args.model, d_model=64, ffn_hidden=40, n_heads=2, n_kv_heads=1, head_dim=32, ssm_d_state=16)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("bench/ops.py times CUDA kernels: run it on a GPU, or with --smoke")
    cases = [swiglu_case(cfg, args.tokens, device)]
    if {"attention", "sparse_attention"} & set(cfg.layer_mixers):
        cases.append(qk_norm_rope_case(cfg, args.tokens, args.seq, device))
    if "attention" in cfg.layer_mixers and flash_attention_usable(cfg.attention_kernel, device):
        cases.append(flash_attention_case(cfg, args.tokens, args.seq, device))
    if quack_runs(device):
        cases.append(fused_mlp_case(cfg, args.tokens, device))
    if "mamba2" in cfg.layer_mixers:
        cases.append(causal_conv_case(cfg, args.tokens, args.seq, device))
    rows = [row for case in cases for row in measure(case, args, device)]
    print(f"# {args.model}: {args.tokens} tokens per call, {args.seq} per sequence, bf16, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter)'}")
    print_table(rows)


if __name__ == "__main__":
    main()
