"""LightningDataModule over conversations for supervised fine-tuning: the loss is on assistant
tokens only, and validation measures both the instruction loss and forgetting of pretraining.
See `conf/data/chat_embedded.yaml` for a configuration."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from datamodules.prompts import PromptDataModule
from datamodules.stream import EpochDataModule, check_at_least, check_fraction
from datamodules.token_shards import TokenShardDataModule
from slmlab.data.chat import IM_END, PAD, Message, check_messages, encode_chat, load_chat_tokenizer
from slmlab.data.errors import DataError
from slmlab.data.records import is_val_record, parse_jsonl, record_name
from slmlab.data.sequences import PaddedBatches, Sequences, pack_greedily
from slmlab.data.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)

CHAT_SOURCE = "chat"
CONSTRAINTS_SOURCE = "constraints"
"""The name of the held-out conversations among `val_sources`."""


class ChatDataModule(EpochDataModule):
    """Conversations (JSON lines `{"id", "messages": [{"role", "content"}, ...]}`), tokenized in memory.

    conversations: a `.jsonl` or `.jsonl.gz` file. tokenizer: the `tokenizer.json` of the pretrained
        model; the chat template comes from the `tokenizer_config.json` beside it (written with
        the ChatML template when missing).
    Train/val: by the hash of each record's `split_key` field (`is_val_document`), so the split
        does not depend on the file's order; the embedded data splits by `section`, which keeps a
        section's conversations in both languages, and its pretraining text, on one side.
    Rows without an assistant turn are a `DataError` naming file, line and id (`on_bad_row="error"`)
        or are skipped and counted (`"skip"`). Conversations longer than seq_len + 1 tokens are cut.
    Training batches: {"input_ids", "labels"}: LongTensor[batch_size, seq_len]; labels are the next
        token where that token belongs to an assistant reply or its closing <|im_end|>, IGNORE_INDEX
        elsewhere and on the right padding. Epoch e visits every training sample once, in an order
        seeded by (seed, e); the stream position is saved in checkpoints for an exact resume.
    packing: fill each row with whole conversations (next-fit, never splitting one) instead of one
        padded conversation per row. The batches then carry "positions", each token's position in its
        own conversation, and every mixer keeps the conversations of a row apart (attention's document
        mask, the recurrent states cleared at each start): each is modelled as if alone, so the loss
        is the one without packing, in fewer rows. Validation rows are never packed.
    pretrain_val: a TokenShardDataModule of the same tokenizer; its validation loaders follow the
        chat one (`val_sources = ["chat", *its sources]`) to measure forgetting.
    constraint_val: a PromptDataModule of the same tokenizer; its held-out constraint prompts come
        last (source "constraints"), for the constraint-following pass-rate of the SFT model.
    """

    def __init__(self, conversations: str, tokenizer: str, seq_len: int, batch_size: int, val_fraction: float = 0.1,
                 seed: int = 1234, num_workers: int = 0, packing: bool = False,
                 pretrain_val: TokenShardDataModule | None = None, constraint_val: PromptDataModule | None = None,
                 on_bad_row: str = "error", split_key: str = "id"):
        super().__init__(batch_size, seed, num_workers)
        check_at_least(1, seq_len=seq_len)
        check_fraction(val_fraction=val_fraction)
        self.conversations_path, self.tokenizer_path = Path(conversations), Path(tokenizer)
        self.seq_len, self.val_fraction = seq_len, val_fraction
        self.packing, self.pretrain_val, self.on_bad_row, self.split_key = packing, pretrain_val, on_bad_row, split_key
        self.constraint_val = constraint_val
        self.val_sources = ([CHAT_SOURCE] + (pretrain_val.val_sources if pretrain_val is not None else [])
                            + ([CONSTRAINTS_SOURCE] if constraint_val is not None else []))
        # set by setup()
        self.tokenizer = self.vocab_size = self.eos_id = self.chat_template = None
        self.num_train_conversations = 0  # = train_size, the samples per epoch, unless packed into fewer rows
        self.skipped = self.truncated = self.dropped = 0
        self._val_bytes_per_token = 0.0

    def prepare_data(self) -> None:
        """Prepare the pretraining validation data (and with it the tokenizer, if missing)."""
        if self.pretrain_val is not None:
            self.pretrain_val.prepare_data()
        if not self.tokenizer_path.exists():
            raise DataError(f"{self.tokenizer_path}: tokenizer not found; fine-tuning continues from a pretraining "
                            "tokenizer: python -m slmlab.data.prepare data=<pretraining data>")

    def setup(self, stage: str | None = None) -> None:
        """Tokenize every conversation and split them into train and val."""
        if self.tokenizer is not None:
            return
        tokenizer, template = load_chat_tokenizer(self.tokenizer_path)
        if self.pretrain_val is not None:
            self.pretrain_val.setup(stage)
            _check_same_tokenizer(self.pretrain_val.tokenizer_path, self.tokenizer_path)
        if self.constraint_val is not None:
            self.constraint_val.setup(stage)
            _check_same_tokenizer(self.constraint_val.tokenizer_path, self.tokenizer_path)
        conversations, self.skipped = parse_jsonl(self.conversations_path, self._parse, self.on_bad_row)
        splits: dict[bool, list[tuple[list[int], list[bool]]]] = {False: [], True: []}
        val_bytes = val_tokens = 0
        for is_val, messages in conversations:
            ids, mask = encode_chat(tokenizer, messages, template)
            if is_val:  # before cutting: bytes per learnt token of whole replies
                val_bytes += sum(len(m["content"].encode("utf-8")) for m in messages if m["role"] == "assistant")
                val_tokens += sum(mask)
            if len(ids) > self.seq_len + 1:
                self.truncated += 1
                ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
            if not any(mask[1:]):  # the cut left no assistant token to learn
                self.dropped += 1
                continue
            splits[is_val].append((ids, mask))
        for is_val, name in ((False, "train"), (True, "val")):
            if not splits[is_val]:
                raise DataError(f"{self.conversations_path}: no {name} conversations with val_fraction="
                                f"{self.val_fraction}; change val_fraction, or add conversations")
        train = Sequences.from_lists(splits[False])
        self.num_train_conversations = len(train)
        if self.packing:  # in a seeded random order, so that a row holds unrelated conversations
            order = np.random.default_rng(self.seed).permutation(len(train))
            groups = pack_greedily(train.lengths[order].tolist(), self.seq_len + 1)
            train = train.packed([order[group].tolist() for group in groups])
        pad_id = tokenizer.token_to_id(PAD)
        self.train_collate = PaddedBatches(train, self.seq_len, pad_id)
        self.val_collate = PaddedBatches(Sequences.from_lists(splits[True]), self.seq_len, pad_id)
        self._val_bytes_per_token = val_bytes / val_tokens
        self.tokenizer, self.chat_template = tokenizer, template
        self.vocab_size, self.eos_id = tokenizer.get_vocab_size(), tokenizer.token_to_id(IM_END)
        log.info("%s: %d train conversations%s, %d val; %d cut to seq_len + 1 = %d tokens, %d dropped with no "
                 "assistant token left, %d bad rows skipped", self.conversations_path, self.num_train_conversations,
                 f" in {self.train_size} packed rows" if self.packing else "", len(self.val_collate),
                 self.truncated, self.seq_len + 1, self.dropped, self.skipped)

    def _parse(self, record: dict[str, Any], where: str) -> tuple[bool, list[Message]]:
        """(held out?, messages) of one record; DataError naming it if it is unusable."""
        name = record_name(record, where)
        messages = record.get("messages")
        check_messages(messages, name)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{name}: no assistant turn, nothing to learn")
        return is_val_record(record, self.split_key, self.val_fraction, where), messages

    def bytes_per_token(self, source: str) -> float:
        """UTF-8 bytes per learnt token: for "chat", of the held-out assistant replies (their
        closing <|im_end|> counts as a token of no bytes); else of the pretraining source."""
        if source == CHAT_SOURCE:
            return self._val_bytes_per_token
        return self.pretrain_val.bytes_per_token(source)

    # -- loaders -------------------------------------------------------------------------------

    def val_dataloader(self) -> list[DataLoader]:
        """The held-out conversations in order, then the pretraining sources' loaders, then the
        held-out constraint prompts."""
        loaders = [self.val_loader()]
        for other in (self.pretrain_val, self.constraint_val):
            if other is not None:
                other.trainer = self.trainer  # its loaders split over the same ranks
                loader = other.val_dataloader()
                loaders += loader if isinstance(loader, list) else [loader]
        return loaders


def _check_same_tokenizer(other: Path, ours: Path) -> None:
    """DataError unless two tokenizer files are the same tokenizer (by their fingerprint)."""
    if other != ours and tokenizer_hash(other) != tokenizer_hash(ours):
        raise DataError(f"validation tokenizer {other} differs from the chat data's tokenizer {ours}: "
                        "held-out data must be read with the model's own tokenizer")
