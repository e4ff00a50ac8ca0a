"""Peak memory of DPO/GRPO per-token log-probs, forward + backward: from the full logits vs chunked.

    python bench/logprobs_memory.py                      # batch 8 x 1024 tokens, d 256, vocab 50,000, CPU float32
    python bench/logprobs_memory.py --vocab 150000 --chunks 512 2048

Each variant runs in a fresh process and reports its peak resident-memory growth (CPU) or the peak
CUDA allocation (with --cuda).
"""

import argparse
import resource
import subprocess
import sys

import torch

from slmlab.training.losses import chunked_token_logprobs, token_logprobs


def measure(args: argparse.Namespace, chunk: int) -> float:
    """GiB of peak memory growth for one fwd+bwd; chunk 0 = full logits."""
    device = "cuda" if args.cuda else "cpu"
    torch.manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.d_model, device=device, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model, device=device) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    base = torch.cuda.memory_allocated() if args.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if chunk:
        out = chunked_token_logprobs(hidden, weight, labels, chunk_tokens=chunk)
    else:
        out = token_logprobs(hidden @ weight.T, labels)
    out.sum().backward()
    peak = torch.cuda.max_memory_allocated() if args.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process measuring one variant
    args = parser.parse_args()
    if args.one is not None:
        print(measure(args, args.one))
        return
    print(f"batch {args.batch} x {args.seq} tokens, d_model {args.d_model}, vocab {args.vocab:,}")
    for chunk in [0, *args.chunks]:
        child = subprocess.run([sys.executable, *sys.argv, "--one", str(chunk)], capture_output=True, text=True, check=True)
        name = "full logits" if chunk == 0 else f"chunked, {chunk} tokens"
        print(f"  {name:<24} {float(child.stdout):6.2f} GiB")


if __name__ == "__main__":
    main()
