"""Training-stream read throughput from memory-mapped token shards, in one process.

    python bench/dataloader.py                       # 200M synthetic tokens, batches of 32 x 2048
    python bench/dataloader.py --tokens 1e9 --batch-size 8 --seq-len 4096

Writes synthetic uint16 shards to a temporary directory (deleted afterwards), then times
`TrainBatches` through a `DataLoader(batch_size=None, num_workers=0)`: block lookup, shuffled
memmap reads, int64 conversion and the input/label split. The shards were just written, so they
are mostly in the page cache: this measures the read path, not the disk.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from slmlab.data.blocks import Blocks
from slmlab.data.mixture import Mixture
from slmlab.data.shards import Manifest, ShardWriter, Split, token_dtype
from slmlab.data.streams import TrainBatches

VOCAB = 32_000


def write_synthetic_shards(out_dir: Path, tokens: int, shard_tokens: int) -> Manifest:
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, "train", token_dtype(VOCAB), shard_tokens)
    for start in range(0, tokens, 10_000_000):
        writer.write(rng.integers(0, VOCAB, min(10_000_000, tokens - start), dtype=np.uint16))
    splits = {"train": Split(writer.close(), tokens=tokens), "val": Split()}
    manifest = Manifest(vocab_size=VOCAB, tokenizer_hash="synthetic", eos_id=0, val_fraction=0.01, splits=splits)
    manifest.save(out_dir)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--shard-tokens", type=float, default=50e6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = write_synthetic_shards(Path(tmp), int(args.tokens), int(args.shard_tokens))
        print(f"wrote {int(args.tokens):,} tokens in {len(manifest.splits['train'].shards)} shards "
              f"({time.perf_counter() - start:.1f} s)")
        blocks = Blocks(tmp, manifest, "train", args.seq_len)
        stream = TrainBatches([blocks], Mixture({"synthetic": 1.0}), args.batch_size, seed=0)
        batches = iter(DataLoader(stream, batch_size=None, num_workers=0))
        for _ in range(10):  # warm-up: the first pass's permutation, first page faults
            next(batches)
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < args.seconds:
            next(batches)
            count += 1
        tokens_per_s = count * args.batch_size * args.seq_len / elapsed
        print(f"{count:,} batches of {args.batch_size} x {args.seq_len} in {elapsed:.2f} s: "
              f"{tokens_per_s / 1e6:.1f}M tokens/s, {elapsed / count * 1e3:.3f} ms/batch")


if __name__ == "__main__":
    main()
