"""Batched decoding speed and memory: our cached generation vs Hugging Face `generate` on the same
weights (an exported dense model), GRPO-style rollouts of prompts of different lengths decoded together
or one prompt at a time, and the decoding state of every mixer against context length.

    python bench/generate.py                     # helios_nova shape, batch 32, 128-token prompts, 256 new
    python bench/generate.py --mixers attention --contexts 1024 8192   # a part of the decoding-state table
    python bench/generate.py --smoke             # tiny shapes on the CPU: checks the script runs

Greedy, bf16 weights on CUDA; tokens/s counts generated tokens of the whole batch. On CUDA our decoding
replays a CUDA graph per step (`models/decode_graph.py`); the "no CUDA graph" row is the same code eager.
"""

import argparse
import time
from dataclasses import replace

import torch
from hydra.utils import instantiate

from slmlab.config import compose_config
from slmlab.export.hf import hf_twin, to_hf_state_dict
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.decode_graph import release_decoders
from slmlab.models.generate import decode, generate, generate_prompts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(fn, new_tokens: int, batch: int, device: torch.device) -> float:
    fn()  # warm-up: kernels, caches, compilation
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return batch * new_tokens / (time.perf_counter() - start)


def decode_after(model: CausalLM, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Tokens/s of greedy decoding alone (the prompt's prefill is not timed), and the GPU memory the
    decoding steps peaked at beyond the weights (GiB; nan on the CPU)."""
    tokens = decode(model, prompt, new_tokens + 1, temperature=0)
    next(tokens)  # the prefill's token
    synchronize(prompt.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if prompt.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in tokens:
        pass
    synchronize(prompt.device)
    rate = prompt.shape[0] * new_tokens / (time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - weights) / 2**30 if prompt.is_cuda else float("nan")
    return rate, peak


def state_bytes(model: CausalLM, context: int) -> int:
    """Memory of the decoding state for one sequence of `context` tokens (KV cache or recurrent state)."""
    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        return sum(size(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0

    return sum(size(s) for s in model.init_state(1, context))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="helios_nova")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt of the rollout rows")
    parser.add_argument("--mixers", nargs="+", default=["attention", "gla", "hgrn2", "mamba2"],
                        help="mixers of the decoding-state table (each at the model's shape, every layer that mixer)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768])
    parser.add_argument("--state-batch", type=int, default=8, help="batch of the decoding-state table")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.batch % args.group:  # the rollout rows decode batch // group prompts, group samples each
        parser.error(f"--batch {args.batch} is not a multiple of --group {args.group}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg: ModelConfig = instantiate(compose_config([f"model={args.model}"]).model)
    if args.smoke:
        cfg = replace(cfg, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=128)
        args.batch, args.prompt, args.new, args.state_batch, args.group = 4, 16, 64, 2, 2
    cfg = replace(cfg, max_seq_len=args.prompt + args.new)
    torch.manual_seed(0)
    ours = CausalLM(cfg).to(device, dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    rows = {"slmlab generate": decode_rate(lambda: generate(ours, prompt, args.new, temperature=0), args.new,
                                           args.batch, device)}
    if device.type == "cuda":
        rows["slmlab, no CUDA graph"] = decode_rate(
            lambda: generate(ours, prompt, args.new, temperature=0, cuda_graph=False), args.new, args.batch, device)
    hf = None
    try:
        hf = hf_twin(cfg).to(device, dtype).eval()
        hf.load_state_dict(to_hf_state_dict(ours), strict=False)
        run = lambda: hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)  # noqa: E731
        rows["transformers generate"] = decode_rate(run, args.new, args.batch, device)
    except ImportError:
        pass
    # GRPO's rollouts: batch / group prompts of different lengths, `group` samples each, decoded as one
    # batch (`generate_prompts`) or one prompt at a time; every row runs to `new` tokens
    lengths = torch.linspace(args.prompt // 2, args.prompt, args.batch // args.group).long().tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lengths]
    rollout = lambda group: generate_prompts(ours, group, args.new, stop_id=-1, n=args.group, temperature=0)  # noqa: E731
    rows[f"rollouts, {len(prompts)} prompts together"] = decode_rate(lambda: rollout(prompts), args.new,
                                                                        args.batch, device)
    rows[f"rollouts, {len(prompts)} one by one"] = decode_rate(lambda: [rollout([p]) for p in prompts], args.new,
                                                                  args.batch, device)
    base = rows.get("transformers generate")
    print(f"# {cfg.d_model}d x {cfg.n_layers}L  batch {args.batch}  prompt {args.prompt}  new {args.new}  {device.type}")
    for name, rate in rows.items():
        print(f"{name:>30}  {rate:12,.0f} tokens/s" + (f"  {rate / base:.2f}x" if base else ""))
    release_decoders(ours)
    del ours, hf  # the state table's memory column: only the model it decodes with
    if device.type == "cuda":
        torch.cuda.empty_cache()
    contexts = (256, 1024, 4096) if args.smoke else tuple(args.contexts)
    print("# per context length: decoding state per sequence (MiB) | decode tokens/s after a prompt of that many "
          f"tokens | GPU memory of the decoding steps beyond the weights (GiB), batch {args.state_batch}")
    for mixer in args.mixers:
        shape = replace(cfg, mixer=mixer, layout=None, hgrn2_expand_ratio=cfg.head_dim)
        sizes = [state_bytes(CausalLM(shape).to("meta", dtype), n) / 2**20 for n in contexts]  # the dtype it decodes in
        # + 1: decode_after's prefill token, so that the largest context times `new` steps too
        model = CausalLM(replace(shape, max_seq_len=max(contexts) + args.new + 1)).to(device, dtype).eval()
        cells = []
        for n, size in zip(contexts, sizes):
            prompt = torch.randint(0, cfg.vocab_size, (args.state_batch, n), device=device)
            runs = [decode_after(model, prompt, args.new) for _ in range(3)]  # best of three: the least disturbed
            rate, peak = max(r for r, _ in runs), max(m for _, m in runs)
            release_decoders(model)  # the next context's memory without this one's state and graph
            cells.append(f"{n:>6}: {size:8.2f} MiB {rate:9,.0f}/s {peak:6.2f} GiB")
        print(f"{mixer:>22}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
