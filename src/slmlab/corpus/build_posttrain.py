"""Build the embedded post-training data from the embedded Debian Reference (en + de).

    python src/slmlab/corpus/build_posttrain.py

writes, next to this file:
  chat.jsonl.gz                conversations about the book's sections, for SFT
  prefs.jsonl.gz               preference pairs (a grounded answer against a worse one), for DPO
  constraint_prompts.jsonl.gz  questions with verifiable constraints (`slmlab.rewards`), for GRPO

Every answer is made of the book's own words: a section's title, its first sentences, the commands
and manual pages it names. Each record carries `section`, the id of the corpus record its text
comes from, so that a held-out section stays held out in every stage (`split_key: section`, with
the rule of `slmlab.data.prepare.is_val_document`). The build is deterministic: the same corpus
gives byte-identical files.
"""

import gzip
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slmlab.data.prepare import is_val_document
from slmlab.rewards import MAX_CONSTRAINTS, compatible, describe, random_constraints

HERE = Path(__file__).parent
LANGUAGES = ("en", "de")
SEED = 20240601
HELDOUT_FRACTION = 0.2
"""Share of the book's sections whose constraint prompts are `heldout` (by `is_val_document`)."""
MAX_ANSWER_WORDS = 40
"""Sentences are added to an answer while it stays within this many words: tiny models learn short answers."""

SECTION_HEADING = re.compile(r"^(\d+\.\d+(?:\.\d+)?)\.\s+(\S.*)$")
CHAPTER_HEADING = re.compile(r"^(?:Chapter|Kapitel)\s+(\d+)\.\s+(\S.*)$")
ADMONITIONS = {"Note", "Tip", "Warning", "Caution", "Important", "Anmerkung", "Tipp", "Warnung", "Achtung", "Wichtig"}
MANPAGE = re.compile(r"\b([a-z][a-z0-9_.+-]*[a-z0-9]) ?\(([1-8])\)")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÜ\"„“(])")
LEAD_INS = ("following.", "follows.", "folgt.", "Folgendes.", "folgenden.")
"""Sentence ends that point at a listing or command the answer does not show."""
ABBREVIATIONS = ("e.g.", "i.e.", "z.B.", "z. B.", "d.h.", "d. h.", "u.a.", "bzw.", "ggf.", "vgl.", "Nr.", "ca.", "vs.")


@dataclass
class Unit:
    """A numbered part of the book in one language: a chapter, a section (1.5) or a subsection (1.5.2)."""
    id: str
    section: str  # the corpus record the text belongs to: the train/val split key
    language: str
    title: str
    sentences: list[str] = field(default_factory=list)
    subtitles: list[str] = field(default_factory=list)  # of its subsections, for a section without own text
    commands: list[str] = field(default_factory=list)  # shell command lines, prompt removed
    manpages: list[str] = field(default_factory=list)  # "mount(8)", in order of first mention

    @property
    def kind(self) -> str:
        return "chapter" if "." not in self.id else "section"


# -- parsing the book ------------------------------------------------------------------------------

def clean(text: str) -> str:
    """No-break and other odd spaces -> plain spaces, runs of spaces -> one."""
    return re.sub(r"\s+", " ", text.replace("\xa0", " ")).strip()


def join_lines(lines: list[str]) -> str:
    """Undo the plain-text edition's line wrapping ("/usr/share/doc/\\n  foo" is one path)."""
    text = ""
    for line in (line.strip() for line in lines):
        text += line if text.endswith("/") or not text else " " + line
    return clean(text)


def split_sentences(paragraph: str) -> list[str]:
    """At ". " before a capital, except after an abbreviation ("e.g. The" stays one sentence)."""
    chunks = SENTENCE_END.split(paragraph)
    sentences: list[str] = []
    for chunk in chunks:
        if sentences and sentences[-1].endswith(ABBREVIATIONS):
            sentences[-1] += " " + chunk
        else:
            sentences.append(chunk)
    return sentences


def is_prose(sentence: str) -> bool:
    """A sentence worth quoting: complete, plain words, not a lead-in to a list ("as follows:")."""
    words = sentence.split()
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return (4 <= len(words) <= 32 and sentence[0].isupper() and sentence.endswith((".", "!", "?"))
            and not sentence.endswith(LEAD_INS) and letters >= 0.8 * len(sentence))


def paragraphs(lines: list[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def read_units(record: dict, language: str) -> list[Unit]:
    """The units of one corpus record: its section and the subsections (or a chapter) it holds."""
    units: list[Unit] = []
    bodies: list[list[str]] = []  # the lines under each heading
    for line in record["text"].splitlines():
        heading = None if line.startswith(" ") else SECTION_HEADING.match(clean(line)) or CHAPTER_HEADING.match(
            clean(line))
        if heading:
            units.append(Unit(heading.group(1), record["id"], language, heading.group(2)))
            bodies.append([])
        elif bodies:
            bodies[-1].append(line)
    for unit, body in zip(units, bodies):
        fill(unit, body)
        unit.subtitles = [u.title for u in units if u.id.rsplit(".", 1)[0] == unit.id]  # 1.5.1, 1.5.2 of 1.5
    return units


def fill(unit: Unit, lines: list[str]) -> None:
    """The sentences, commands and manual pages of a unit's text; tables are skipped."""
    for block in paragraphs(lines):
        first = block[0].strip()
        if first.startswith(("+", "|")):  # a table
            continue
        if first.startswith(("$ ", "# ")):
            unit.commands += [clean(line)[2:] for line in block if clean(line).startswith(("$ ", "# "))]
            continue
        if len(block) == 1 and first in ADMONITIONS:
            continue
        text = re.sub(r"^(\*|\d+\.)\s+", "", join_lines(block))  # list items are prose too
        unit.manpages += [f"{name}({sec})" for name, sec in MANPAGE.findall(text)
                          if f"{name}({sec})" not in unit.manpages]
        unit.sentences += [s for s in split_sentences(text) if is_prose(s)]
    unit.commands = [c for c in dict.fromkeys(unit.commands) if 2 <= len(c) <= 60]


def load_book() -> dict[tuple[str, str], Unit]:
    """(language, unit id) -> unit, for both languages (the ids are the same in both)."""
    units = {}
    for language in LANGUAGES:
        with gzip.open(HERE / f"debian_reference.{language}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                for unit in read_units(json.loads(line), language):
                    units[language, unit.id] = unit
    return units


# -- questions and answers -------------------------------------------------------------------------

def name(unit: Unit, language: str, capital: bool = False) -> str:
    """"section 1.5.2" / "Abschnitt 1.5.2" / "chapter 1" / "Kapitel 1"."""
    word = {("en", "section"): "section", ("en", "chapter"): "chapter",
            ("de", "section"): "Abschnitt", ("de", "chapter"): "Kapitel"}[language, unit.kind]
    return f"{word.capitalize() if capital else word} {unit.id}"


def quoted(title: str, language: str) -> str:
    return f"“{title}”" if language == "en" else f"„{title}“"


def join_words(items: list[str], language: str) -> str:
    """"a, b and c" / "a, b und c"."""
    conjunction = " and " if language == "en" else " und "
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + conjunction + items[-1]


def lead_sentences(unit: Unit, budget: int) -> list[str]:
    """The unit's first sentences, as many as fit in `budget` words (at least one)."""
    chosen: list[str] = []
    for sentence in unit.sentences:
        if chosen and sum(len(s.split()) for s in chosen) + len(sentence.split()) > budget:
            break
        chosen.append(sentence)
    return chosen


def summary_sentence(unit: Unit) -> str | None:
    """The first sentence of eight words or more: shorter ones are mostly lead-ins ("Here are some tips.")."""
    return next((s for s in unit.sentences if len(s.split()) >= 8), None)


@dataclass
class QA:
    """One question kind: its phrasings per language and its answer (None where the unit has none)."""
    questions: dict[str, list[str]]
    answer: Callable[[Unit, str], str | None]


def about(unit: Unit, language: str) -> str | None:
    title = quoted(unit.title, language)
    head = (f"{name(unit, language, True)} is titled {title}." if language == "en"
            else f"{name(unit, language, True)} trägt den Titel {title}.")
    budget = MAX_ANSWER_WORDS - len(head.split())
    if unit.sentences:
        return " ".join([head, *lead_sentences(unit, budget)])
    if unit.subtitles:
        topics = join_words(unit.subtitles[:5], language)
        return head + (f" It covers: {topics}." if language == "en" else f" Er behandelt: {topics}.")
    return None


def title(unit: Unit, language: str) -> str:
    return f"{quoted(unit.title, language)}."


def summary(unit: Unit, language: str) -> str | None:
    return summary_sentence(unit)


def manpages(unit: Unit, language: str) -> str | None:
    if not unit.manpages:
        return None
    listed = join_words(unit.manpages[:6], language)
    return (f"{name(unit, language, True)} mentions {listed}." if language == "en"
            else f"{name(unit, language, True)} nennt {listed}.")


def first_command(unit: Unit, language: str) -> str | None:
    if not unit.commands:
        return None
    return (f"The first command in {name(unit, language)} is: {unit.commands[0]}" if language == "en"
            else f"Der erste Befehl in {name(unit, language)} lautet: {unit.commands[0]}")


def which_unit(unit: Unit, language: str) -> str:
    return f"{name(unit, language, True)}."


QAS = {
    "about": QA({"en": ["What is {name} about?", "What does {name} of the Debian Reference cover?",
                        "Briefly, what does {name} explain?"],
                 "de": ["Worum geht es in {name}?", "Was behandelt {name} der Debian-Referenz?",
                        "Was erklärt {name}, kurz gesagt?"]}, about),
    "title": QA({"en": ["What is the title of {name}?"], "de": ["Wie lautet der Titel von {name}?"]}, title),
    "summary": QA({"en": ["Summarise {name} in one sentence."], "de": ["Fasse {name} in einem Satz zusammen."]},
                  summary),
    "manpages": QA({"en": ["Which commands does {name} mention?", "Which manual pages does {name} refer to?"],
                    "de": ["Welche Befehle nennt {name}?", "Auf welche Handbuchseiten verweist {name}?"]}, manpages),
    "command": QA({"en": ["Which command does {name} show first?"],
                   "de": ["Welchen Befehl zeigt {name} als ersten?"]}, first_command),
    "which": QA({"en": ["Which part of the Debian Reference is titled {title}?"],
                 "de": ["Welcher Teil der Debian-Referenz trägt den Titel {title}?"]}, which_unit),
}
FOLLOW_UPS = {  # a second turn about the same unit: (question kind, phrasing per language)
    "summary": {"en": "Summarise it in one sentence.", "de": "Fasse das in einem Satz zusammen."},
    "manpages": {"en": "Which commands does it mention?", "de": "Welche Befehle werden dort genannt?"},
    "command": {"en": "Which command does it show first?", "de": "Welchen Befehl zeigt er als ersten?"},
}
SYSTEM = {"en": "You answer questions about the Debian Reference briefly and accurately.",
          "de": "Du beantwortest Fragen zur Debian-Referenz knapp und genau."}
ANSWER_IN = {  # asked in `key[0]`, to be answered in `key[1]`
    ("en", "de"): "Please answer in German.", ("de", "en"): "Bitte antworte auf Englisch.",
}


def question(kind: str, unit: Unit, language: str, rng: random.Random) -> str:
    return rng.choice(QAS[kind].questions[language]).format(name=name(unit, language),
                                                            title=quoted(unit.title, language))


def other(language: str) -> str:
    return LANGUAGES[1 - LANGUAGES.index(language)]


# -- the three datasets ----------------------------------------------------------------------------

def chat_records(book: dict[tuple[str, str], Unit], rng: random.Random) -> list[dict]:
    """The conversations about every unit in each language, a quarter of them with a system prompt."""
    records = []
    for (language, _), unit in book.items():
        for kind, messages, answered_in in conversations_about(unit, book, rng):
            if rng.random() < 0.25:
                messages = [{"role": "system", "content": SYSTEM[language]}] + messages
            records.append({"id": f"{unit.id}/{language}/{kind}", "section": unit.section, "language": answered_in,
                            "messages": messages})
    return records


def conversations_about(unit: Unit, book: dict[tuple[str, str], Unit],
                        rng: random.Random) -> Iterator[tuple[str, list[dict], str]]:
    """(kind, messages, language of the answers): what the unit is about, and for a random share of
    units other question kinds, a follow-up question, or an answer in the other language."""
    language = unit.language
    for kind, share in (("about", 1.0), ("title", 0.3), ("summary", 0.3), ("manpages", 0.4),
                        ("command", 0.4), ("which", 0.3)):
        answer = QAS[kind].answer(unit, language)
        if answer is not None and rng.random() < share:
            yield kind, turns(question(kind, unit, language, rng), answer), language
    first = QAS["about"].answer(unit, language)
    follow = rng.choice(list(FOLLOW_UPS))
    second = QAS[follow].answer(unit, language)
    if first and second and rng.random() < 0.3:
        yield (f"about+{follow}", turns(question("about", unit, language, rng), first,
                                        FOLLOW_UPS[follow][language], second), language)
    translated = QAS["about"].answer(book[other(language), unit.id], other(language))
    if translated and rng.random() < 0.15:
        asked = f"{question('about', unit, language, rng)} {ANSWER_IN[language, other(language)]}"
        yield "about-translated", turns(asked, translated), other(language)


def turns(*contents: str) -> list[dict]:
    """user, assistant, user, ... messages."""
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


REJECTIONS = ("wrong_section", "truncated", "garbled", "wrong_language")


def rejected_answer(how: str, kind: str, unit: Unit, chosen: str, book: dict[tuple[str, str], Unit],
                    rng: random.Random) -> str | None:
    """A worse answer to the question `kind` about `unit` (None where `how` does not apply)."""
    language = unit.language
    if how == "wrong_section":  # a fluent, well-formed answer about another part of the book
        # never a held-out section's text: the splits nest (pretraining's 5%, chat and prefs' 15%, these 20%)
        others = [u for (lang, _), u in book.items() if lang == language and u.section != unit.section
                  and not is_val_document(u.section.encode(), HELDOUT_FRACTION)]
        for candidate in rng.sample(others, 20):
            answer = QAS[kind].answer(candidate, language)
            if answer is not None and answer != chosen:
                return answer
        return None
    words = chosen.split()
    if how == "truncated":  # stops mid-sentence
        return " ".join(words[:max(2, len(words) * rng.randint(3, 6) // 10)]) if len(words) >= 6 else None
    if how == "garbled":  # the right words in the wrong order
        if len(words) < 6:
            return None
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    answer = QAS[kind].answer(book[other(language), unit.id], other(language))  # wrong_language
    return answer if answer != chosen else None


def preference_records(book: dict[tuple[str, str], Unit], rng: random.Random) -> list[dict]:
    """One pair for about half of the units per language: the grounded answer is chosen."""
    records = []
    for (language, _), unit in book.items():
        if rng.random() >= 0.5:
            continue
        kinds = [k for k in ("about", "summary", "manpages", "title") if QAS[k].answer(unit, language)]
        if not kinds:
            continue
        kind = rng.choice(kinds)
        chosen = QAS[kind].answer(unit, language)
        for how in rng.sample(REJECTIONS, len(REJECTIONS)):  # the first that applies
            rejected = rejected_answer(how, kind, unit, chosen, book, rng)
            if rejected is not None:
                break
        prompt = turns(question(kind, unit, language, rng))
        if rng.random() < 0.25:
            prompt = [{"role": "system", "content": SYSTEM[language]}] + prompt
        records.append({"id": f"{unit.id}/{language}/{kind}", "section": unit.section, "language": language,
                        "prompt": prompt, "chosen": chosen, "rejected": rejected, "rejected_kind": how})
    return records


EASY_KINDS = ("all_lowercase", "no_commas", "language", "quotation", "title", "max_words")
"""Constraints a small model meets by a simple habit (no capitals, no commas, short answers, ...)."""
EASY_SHARE = 0.8
"""Share of the prompts led by an easy constraint: all_lowercase for half of them."""


def constraint_set(rng: random.Random, language: str) -> list[dict]:
    """One or two compatible constraints for an answer in `language`, mostly led by an easy one.
    (Each instruction adds 15 to 35 tokens: three rarely leave room for an answer in 128 positions.)"""
    pool = random_constraints(rng, MAX_CONSTRAINTS, language)  # pairwise compatible, in random order
    k = rng.choice((1, 2, 2))
    if rng.random() >= EASY_SHARE:
        return pool[:k]
    if rng.random() < 0.5:
        lead = {"kind": "all_lowercase"}
    else:  # "language" is compatible with every kind, so the pool always holds an easy constraint
        lead = next(c for c in pool if c["kind"] in EASY_KINDS)
    return [lead] + [c for c in pool if compatible(c["kind"], lead["kind"])][:k - 1]


def constraint_records(book: dict[tuple[str, str], Unit], rng: random.Random) -> list[dict]:
    """Questions about sections, each followed by the sentences that state its constraints."""
    records = []
    for (language, _), unit in book.items():
        if unit.kind != "section" or rng.random() >= 0.45:
            continue
        constraints = constraint_set(rng, language)
        asked = QAS["about"].questions[language][0].format(name=name(unit, language))  # the shortest phrasing
        text = " ".join([asked] + [describe(c) for c in constraints])
        split = "heldout" if is_val_document(unit.section.encode(), HELDOUT_FRACTION) else "train"
        records.append({"id": f"{unit.id}/{language}/constrained", "section": unit.section, "prompt": text,
                        "language": language, "constraints": constraints, "split": split})
    return records


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0: the same records give byte-identical files
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{path.name}: {len(records)} records, {path.stat().st_size:,} bytes")


def main(out_dir: Path = HERE) -> None:
    book = load_book()
    # one generator per dataset: changing one dataset leaves the others as they were
    write_jsonl_gz(out_dir / "chat.jsonl.gz", chat_records(book, random.Random(f"{SEED}/chat")))
    write_jsonl_gz(out_dir / "prefs.jsonl.gz", preference_records(book, random.Random(f"{SEED}/prefs")))
    write_jsonl_gz(out_dir / "constraint_prompts.jsonl.gz",
                   constraint_records(book, random.Random(f"{SEED}/constraints")))


if __name__ == "__main__":
    main()
