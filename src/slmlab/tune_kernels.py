"""Autotune the Triton kernels of the presets' recurrent mixers on this GPU and save the results
where slmlab ships them (`ops/kernel_configs/<GPU model>/`, see `ops/autotune_cache.py`).

    python -m slmlab.tune_kernels                                  # helix_hybrid and odinnext, seq 2048
    python -m slmlab.tune_kernels --models odinnext --jobs 1       # one preset; sequential, cleanest timings
    python -m slmlab.tune_kernels --mixers mamba2                   # one mixer; the others' results are kept
    python -m slmlab.tune_kernels --out /tmp/configs                # somewhere else than the package
    python -m slmlab.tune_kernels --models --quack-mlp helios_nova  # only quack's MLP GEMMs, 32,768 tokens

For each distinct Triton-backed mixer of the presets (gla, hgrn2, mamba2): one layer of the preset's
shape runs forward + backward under bf16 autocast at `--seq-len`, then a prefill and one decoding step,
in a Triton cache of its own, so every kernel on the training and generation paths autotunes from
scratch. When every mixer of TUNED_MIXERS was tuned, the winners replace that GPU's folder; otherwise
(`--mixers`, or presets without some of them) they only replace the results of the same kernel and
tuning key, and the other mixers' results are kept. The winners are also copied into this machine's
Triton cache; the winners of kernels with pre_hooks, which Triton does not write, go into the folder's
`prehook_configs.json` (see `ops/autotune_cache.py`).
Attention mixers use flash SDPA / FlexAttention (compiled by torch, cached by inductor): nothing to tune.
`--quack-mlp` tunes quack's GEMMs of those presets' SwiGLU MLP (`mlp_kernel=quack`) at each of `--quack-tokens`
tokens of `--seq-len` (each batch x seq is its own shape) and replaces the folder's `quack/` results.
With `--jobs` > 1 the mixers tune in parallel processes on the one GPU: several times faster, but
each candidate is timed while the others run, so the choice between close configs is noisier.
"""

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from slmlab.ops.autotune_cache import (PATTERN, PREHOOK_FILE, QUACK_FOLDER, SHIPPED, copy_autotune_results,
                                       gpu_dirname, merge_prehook_winners, prehook_winners, quack_cache_dir,
                                       triton_cache_dir)

TUNED_MIXERS = ("gla", "hgrn2", "mamba2")  # the mixers that run fla / mamba-ssm Triton kernels


def tuning_jobs(models: list[str], seq_len: int, tokens: int,
                mixers: tuple[str, ...] = TUNED_MIXERS) -> list[tuple[str, str, int, int]]:
    """(preset, mixer, batch, seq_len) per distinct Triton-backed mixer of `models` among `mixers`,
    first preset wins."""
    from hydra.utils import instantiate

    from slmlab.config import compose_config

    jobs, seen = [], set()
    for name in models:
        cfg = instantiate(compose_config([f"model={name}"]).model)
        for mixer in dict.fromkeys(cfg.layer_mixers):
            if mixer in mixers and mixer not in seen:
                seen.add(mixer)
                jobs.append((name, mixer, max(1, tokens // seq_len), seq_len))
    return jobs


def replaces_folder(jobs: list[tuple[str, str, int, int]]) -> bool:
    """Whether the new results replace the GPU's whole folder: only when `jobs` tune every mixer of
    TUNED_MIXERS. A result file is not attributable to a mixer (Triton names it by a hash of the kernel
    source and tuning key, and HGRN2 runs GLA's kernels), so a partial run cannot remove just
    its mixers' old files; its new ones overwrite those of the same kernel and key."""
    return {mixer for _, mixer, _, _ in jobs} == set(TUNED_MIXERS)


def remove_triton_results(folder: Path) -> None:
    """Empties a GPU's folder of its Triton results (and pre_hook winners) before a full tuning run
    writes new ones; quack's results, tuned by their own option, stay."""
    (folder / PREHOOK_FILE).unlink(missing_ok=True)
    for path in folder.glob("*/"):
        if path.name != QUACK_FOLDER:
            shutil.rmtree(path)


def tune_quack_mlp(name: str, batch: int, seq_len: int) -> float:
    """Runs the preset's SwiGLU MLP through quack's GEMMs forward + backward once under bf16 autocast,
    autotuning each GEMM at this shape; returns the seconds it took."""
    import torch
    from hydra.utils import instantiate

    from slmlab.config import compose_config
    from slmlab.models.layers import SwiGLU

    start = time.perf_counter()
    cfg = instantiate(compose_config([f"model={name}"]).model)
    mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden, "quack").cuda()
    x = torch.randn(batch, seq_len, cfg.d_model, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mlp(x)
    y.float().square().mean().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_job(job: tuple[str, str, int, int]) -> tuple[str, str, float, list[dict]]:
    """Runs one mixer's training and decoding kernels once (autotuning them); returns (preset, mixer,
    seconds, the winners of its pre_hook kernels)."""
    import torch
    from hydra.utils import instantiate

    from slmlab import mixers
    from slmlab.config import compose_config

    name, kind, batch, seq_len = job
    start = time.perf_counter()
    cfg = replace(instantiate(compose_config([f"model={name}"]).model), kernel="auto")
    layer_idx = cfg.layer_mixers.index(kind)
    layer = mixers.mixer_class(kind)(cfg, layer_idx).cuda()
    x = torch.randn(batch, seq_len, cfg.d_model, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for prompt in (64, seq_len):  # <= 64 steps: fused recurrent kernels; longer: chunked with a state
            state = layer.init_state(batch, prompt + 1, x.device, torch.bfloat16)
            layer(x[:, :prompt].detach(), state)
            layer(x[:, prompt - 1 : prompt].detach(), state)
    torch.cuda.synchronize()
    return name, kind, time.perf_counter() - start, prehook_winners()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["helix_hybrid", "odinnext"],
                        help="presets whose recurrent mixers' Triton kernels tune (none: only --quack-mlp)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per tuning batch (batch = tokens // seq-len)")
    parser.add_argument("--mixers", nargs="+", choices=TUNED_MIXERS, default=list(TUNED_MIXERS),
                        help="only these mixers; the GPU folder keeps the others' results")
    parser.add_argument("--jobs", type=int, default=1, help="mixers tuned in parallel processes")
    parser.add_argument("--out", type=Path, default=SHIPPED, help="folder of per-GPU config folders")
    parser.add_argument("--quack-mlp", nargs="*", default=[], metavar="PRESET",
                        help="also tune quack's GEMMs of these presets' MLP (package quack-kernels)")
    parser.add_argument("--quack-tokens", type=int, nargs="+", default=[32768],
                        help="tokens per batch the quack GEMMs are tuned at, each its own shape (batch = tokens // "
                        "seq-len), e.g. 32768 49152 for batch 16 and helios_nova's recipe's micro-batch of 24")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA GPU")
    user_cache, user_quack_cache = triton_cache_dir(), quack_cache_dir()
    scratch, quack_scratch = (Path(tempfile.mkdtemp(prefix=f"slmlab-tune-{what}-")) for what in ("triton", "quack"))
    # set before any kernel package loads (here and in the spawned workers, which inherit them); no shipped
    # result is seeded (SLMLAB_TUNED_CONFIGS=0), so every kernel tunes from scratch
    os.environ.update(TRITON_CACHE_DIR=str(scratch), TRITON_CACHE_AUTOTUNING="1", SLMLAB_TUNED_CONFIGS="0",
                      QUACK_CACHE_DIR=str(quack_scratch), QUACK_CACHE_AUTOTUNING="1")
    dest = args.out / gpu_dirname(torch.cuda.get_device_name())
    jobs = tuning_jobs(args.models, args.seq_len, args.tokens, tuple(args.mixers))
    start = time.perf_counter()
    if jobs:
        print(f"tuning {', '.join(f'{m} ({p})' for p, m, _, _ in jobs)} at seq {args.seq_len} in {args.jobs} "
              "process(es)", flush=True)
        prehook = []
        with multiprocessing.get_context("spawn").Pool(max(1, min(args.jobs, len(jobs)))) as pool:
            for name, kind, seconds, winners in pool.imap_unordered(run_job, jobs):
                print(f"  {kind:<7} ({name}): {seconds:6.1f} s", flush=True)
                prehook += winners
        if replaces_folder(jobs) and dest.is_dir():
            remove_triton_results(dest)
        written = copy_autotune_results(scratch, dest, overwrite=True)
        held = merge_prehook_winners(dest / PREHOOK_FILE, prehook)
        copy_autotune_results(scratch, user_cache, overwrite=True)
        kernels = sorted({p.name.removesuffix(".autotune.json") for p in dest.glob(PATTERN)})
        print(f"{len(written)} autotune results for {len(kernels)} kernels in {time.perf_counter() - start:.0f} s -> "
              f"{dest}; {len(prehook)} pre_hook kernel results ({held} in {PREHOOK_FILE})")
        print("  " + ", ".join(kernels))
    if args.quack_mlp:
        for name in args.quack_mlp:
            for batch in sorted({max(1, tokens // args.seq_len) for tokens in args.quack_tokens}):
                seconds = tune_quack_mlp(name, batch, args.seq_len)
                print(f"  quack MLP ({name}, batch {batch} x {args.seq_len}): {seconds:6.1f} s", flush=True)
        shutil.rmtree(dest / QUACK_FOLDER, ignore_errors=True)
        written = copy_autotune_results(quack_scratch, dest / QUACK_FOLDER, overwrite=True)
        copy_autotune_results(quack_scratch, user_quack_cache, overwrite=True)
        print(f"{len(written)} quack autotune results -> {dest / QUACK_FOLDER}")
    for folder in (scratch, quack_scratch):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
