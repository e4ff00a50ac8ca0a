"""Programmatically checkable instructions (IFEval-style constraints) for rule-based rewards.

A constraint is a plain mapping, as it comes from JSON or YAML: `{"kind": "max_words", "n": 50}`.
`kind` names a checker in `CONSTRAINTS`; the other keys are that checker's keyword parameters.
`check(text, constraint)` validates the parameters against the checker's signature (type hints)
and runs it; `describe(constraint)` gives the instruction to put in the prompt.

Shared definitions (used by several checkers):
- *word*: a run of letters, digits or underscores, with inner apostrophes ("don't" is one word);
- *sentence*: text up to ".", "!" or "?" (closing quotes or brackets may follow) before whitespace,
  or up to a paragraph break; a piece without a word is not a sentence. Abbreviations ("e.g.",
  "z. B.") end a sentence too;
- *paragraph*: text between blank lines or lines holding only the markdown divider `***`;
- *keyword / phrase* matching: case-insensitive, any whitespace between its words, and never
  inside a longer word ("cat" does not match "category");
- *blank text* (empty or whitespace only) satisfies no constraint, so an empty answer cannot earn
  reward for what it avoids (commas, capitals, more than 50 words).

Differences from IFEval (google-research/instruction_following_eval), where a kind exists there:
- blank text fails everything (IFEval passes it for e.g. no_comma, lowercase, word-count "less than");
- counts compare inclusively: max_words means "at most n" (IFEval's "less than" is strict);
- words are `\\w+` runs with inner apostrophes (IFEval: nltk tokens, "don't" is two words);
- paragraphs are split by blank lines *or* `***`, empty ones are ignored (IFEval: `***` only, and an
  empty paragraph in the middle fails);
- keywords match whole words only (IFEval's include-keywords matches substrings);
- all_lowercase needs a lower-case letter and all_uppercase a capital (IFEval: `text == text.lower()`,
  true for "123"); German ß, which has no one-letter capital, is allowed in all-capitals text;
- ALL-CAPS words need at least two letters, so "I" and "A" do not count;
- json_output needs an object or array (IFEval accepts any JSON value, e.g. `42`);
- title, placeholders and highlights need non-blank content; a markdown link's `[text](url)` is
  not a placeholder;
- quotation also accepts typographic pairs “…” and „…“;
- postscript must be in the last paragraph (IFEval: anywhere);
- language tells only German from English (IFEval: langdetect, any language);
- starts_with and min/max_sentences are not IFEval kinds (IFEval has first-word-of-paragraph and
  a single sentence count with a relation).
"""

import inspect
import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

from slmlab.rewards.language import Language, detect_language

Checker = Callable[..., bool]
Relation = Literal["at least", "at most"]
Marker = Literal["P.S.", "P.P.S."]

CONSTRAINTS: dict[str, Checker] = {}
"""Kind -> checker(text, **params) -> bool. Call `check` rather than a checker: it validates."""
DESCRIPTIONS: dict[str, Callable[..., str]] = {}
"""Kind -> describer(**params) -> the instruction in English."""
_PARAMETERS: dict[str, dict[str, Any]] = {}
"""Kind -> its parameters' names and type hints (all parameters are required)."""


def instruction(describe: Callable[..., str]) -> Callable[[Checker], Checker]:
    """Register the decorated checker as the kind named like the function; `describe(**params)`
    gives its instruction."""
    def register(checker: Checker) -> Checker:
        kind = checker.__name__
        hints = get_type_hints(checker)
        names = list(inspect.signature(checker).parameters)[1:]  # after `text`
        CONSTRAINTS[kind] = checker
        DESCRIPTIONS[kind] = describe
        _PARAMETERS[kind] = {name: hints[name] for name in names}
        return checker
    return register


# ---------------------------------------------------------------- validation and entry points

def _valid(kind: str, name: str, hint: Any, value: Any) -> Any:
    """`value` if it fits the type hint (lists as list), else ValueError naming kind and param."""
    if get_origin(hint) is Literal:
        ok, expected = value in get_args(hint), f"one of {', '.join(map(repr, get_args(hint)))}"
    elif hint is int:
        ok, expected = type(value) is int and value >= 0, "a non-negative integer"
    elif hint is str:
        ok, expected = isinstance(value, str) and bool(value.strip()), "a non-blank string"
    elif get_origin(hint) is list:
        ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
              and all(isinstance(v, str) and v.strip() for v in value))
        expected, value = "a non-empty list of non-blank strings", list(value) if ok else value
    else:
        raise TypeError(f"{kind}: parameter {name!r} has an unsupported type hint {hint!r}")
    if not ok:
        raise ValueError(f"constraint {kind!r}: parameter {name!r} must be {expected}, got {value!r}")
    return value


def _parse(constraint: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kind and its validated parameters."""
    if not isinstance(constraint, Mapping) or "kind" not in constraint:
        raise ValueError(f"a constraint is a mapping with a 'kind' key, got {constraint!r}")
    kind = constraint["kind"]
    if not isinstance(kind, str) or kind not in CONSTRAINTS:  # a list or dict: `in` raises TypeError
        raise ValueError(f"unknown constraint kind {kind!r}; known kinds: {', '.join(sorted(CONSTRAINTS))}")
    given = {name: value for name, value in constraint.items() if name != "kind"}
    expected = _PARAMETERS[kind]
    if unknown := sorted(given.keys() - expected.keys()):
        raise ValueError(f"constraint {kind!r}: unknown parameter {unknown[0]!r} "
                         f"(it takes: {', '.join(expected) or 'none'})")
    if missing := [name for name in expected if name not in given]:
        raise ValueError(f"constraint {kind!r}: missing parameter {missing[0]!r}")
    return kind, {name: _valid(kind, name, expected[name], value) for name, value in given.items()}


def check(text: str, constraint: Mapping[str, Any]) -> bool:
    """Whether `text` satisfies `constraint`; blank text satisfies none.

    Raises ValueError, naming the kind and the parameter, for an unknown kind or a missing,
    unknown or ill-typed parameter (even when the text is blank).
    """
    kind, params = _parse(constraint)
    return bool(text.strip()) and CONSTRAINTS[kind](text, **params)


def describe(constraint: Mapping[str, Any]) -> str:
    """The natural-language instruction, e.g. "Answer with at most 50 words." (validated like `check`)."""
    kind, params = _parse(constraint)
    return DESCRIPTIONS[kind](**params)


# ---------------------------------------------------------------- shared definitions

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”“»«)\]]*\s+")
_SEPARATOR_LINE = re.compile(r"^[^\S\n]*(?:\*\*\*)?[^\S\n]*$", re.MULTILINE)
_LANGUAGE_NAMES = {"de": "German", "en": "English"}


def words(text: str) -> list[str]:
    """The words of `text` (see the module docstring)."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """The sentences of `text` (see the module docstring)."""
    return [s for p in paragraphs(text) for s in _SENTENCE_END.split(p) if _WORD.search(s)]


def paragraphs(text: str) -> list[str]:
    """The non-empty paragraphs of `text`, split at blank lines and `***` divider lines."""
    pieces = (p.strip() for p in _SEPARATOR_LINE.split(text))
    return [p for p in pieces if p]


def _phrase(phrase: str) -> str:
    """A regex for `phrase`: any whitespace between its words, not inside a longer word."""
    return r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"


def _occurrences(text: str, phrase: str) -> int:
    return len(re.findall(_phrase(phrase), text, re.IGNORECASE))


def _is_capital(char: str) -> bool:
    return unicodedata.category(char) in ("Lu", "Lt")


def _is_small(char: str) -> bool:
    """A lower-case letter with a one-letter capital (so not ß, whose capital is "SS")."""
    return char.islower() and len(char.upper()) == 1 and char.upper() != char


def _is_capital_word(word: str) -> bool:
    letters = [c for c in word if c.isalpha()]
    return len(letters) >= 2 and any(map(_is_capital, letters)) and not any(map(_is_small, letters))


def _compare(count: int, relation: Relation, n: int) -> bool:
    return count >= n if relation == "at least" else count <= n


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _quoted(items: Sequence[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# ---------------------------------------------------------------- length

@instruction(lambda n: f"Answer with at least {_plural(n, 'word')}.")
def min_words(text: str, n: int) -> bool:
    """At least `n` words."""
    return len(words(text)) >= n


@instruction(lambda n: f"Answer with at most {_plural(n, 'word')}.")
def max_words(text: str, n: int) -> bool:
    """At most `n` words (inclusive)."""
    return len(words(text)) <= n


@instruction(lambda n: f"Answer with at least {_plural(n, 'sentence')}.")
def min_sentences(text: str, n: int) -> bool:
    """At least `n` sentences."""
    return len(sentences(text)) >= n


@instruction(lambda n: f"Answer with at most {_plural(n, 'sentence')}.")
def max_sentences(text: str, n: int) -> bool:
    """At most `n` sentences (inclusive)."""
    return len(sentences(text)) <= n


@instruction(lambda n: f"Write exactly {_plural(n, 'paragraph')}, separated by blank lines or the "
                       "markdown divider ***.")
def paragraph_count(text: str, n: int) -> bool:
    """Exactly `n` non-empty paragraphs; leading, trailing or doubled separators do not count."""
    return len(paragraphs(text)) == n


# ---------------------------------------------------------------- content

@instruction(lambda keywords: f"Include the {'keyword' if len(keywords) == 1 else 'keywords'} "
                              f"{_quoted(keywords)} in your answer.")
def include_keywords(text: str, keywords: list[str]) -> bool:
    """Every keyword (or phrase) appears at least once, as a whole word, in any letter case."""
    return all(_occurrences(text, keyword) > 0 for keyword in keywords)


@instruction(lambda keywords: f"Do not use the {'word' if len(keywords) == 1 else 'words'} "
                              f"{_quoted(keywords)} in your answer.")
def exclude_keywords(text: str, keywords: list[str]) -> bool:
    """No keyword appears as a whole word in any letter case; inside longer words is fine."""
    return not any(_occurrences(text, keyword) for keyword in keywords)


@instruction(lambda keyword, n: f'Use the word "{keyword}" at least {_plural(n, "time")}.')
def keyword_frequency(text: str, keyword: str, n: int) -> bool:
    """`keyword` appears at least `n` times as a whole word, in any letter case."""
    return _occurrences(text, keyword) >= n


@instruction(lambda n: f"Include at least {_plural(n, 'placeholder')} in square brackets, "
                       "such as [address].")
def placeholders(text: str, n: int) -> bool:
    """At least `n` placeholders `[...]` with non-blank content on one line; a markdown link's
    text, `[text](url)`, is not one."""
    found = re.findall(r"\[([^\[\]\n]+)\](?!\()", text)
    return sum(bool(content.strip()) for content in found) >= n


@instruction(lambda language: f"Answer in {_LANGUAGE_NAMES[language]} only; no other language is allowed.")
def language(text: str, language: Language) -> bool:
    """The text is in `language` ("de" or "en") per `detect_language`; undecidable text fails."""
    return detect_language(text) == language


# ---------------------------------------------------------------- letter case and punctuation

@instruction(lambda: "Write your entire answer in lowercase letters; no capital letters are allowed.")
def all_lowercase(text: str) -> bool:
    """At least one lower-case letter and no capital (umlauts included: "Ä" fails)."""
    return any(c.islower() for c in text) and not any(map(_is_capital, text))


@instruction(lambda: "Write your entire answer in capital letters; no lowercase letters are allowed.")
def all_uppercase(text: str) -> bool:
    """At least one capital and no lower-case letter that has a one-letter capital: "ÄPFEL" passes,
    "GROß" passes (ß capitalises to "SS"), "Äpfel" fails."""
    return any(map(_is_capital, text)) and not any(map(_is_small, text))


@instruction(lambda relation, n: f"Use {relation} {_plural(n, 'word')} written entirely in capital "
                                 "letters.")
def capital_word_frequency(text: str, relation: Relation, n: int) -> bool:
    """The number of ALL-CAPS words (at least two letters, all capitals, ß allowed) is at least or
    at most `n`. Words glued by apostrophes count once ("DON'T")."""
    return _compare(sum(map(_is_capital_word, words(text))), relation, n)


@instruction(lambda: "Do not use any commas in your answer.")
def no_commas(text: str) -> bool:
    """No ASCII comma ","; other comma-like characters ("，", "、") are allowed."""
    return "," not in text


# ---------------------------------------------------------------- format

_JSON_FENCE = re.compile(r"```(?:json)?(.*)```", re.DOTALL | re.IGNORECASE)


@instruction(lambda: "Wrap your entire answer in JSON (an object or an array); a ```json code block "
                     "is allowed.")
def json_output(text: str) -> bool:
    """The whole text, or the inside of one ``` or ```json fence around all of it, parses as a
    JSON object or array. Text before or after the fence fails; so does a bare number or string."""
    body = text.strip()
    fenced = _JSON_FENCE.fullmatch(body)
    try:
        value = json.loads(fenced.group(1) if fenced else body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return False
    return isinstance(value, (dict, list))


@instruction(lambda n: f'Use exactly {_plural(n, "markdown bullet point")}, lines starting with '
                       '"* " or "- ".')
def bullet_points(text: str, n: int) -> bool:
    """Exactly `n` lines start (after indentation) with "* " or "- "; both markers count, nested
    bullets too. "**bold**", "-5" and the divider "***" are not bullets."""
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", text, re.MULTILINE)) == n


@instruction(lambda: "Give your answer a title wrapped in double angular brackets, such as "
                     "<<poem of joy>>.")
def title(text: str) -> bool:
    """Contains `<<title>>` with non-blank content on one line, anywhere in the text."""
    return any(content.strip() for content in re.findall(r"<<([^\n<>]+)>>", text))


@instruction(lambda n: f"Highlight at least {_plural(n, 'section')} with markdown, such as "
                       "*highlighted section*.")
def highlighted_sections(text: str, n: int) -> bool:
    """At least `n` spans `*like this*` or `**like this**` on one line. The stars must hug the
    text, so bullets ("* item"), products ("2 * 3") and the divider "***" are not highlights."""
    spans = re.findall(r"(?<!\*)(\*{1,2})(?![\s*])[^*\n]+?(?<![\s*])\1(?!\*)", text)
    return len(spans) >= n


@instruction(lambda: "Wrap your entire answer in double quotation marks.")
def quotation(text: str) -> bool:
    """After stripping whitespace, the text starts and ends with a matching pair of double quotes,
    "…", “…” or „…“, with something non-blank between them."""
    body = text.strip()
    pairs = {('"', '"'), ("“", "”"), ("„", "“")}
    return len(body) >= 2 and (body[0], body[-1]) in pairs and bool(body[1:-1].strip())


@instruction(lambda phrase: f'Start your answer with the phrase "{phrase}".')
def starts_with(text: str, phrase: str) -> bool:
    """After leading whitespace the text starts with `phrase` (any case, any whitespace between
    its words), not as the start of a longer word: "Surely" does not start with "Sure"."""
    return re.match(r"\s*" + _phrase(phrase), text, re.IGNORECASE) is not None


@instruction(lambda phrase: f'Finish your answer with the exact phrase "{phrase}"; no other words '
                            "may follow it.")
def ends_with(text: str, phrase: str) -> bool:
    """Before trailing whitespace the text ends with `phrase` (any case, any whitespace between
    its words), not as the end of a longer word."""
    return re.search(_phrase(phrase) + r"\s*\Z", text, re.IGNORECASE) is not None


@instruction(lambda marker: f"At the end of your answer, add a postscript starting with {marker}")
def postscript(text: str, marker: Marker) -> bool:
    """A line of the last paragraph starts with `marker` ("P.S." or "P.P.S.", any case, a space
    allowed after each dot, the last dot optional but then no letter right after: "P.Smith" is a name)
    followed by some text."""
    letters = marker.replace(".", "")
    start = r"^\s*" + r"\.\s?".join(letters) + r"(?:\.|(?!\w))\s*:?\s*\w"
    last_paragraph = paragraphs(text)[-1:]
    return any(re.search(start, p, re.IGNORECASE | re.MULTILINE) for p in last_paragraph)
