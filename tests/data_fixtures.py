"""Tiny synthetic data for the data-pipeline tests: documents, a 300-token tokenizer, shard directories."""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from slmlab.data.shards import Manifest, ShardWriter, Split, token_dtype
from slmlab.data.tokenizer import train_tokenizer

VOCAB = 300
WORDS = ["the", "package", "manager", "Grüße", "Straße", "über", "Äpfel", "naïve", "def", "return",
         "x**2", "{", "}", "=", "日本語", "😀", "ﬁle", "\n", "\t", "apt-get", "install", "Debian"]


def documents(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of 20 to 120 words (each ends in its own number)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(20, 120))) + f" doc{i}" for i in range(n)]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({key: t}) + "\n" for t in texts)
    return path


def write_shards(out_dir: Path, splits: dict[str, np.ndarray], *, vocab_size: int = VOCAB,
                 tokenizer_hash: str = "0" * 16, shard_tokens: int = 1000, val_fraction: float = 0.05) -> Manifest:
    """A shard directory holding the given token streams, as prepare would write it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, tokens in splits.items():
        writer = ShardWriter(out_dir, split, token_dtype(vocab_size), shard_tokens)
        writer.write(tokens)
        manifest_splits[split] = Split(writer.close(), tokens=len(tokens), documents=1, bytes=3 * len(tokens))
    manifest = Manifest(vocab_size=vocab_size, tokenizer_hash=tokenizer_hash, eos_id=0,
                        val_fraction=val_fraction, splits=manifest_splits)
    manifest.save(out_dir)
    return manifest


@pytest.fixture(scope="session", name="tokenizer_path")
def tokenizer_path_fixture(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of at most 300 tokens, trained on `documents(200)`."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(documents(200), VOCAB, path)
    return path
