"""Sequence-level distillation, step 1: a teacher answers the prompts of a chat dataset, and its
answers become a new chat dataset to fine-tune the student on (step 2: `stage=sft`).

    python -m slmlab.seqkd --teacher outputs/<teacher>/checkpoints/last.ckpt \\
        --tokenizer artifacts/tokenizers/de_en-v4096/tokenizer.json --out seqkd.jsonl
    python train.py stage=sft init_from=<student ckpt> data.conversations=seqkd.jsonl

Each conversation's turns before its first assistant turn are the prompt; sampling follows
OdinNext's recipe (temperature 0.7, top-p 0.9) and is seeded, so a rerun writes the same file.
Answers the teacher did not finish (no end of turn within `--max-new-tokens` or its context) are
skipped and counted: written as a closed turn, they would teach the student to stop mid-sentence
(`--keep-unfinished` writes them anyway); so are empty answers, which would teach it to say nothing.
A written row keeps every field of its source row (`id`, `section`, ...), so the SFT data config
splits it as it splits the source. Rows of that config's validation split (`--data`: its `split_key`
and `val_fraction`) are not answered: they are copied as they are, so the student is validated on the
same held-out conversations, with their reference answers, as after plain SFT.
"""

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import HydraException
from hydra.utils import get_object

from datamodules.chat import ChatDataModule
from slmlab import CORPUS_DIR
from slmlab.checkpoint import load_model
from slmlab.config import compose_config
from slmlab.data.atomic import atomic_write
from slmlab.data.chat import IM_END, check_messages, encode_chat, load_chat_tokenizer
from slmlab.data.errors import DataError
from slmlab.data.records import is_val_record, read_jsonl, record_name
from slmlab.models.generate import generate


def teacher_conversations(teacher: str, tokenizer_path: str, prompts: str, max_new_tokens: int | None = None,
                          temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, limit: int | None = None,
                          split_key: str | None = None, val_fraction: float = 0.0,
                          keep_unfinished: bool = False) -> list[dict]:
    """One conversation per prompt: its source row with the prompt turns plus the teacher's answer.

    An answer has at most `max_new_tokens` tokens (None: no limit) and always ends within the
    teacher's max_seq_len, so that it fits the student's context; prompts that fill it are skipped, and
    so are answers without an end of turn, unless `keep_unfinished`.
    With `split_key`, held-out rows (`is_val_record`) are copied unanswered, and do not count
    towards `limit`. DataError if no prompt is answered.
    """
    model = load_model(teacher)
    context = model.cfg.max_seq_len
    tokenizer, template = load_chat_tokenizer(tokenizer_path)
    end_of_turn = tokenizer.token_to_id(IM_END)
    generator = torch.Generator().manual_seed(seed)
    out, answered, held_out, too_long, unfinished, empty = [], 0, 0, 0, 0, 0
    for where, row in read_jsonl(prompts):
        if split_key is not None and is_val_record(row, split_key, val_fraction, where):
            out.append(row)
            held_out += 1
            continue
        if limit is not None and answered >= limit:
            if split_key is None:
                break
            continue  # read on for the held-out rows
        check_messages(row.get("messages"), record_name(row, where))  # a bad row is named by file and line
        first_answer = next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), len(row["messages"]))
        turns = row["messages"][:first_answer]
        if not turns:
            continue
        ids, _ = encode_chat(tokenizer, turns, template, add_generation_prompt=True)
        if len(ids) >= context:
            too_long += 1
            continue
        # generate() stops at the end of the context: the answer never needs cutting for the student
        budget = context if max_new_tokens is None else max_new_tokens
        seq = generate(model, torch.tensor([ids]), budget, temperature=temperature, top_p=top_p, stop_ids=end_of_turn,
                       generator=generator)[0, len(ids):].tolist()
        if end_of_turn not in seq and not keep_unfinished:
            unfinished += 1
            continue
        answer = tokenizer.decode([t for t in seq if t != end_of_turn]).strip()
        if not answer:
            empty += 1
            continue
        out.append({"id": len(out), **row, "messages": turns + [{"role": "assistant", "content": answer}]})
        answered += 1
    summary = (f"{too_long} prompts fill the teacher's max_seq_len={context}; {unfinished} answers unfinished "
               f"(skipped; --keep-unfinished keeps them); {empty} answers empty (skipped); {held_out} held out "
               f"(split_key={split_key!r}, val_fraction={val_fraction})")
    if not answered:
        raise DataError(f"{prompts}: no prompt answered: {summary}")
    print(f"{answered} prompts answered; {summary}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slmlab.seqkd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (.ckpt)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json shared by teacher and student")
    parser.add_argument("--prompts", default=str(CORPUS_DIR / "chat.jsonl.gz"), help="chat jsonl[.gz] whose prompts to answer")
    parser.add_argument("--out", required=True, help="conversations jsonl to write")
    parser.add_argument("--data", default="chat_embedded",
                        help="the SFT data config (conf/data/<name>.yaml) the output is for: the rows of its "
                             "validation split are copied unanswered (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest answer in tokens (default: none); an answer also ends at the teacher's "
                             "max_seq_len, prompt included, and prompts that fill it are skipped")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="answer at most this many prompts")
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="also write answers cut by --max-new-tokens or the context, as closed turns")
    args = parser.parse_args(argv)
    try:
        data = compose_config([f"data={args.data}"]).data
        if not issubclass(get_object(data._target_), ChatDataModule):  # its split is the one the output keeps
            raise DataError(f"--data {args.data} configures a {data._target_}, not SFT data: name the chat data "
                            "config the output is for (a ChatDataModule, e.g. --data chat_embedded)")
        defaults = inspect.signature(ChatDataModule).parameters  # of the keys a config leaves out
        split_key, val_fraction = (data.get(key, defaults[key].default) for key in ("split_key", "val_fraction"))
        rows = teacher_conversations(args.teacher, args.tokenizer, args.prompts, args.max_new_tokens,
                                     args.temperature, args.top_p, args.seed, args.limit, split_key, val_fraction,
                                     args.keep_unfinished)
    except (DataError, HydraException) as e:  # no file written, and a failing status stops a pipeline
        sys.exit(f"error: {e}")
    with atomic_write(Path(args.out)) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"{args.out}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
