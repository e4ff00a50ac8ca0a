"""Contrastive knowledge probes: does the model prefer the true continuation of a prompt to wrong ones?

An item is `{"prompt": ..., "correct": ..., "wrong": [...], "lang": ...}` (one JSON object per line).
Each continuation is scored by its mean per-token negative log-likelihood (nats) given the prompt,
so long and short options compete fairly. An item's margin is the mean over its wrong options of
NLL(wrong) - NLL(correct): positive when the model prefers the truth; accuracy is the share of
items with a positive margin. `probes/debian_en_de.jsonl` holds facts of the embedded corpus.
"""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from slmlab.data.errors import DataError
from slmlab.data.records import parse_jsonl
from slmlab.eval.scoring import encode_pair, score_continuations
from slmlab.models import CausalLM

DEFAULT_PROBES = Path(__file__).parent / "probes" / "debian_en_de.jsonl"


def load_probes(path: str | Path = DEFAULT_PROBES) -> list[dict]:
    """The items of a probes file; a malformed line is a `DataError` naming the file and line."""
    return parse_jsonl(path, _check_probe)[0]


def _check_probe(item: dict, where: str) -> dict:
    if not {"prompt", "correct", "wrong"} <= item.keys() or not item["wrong"]:
        raise DataError(f"{where}: a probe needs prompt, correct and a non-empty wrong list")
    # an empty answer scores 0 nats over 0 tokens, and a string as `wrong` would be read letter by letter
    if not isinstance(item["wrong"], list) or not all(isinstance(a, str) and a for a in [item["correct"], *item["wrong"]]):
        raise DataError(f"{where}: a probe's correct answer and each of its wrong list are non-empty strings")
    return item


def item_margins(model: CausalLM, tokenizer: Tokenizer, items: Sequence[dict], batch_size: int = 16) -> list[float]:
    """The margin of each item (nats per token)."""
    pairs, spans = [], []
    for item in items:
        options = [item["correct"], *item["wrong"]]
        spans.append((len(pairs), len(options)))
        for option in options:
            context, continuation = encode_pair(tokenizer, item["prompt"], option)
            if not continuation:  # merged into the prompt's last token: no NLL per token to compare
                raise DataError(f"probe {item['prompt']!r}: the answer {option!r} has no token of its own (it "
                                "joins the prompt's last token); end the prompt where a word ends")
            pairs.append((context, continuation))
    nll = [-s.logprob / s.tokens for s in score_continuations(model, pairs, batch_size)]
    return [sum(nll[start + 1:start + n]) / (n - 1) - nll[start] for start, n in spans]


def probe_report(model: CausalLM, tokenizer: Tokenizer, items: Sequence[dict],
                 batch_size: int = 16) -> dict[str, dict[str, float]]:
    """{group: {"margin", "accuracy", "items"}} for each `lang` present and "all"."""
    margins = item_margins(model, tokenizer, items, batch_size)
    groups: dict[str, list[float]] = {}
    for item, margin in zip(items, margins):
        groups.setdefault(item.get("lang", "all"), []).append(margin)
    groups["all"] = margins
    return {name: {"margin": sum(m) / len(m), "accuracy": sum(x > 0 for x in m) / len(m), "items": len(m)}
            for name, m in groups.items()}
