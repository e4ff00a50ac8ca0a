"""Training throughput on one GPU, every row of the table measured in the same run.

    python bench/throughput.py layers     # each mixer layer, fwd+bwd: ours (kernels), ours (torch reference),
                                          # the kernel library's own layer, taking turns (--rounds); and
                                          # what each keeps for its backward, per token
    python bench/throughput.py models     # helix_hybrid and odinnext vs the all-attention model of their shape
                                          # at 2k/8k(/32k); helios_nova vs Hugging Face Qwen3 (torch.compile);
                                          # helium_nano MFU
    python bench/throughput.py pipeline   # helios_nova through `python train.py` (Lightning, shard loader,
                                          # logging; its own perf/* metrics) vs Hugging Face Qwen3 under
                                          # torch.compile at the same batch, in one run
    python bench/throughput.py layers models --smoke   # tiny shapes on the CPU: checks the script runs

    # as measured for the README: compiled dense presets; helix_hybrid at 32k with activation checkpointing
    python bench/throughput.py models --compile --only helios_nova --tokens 32768 --warmup 3 --iters 8
    python bench/throughput.py models --compile --only helium_nano --tokens 131072 --warmup 3 --iters 8
    python bench/throughput.py models --only helix_hybrid --seqs 32768 --tokens 32768 --checkpoint-from 32768
    python bench/throughput.py pipeline --compile --tokens 32768 --pipeline-steps 50
    # helios_nova's recipe (conf/experiment/helios_nova_pretrain.yaml): micro-batch 24, 8 accumulated
    python bench/throughput.py pipeline --compile --tokens 49152 --accumulate 8 --pipeline-steps 30

bf16 autocast over float32 weights, fused AdamW, 16,384 tokens per step unless `--tokens`. MFU uses
`CausalLM.flops_per_token` (forward + backward = 3x forward) against the GPU's dense bf16 peak.
Triton kernels autotune on first use (minutes for fla's GLA/HGRN2) unless slmlab ships tuned configs for
the GPU (`python -m slmlab.tune_kernels`); the first_call_s column shows what that costs. `--profile`
(CUDA) prints where a model's training step spends its GPU time: per kind of kernel (matmul, attention,
optimizer, the rest) and the busiest kernels.
"""

import argparse
import csv
import subprocess
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate

from slmlab.config import compose_config
from slmlab.export.hf import hf_twin
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.transformer import CUDA_GRAPH_MODES
from slmlab.ops.backend import seed_tuned_configs
from slmlab.training.callbacks import peak_flops
from slmlab.training.profiling import kernel_summary, saved_activation_bytes


def timed(step: Callable[[], None], warmup: int, iters: int, device: torch.device,
          peak_from_start: bool = False) -> tuple[float, float]:
    """(seconds per call, peak memory in GiB) of `step`, after `warmup` calls. The peak is that of the
    timed calls, or with `peak_from_start` of all calls: CUDA graphs allocate their memory while they are
    recorded (a warm-up call), and their replays do not go through the allocator."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        if not peak_from_start:
            torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def preset(name: str, **changes) -> ModelConfig:
    return replace(instantiate(compose_config([f"model={name}"]).model), **changes)


# --- layers ---------------------------------------------------------------------------------------

def library_layer(kind: str, cfg: ModelConfig) -> torch.nn.Module | None:
    """The kernel library's own layer of the configuration of our mixer, or None when not installed."""
    try:
        if kind == "gla":
            from fla.layers import GatedLinearAttention

            return GatedLinearAttention(hidden_size=cfg.d_model, num_heads=cfg.n_heads, expand_k=1.0, expand_v=1.0,
                                        mode="chunk")
        if kind == "hgrn2":
            from fla.layers import HGRN2Attention

            return HGRN2Attention(hidden_size=cfg.d_model, num_heads=cfg.d_model // cfg.hgrn2_expand_ratio,
                                  expand_ratio=cfg.hgrn2_expand_ratio, mode="chunk")
        if kind == "mamba2":
            from mamba_ssm.modules.mamba2 import Mamba2

            # the fused path needs the causal_conv1d CUDA extension; this is the SSD kernel path
            return Mamba2(d_model=cfg.d_model, d_state=cfg.ssm_d_state, d_conv=cfg.ssm_d_conv, expand=cfg.ssm_expand,
                          headdim=cfg.ssm_headdim, use_mem_eff_path=False)
    except ImportError:
        return None
    return None


def layer_rows(args, device: torch.device) -> list[dict]:
    from slmlab import mixers

    helix, odin = preset("helix_hybrid"), preset("odinnext")
    shapes = {"attention": helix, "sparse_attention": helix, "gla": helix, "mamba2": helix, "hgrn2": odin}
    seqs = [64] if args.smoke else [2048, 8192]
    rows = []
    for kind, cfg in shapes.items():
        if args.only and kind not in args.only:
            continue
        if args.smoke:
            cfg = replace(cfg, d_model=64, n_heads=2, n_kv_heads=2, head_dim=32, hgrn2_expand_ratio=32, ssm_d_state=16,
                              ssm_headdim=16, sliding_window=16, global_tokens=4)
        for seq in seqs:
            batch = max(1, args.tokens // seq)
            x = torch.randn(batch, seq, cfg.d_model, device=device, requires_grad=True)
            # a layer without RoPE: the library layers have none (odinnext rotates in its even HGRN2 layers)
            plain = next((i for i in range(cfg.n_layers) if not cfg.rope_on(i)), 0) if kind == "hgrn2" else 0
            candidates = {"ours": mixers.mixer_class(kind)(cfg, plain)}
            if kind == "hgrn2" and cfg.rope_on(0):
                candidates["ours +RoPE"] = mixers.mixer_class(kind)(cfg, 0)
            if kind != "attention":  # the PyTorch reference the CPU runs (sparse attention: SDPA, a boolean mask)
                candidates["ours, torch reference"] = mixers.mixer_class(kind)(replace(cfg, kernel="torch"), plain)
            if kind != "attention" and (theirs := library_layer(kind, cfg)) is not None:
                candidates["library"] = theirs
            steps, first, saved = {}, {}, {}
            for impl, layer in candidates.items():
                steps[impl] = layer_step(layer.to(device), x)
                start = time.perf_counter()
                steps[impl]()  # the first call compiles and autotunes the Triton kernels
                first[impl] = time.perf_counter() - start
                saved[impl] = saved_activation_bytes(lambda: layer_forward(layer, x), layer.parameters())
            # the candidates take turns, round after round, and each reports its median round: a drift of
            # the GPU's clocks or of the host's speed during the run then reaches all of them alike
            timings = {impl: [] for impl in steps}
            for _ in range(args.rounds):
                for impl, step in steps.items():
                    timings[impl].append(timed(step, args.warmup, args.iters, device))
            for impl, runs in timings.items():
                seconds = statistics.median(s for s, _ in runs)
                rows.append({"layer": kind, "impl": impl, "seq": seq, "batch": batch, "ms": seconds * 1e3,
                             "first_call_s": first[impl], "peak_GiB": max(p for _, p in runs),
                             "saved_KiB_per_token": saved[impl] / 1024 / (batch * seq)})
                progress(rows[-1])
    return rows


def layer_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer` on x, under bf16 autocast on CUDA."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        out = layer(x)
    return out[0] if isinstance(out, tuple) else out  # fla layers return (out, attn, cache)


def layer_step(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward and backward of `layer` on x."""
    return lambda: layer_forward(layer, x).float().sum().backward()


# --- models ---------------------------------------------------------------------------------------

def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, hf: bool, accumulate: int = 1) -> Callable[[], None]:
    """One optimizer step over `accumulate` micro-batches of `ids`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ids.device.type == "cuda")

    def step() -> None:
        for _ in range(accumulate):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs of compiled blocks (--compile-mode reduce-overhead)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
                if hf:
                    loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # shifts inside
                else:
                    loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
            (loss / accumulate).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_rows(args, device: torch.device) -> list[dict]:
    runs = []  # (name, cfg, seq, impl)
    changes = dict(args.set)
    helix = preset("helix_hybrid", **changes)
    if args.smoke:
        helix = replace(helix, vocab_size=512, d_model=64, n_layers=6, layout="M*2,G*2,S*2", n_heads=2, n_kv_heads=2, head_dim=32,
                        ffn_hidden=128, ssm_d_state=16, ssm_headdim=16, sliding_window=16, global_tokens=4)
    odin = preset("odinnext", **changes)
    if args.smoke:
        odin = replace(odin, vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=32, hgrn2_expand_ratio=32,
                       ffn_hidden=128)
    for name, cfg, seqs in (("helix_hybrid", helix, [2048, 8192, 32768]), ("odinnext", odin, [2048, 8192])):
        twin = replace(cfg, layout=None, mixer="attention", residual="plain", norm="rms", rope_layers="all")
        for seq in [64] if args.smoke else seqs:
            runs += [(name, replace(cfg, max_seq_len=seq), seq, "ours"),
                     (f"{name}: all-attention twin", replace(twin, max_seq_len=seq), seq, "ours")]
    for name in ("helios_nova", "helium_nano"):
        cfg = preset(name, **changes)
        if args.smoke:
            cfg = replace(cfg, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128)
        seq = 64 if args.smoke else cfg.max_seq_len  # each preset's own context: 2048 and 512
        runs.append((name, replace(cfg, max_seq_len=seq), seq, "ours"))
        if name == "helios_nova":
            runs.append((name, replace(cfg, max_seq_len=seq), seq, "hf+compile"))
    rows = []
    peak = peak_flops(device)
    for name, cfg, seq, impl in runs:
        if args.only and name.split(":")[0] not in args.only or args.seqs and seq not in args.seqs:
            continue
        batch = max(1, args.tokens // seq)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
        # each row compiles afresh, as a training run of one shape does: after another shape, dynamo would
        # compile the blocks for dynamic shapes (and CUDA graphs skip those)
        torch._dynamo.reset()
        if impl == "ours" and seq >= args.checkpoint_from:
            cfg = replace(cfg, activation_checkpointing=True)
        ours = CausalLM(cfg)
        if impl == "hf+compile":
            model = torch.compile(hf_twin(cfg).to(device))
        else:
            model = ours.to(device)
            if args.compile:
                model.compile_blocks(args.compile_mode)
        step = train_step_fn(model, ids, hf=impl == "hf+compile")
        graphs = impl == "ours" and args.compile and args.compile_mode in CUDA_GRAPH_MODES
        seconds, mem = timed(step, args.warmup, args.iters, device, peak_from_start=graphs)
        if args.profile:
            print_profile(step, f"{name} {impl} seq {seq}")
        tps = batch * seq / seconds
        if impl == "ours" and args.compile:
            impl += f" +compile({args.compile_mode or 'default'})"
        impl += " +ckpt" if cfg.activation_checkpointing else ""
        rows.append({"model": name, "impl": impl, "seq": seq, "batch": batch, "tokens_per_s": tps,
                     "mfu": tps * ours.flops_per_token(seq) / peak if peak else float("nan"), "peak_GiB": mem,
                     "MiB_per_token": mem * 1024 / (batch * seq)})
        progress(rows[-1])
        del model, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # ratios against the baseline of each comparison, from this run
    base = {(r["seq"], r["model"], r["impl"]): r["tokens_per_s"] for r in rows}
    for r in rows:
        if r["model"] in ("helix_hybrid", "odinnext"):
            baseline = (r["seq"], f"{r['model']}: all-attention twin", r["impl"])
        elif r["model"] == "helios_nova" and r["impl"] != "hf+compile":
            baseline = (r["seq"], "helios_nova", "hf+compile")
        else:
            continue
        if baseline in base:
            r["ratio"] = r["tokens_per_s"] / base[baseline]

    return rows


# --- pipeline -------------------------------------------------------------------------------------

def pipeline_rows(args, device: torch.device) -> list[dict]:
    """A model trained by `train.py` itself (helios_nova unless `--pipeline-model`): its ThroughputMonitor's
    tokens/s, MFU and data wait, averaged over the logged windows after the first (compilation), and its
    start-up time; then the compiled Hugging Face twin at the same batch and accumulation, in this process."""
    name = "tiny" if args.smoke else args.pipeline_model
    seq = 64 if args.smoke else 2048
    batch = max(1, args.tokens // seq)
    run_name = f"bench-pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"model={name}", f"data.seq_len={seq}", f"data.batch_size={batch}",
                 # never validates (the interval counts batches, so it is a multiple of the accumulation, as
                 # train.py requires); the warmup fits in a short run unless an override sets it
                 f"trainer.max_steps={args.pipeline_steps}", f"trainer.val_check_interval={100000 * args.accumulate}",
                 f"schedule.warmup_steps={args.pipeline_steps // 3}",
                 "trainer.log_every_n_steps=10", "callbacks.sample=null", "callbacks.periodic=null",
                 "callbacks.checkpoint.save_top_k=0", "callbacks.checkpoint.save_last=false", f"run_name={run_name}",
                 f"trainer.accumulate_grad_batches={args.accumulate}",
                 f"stage.compile={(args.compile_mode or 'true') if args.compile else 'false'}", *args.pipeline_overrides]
    if device.type == "cuda":
        overrides.append("trainer=gpu")
    root = Path(__file__).resolve().parents[1]
    print("  # python train.py " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, str(root / "train.py"), *overrides], cwd=root, check=True)
    with open(root / "outputs" / run_name / "csv" / "metrics.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    perf = [r for r in logged if r.get("perf/tokens_per_s")]
    warm = perf[1:] or perf

    def mean(key: str) -> float:
        values = [float(r[key]) for r in warm if r.get(key)]
        return sum(values) / len(values) if values else float("nan")

    startup = next((float(r["perf/startup_s"]) for r in logged if r.get("perf/startup_s")), float("nan"))
    compiled = f" +compile({args.compile_mode or 'default'})" if args.compile else ""
    batches = batch if args.accumulate == 1 else f"{batch}x{args.accumulate}"  # micro-batch x accumulation
    rows = [{"model": name, "impl": "train.py" + compiled, "seq": seq, "batch": batches,
             "tokens_per_s": mean("perf/tokens_per_s"), "mfu": mean("perf/mfu"), "data_wait": mean("perf/data_wait"),
             "startup_s": startup}]
    progress(rows[-1])
    cfg = preset(name, max_seq_len=seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    seconds, _ = timed(train_step_fn(torch.compile(hf_twin(cfg).to(device)), ids, hf=True, accumulate=args.accumulate),
                       args.warmup, args.iters, device)
    tps = args.accumulate * batch * seq / seconds
    peak = peak_flops(device)
    rows.append({"model": name, "impl": "hf+compile", "seq": seq, "batch": batches, "tokens_per_s": tps,
                 "mfu": tps * CausalLM(cfg).flops_per_token(seq) / peak if peak else float("nan")})
    progress(rows[-1])
    rows[0]["ratio"] = rows[0]["tokens_per_s"] / tps
    return rows


def print_profile(step: Callable[[], None], title: str, top: int = 25) -> None:
    """The GPU kernels of two steps: milliseconds per step by kind of kernel, then the `top` kernels."""
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    lines = kernel_summary(prof, steps, top)
    print(f"# profile: {title}: {lines[0]}")
    print("\n".join(lines[1:]))


def progress(row: dict) -> None:
    """Each row as soon as it is measured (the table comes at the end): a cut-off run keeps its numbers."""
    print("  # " + "  ".join(f"{k}={number(v) if isinstance(v, float) else v}" for k, v in row.items()), flush=True)


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [columns] + [[number(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
                         for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def model_setting(text: str) -> tuple[str, object]:
    """"ffn_hidden=1344" -> ("ffn_hidden", 1344): a ModelConfig field and its value, parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or key not in ModelConfig.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a model config field")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=["layers", "models", "pipeline"])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens // seq)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="layers: timed rounds, the candidates taking turns; the median is reported")
    parser.add_argument("--compile", action="store_true", help="torch.compile each of our blocks")
    parser.add_argument("--compile-mode", help="with --compile: a torch.compile mode (max-autotune-no-cudagraphs, ...), "
                        "or backbone (the blocks as one graph)")
    parser.add_argument("--profile", action="store_true", help="print each model's GPU time per step by kind of kernel, and the busiest kernels (CUDA)")
    parser.add_argument("--checkpoint-from", type=int, default=1 << 30, metavar="SEQ",
                        help="activation checkpointing for our models (and their twins) at this sequence length and up")
    parser.add_argument("--seqs", nargs="+", type=int, help="only these sequence lengths (models)")
    parser.add_argument("--set", nargs="+", type=model_setting, default=[], metavar="KEY=VALUE",
                        help="change the presets (models), e.g. ffn_hidden=1344")
    parser.add_argument("--pipeline-model", default="helios_nova")
    parser.add_argument("--pipeline-steps", type=int, default=60, help="optimizer steps of the train.py run")
    parser.add_argument("--accumulate", type=int, default=1, metavar="N",
                        help="pipeline: micro-batches per optimizer step, for train.py and the Hugging Face row alike "
                        "(helios_nova's recipe: 8 at batch 24)")
    parser.add_argument("--pipeline-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more overrides of the train.py run, e.g. data.num_workers=2")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU")
    parser.add_argument("--only", nargs="+", help="only these layers (gla, mamba2, ...) or models (helix_hybrid, ...)")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.warmup, args.iters = 128, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_tuned_configs()  # before the library layers import fla / mamba-ssm
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {time.strftime('%Y-%m-%d')}  {name}  torch {torch.__version__}  tokens/step {args.tokens}")
    for what in args.what:
        rows = {"layers": layer_rows, "models": model_rows, "pipeline": pipeline_rows}[what](args, device)
        print_table(rows)


if __name__ == "__main__":
    main()
