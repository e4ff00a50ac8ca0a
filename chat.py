"""Chat with a trained model in the terminal, its answers streamed as they are generated.

    python chat.py ckpt=outputs/sft/checkpoints/last.ckpt
    python chat.py ckpt=exported/ --prompt "How do I install a package?"

ckpt: a Lightning checkpoint or an exported folder. Keys (key=value): tokenizer (default: the one
exported beside the model, else the training config's), system (a system message), max_new_tokens
(256), temperature (0.7; 0 is greedy), top_k, top_p (0.9), repetition_penalty (1.1), stop (extra stop
strings, `|`-separated), seed (0), device. Other key=value arguments are Hydra overrides of the
training config that name the tokenizer (e.g. `data=tinystories`).
Interactive commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves.
"""

import argparse
import sys

import torch
from hydra.errors import HydraException

from slmlab.config import tokenizer_path, training_config
from slmlab.data.chat import CHATML_TEMPLATE, encode_chat
from slmlab.data.tokenizer import SPECIAL_TOKENS
from slmlab.eval.seed import seed_everything
from slmlab.export.load import load_pretrained, to_device
from slmlab.export.tokenizer import TokenizerFiles, find_tokenizer
from slmlab.models import CausalLM
from slmlab.models.generate import check_sampling, stream_text

SAMPLING = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
DEFAULTS = {"max_new_tokens": "256", "temperature": "0.7", "top_p": "0.9", "repetition_penalty": "1.1", "seed": "0"}
KEYS = {"ckpt", "tokenizer", "system", "stop", "seed", "device", *SAMPLING}


class Chat:
    """A conversation: its messages, and the model's streamed answer to each new user turn."""

    def __init__(self, model: CausalLM, tokens: TokenizerFiles, args: dict[str, str]) -> None:
        self.model, self.tokenizer = model, tokens.tokenizer
        self.template = tokens.chat_template or CHATML_TEMPLATE
        self.system = args.get("system")
        self.sampling = {k: cast(args[k]) for k, cast in SAMPLING.items() if k in args}
        # a new turn's start also ends the answer: a model that goes on to write the user's next turn
        self.stop_ids = [i for i in (tokens.token_id(t) for t in SPECIAL_TOKENS) if i is not None]
        self.stop_strings = [s for s in args.get("stop", "").split("|") if s]
        self.generator = torch.Generator(next(model.parameters()).device).manual_seed(int(args["seed"]))
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The conversation so far, ready for the answer; the oldest turns are dropped (the system message
        kept) until it leaves room for `max_new_tokens` in the model's context, and a single question
        too long even then keeps its end."""
        room = self.model.cfg.max_seq_len - min(self.sampling.get("max_new_tokens", 256), self.model.cfg.max_seq_len // 2)
        history = self.messages
        while True:
            ids, _ = encode_chat(self.tokenizer, history, self.template, add_generation_prompt=True)
            first_turn = 1 if history and history[0]["role"] == "system" else 0
            if len(ids) <= room or len(history) - first_turn <= 1:
                return ids[-room:]
            rest = history[first_turn + 1:]  # forget the oldest question with its answer
            history = history[:first_turn] + (rest[1:] if rest[0]["role"] == "assistant" else rest)

    def answer(self, text: str):
        """Streams the answer to a user message as text pieces, and records it."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, self.prompt_ids(), stop_ids=self.stop_ids,
                                 stop_strings=self.stop_strings, generator=self.generator, **self.sampling):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str], str | None]:
    """(our key=value arguments with defaults, Hydra overrides, the --prompt text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", help="answer this one message, then exit")
    parser.add_argument("args", nargs="*", help="ckpt=PATH and other key=value arguments")
    ns = parser.parse_intermixed_args(argv)  # key=value arguments before or after --prompt
    if malformed := [a for a in ns.args if "=" not in a]:
        parser.error(f"arguments are key=value, got {malformed}")
    pairs = [a.split("=", 1) for a in ns.args]
    args = {**DEFAULTS, **{k: v for k, v in pairs if k in KEYS}}
    if "ckpt" not in args:
        parser.error("missing ckpt=<checkpoint or exported folder>")
    for key, cast in {**SAMPLING, "seed": int}.items():
        if key in args:
            try:
                cast(args[key])
            except ValueError:
                parser.error(f"{key}={args[key]!r} is not a {cast.__name__}")
    if "max_new_tokens" in args and int(args["max_new_tokens"]) < 1:  # else the prompt fills the whole context
        parser.error(f"max_new_tokens={args['max_new_tokens']}: must be at least 1")
    try:  # before the model loads, not at the first answer
        check_sampling(**{k: SAMPLING[k](args[k]) for k in ("temperature", "top_k", "top_p", "repetition_penalty")
                          if k in args})
    except ValueError as e:
        parser.error(str(e))
    return args, [f"{k}={v}" for k, v in pairs if k not in KEYS], ns.prompt


def main(argv: list[str]) -> None:
    args, overrides, prompt = parse_args(argv)
    try:
        model = load_pretrained(args["ckpt"])
        if "device" in args:
            model = to_device(model, args["device"])
        cfg_tokenizer = tokenizer_path(training_config(model.cfg, overrides).data)
        tokens = find_tokenizer(args["ckpt"], cfg_tokenizer, args.get("tokenizer"))
        tokens.check_fits(model.cfg.vocab_size)
    except (FileNotFoundError, ValueError, HydraException) as e:  # a wrong path or argument: no traceback
        sys.exit(f"error: {e}")
    seed_everything(int(args["seed"]))
    chat = Chat(model, tokens, args)
    if prompt is not None:
        for piece in chat.answer(prompt):
            print(piece, end="", flush=True)
        print()
        return
    print(f"{model.num_params() / 1e6:.1f}M parameters, context {model.cfg.max_seq_len} tokens. /reset, /quit")
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/quit":
            return
        if text == "/reset":
            chat.reset()
            continue
        if text:
            print("model> ", end="", flush=True)
            for piece in chat.answer(text):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
