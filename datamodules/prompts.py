"""LightningDataModule over prompts with verifiable constraints, for GRPO. See
`conf/data/ifeval_prompts.yaml` for a configuration."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from datamodules.stream import EpochDataModule, check_at_least
from slmlab.data.chat import IM_END, encode_chat, load_chat_tokenizer
from slmlab.data.errors import DataError
from slmlab.data.records import parse_jsonl, record_name
from slmlab.rewards import LANGUAGES, describe

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")

Prompt = dict[str, Any]
"""{"id": str, "prompt": str, "prompt_ids": list[int], "constraints": list[dict], "language": str}"""


class PromptList:
    """Collate: prompt indices -> the list of those prompts (picklable, for dataloader workers)."""

    def __init__(self, prompts: Sequence[Prompt]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, items: np.ndarray) -> list[Prompt]:
        return [self.prompts[i] for i in np.asarray(items).tolist()]


class PromptDataModule(EpochDataModule):
    """Prompts `{"id", "prompt": str, "language": "en"|"de", "constraints": [...], "split": "train"|"heldout"}`
    (JSON lines); the constraints are `slmlab.rewards` constraints, checked when the file is read.

    Training batches are lists of `batch_size` prompts of split `split` (None: validation only, as
    `data.constraint_val`, which then needs no training prompts), each a dict with
    "prompt_ids": the prompt as a user turn with the chat template and its generation prompt
    applied. Epochs, the endless stream and exact resume work as in `ChatDataModule`. Validation
    (and `heldout()`) covers the held-out prompts, in file order.
    max_prompt_len: prompts of more tokens are dropped (counted in `dropped`), leaving room for the
        completion in the model's positions. `seq_len` is the longest prompt kept, so that a
        module can check that the prompts fit the model; prompts of a split it does not serve (with
        split None, the training ones) are left out.
    """

    def __init__(self, prompts: str, tokenizer: str, batch_size: int, split: str | None = "train", seed: int = 1234,
                 num_workers: int = 0, on_bad_row: str = "error", max_prompt_len: int | None = None):
        super().__init__(batch_size, seed, num_workers)
        if split is not None and split not in SPLITS:
            raise DataError(f"split={split!r} is not one of {SPLITS}")
        if max_prompt_len is not None:
            check_at_least(1, max_prompt_len=max_prompt_len)
        self.prompts_path, self.tokenizer_path = Path(prompts), Path(tokenizer)
        self.split, self.on_bad_row, self.max_prompt_len = split, on_bad_row, max_prompt_len
        self.val_sources = ["heldout"]
        # set by setup()
        self.tokenizer = self.vocab_size = self.eos_id = self.chat_template = self.seq_len = None
        self.prompts: dict[str, list[Prompt]] = {}
        self.skipped = self.dropped = 0

    def setup(self, stage: str | None = None) -> None:
        """Read and check every prompt, and apply the chat template to it."""
        if self.tokenizer is not None:
            return
        tokenizer, template = load_chat_tokenizer(self.tokenizer_path)
        rows, self.skipped = parse_jsonl(self.prompts_path, self._parse, self.on_bad_row)
        used = ("heldout",) if self.split is None else (self.split, "heldout")
        self.prompts = {split: [] for split in SPLITS}
        for split, prompt in rows:
            if split not in used:  # never served: its lengths must not decide what fits the model
                continue
            messages = [{"role": "user", "content": prompt["prompt"]}]
            prompt["prompt_ids"] = encode_chat(tokenizer, messages, template, add_generation_prompt=True)[0]
            if self.max_prompt_len is not None and len(prompt["prompt_ids"]) > self.max_prompt_len:
                self.dropped += 1
                continue
            self.prompts[split].append(prompt)
        for split in used:
            if not self.prompts[split]:
                raise DataError(f"{self.prompts_path}: no prompts of split {split!r}"
                                + (f" within max_prompt_len={self.max_prompt_len} tokens" if self.dropped else ""))
        self.train_collate = None if self.split is None else PromptList(self.prompts[self.split])
        self.val_collate = PromptList(self.prompts["heldout"])
        self.tokenizer, self.chat_template = tokenizer, template
        self.vocab_size, self.eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(IM_END)
        self.seq_len = max(len(p["prompt_ids"]) for prompts in self.prompts.values() for p in prompts)
        log.info("%s: %s prompts; %d longer than max_prompt_len=%s tokens dropped, %d bad rows skipped",
                 self.prompts_path, ", ".join(f"{len(p)} {split}" for split, p in self.prompts.items()),
                 self.dropped, self.max_prompt_len, self.skipped)

    def _parse(self, record: dict[str, Any], where: str) -> tuple[str, Prompt]:
        """(split, prompt) of one record; DataError naming it if it is unusable."""
        name = record_name(record, where)
        for key in ("id", "prompt", "language", "constraints", "split"):
            if key not in record:
                raise DataError(f"{name}: no {key!r}")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise DataError(f"{name}: 'prompt' must be a non-blank string")
        if record["language"] not in LANGUAGES:
            raise DataError(f"{name}: language {record['language']!r} is not one of {LANGUAGES}")
        if record["split"] not in SPLITS:
            raise DataError(f"{name}: split {record['split']!r} is not one of {SPLITS}")
        if not isinstance(record["constraints"], list):
            raise DataError(f"{name}: 'constraints' must be a list")
        for constraint in record["constraints"]:
            try:
                describe(constraint)  # validates the kind and its parameters
            except ValueError as e:
                raise DataError(f"{name}: {e}") from None
        return record["split"], {key: record[key] for key in ("id", "prompt", "constraints", "language")}

    @property
    def train_size(self) -> int:
        if self.split is None and self.tokenizer is not None:
            raise DataError(f"{self.prompts_path}: split=null serves validation only; set split=train to train on it")
        return super().train_size

    def heldout(self) -> list[Prompt]:
        """The held-out prompts, in file order, for evaluation."""
        return list(self.prompts["heldout"])

    def val_dataloader(self) -> DataLoader:
        """The held-out prompts in order, in lists of `batch_size`."""
        return self.val_loader()
