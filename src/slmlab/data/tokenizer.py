"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, load, fingerprint.

Byte-level means every string is encodable (no unknown token) and decoding returns the
NFKC-normalized input exactly.
"""

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from slmlab.data.atomic import atomic_write
from slmlab.data.errors import DataError

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>", "<|im_start|>", "<|im_end|>"]
"""Ids 0..3 in this order. EOS separates documents in the token stream; the ChatML pair is for SFT."""

MAX_TOKEN_LENGTH = 16
"""Longest token in characters: keeps runs like '==========' from filling a small vocabulary."""

_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the special tokens and the 256 byte symbols


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`; write it to `path`.

    The vocabulary can come out smaller than `vocab_size` when the text has too few pairs that occur
    `min_frequency` times. The file is written atomically, so a concurrent reader never sees half
    of it; training is deterministic, so concurrent trainings on the same text write the same file.
    """
    if vocab_size < _MIN_VOCAB:
        raise DataError(f"tokenizer vocab_size={vocab_size}: must be at least {_MIN_VOCAB} "
                        f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        max_token_length=MAX_TOKEN_LENGTH,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(tokenizer.to_str(pretty=True).encode())
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` written by `train_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # `tokenizers` raises a bare Exception, naming no file, for any parse error
        raise DataError(f"{path}: not a valid tokenizer file ({e})") from None
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise DataError(f"{path}: special tokens {SPECIAL_TOKENS} must have ids 0..{len(ids) - 1}, got {ids}")
    return tokenizer


def tokenizer_hash(path: str | Path) -> str:
    """Fingerprint of a tokenizer file: the first 16 hex digits of the sha256 of its bytes.

    Token shards record it, so shards are never read with a tokenizer other than their own.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
