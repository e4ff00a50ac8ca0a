"""Chat format: the ChatML template, its token encoding with an assistant mask, and conversion of
Hugging Face chat datasets to our conversation files.

Each message renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a generation prompt is
`<|im_start|>assistant\\n`. The template is stored as a Jinja string in `tokenizer_config.json`
beside `tokenizer.json`, under the keys Hugging Face `transformers` reads, so a trained model's
tokenizer directory works with `AutoTokenizer.from_pretrained(...).apply_chat_template`.

Conversation files are JSON lines `{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}`
(optionally gzipped). Convert a Hugging Face dataset with a `messages` column:

    python -m slmlab.data.chat convert-hf HuggingFaceTB/smol-smoltalk smol-smoltalk.jsonl
"""

import argparse
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from slmlab.data.atomic import atomic_write
from slmlab.data.errors import DataError
from slmlab.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

IM_START, IM_END = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
PAD = SPECIAL_TOKENS[1]
ROLES = ("system", "user", "assistant")
CONFIG_FILE = "tokenizer_config.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = Mapping[str, str]


def tokenizer_config(template: str = CHATML_TEMPLATE) -> dict[str, Any]:
    """The contents of `tokenizer_config.json`: the chat template and the special tokens' roles.

    `<|im_end|>` is the EOS of a chat model (generation stops at the end of its turn); there is no BOS.
    """
    return {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "bos_token": None,
            "eos_token": IM_END, "pad_token": PAD, "unk_token": None, "clean_up_tokenization_spaces": False}


def write_tokenizer_config(tokenizer_dir: str | Path, template: str = CHATML_TEMPLATE) -> Path:
    """Write `tokenizer_config.json` into `tokenizer_dir` (atomically); return its path."""
    path = Path(tokenizer_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write((json.dumps(tokenizer_config(template), indent=2) + "\n").encode())
    return path


def load_tokenizer_config(tokenizer_dir_or_config: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """A config mapping as is; a directory's `tokenizer_config.json`; or that file given by its path."""
    if isinstance(tokenizer_dir_or_config, Mapping):
        return tokenizer_dir_or_config
    path = Path(tokenizer_dir_or_config)
    path = path / CONFIG_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: tokenizer config not found (write it with write_tokenizer_config)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "chat_template" not in config:  # `in` on a JSON number: TypeError
        raise DataError(f"{path}: no chat_template")
    return config


def load_chat_tokenizer(tokenizer_path: str | Path) -> tuple[Tokenizer, str]:
    """The tokenizer of a `tokenizer.json`, and the chat template of the `tokenizer_config.json`
    beside it; that file is written, with the ChatML template, where it is missing."""
    tokenizer_path = Path(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    if not (tokenizer_path.parent / CONFIG_FILE).exists():
        write_tokenizer_config(tokenizer_path.parent)
    return tokenizer, load_tokenizer_config(tokenizer_path.parent)["chat_template"]


@lru_cache(maxsize=8)
def _compile(template: str) -> Template:
    # sandboxed: a template comes with a downloaded tokenizer and must not reach Python internals.
    # trim_blocks/lstrip_blocks as in `transformers`, so both render a template identically.
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render(template: str, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """`messages` rendered with the Jinja `template` (given the special tokens too, as `transformers` does)."""
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token="", eos_token=IM_END, pad_token=PAD)


def apply_chat_template(messages: Sequence[Message], tokenizer_dir_or_config: str | Path | Mapping[str, Any],
                        add_generation_prompt: bool = False) -> str:
    """`messages` as text, with the template of a tokenizer directory (or of a config mapping)."""
    check_messages(messages)
    template = load_tokenizer_config(tokenizer_dir_or_config)["chat_template"]
    return render(template, messages, add_generation_prompt)


def check_messages(messages: Sequence[Message], where: str = "messages") -> None:
    """DataError unless `messages` is a list of {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                            f"got {message!r:.200}")


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Message], template: str = CHATML_TEMPLATE,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and the assistant mask: True exactly on the tokens
    of assistant contents and the `<|im_end|>` that closes each of them (the model learns to stop).

    The conversation is encoded piece by piece: the template's own text (with its special tokens as
    special ids) and each message's content (where a literal "<|im_end|>" is text, not a special),
    so every mask boundary is a token boundary. For contents without leading or trailing whitespace
    the ids equal those of encoding the rendered string in one go (BPE pre-tokenization would merge
    whitespace across a boundary otherwise).
    """
    check_messages(messages)
    # render once with a unique marker for each content: the text between markers is template text
    markers = [f"\x00{i}\x00" for i in range(len(messages))]
    skeleton = render(template, [{**m, "content": mk} for m, mk in zip(messages, markers)], add_generation_prompt)
    glue, rest = [], skeleton
    for marker in markers:
        before, found, rest = rest.partition(marker)
        if not found:
            raise DataError(f"the chat template renders message contents out of order or not at all: "
                            f"{template!r:.200}")
        glue.append(before)
    glue.append(rest)
    rendered = "".join(g + m["content"] for g, m in zip(glue, messages)) + glue[-1]
    if rendered != render(template, messages, add_generation_prompt):
        raise DataError("the chat template changes message contents (e.g. strips them); encode_chat needs them "
                        "verbatim")

    pieces: list[tuple[str, bool, bool]] = []  # (text, is content, in the mask)
    for i, text in enumerate(glue):
        if i > 0 and messages[i - 1]["role"] == "assistant":  # the previous turn's end is learnt
            end = text.find(IM_END)
            if end < 0:
                raise DataError(f"the chat template does not close an assistant turn with {IM_END}")
            end += len(IM_END)
            pieces += [(text[:end], False, True), (text[end:], False, False)]
        else:
            pieces.append((text, False, False))
        if i < len(messages):
            pieces.append((messages[i]["content"], True, messages[i]["role"] == "assistant"))

    ids, mask = [], []
    for (_, _, masked), encoding in zip(pieces, _encode_pieces(tokenizer, pieces)):
        ids += encoding
        mask += [masked] * len(encoding)
    return ids, mask


def _encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool, bool]]) -> list[list[int]]:
    """Template text with special tokens recognised, contents with them taken literally."""
    encoded: list[list[int] | None] = [None] * len(pieces)
    previous = tokenizer.encode_special_tokens  # a setting of the shared tokenizer: restored below
    try:
        for is_content in (False, True):
            tokenizer.encode_special_tokens = is_content
            at = [i for i, (text, content, _) in enumerate(pieces) if content == is_content and text]
            for i, encoding in zip(at, tokenizer.encode_batch_fast([pieces[i][0] for i in at],
                                                                   add_special_tokens=False)):
                encoded[i] = encoding.ids
    finally:
        tokenizer.encode_special_tokens = previous
    return [ids or [] for ids in encoded]


# -- converting Hugging Face chat datasets ---------------------------------------------------------

def convert_hf(dataset: str, out: str | Path, split: str = "train", config: str | None = None,
               messages_key: str = "messages", max_rows: int | None = None) -> int:
    """Write the `messages` of a Hugging Face chat dataset as our conversation JSON lines; return
    the number written. Each conversation's id is `<dataset>/<split>/<row>`; roles outside ROLES
    (tool calls, ...) and empty conversations are skipped, and counted in the printed summary."""
    try:
        import datasets
    except ImportError:
        raise ImportError("converting a Hugging Face dataset needs `datasets`: pip install -e '.[hf]'") from None
    stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    written = skipped = 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        for row, record in enumerate(stream):
            if max_rows is not None and row >= max_rows:
                break
            if messages_key not in record:  # a KeyError named neither the dataset nor the columns it has
                raise DataError(f"{dataset} (split {split}): row {row} has no {messages_key!r} "
                                f"(columns: {sorted(record)}); set --messages-key")
            # a tool call's message may have no "content" (or a null one): skipped below, not a KeyError
            messages = [{"role": m.get("role"), "content": m.get("content")} for m in record[messages_key] or []]
            if not messages or any(m["role"] not in ROLES or not isinstance(m["content"], str) for m in messages) \
                    or not any(m["role"] == "assistant" for m in messages):
                skipped += 1
                continue
            line = {"id": f"{dataset}/{split}/{row}", "messages": messages}
            f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
            written += 1
    print(f"{out}: {written:,} conversations; skipped {skipped:,} with other roles or no assistant turn")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slmlab.data.chat", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-hf", help="a Hugging Face chat dataset -> conversation JSON lines")
    convert.add_argument("dataset", help="e.g. HuggingFaceTB/smol-smoltalk")
    convert.add_argument("out", help="output .jsonl file")
    convert.add_argument("--split", default="train")
    convert.add_argument("--config", default=None, help="the dataset's configuration name, if it has several")
    convert.add_argument("--messages-key", default="messages")
    convert.add_argument("--max-rows", type=int, default=None)
    args = parser.parse_args(argv)
    convert_hf(args.dataset, args.out, args.split, args.config, args.messages_key, args.max_rows)


if __name__ == "__main__":
    main()
