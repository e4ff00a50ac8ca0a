"""Rebuild the embedded default corpus from Debian's `debian-reference-{en,de}` packages.

    apt-get download debian-reference-en debian-reference-de
    python build_corpus.py debian-reference-en_*.deb debian-reference-de_*.deb

Each package ships the whole book as plain text (`debian-reference.<lang>.txt.gz`). We drop the
front matter and table of contents and write one JSON line per numbered section ("1.2. ..."),
`{"id": "1.2", "text": ...}`: the same ids in both languages, so that a section and its
translation can be kept in the same train/val split (`split_key: id`).
"""

import gzip
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SECTION = re.compile(r"^(\d+\.\d+)\.\s\S")
FIRST_CHAPTER = re.compile(r"^(Chapter|Kapitel)\s1\.\s")
CHAPTER = re.compile(r"^(?:Chapter|Kapitel|Appendix|Anhang)\s(\w+)\.\s")


def section_id(first_line: str) -> str:
    match = SECTION.match(first_line) or CHAPTER.match(first_line)
    if match is None:
        raise ValueError(f"a section starts with an unnumbered line: {first_line!r}")
    return match.group(1)


def sections(text: str) -> list[dict]:
    lines = text.splitlines()
    # the table of contents repeats "Chapter 1." first; the body starts at its last occurrence
    start = max(i for i, line in enumerate(lines) if FIRST_CHAPTER.match(line))
    docs, current = [], []
    for line in lines[start:]:
        if SECTION.match(line) and current:
            docs.append("\n".join(current).strip())
            current = []
        current.append(line.rstrip())
    docs.append("\n".join(current).strip())
    return [{"id": section_id(d.splitlines()[0]), "text": d} for d in docs if d]


def main(debs: list[str]) -> None:
    for deb in debs:
        lang = re.search(r"debian-reference-(\w+)_", deb).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            src = Path(tmp) / f"usr/share/debian-reference/debian-reference.{lang}.txt.gz"
            text = gzip.decompress(src.read_bytes()).decode("utf-8")
        out = Path(__file__).parent / f"debian_reference.{lang}.jsonl.gz"
        docs = sections(text)
        # mtime=0: the same input gives byte-identical files
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for doc in docs:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
        print(f"{out.name}: {len(docs)} documents, {sum(len(d['text'].encode()) for d in docs):,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
