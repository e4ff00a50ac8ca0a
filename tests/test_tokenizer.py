import re
import unicodedata

import pytest

from slmlab.data.errors import DataError
from slmlab.data.tokenizer import MAX_TOKEN_LENGTH, SPECIAL_TOKENS, load_tokenizer, tokenizer_hash, train_tokenizer
from tests.data_fixtures import VOCAB, documents, tokenizer_path_fixture  # noqa: F401 (a fixture)

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: Äpfel, Öl und Übermut — „Anführungszeichen“ und ß.",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\r\n",
    "emoji 😀🇩🇪 and CJK 日本語, ligature ﬁ, full-width ＡＢＣ, superscript x²",
    "  leading and trailing spaces  \n\n\n",
]


def test_special_tokens_have_ids_0_to_3(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert SPECIAL_TOKENS[0] == "<|endoftext|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode_up_to_nfkc(tokenizer_path, text):
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", text)
    assert max(ids) < tokenizer.get_vocab_size()


def test_vocabulary_is_capped_and_tokens_are_short(tmp_path):
    # one long word repeated: without max_token_length BPE would merge it into a single token
    texts = ["abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz " * 50] * 20 + documents(50)
    tokenizer = train_tokenizer(texts, 400, tmp_path / "t.json")
    assert tokenizer.get_vocab_size() <= 400
    assert max(len(token) for token in tokenizer.get_vocab()) <= MAX_TOKEN_LENGTH


def test_training_is_deterministic_and_the_hash_tracks_the_file(tmp_path):
    texts = documents(100)
    train_tokenizer(texts, VOCAB, tmp_path / "a" / "tokenizer.json")
    train_tokenizer(texts, VOCAB, tmp_path / "b" / "tokenizer.json")
    train_tokenizer(texts, VOCAB + 20, tmp_path / "c" / "tokenizer.json")
    hashes = [tokenizer_hash(tmp_path / d / "tokenizer.json") for d in "abc"]
    assert hashes[0] == hashes[1] != hashes[2]
    assert len(hashes[0]) == 16
    # written atomically: nothing but the file itself is left in the directory
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["tokenizer.json"]


def test_too_small_vocab_and_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100"):
        train_tokenizer(documents(5), 100, tmp_path / "t.json")
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    with pytest.raises(DataError, match=re.escape(str(missing))):
        tokenizer_hash(missing)


@pytest.mark.parametrize("content", ['{"version": "1.0", "trunc', "[]"])
def test_a_malformed_tokenizer_file_is_named(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: not a valid tokenizer file")):
        load_tokenizer(path)
