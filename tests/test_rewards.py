import gzip
import itertools
import json
import random
import re
from importlib.resources import files

import pytest

from slmlab.rewards import (CONSTRAINTS, DESCRIPTIONS, INCOMPATIBLE, LANGUAGES, MAX_CONSTRAINTS, all_pass, check,
                            compatible, describe, detect_language, random_constraints, score)
from slmlab.rewards.constraints import paragraphs, sentences, words
from slmlab.rewards.language import _FUNCTION_WORDS
from slmlab.rewards.reward import END_PHRASES, KEYWORDS, START_PHRASES

# (constraint, a text that satisfies it, a text that does not): at least one row per kind
CASES = [
    ({"kind": "min_words", "n": 8}, "The quick brown fox jumps over the lazy dog.", "Guten Morgen, liebe Freunde!"),
    ({"kind": "max_words", "n": 5}, "Guten Morgen, liebe Freunde!", "The quick brown fox jumps over the lazy dog."),
    ({"kind": "min_sentences", "n": 3}, "It rained. We stayed home! Did you?", "It rained all day long."),
    ({"kind": "max_sentences", "n": 2}, "Es regnete. Wir blieben zu Hause.", "Es regnete. Wir blieben. Du auch?"),
    ({"kind": "paragraph_count", "n": 2}, "First paragraph here.\n\nSecond paragraph here.",
     "One paragraph only.\nStill the same paragraph."),
    ({"kind": "include_keywords", "keywords": ["river", "bridge"]},
     "We crossed the old Bridge over the river.", "We crossed the old bridge over the stream."),
    ({"kind": "exclude_keywords", "keywords": ["Kaffee"]}, "Ich trinke morgens Tee.", "Ich trinke morgens Kaffee."),
    ({"kind": "keyword_frequency", "keyword": "Garten", "n": 2},
     "Der Garten ist groß, und im Garten wachsen Äpfel.", "Der Garten ist groß."),
    ({"kind": "placeholders", "n": 2}, "Send it to [name] at [address].", "Send it to [name] at home."),
    ({"kind": "language", "language": "de"}, "Ich habe heute keine Zeit, weil ich arbeiten muss.",
     "I have no time today because I have to work."),
    ({"kind": "language", "language": "en"}, "I have no time today because I have to work.",
     "Ich habe heute keine Zeit, weil ich arbeiten muss."),
    ({"kind": "all_lowercase"}, "grüße aus köln, wo die äpfel wachsen.",
     "Grüße aus Köln, wo die Äpfel wachsen."),
    ({"kind": "all_uppercase"}, "GRÜSSE AUS KÖLN! ÄPFEL SIND GROß.", "GRÜSSE AUS KÖLN! äPFEL SIND GROSS."),
    ({"kind": "capital_word_frequency", "relation": "at least", "n": 2},
     "This is VERY important and URGENT.", "This is VERY important and urgent."),
    ({"kind": "capital_word_frequency", "relation": "at most", "n": 1},
     "This is VERY important.", "This is VERY important and URGENT."),
    ({"kind": "no_commas"}, "I came and I saw and I left.", "I came, I saw, I left."),
    ({"kind": "json_output"}, '{"answer": "yes", "confidence": 0.9}', 'Here you go: {"answer": "yes"}'),
    ({"kind": "bullet_points", "n": 2}, "Two things:\n* apples\n* pears", "Three things:\n* apples\n* pears\n* plums"),
    ({"kind": "title"}, "<<Ode to Spring>>\nThe days grow longer.", "Ode to Spring\nThe days grow longer."),
    ({"kind": "highlighted_sections", "n": 2}, "This is *very* important and **urgent**.",
     "This is *very* important and urgent."),
    ({"kind": "quotation"}, '"To be or not to be, that is the question."',
     'He said: "To be or not to be, that is the question."'),
    ({"kind": "starts_with", "phrase": "My answer is"}, "My answer is yes.", "Yes, my answer is yes."),
    ({"kind": "ends_with", "phrase": "Any other questions?"}, "That covers it. Any other questions?",
     "Any other questions? That covers it."),
    ({"kind": "postscript", "marker": "P.S."}, "Liebe Grüße, Anna\n\nP.S. Vergiss den Schlüssel nicht!",
     "Liebe Grüße, Anna\n\nVergiss den Schlüssel nicht!"),
    ({"kind": "postscript", "marker": "P.P.S."}, "Thanks!\n\nP.S. See you soon.\nP.P.S. Bring cake.",
     "Thanks!\n\nP.S. See you soon."),
]


def _case_id(case: tuple) -> str:
    return "-".join(str(v) for v in case[0].values())


def test_every_kind_has_a_case_and_there_are_at_least_18():
    assert {constraint["kind"] for constraint, _, _ in CASES} == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 18


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_passing_and_failing_text(case):
    constraint, good, bad = case
    assert check(good, constraint)
    assert not check(bad, constraint)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_blank_text_satisfies_no_constraint(case):
    constraint = case[0]
    for blank in ("", " ", "\n\t \n"):
        assert not check(blank, constraint)


# ---------------------------------------------------------------- definitions and edge cases

def test_words_keep_inner_apostrophes_and_umlauts():
    assert words("Don't stop — Straße, naïve, 3.5 apples!") == \
        ["Don't", "stop", "Straße", "naïve", "3", "5", "apples"]


def test_sentences_end_at_punctuation_with_closing_quotes_and_at_paragraph_breaks():
    text = 'He asked: "Why?" She left. 3.5 is a number!\n\nNo full stop here\n\n...'
    assert sentences(text) == ['He asked: "Why?', "She left.", "3.5 is a number!", "No full stop here"]


def test_paragraphs_split_at_blank_lines_and_dividers_and_ignore_empty_ones():
    text = "***\nErster Absatz.\n\n\n***\n\nZweiter Absatz,\nzweite Zeile.\r\n\r\nDritter.\n   \n***\n"
    assert paragraphs(text) == ["Erster Absatz.", "Zweiter Absatz,\nzweite Zeile.", "Dritter."]
    assert check(text, {"kind": "paragraph_count", "n": 3})


def test_trailing_and_leading_whitespace():
    assert check("  \nMy answer is no.", {"kind": "starts_with", "phrase": "My answer is"})
    assert check("That is all.  \n\n", {"kind": "ends_with", "phrase": "That is all."})
    assert check('  "Quoted."\n', {"kind": "quotation"})
    assert check("\n\n\nOnly one.\n\n", {"kind": "paragraph_count", "n": 1})


def test_phrases_ignore_case_and_whitespace_but_not_word_boundaries():
    assert check("MY ANSWER\nIS NO.", {"kind": "starts_with", "phrase": "My answer is"})
    assert not check("Surely not.", {"kind": "starts_with", "phrase": "Sure"})
    assert check("Das ist ALLES.", {"kind": "ends_with", "phrase": "Das ist alles."})
    assert not check("Das ist alles. Tschüss", {"kind": "ends_with", "phrase": "Das ist alles."})
    assert not check("Is that all.", {"kind": "ends_with", "phrase": "at all."})


def test_keywords_match_whole_words_in_any_case():
    text = "The category of Cats, and one cat."
    assert check(text, {"kind": "keyword_frequency", "keyword": "cat", "n": 1})
    assert not check(text, {"kind": "keyword_frequency", "keyword": "cat", "n": 2})
    assert check("Die KÜCHE ist warm.", {"kind": "include_keywords", "keywords": ["Küche"]})
    assert check("Im Küchenschrank steht nichts.", {"kind": "exclude_keywords", "keywords": ["Küche"]})
    assert check("Meet me at the train station.", {"kind": "include_keywords", "keywords": ["train station"]})


def test_lowercase_and_uppercase_with_umlauts_and_sharp_s():
    lower, upper = {"kind": "all_lowercase"}, {"kind": "all_uppercase"}
    assert check("über öl und ärger: ß!", lower)
    assert not check("über Öl", lower)
    assert check("ÜBER ÖL UND ÄRGER: STRAẞE, GROß!", upper)  # ẞ and ß both allowed
    assert not check("ÜBER öL", upper)
    # no letters at all: neither lowercase nor uppercase
    assert not check("123 + 456 = 579", lower)
    assert not check("123 + 456 = 579", upper)


def test_capital_words_need_two_letters():
    at_least_one = {"kind": "capital_word_frequency", "relation": "at least", "n": 1}
    assert not check("I saw A cat at 3 p.m. on Route 9B.", at_least_one)
    assert check("DON'T do it.", at_least_one)
    assert check("Die GROẞE Pause.", at_least_one)
    assert check("Das ist GROß.", at_least_one)


def test_json_fenced_or_bare_but_only_objects_and_arrays():
    json_output = {"kind": "json_output"}
    assert check('```json\n{"name": "Anna", "age": 7}\n```', json_output)
    assert check('```JSON\n[1, 2, 3]\n```\n', json_output)
    assert check('```\n{"a": null}\n```', json_output)
    assert check('  [{"a": 1}]  ', json_output)
    assert not check('```json\n{"a": 1,}\n```', json_output)  # trailing comma
    assert not check('```python\n{"a": 1}\n```', json_output)
    assert not check('```json\n{"a": 1}\n```\nHope this helps.', json_output)
    assert not check("42", json_output)
    assert not check('"just a string"', json_output)
    assert not check("[" * 5000, json_output)  # deeper than json's recursion limit: no crash


def test_bullets_with_both_markers_indentation_and_lookalikes():
    text = "Shopping list:\n* apples\n- pears\n  * green ones\n\t- red ones\n**bold line**\n-5 degrees\n***\n-\n"
    assert check(text, {"kind": "bullet_points", "n": 4})
    assert check("No list here.", {"kind": "bullet_points", "n": 0})


def test_highlights_need_hugging_stars():
    highlighted = {"kind": "highlighted_sections", "n": 1}
    assert not check("* a bullet\n2 * 3 * 4\n***\n** **\n*not closed", highlighted)
    assert check("* a bullet with *one* highlight", highlighted)
    assert not check("*multi\nline*", highlighted)


def test_placeholders_and_titles_need_content():
    assert not check("Empty [] and [  ] and a [link](https://example.org).", {"kind": "placeholders", "n": 1})
    assert check("[Anrede] [Name],", {"kind": "placeholders", "n": 2})
    assert not check("<<   >> and <<a\nb>>", {"kind": "title"})
    assert check("Ein Gedicht: <<Der Erlkönig>>", {"kind": "title"})


def test_quotation_accepts_typographic_pairs_but_not_mixed_or_empty():
    quotation = {"kind": "quotation"}
    assert check("„Wer reitet so spät durch Nacht und Wind?“", quotation)
    assert check("“Hello there.”", quotation)
    assert not check("„Wer reitet so spät?”", quotation)
    assert not check('""', quotation)
    assert not check('"', quotation)


def test_postscript_variants_and_position():
    ps = {"kind": "postscript", "marker": "P.S."}
    assert check("Bis bald.\np. s.: ruf mich an", ps)
    assert check("Thanks.\n\nP.S. Call me.\nI mean it.", ps)
    assert not check("P.S. Call me.\n\nThanks for reading.", ps)
    assert not check("Thanks.\n\nP.S.", ps)
    assert not check("Thanks.\n\nPS call me", ps)
    assert check("Thanks.\n\nP.S call me", ps)  # the last dot is optional
    assert not check("Thanks.\n\nP.Smith wrote this.", ps)  # but not before a name's letters
    assert not check("Hi.\n\nP.P.Sander signed.", {"kind": "postscript", "marker": "P.P.S."})


def test_language_of_uppercase_and_lowercase_text():
    assert check("DAS IST EIN GANZ NORMALER SATZ.", {"kind": "language", "language": "de"})
    assert check("this is a perfectly normal sentence.", {"kind": "language", "language": "en"})
    assert not check("12345 !!!", {"kind": "language", "language": "en"})


# ---------------------------------------------------------------- validation and descriptions

@pytest.mark.parametrize("constraint, kind, param", [
    ({"kind": "max_words"}, "max_words", "n"),
    ({"kind": "max_words", "n": -1}, "max_words", "n"),
    ({"kind": "max_words", "n": 2.0}, "max_words", "n"),
    ({"kind": "max_words", "n": True}, "max_words", "n"),
    ({"kind": "max_words", "n": 5, "words": 3}, "max_words", "words"),
    ({"kind": "include_keywords", "keywords": "river"}, "include_keywords", "keywords"),
    ({"kind": "include_keywords", "keywords": []}, "include_keywords", "keywords"),
    ({"kind": "exclude_keywords", "keywords": ["ok", " "]}, "exclude_keywords", "keywords"),
    ({"kind": "ends_with", "phrase": ""}, "ends_with", "phrase"),
    ({"kind": "language", "language": "fr"}, "language", "language"),
    ({"kind": "capital_word_frequency", "relation": "less than", "n": 2}, "capital_word_frequency", "relation"),
    ({"kind": "postscript", "marker": "PS"}, "postscript", "marker"),
])
def test_bad_parameters_raise_naming_kind_and_parameter(constraint, kind, param):
    for call in (lambda: check("Some text.", constraint), lambda: check("", constraint), lambda: describe(constraint)):
        with pytest.raises(ValueError, match=rf"'{kind}'.*'{param}'"):
            call()


def test_unknown_or_missing_kind_raises():
    with pytest.raises(ValueError, match="'max_letters'"):
        check("Text.", {"kind": "max_letters", "n": 3})
    with pytest.raises(ValueError, match="'kind'"):
        check("Text.", {"n": 3})
    with pytest.raises(ValueError, match=r"unknown constraint kind \['no_commas'\]"):  # not a TypeError
        check("Text.", {"kind": ["no_commas"]})


def test_parameters_from_yaml_like_containers_are_accepted():
    keywords = ("river", "bridge")  # any sequence of strings, e.g. an OmegaConf ListConfig
    assert check("A bridge over the river.", {"kind": "include_keywords", "keywords": keywords})


def test_every_kind_has_a_description():
    assert set(DESCRIPTIONS) == set(CONSTRAINTS)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_descriptions_are_sentences_that_mention_the_parameters(case):
    constraint = case[0]
    text = describe(constraint)
    assert text[0].isupper() and text[-1] in ".:" and "{" not in text
    for name, value in constraint.items():
        if name in ("n", "phrase", "keyword", "marker", "relation"):
            assert str(value) in text
        elif name == "keywords":
            assert all(f'"{keyword}"' in text for keyword in value)


def test_descriptions_read_naturally():
    assert describe({"kind": "max_words", "n": 50}) == "Answer with at most 50 words."
    assert describe({"kind": "min_sentences", "n": 1}) == "Answer with at least 1 sentence."
    assert describe({"kind": "include_keywords", "keywords": ["a", "b", "c"]}) == \
        'Include the keywords "a", "b" and "c" in your answer.'
    assert describe({"kind": "language", "language": "de"}).startswith("Answer in German")


# ---------------------------------------------------------------- scoring

def test_score_is_the_fraction_satisfied():
    text = "the river flows, and the river sings."
    constraints = [
        {"kind": "all_lowercase"},                                         # yes
        {"kind": "no_commas"},                                             # no
        {"kind": "keyword_frequency", "keyword": "river", "n": 2},         # yes
        {"kind": "max_words", "n": 5},                                     # no (7 words)
        {"kind": "language", "language": "en"},                            # yes
    ]
    assert score(text, constraints) == pytest.approx(3 / 5)
    assert score(text, constraints[:1]) == 1.0
    assert score(text, constraints[1:2]) == 0.0
    assert score(text, constraints[1:4]) == pytest.approx(1 / 3)
    assert not all_pass(text, constraints)
    assert all_pass(text, [constraints[0], constraints[2]])
    assert score(" ", constraints) == 0.0


def test_no_constraints_pass_vacuously():
    assert score("Anything.", []) == 1.0
    assert all_pass("Anything.", [])


def test_a_bad_constraint_raises_even_after_a_failing_one():
    with pytest.raises(ValueError, match="'max_words'"):
        all_pass("Hello, world.", [{"kind": "no_commas"}, {"kind": "max_words"}])


def test_one_answer_can_satisfy_many_constraints_at_once():
    answer = (
        "My answer is short. <<A Walk by the River>>\n\n"
        "I walked along the *river* in the **early** morning with [friend] and a bag of [snacks]. "
        "The river was calm and the air was cold.\n\n"
        "* We saw two herons\n"
        "- We heard church bells\n\n"
        "P.S. The river is lovely in WINTER and in SPRING. Any other questions?"
    )
    constraints = [
        {"kind": "starts_with", "phrase": "My answer is"}, {"kind": "title"},
        {"kind": "highlighted_sections", "n": 2}, {"kind": "placeholders", "n": 2},
        {"kind": "bullet_points", "n": 2}, {"kind": "paragraph_count", "n": 4},
        {"kind": "keyword_frequency", "keyword": "river", "n": 3},
        {"kind": "include_keywords", "keywords": ["morning", "herons"]},
        {"kind": "exclude_keywords", "keywords": ["coffee"]}, {"kind": "no_commas"},
        {"kind": "capital_word_frequency", "relation": "at least", "n": 2}, {"kind": "language", "language": "en"},
        {"kind": "min_words", "n": 40}, {"kind": "max_words", "n": 80},
        {"kind": "min_sentences", "n": 3}, {"kind": "max_sentences", "n": 8},
        {"kind": "postscript", "marker": "P.S."}, {"kind": "ends_with", "phrase": "Any other questions?"},
    ]
    assert all_pass(answer, constraints)


# ---------------------------------------------------------------- random constraints

def _samples(n_seeds: int = 200):
    for seed in range(n_seeds):
        language = LANGUAGES[seed % len(LANGUAGES)]
        yield language, random_constraints(random.Random(seed), 1 + seed % MAX_CONSTRAINTS, language)


def test_random_constraints_are_deterministic_for_a_seed():
    assert random_constraints(random.Random(7), 5) == random_constraints(random.Random(7), 5)
    assert random_constraints(random.Random(7), 5, "de") == random_constraints(random.Random(7), 5, "de")
    assert random_constraints(random.Random(7), 5) != random_constraints(random.Random(8), 5)


def test_incompatible_table_names_registered_kinds_in_pairs():
    assert all(len(pair) == 2 and pair <= set(CONSTRAINTS) for pair in INCOMPATIBLE)
    assert not compatible("all_lowercase", "all_uppercase") and not compatible("all_uppercase", "all_lowercase")
    assert not compatible("title", "title") and compatible("title", "json_output")


def test_random_constraints_are_valid_distinct_and_pairwise_compatible():
    seen = set()
    for seed, (language, constraints) in enumerate(_samples()):
        assert len(constraints) == 1 + seed % MAX_CONSTRAINTS
        kinds = [c["kind"] for c in constraints]
        assert len(set(kinds)) == len(kinds)
        assert all(compatible(a, b) for a, b in itertools.combinations(kinds, 2))
        for text in ("", "Ein kurzer Satz.", "A short sentence, with a comma."):
            score(text, constraints)  # validates every constraint
        assert all(describe(c) for c in constraints)
        seen.update(kinds)
        if "language" in kinds:
            assert {"kind": "language", "language": language} in constraints
    assert seen == set(CONSTRAINTS)


def test_random_parameters_cannot_clash():
    for language, constraints in _samples():
        by_kind = {c["kind"]: c for c in constraints}
        for low, high in (("min_words", "max_words"), ("min_sentences", "max_sentences")):
            if low in by_kind and high in by_kind:
                assert by_kind[low]["n"] < by_kind[high]["n"]
        keywords = [keyword for c in constraints for keyword in c.get("keywords", [c.get("keyword")]) if keyword]
        assert len(set(keywords)) == len(keywords)
        assert set(keywords) <= set(KEYWORDS[language])


@pytest.mark.parametrize("language", LANGUAGES)
def test_phrases_hold_no_keyword_comma_or_capital_word_and_are_in_their_language(language):
    for phrase in START_PHRASES[language] + END_PHRASES[language]:
        assert "," not in phrase
        assert not {w.lower() for w in words(phrase)} & {k.lower() for k in KEYWORDS[language]}
        assert check(phrase, {"kind": "capital_word_frequency", "relation": "at most", "n": 0})
    assert detect_language(" ".join(START_PHRASES[language] + END_PHRASES[language])) == language


def test_every_maximal_compatible_set_has_max_constraints_kinds():
    """So the greedy pass in `random_constraints` always reaches k <= MAX_CONSTRAINTS."""
    conflicted = sorted(set().union(*INCOMPATIBLE))
    free = len(CONSTRAINTS) - len(conflicted)  # compatible with everything
    sizes = []
    for r in range(len(conflicted) + 1):
        for subset in itertools.combinations(conflicted, r):
            independent = all(compatible(a, b) for a, b in itertools.combinations(subset, 2))
            maximal = all(not all(compatible(k, s) for s in subset) for k in conflicted if k not in subset)
            if independent and maximal:
                sizes.append(free + r)
    assert min(sizes) == MAX_CONSTRAINTS


def test_random_constraints_reject_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        random_constraints(random.Random(0), MAX_CONSTRAINTS + 1)
    with pytest.raises(ValueError, match="language"):
        random_constraints(random.Random(0), 3, "fr")
    assert random_constraints(random.Random(0), 0) == []


# ---------------------------------------------------------------- language detection

# The detector's word lists were checked on chapters 1-2 of the corpus; accuracy is measured on the rest.
TUNING_CHAPTERS = {"1", "2"}


def _prose_paragraphs(language: str) -> dict[str, list[str]]:
    """Section id -> its prose paragraphs of >= 30 words (no tables, code or command output)."""
    path = files("slmlab") / "corpus" / f"debian_reference.{language}.jsonl.gz"
    sections = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            blocks = (" ".join(block.split()) for block in re.split(r"\n\s*\n", record["text"])
                      if not re.search(r"[|+]-|^\s*[|$#]", block, re.MULTILINE))
            sections[record["id"]] = [b for b in blocks if len(b.split()) >= 30 and b[-1] in ".:"]
    return sections


@pytest.fixture(scope="module")
def held_out() -> dict[str, list[str]]:
    """Language -> held-out paragraphs. German paragraphs left untranslated (their first words
    equal those of an English paragraph of the same section) are dropped."""
    corpus = {language: _prose_paragraphs(language) for language in LANGUAGES}
    english_starts = {(sid, tuple(p.split()[:6])) for sid, ps in corpus["en"].items() for p in ps}
    held_out = {language: [] for language in LANGUAGES}
    for language, sections in corpus.items():
        for sid, section in sections.items():
            if sid.split(".")[0] in TUNING_CHAPTERS:
                continue
            held_out[language] += [p for p in section
                                   if language == "en" or (sid, tuple(p.split()[:6])) not in english_starts]
    return held_out


def test_function_word_lists_are_disjoint():
    assert not _FUNCTION_WORDS["de"] & _FUNCTION_WORDS["en"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_language_of_held_out_paragraphs(held_out, language):
    paragraphs_ = held_out[language]
    assert len(paragraphs_) >= 200
    accuracy = sum(detect_language(p) == language for p in paragraphs_) / len(paragraphs_)
    assert accuracy >= 0.95


@pytest.mark.parametrize("language", LANGUAGES)
def test_language_of_short_snippets(held_out, language):
    """5-10 consecutive words from each held-out paragraph: mostly right."""
    rng = random.Random(0)
    snippets = []
    for paragraph in held_out[language]:
        tokens, length = paragraph.split(), rng.randint(5, 10)
        start = rng.randrange(len(tokens) - length)
        snippets.append(" ".join(tokens[start:start + length]))
    accuracy = sum(detect_language(s) == language for s in snippets) / len(snippets)
    assert accuracy >= 0.9


@pytest.mark.parametrize("text, language", [
    ("Das Wetter ist heute wirklich schön.", "de"),
    ("The weather is really nice today.", "en"),
    ("Schnelle Installation", "de"),
    ("Quick installation", "en"),
    ("WIR SEHEN UNS MORGEN IM BÜRO.", "de"),
    ("see you tomorrow at the office.", "en"),
    ("Kannst du mir bitte helfen?", "de"),
    ("Could you please help me?", "en"),
])
def test_language_of_everyday_sentences(text, language):
    assert detect_language(text) == language


def test_no_evidence_gives_none():
    assert detect_language("") is None
    assert detect_language("42 + 17 = 59 :-)") is None
