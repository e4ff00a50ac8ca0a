"""Sequence-level distillation, step 1: a teacher answers the prompts of a chat dataset, and its
answers become a new chat dataset to fine-tune the student on (step 2: `stage=sft`).

    python -m slmlab.seqkd --teacher outputs/<teacher>/checkpoints/last.ckpt \\
        --tokenizer artifacts/tokenizers/de_en-v4096/tokenizer.json --out seqkd.jsonl --device cuda
    python train.py stage=sft init_from=<student ckpt> data.conversations=seqkd.jsonl

Each conversation's turns before its first assistant turn are the prompt; sampling follows
OdinNext's recipe (temperature 0.7, top-p 0.9) and is seeded, so a rerun writes the same file.
The teacher answers `--batch-size` prompts together on `--device` (the CPU unless named), in file order (`generate_prompts`: those of near
lengths decode as one batch). The rows of a batch sample from the one seeded generator, so the answers
depend on the batch size: `--batch-size 1` answers one prompt at a time, with the answers of earlier
versions of this script. `--limit` writes the first answers of the run without it.
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
import itertools
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
from slmlab.export.load import to_device
from slmlab.models.generate import generate_prompts


def teacher_conversations(teacher: str, tokenizer_path: str, prompts: str, max_new_tokens: int | None = None,
                          temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, limit: int | None = None,
                          split_key: str | None = None, val_fraction: float = 0.0,
                          keep_unfinished: bool = False, batch_size: int = 16, device: str = "cpu") -> list[dict]:
    """One conversation per prompt: its source row with the prompt turns plus the teacher's answer.

    An answer has at most `max_new_tokens` tokens (None: no limit) and always ends within the
    teacher's max_seq_len, so that it fits the student's context; prompts that fill it are skipped, and
    so are answers without an end of turn, unless `keep_unfinished`.
    With `split_key`, held-out rows (`is_val_record`) are copied unanswered, and do not count
    towards `limit`. The teacher answers `batch_size` prompts at a time, in file order, on `device`.
    DataError if no prompt is answered.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    model = to_device(load_model(teacher), device)
    context = model.cfg.max_seq_len
    tokenizer, template = load_chat_tokenizer(tokenizer_path)
    end_of_turn = tokenizer.token_to_id(IM_END)
    # every row is read and checked before the teacher spends any time: a bad row is named by file and line
    rows: list[tuple[dict, list[dict] | None]] = []  # (row, its prompt turns; None: held out)
    for where, row in read_jsonl(prompts):
        if split_key is not None and is_val_record(row, split_key, val_fraction, where):
            rows.append((row, None))
            continue
        check_messages(row.get("messages"), record_name(row, where))
        first_answer = next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), len(row["messages"]))
        rows.append((row, row["messages"][:first_answer]))
    candidates = ((i, encode_chat(tokenizer, turns, template, add_generation_prompt=True)[0])
                  for i, (_, turns) in enumerate(rows) if turns)  # encoded as they are reached
    # decoding stops at the end of the context: the answer never needs cutting for the student
    budget = context if max_new_tokens is None else max_new_tokens
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)  # sampling draws where the logits are
    answers: dict[int, str] = {}  # row index -> answer
    too_long, unfinished, empty = 0, 0, 0
    # a skipped answer does not count towards `limit`: the next chunk answers later prompts instead
    while limit is None or len(answers) < limit:
        chunk = list(itertools.islice(candidates, batch_size))
        if not chunk:
            break
        fit = [(i, ids) for i, ids in chunk if len(ids) < context]
        seqs = generate_prompts(model, [ids for _, ids in fit], budget, stop_id=end_of_turn, max_rows=batch_size,
                                temperature=temperature, top_p=top_p, generator=generator)
        completions = {i: seq[0, len(ids):].tolist() for (i, ids), seq in zip(fit, seqs)}
        for i, _ in chunk:
            if limit is not None and len(answers) >= limit:
                break  # the chunk's other answers are dropped, so that a limit keeps the answers of a full run
            if i not in completions:
                too_long += 1
                continue
            completion = completions[i]  # right-padded with end of turn after the answer's own
            finished = end_of_turn in completion
            if not finished and not keep_unfinished:
                unfinished += 1
                continue
            answer = tokenizer.decode(completion[:completion.index(end_of_turn)] if finished else completion).strip()
            if not answer:
                empty += 1
                continue
            answers[i] = answer
    out: list[dict] = []  # in file order: held-out rows stay where they were among the answered ones
    for i, (row, turns) in enumerate(rows):
        if turns is None:
            out.append(row)
        elif i in answers:
            out.append({"id": len(out), **row, "messages": turns + [{"role": "assistant", "content": answers[i]}]})
    held_out = sum(turns is None for _, turns in rows)
    summary = (f"{too_long} prompts fill the teacher's max_seq_len={context}; {unfinished} answers unfinished "
               f"(skipped; --keep-unfinished keeps them); {empty} answers empty (skipped); {held_out} held out "
               f"(split_key={split_key!r}, val_fraction={val_fraction})")
    if not answers:
        raise DataError(f"{prompts}: no prompt answered: {summary}")
    print(f"{len(answers)} prompts answered; {summary}")
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
    parser.add_argument("--batch-size", type=int, default=16,
                        help="prompts the teacher answers together (default: %(default)s); the answers depend on it")
    parser.add_argument("--keep-unfinished", action="store_true",
                        help="also write answers cut by --max-new-tokens or the context, as closed turns")
    parser.add_argument("--device", default="cpu", help="where the teacher runs, e.g. cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size {args.batch_size} must be at least 1")
    try:
        data = compose_config([f"data={args.data}"]).data
        if not issubclass(get_object(data._target_), ChatDataModule):  # its split is the one the output keeps
            raise DataError(f"--data {args.data} configures a {data._target_}, not SFT data: name the chat data "
                            "config the output is for (a ChatDataModule, e.g. --data chat_embedded)")
        defaults = inspect.signature(ChatDataModule).parameters  # of the keys a config leaves out
        split_key, val_fraction = (data.get(key, defaults[key].default) for key in ("split_key", "val_fraction"))
        rows = teacher_conversations(args.teacher, args.tokenizer, args.prompts, args.max_new_tokens,
                                     args.temperature, args.top_p, args.seed, args.limit, split_key, val_fraction,
                                     args.keep_unfinished, args.batch_size, args.device)
    except (DataError, HydraException, ValueError, FileNotFoundError) as e:  # no file written, and a failing status stops a pipeline
        sys.exit(f"error: {e}")
    with atomic_write(Path(args.out)) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"{args.out}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
