"""Rule-based rewards for GRPO: sample a compatible set of constraints for a prompt, then score
the answer by the fraction of them it satisfies.

`random_constraints` never combines kinds that contradict each other (`INCOMPATIBLE`), and
samples parameters from ranges that cannot clash across kinds: every `min_words` is below every
`max_words` (likewise for sentences), the keywords to include, exclude and repeat are distinct
words, and the start/end phrases hold no keyword, comma or ALL-CAPS word.
"""

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from slmlab.rewards.constraints import check
from slmlab.rewards.language import LANGUAGES

INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(map(frozenset, [
    ("all_lowercase", "all_uppercase"),
    # all-lowercase text has no ALL-CAPS word; in all-caps text every word is one
    ("all_lowercase", "capital_word_frequency"),
    ("all_uppercase", "capital_word_frequency"),
    # JSON starts with { or [ and ends with } or ]: no quotes, phrases or P.S. around it,
    # no line starting with a bullet marker, no paragraphs
    ("json_output", "quotation"),
    ("json_output", "starts_with"),
    ("json_output", "ends_with"),
    ("json_output", "postscript"),
    ("json_output", "bullet_points"),
    ("json_output", "paragraph_count"),
    ("quotation", "starts_with"),
    ("quotation", "ends_with"),
]))
"""Pairs of kinds that `random_constraints` never puts together."""

MAX_CONSTRAINTS = 14
"""The largest `k` for `random_constraints`: every maximal compatible set of kinds is this large."""

KEYWORDS = {
    "en": ["river", "garden", "music", "window", "coffee", "mountain", "bicycle", "library", "winter",
           "market", "forest", "letter", "kitchen", "island", "train", "teacher", "ocean", "bridge",
           "candle", "journey"],
    "de": ["Fluss", "Garten", "Musik", "Fenster", "Kaffee", "Berg", "Fahrrad", "Bibliothek", "Schnee",
           "Markt", "Wald", "Brief", "Küche", "Insel", "Zug", "Lehrerin", "Meer", "Brücke", "Kerze",
           "Reise"],
}
"""Everyday nouns for the keyword kinds, per answer language."""

START_PHRASES = {
    "en": ["My answer is", "Here is my answer", "Dear reader", "In short"],
    "de": ["Meine Antwort lautet", "Hier ist meine Antwort", "Liebe Leserin", "Kurz gesagt"],
}
END_PHRASES = {
    "en": ["Is there anything else I can help with?", "Let me know if you have additional questions.",
           "Any other questions?", "That is all."],
    "de": ["Kann ich sonst noch helfen?", "Gibt es noch weitere Fragen?", "Das ist alles."],
}


class _Draw:
    """The randomness of one `random_constraints` call: the rng, the answer language, and the
    keywords not used yet (so that no two constraints share one)."""

    def __init__(self, rng: random.Random, language: str):
        self.rng, self.language = rng, language
        self.unused_keywords = rng.sample(KEYWORDS[language], len(KEYWORDS[language]))

    def keywords(self, n: int) -> list[str]:
        return [self.unused_keywords.pop() for _ in range(n)]

    def count(self, low: int, high: int) -> dict[str, int]:
        return {"n": self.rng.randint(low, high)}

    def capital_words(self) -> dict[str, Any]:
        if self.rng.random() < 0.5:
            return {"relation": "at least", **self.count(2, 4)}
        return {"relation": "at most", **self.count(1, 3)}


_PARAMS: dict[str, Callable[[_Draw], dict[str, Any]]] = {
    "min_words": lambda d: {"n": d.rng.choice([20, 30, 40, 50])},
    "max_words": lambda d: {"n": d.rng.choice([80, 100, 150, 200, 300])},
    "min_sentences": lambda d: d.count(2, 5),
    "max_sentences": lambda d: d.count(6, 12),
    "paragraph_count": lambda d: d.count(2, 5),
    "include_keywords": lambda d: {"keywords": d.keywords(d.rng.randint(1, 3))},
    "exclude_keywords": lambda d: {"keywords": d.keywords(d.rng.randint(1, 2))},
    "keyword_frequency": lambda d: {"keyword": d.keywords(1)[0], **d.count(2, 4)},
    "placeholders": lambda d: d.count(1, 3),
    "language": lambda d: {"language": d.language},
    "all_lowercase": lambda d: {},
    "all_uppercase": lambda d: {},
    "capital_word_frequency": lambda d: d.capital_words(),
    "no_commas": lambda d: {},
    "json_output": lambda d: {},
    "bullet_points": lambda d: d.count(2, 5),
    "title": lambda d: {},
    "highlighted_sections": lambda d: d.count(1, 3),
    "quotation": lambda d: {},
    "starts_with": lambda d: {"phrase": d.rng.choice(START_PHRASES[d.language])},
    "ends_with": lambda d: {"phrase": d.rng.choice(END_PHRASES[d.language])},
    "postscript": lambda d: {"marker": d.rng.choice(["P.S.", "P.P.S."])},
}
"""Kind -> sampler of its parameters, in ranges that fit together (see the module docstring)."""


def compatible(kind: str, other: str) -> bool:
    """Whether two kinds may appear in one constraint set (a kind is not compatible with itself)."""
    return kind != other and frozenset((kind, other)) not in INCOMPATIBLE


def random_constraints(rng: random.Random, k: int, language: str = "en") -> list[dict[str, Any]]:
    """`k` constraints of distinct, pairwise compatible kinds, for an answer in `language`.

    Kinds are taken greedily in a random order, so every kind is equally likely to be first;
    the result depends only on the state of `rng`. 0 <= k <= MAX_CONSTRAINTS.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    if not 0 <= k <= MAX_CONSTRAINTS:
        raise ValueError(f"k must be between 0 and {MAX_CONSTRAINTS}, got {k}")
    draw = _Draw(rng, language)
    kinds = sorted(_PARAMS)
    rng.shuffle(kinds)
    chosen: list[str] = []
    for kind in kinds:
        if len(chosen) == k:
            break
        if all(compatible(kind, other) for other in chosen):
            chosen.append(kind)
    return [{"kind": kind, **_PARAMS[kind](draw)} for kind in chosen]


def _results(text: str, constraints: Sequence[Mapping[str, Any]]) -> list[bool]:
    """`check` for every constraint (all of them, so that a bad one always raises)."""
    return [check(text, constraint) for constraint in constraints]


def score(text: str, constraints: Sequence[Mapping[str, Any]]) -> float:
    """The fraction of `constraints` that `text` satisfies, in [0, 1]; 1.0 for no constraints."""
    results = _results(text, constraints)
    return sum(results) / len(results) if results else 1.0


def all_pass(text: str, constraints: Sequence[Mapping[str, Any]]) -> bool:
    """Whether `text` satisfies every constraint (true for none)."""
    return all(_results(text, constraints))
