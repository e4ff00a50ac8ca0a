"""Training-step throughput of a model preset on synthetic tokens (no data loading, no Lightning).

    python bench/train_step.py                       # tiny preset, the CPU default
    python bench/train_step.py model=helios_nova data.batch_size=8 --steps 20
    python bench/train_step.py model=helios_nova data.batch_size=8 optim=muon   # the optimizer's share
    python bench/train_step.py model=helios_nova data.batch_size=16 --compile --documents 256  # document masks

Prints tokens/s and, on CUDA, MFU from the model's own FLOPs per token and the optimizer step's time.
The end-to-end number including the loader and Lightning is `perf/tokens_per_s` in any run's metrics.
"""

import argparse
import time

import torch
from hydra.utils import instantiate

from slmlab.config import compose_config
from slmlab.models import CausalLM
from slmlab.training.batching import positions_from_starts
from slmlab.training.callbacks import peak_flops
from slmlab.training.losses import lm_loss
from slmlab.training.optim import param_groups_for


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss", choices=["chunked", "full"], default="chunked",
                        help="chunked: CausalLM.loss (what training runs); full: cross-entropy of the whole logits")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (stage.compile=true)")
    parser.add_argument("--compile-mode", help="with --compile: a torch.compile mode, or backbone (the blocks as one graph)")
    parser.add_argument("--documents", type=int, metavar="MEAN",
                        help="packed rows of documents of random lengths, MEAN tokens on average, under document "
                             "masks (MFU counts attention within the documents)")
    parser.add_argument("--per-step", action="store_true",
                        help="also print each measured step's time on the GPU (CUDA events) and on the host "
                             "(launching it): a host time as long as the GPU's means the GPU waits for launches")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CausalLM(instantiate(cfg.model)).to(device)
    if args.compile:
        model.compile_blocks(args.compile_mode)
    optimizer = instantiate(cfg.optim)  # the configured one: optim=muon measures Muon
    optimizer = optimizer(param_groups_for(optimizer, model))
    optimizer_ms = []  # (start, end) CUDA events around each measured optimizer step
    batch, seq = cfg.data.batch_size, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)
    positions = None
    if args.documents:  # a document starts at each step with probability 1 / MEAN
        starts = torch.rand(batch, seq, generator=torch.Generator().manual_seed(0)) < 1 / args.documents
        starts[:, 0] = True
        positions = positions_from_starts(starts).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    step_marks = []  # (host time, CUDA event) at the start of each measured step, and after the last
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        if step >= args.warmup and args.per_step and device.type == "cuda":
            step_marks.append((time.perf_counter(), torch.cuda.Event(enable_timing=True)))
            step_marks[-1][1].record()
        with autocast:
            if args.loss == "chunked":
                loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:], positions=positions)
            else:
                loss, _ = lm_loss(model(tokens[:, :-1], positions=positions), tokens[:, 1:])
        loss.backward()
        if device.type == "cuda" and step >= args.warmup:
            optimizer_ms.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            optimizer_ms[-1][0].record()
        optimizer.step()
        if optimizer_ms and step >= args.warmup:
            optimizer_ms[-1][1].record()
        optimizer.zero_grad(set_to_none=True)
    if step_marks:
        step_marks.append((time.perf_counter(), torch.cuda.Event(enable_timing=True)))
        step_marks[-1][1].record()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tps = args.steps * batch * seq / (time.perf_counter() - start)
    line = f"loss={args.loss}{' documents=' + str(args.documents) if args.documents else ''} model={cfg.model.d_model}d x {cfg.model.n_layers}L ({model.num_params() / 1e6:.1f}M) batch={batch} seq={seq} " \
           f"device={device.type} threads={torch.get_num_threads()}: {tps:,.0f} tokens/s"
    peak = peak_flops(device)
    if peak:
        line += f", MFU {tps * float(model.flops_per_token(seq, positions=positions)) / peak:.1%}"
    if optimizer_ms:
        ms = sum(start.elapsed_time(end) for start, end in optimizer_ms) / len(optimizer_ms)
        line += f"; {type(optimizer).__name__} step {ms:.2f} ms"
    print(line)
    if step_marks:
        pairs = list(zip(step_marks, step_marks[1:]))
        print("per step, ms on the GPU:", " ".join(f"{a[1].elapsed_time(b[1]):.1f}" for a, b in pairs))
        print("per step, ms launching on the host:", " ".join(f"{(b[0] - a[0]) * 1e3:.1f}" for a, b in pairs))


if __name__ == "__main__":
    main()
