"""The tokenizer files that travel with an exported model, and the special-token ids they imply.

Checkpoints do not record their tokenizer, so every export names it (`tokenizer=path`). Ids come
from our special tokens (`slmlab.data.tokenizer.SPECIAL_TOKENS`): `<|endoftext|>` ends each
document, so it is also the start-of-text token (every training document but the first follows
one); generation stops at it and at ChatML's `<|im_end|>`.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from slmlab.data.tokenizer import SPECIAL_TOKENS

EOS, PAD, _, IM_END = SPECIAL_TOKENS  # the third is <|im_start|>
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"


@dataclass
class TokenizerFiles:
    path: Path  # the tokenizer.json
    tokenizer: Tokenizer
    config: dict = field(default_factory=dict)  # the tokenizer_config.json beside it (chat_template...), if any

    @classmethod
    def load(cls, path: str | Path) -> "TokenizerFiles":
        """`path`: a tokenizer.json, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        config_path = path.parent / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls(path, Tokenizer.from_file(str(path)), config)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def check_fits(self, vocab_size: int) -> None:
        """The tokenizer may be smaller than the embedding (BPE can stop early), never larger."""
        if (n := self.tokenizer.get_vocab_size()) > vocab_size:
            raise ValueError(f"{self.path} has {n} tokens but the model only {vocab_size}: not its tokenizer")

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def model_token_ids(self) -> dict[str, int | None]:
        """bos/eos/pad ids for a model config (config.json, GGUF metadata)."""
        eos = self.token_id(EOS)
        return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": self.token_id(PAD)}

    def stop_ids(self) -> list[int]:
        """The tokens generation stops at: end of a chat turn, end of a document."""
        return [i for i in (self.token_id(IM_END), self.token_id(EOS)) if i is not None]

    def generation_config(self) -> dict:
        return {**self.model_token_ids(), "eos_token_id": self.stop_ids(), "do_sample": False}

    def copy_to(self, out: Path) -> None:
        """tokenizer.json and tokenizer_config.json (when there is one) as they are."""
        shutil.copyfile(self.path, out / TOKENIZER_FILE)
        if self.config:
            shutil.copyfile(self.path.parent / TOKENIZER_CONFIG, out / TOKENIZER_CONFIG)

    def write_hf(self, out: Path, model_max_length: int) -> None:
        """A folder `PreTrainedTokenizerFast.from_pretrained` loads; keys of our own
        tokenizer_config.json (a chat template...) win over the defaults."""
        shutil.copyfile(self.path, out / TOKENIZER_FILE)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "bos_token": None,  # the tokenizer adds nothing: a prompt is the text as trained on
            "eos_token": EOS if self.token_id(EOS) is not None else None,
            "pad_token": PAD if self.token_id(PAD) is not None else None,
            "unk_token": None,  # byte-level BPE encodes every string
            "clean_up_tokenization_spaces": False,
            **self.config,
        }
        (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def find_tokenizer(model_path: str | Path, cfg_tokenizer_path: str | Path, tokenizer: str | Path | None = None) -> TokenizerFiles:
    """The tokenizer of a model: `tokenizer` when given, else the one exported beside the model, else
    the training config's (`training_config(...).data.tokenizer.path`)."""
    if tokenizer is not None:
        return TokenizerFiles.load(tokenizer)
    exported = Path(model_path) / TOKENIZER_FILE
    return TokenizerFiles.load(exported if exported.is_file() else cfg_tokenizer_path)
