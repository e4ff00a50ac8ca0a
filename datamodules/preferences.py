"""LightningDataModule over preference pairs for DPO. See `conf/data/prefs.yaml` for a configuration."""

import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from datamodules.stream import EpochDataModule, check_at_least, check_fraction
from slmlab.data.chat import IM_END, PAD, Message, check_messages, encode_chat, load_chat_tokenizer
from slmlab.data.errors import DataError
from slmlab.data.records import is_val_record, parse_jsonl, record_name
from slmlab.data.sequences import PairBatches, Sequences

log = logging.getLogger(__name__)

Encoded = tuple[list[int], list[bool]]


class PreferenceDataModule(EpochDataModule):
    """Pairs `{"id", "prompt": [messages], "chosen": str, "rejected": str}` (JSON lines), tokenized in memory.

    Each side is the prompt (chat template applied) followed by the reply as an assistant turn.
    Batches: {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}: LongTensor[batch_size,
    seq_len], labels on the reply tokens and its closing <|im_end|> only (IGNORE_INDEX on the prompt,
    also on its own assistant turns, and on padding). Sides longer than seq_len + 1 tokens are cut;
    a pair with no reply token left on a side is dropped (counted). Train/val split, bad rows, the
    endless epoch stream and exact resume work as in `ChatDataModule`.
    """

    def __init__(self, pairs: str, tokenizer: str, seq_len: int, batch_size: int, val_fraction: float = 0.1,
                 seed: int = 1234, num_workers: int = 0, on_bad_row: str = "error", split_key: str = "id"):
        super().__init__(batch_size, seed, num_workers)
        check_at_least(1, seq_len=seq_len)
        check_fraction(val_fraction=val_fraction)
        self.pairs_path, self.tokenizer_path = Path(pairs), Path(tokenizer)
        self.seq_len, self.val_fraction, self.on_bad_row, self.split_key = seq_len, val_fraction, on_bad_row, split_key
        self.val_sources = ["prefs"]
        # set by setup()
        self.tokenizer = self.vocab_size = self.eos_id = self.chat_template = None
        self.skipped = self.truncated = self.dropped = 0

    def setup(self, stage: str | None = None) -> None:
        """Tokenize both sides of every pair and split the pairs into train and val."""
        if self.tokenizer is not None:
            return
        tokenizer, template = load_chat_tokenizer(self.tokenizer_path)
        rows, self.skipped = parse_jsonl(self.pairs_path, self._parse, self.on_bad_row)
        splits: dict[bool, tuple[list[Encoded], list[Encoded]]] = {False: ([], []), True: ([], [])}
        for is_val, prompt, chosen, rejected in rows:
            sides = [self._encode(tokenizer, template, prompt, reply) for reply in (chosen, rejected)]
            if not all(any(mask[1:]) for _, mask in sides):  # a long prompt left no reply token to learn
                self.dropped += 1
                continue
            for side, encoded in zip(splits[is_val], sides):
                side.append(encoded)
        for is_val, name in ((False, "train"), (True, "val")):
            if not splits[is_val][0]:
                raise DataError(f"{self.pairs_path}: no {name} pairs with val_fraction={self.val_fraction}; "
                                "change val_fraction, or add pairs")
        pad_id = tokenizer.token_to_id(PAD)
        self.train_collate, self.val_collate = (
            PairBatches(Sequences.from_lists(chosen), Sequences.from_lists(rejected), self.seq_len, pad_id)
            for chosen, rejected in (splits[False], splits[True]))
        self.tokenizer, self.chat_template = tokenizer, template
        self.vocab_size, self.eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(IM_END)
        log.info("%s: %d train pairs, %d val; %d sides cut to seq_len + 1 = %d tokens, %d pairs dropped with no "
                 "reply token left, %d bad rows skipped", self.pairs_path, self.train_size, len(self.val_collate),
                 self.truncated, self.seq_len + 1, self.dropped, self.skipped)

    def _parse(self, record: dict[str, Any], where: str) -> tuple[bool, list[Message], str, str]:
        """(held out?, prompt, chosen, rejected) of one record; DataError naming it if it is unusable."""
        name = record_name(record, where)
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise DataError(f"{name}: no {key!r}")
        check_messages(record["prompt"], f"{name}: prompt")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataError(f"{name}: {key!r} must be a non-blank string, got {record[key]!r:.100}")
        is_val = is_val_record(record, self.split_key, self.val_fraction, where)
        return is_val, record["prompt"], record["chosen"], record["rejected"]

    def _encode(self, tokenizer: Tokenizer, template: str, prompt: list[Message], reply: str) -> Encoded:
        """Tokens of prompt + reply, masked on the reply and its <|im_end|> only; cut to seq_len + 1."""
        ids, mask = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": reply}], template)
        # the prompt with its generation prompt is a token prefix of that: the template text before
        # the reply is encoded as one piece either way
        prompt_len = len(encode_chat(tokenizer, prompt, template, add_generation_prompt=True)[0])
        mask[:prompt_len] = [False] * prompt_len
        if len(ids) > self.seq_len + 1:
            self.truncated += 1
            ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
        return ids, mask

    def val_dataloader(self) -> DataLoader:
        """The held-out pairs, in order."""
        return self.val_loader()
