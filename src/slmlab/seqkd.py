"""Sequence-level distillation, step 1: a teacher answers the prompts of a chat dataset, and its
answers become a new chat dataset to fine-tune the student on (step 2: `stage=sft`).

    python -m slmlab.seqkd --teacher outputs/<teacher>/checkpoints/last.ckpt \\
        --tokenizer artifacts/tokenizers/de_en-v4096/tokenizer.json --out seqkd.jsonl
    python train.py stage=sft init_from=<student ckpt> data.conversations=seqkd.jsonl

Each conversation's turns before its first assistant turn are the prompt; sampling follows
OdinNext's recipe (temperature 0.7, top-p 0.9) and is seeded, so a rerun writes the same file.
"""

import argparse
import gzip
import json
from pathlib import Path

import torch

from slmlab import CORPUS_DIR
from slmlab.checkpoint import load_model
from slmlab.data.atomic import atomic_write
from slmlab.data.chat import IM_END, encode_chat, load_chat_tokenizer
from slmlab.models.generate import generate


def teacher_conversations(teacher: str, tokenizer_path: str, prompts: str, max_new_tokens: int = 128,
                          temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, limit: int | None = None) -> list[dict]:
    """One conversation per prompt: its prompt turns plus the teacher's answer."""
    model = load_model(teacher)
    tokenizer, template = load_chat_tokenizer(tokenizer_path)
    end_of_turn = tokenizer.token_to_id(IM_END)
    generator = torch.Generator().manual_seed(seed)
    opener = gzip.open if prompts.endswith(".gz") else open
    out, skipped = [], 0
    with opener(prompts, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            first_answer = next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), len(row["messages"]))
            turns = row["messages"][:first_answer]
            if not turns:
                continue
            ids, _ = encode_chat(tokenizer, turns, template, add_generation_prompt=True)
            if len(ids) + max_new_tokens > model.cfg.max_seq_len:
                skipped += 1  # the answer would not fit the student's context either
                continue
            seq = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=end_of_turn, generator=generator)[0, len(ids):].tolist()
            answer = tokenizer.decode([t for t in seq if t != end_of_turn]).strip()
            out.append({"id": row.get("id", len(out)), "messages": turns + [{"role": "assistant", "content": answer}]})
            if limit is not None and len(out) >= limit:
                break
    if skipped:
        print(f"skipped {skipped} prompts longer than max_seq_len={model.cfg.max_seq_len} - {max_new_tokens} new tokens")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (.ckpt)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json shared by teacher and student")
    parser.add_argument("--prompts", default=str(CORPUS_DIR / "chat.jsonl.gz"), help="chat jsonl[.gz] whose prompts to answer")
    parser.add_argument("--out", required=True, help="conversations jsonl to write")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many prompts")
    args = parser.parse_args()
    rows = teacher_conversations(args.teacher, args.tokenizer, args.prompts, args.max_new_tokens, args.temperature,
                                 args.top_p, args.seed, args.limit)
    with atomic_write(Path(args.out)) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"{args.out}: {len(rows)} teacher conversations")


if __name__ == "__main__":
    main()
