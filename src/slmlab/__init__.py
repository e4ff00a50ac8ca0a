"""slmlab: train small language models end to end."""

from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
