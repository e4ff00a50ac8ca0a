"""Where a preset's start-up goes on a GPU: each phase of what `train.py` does before its first
optimizer step, timed in order in one process (run it on empty Triton and inductor caches to see a
fresh machine: `TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/startup.py`).

    python bench/startup.py                        # helix_hybrid at seq 2048
    python bench/startup.py --model odinnext

Phases: imports (torch, Lightning, the kernel packages with the shipped tuned configs seeded), building
the model on the CPU and moving it, building it on the GPU directly (what `train.py` does through
`trainer.init_module()`), then the first forward and forward+backward of one layer of each distinct
mixer at the training shape (Triton compiling, and autotuning where no shipped result applies;
FlexAttention compiling), then two whole-model steps (the loss's compiled softmax gradient).
"""

import argparse
import importlib
import time

START = time.perf_counter()


def stamp(what: str) -> None:
    print(f"{time.perf_counter() - START:7.1f} s  {what}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="helix_hybrid")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    import torch

    stamp("import torch")
    importlib.import_module("lightning")  # what train.py imports first
    stamp("import lightning")
    from slmlab.ops.backend import kernel_available

    for package in ("fla", "mamba_ssm"):
        kernel_available(package)
    stamp("import fla, mamba_ssm (tuned configs seeded)")
    from dataclasses import replace

    from hydra.utils import instantiate

    from slmlab.config import compose_config
    from slmlab.models import CausalLM

    cfg = replace(instantiate(compose_config([f"model={args.model}"]).model), max_seq_len=args.seq_len)
    model = CausalLM(cfg)
    stamp("build the model on the CPU")
    model.cuda()
    torch.cuda.synchronize()
    stamp("move it to the GPU")
    with torch.device("cuda"):
        CausalLM(cfg)
    torch.cuda.synchronize()
    stamp("build it on the GPU directly")

    for kind in dict.fromkeys(cfg.layer_mixers):
        x = torch.randn(1, args.seq_len, cfg.d_model, device="cuda", requires_grad=True)
        block = model.blocks[cfg.layer_mixers.index(kind)]
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        torch.cuda.synchronize()
        forward = time.perf_counter() - start
        y.float().sum().backward()
        torch.cuda.synchronize()
        stamp(f"{kind} block: first forward {forward:.1f} s, forward+backward {time.perf_counter() - start:.1f} s")

    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len + 1), device="cuda")
    for i in range(2):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
        stamp(f"whole-model step {i + 1}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
