"""Tokenizer throughput on the embedded corpus, in MB of UTF-8 text per second.

    python bench/tokenizer.py                   # vocab 4096, the corpus repeated 4 times, 1 and all cores
    python bench/tokenizer.py --vocab-size 16000 --num-proc 1 2 8

Reports `encode_batch_fast` alone (one thread, then the library's own thread pool), and the whole
`prepare_shards` step (read JSON lines, split by hash, tokenize, write shards) with 1 and N processes.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slmlab import CORPUS_DIR
from slmlab.data.prepare import prepare_shards
from slmlab.data.readers import DocumentReader
from slmlab.data.tokenizer import load_tokenizer, train_tokenizer

_ENCODE = """
import sys, time, json
from slmlab.data.tokenizer import load_tokenizer
tokenizer, texts = load_tokenizer(sys.argv[1]), json.load(open(sys.argv[2]))
start = time.perf_counter()
tokenizer.encode_batch_fast(texts)
print(time.perf_counter() - start)
"""


def corpus_texts() -> list[str]:
    return [json.loads(line)["text"] for lang in ("en", "de")
            for line in gzip.open(CORPUS_DIR / f"debian_reference.{lang}.jsonl.gz", "rt", encoding="utf-8")]


def encode_seconds(tokenizer_path: Path, texts_path: Path, parallel: bool) -> float:
    """encode_batch_fast in a fresh process: the library reads TOKENIZERS_PARALLELISM once per process."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": str(parallel).lower()}
    out = subprocess.run([sys.executable, "-c", _ENCODE, str(tokenizer_path), str(texts_path)],
                         env=env, check=True, capture_output=True, text=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus to encode")
    parser.add_argument("--num-proc", type=int, nargs="+", default=sorted({1, os.cpu_count()}))
    args = parser.parse_args()

    texts = corpus_texts()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        train_tokenizer(texts, args.vocab_size, tmp / "tokenizer.json")
        vocab = load_tokenizer(tmp / "tokenizer.json").get_vocab_size()
        print(f"trained a {vocab}-token tokenizer on {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB "
              f"in {time.perf_counter() - start:.2f} s")

        texts = texts * args.repeat
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        (tmp / "texts.json").write_text(json.dumps(texts))
        for parallel in (False, True):
            seconds = encode_seconds(tmp / "tokenizer.json", tmp / "texts.json", parallel)
            print(f"encode_batch_fast, {'library thread pool' if parallel else 'one thread'}: "
                  f"{megabytes / seconds:.2f} MB/s")

        with open(tmp / "docs.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        for num_proc in args.num_proc:
            start = time.perf_counter()
            prepare_shards(DocumentReader(str(tmp / "docs.jsonl")), tmp / f"shards{num_proc}", tmp / "tokenizer.json",
                           val_fraction=0.05, num_proc=num_proc)
            seconds = time.perf_counter() - start
            print(f"prepare_shards, num_proc={num_proc}: {megabytes / seconds:.2f} MB/s "
                  f"({megabytes:.1f} MB in {seconds:.2f} s, process start-up included)")


if __name__ == "__main__":
    main()
