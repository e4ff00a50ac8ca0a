import gzip
import hashlib
import json
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra.utils import instantiate

from datamodules import TokenShardDataModule
from slmlab import CORPUS_DIR
from slmlab.data import prepare
from slmlab.data.errors import DataError
from slmlab.data.prepare import is_val_document, prepare_shards
from slmlab.data.readers import DocumentReader
from slmlab.data.shards import Manifest, open_shards
from slmlab.data.tokenizer import load_tokenizer
from tests.conftest import compose_config
from tests.data_fixtures import documents, tokenizer_path_fixture, write_jsonl  # noqa: F401 (a fixture)


# -- readers -----------------------------------------------------------------------------------

def test_every_format_reads_its_documents(tmp_path):
    docs = documents(7)
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text(docs[i])
    write_jsonl(tmp_path / "d.jsonl.gz", docs[2:4])
    pq.write_table(pa.table({"text": docs[4:7]}), tmp_path / "d.parquet", row_group_size=2)
    write_jsonl(tmp_path / "d.data", docs[:1], key="body")
    files = [str(tmp_path / "part*.txt"), str(tmp_path / "d.jsonl.gz"), str(tmp_path / "d.parquet")]
    assert list(DocumentReader(files)) == docs
    assert list(DocumentReader(files, max_documents=3)) == docs[:3]
    assert list(DocumentReader(str(tmp_path / "d.data"), format="jsonl", text_key="body")) == docs[:1]


@pytest.fixture
def invalid_utf8_files(tmp_path):
    """Files holding 4 good documents and 4 that are not valid UTF-8."""
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "gut"}\n{"text": "caf\xe9"}\n\n{"text": "\\ud800 lone"}\n'
                                       b'{"text": "auch gut"}\n')
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not text")
    (tmp_path / "good.txt").write_text("Grüße")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xc3("], pa.binary())}), tmp_path / "d.parquet")
    return [str(tmp_path / name) for name in ("d.jsonl", "bad.txt", "good.txt", "d.parquet")]


def test_invalid_utf8_is_skipped_and_counted(invalid_utf8_files):
    reader = DocumentReader(invalid_utf8_files)
    assert list(reader) == ["gut", "auch gut", "Grüße", "ok"]
    assert reader.skipped == 4
    list(reader)
    assert reader.skipped == 4  # counted per pass


def test_prepare_records_the_skipped_documents(invalid_utf8_files, tmp_path, tokenizer_path):
    manifest = prepare_shards(DocumentReader(invalid_utf8_files), tmp_path / "out", tokenizer_path, val_fraction=0.5)
    assert manifest.skipped_documents == 4
    assert sum(s.documents for s in manifest.splits.values()) == 4


def test_invalid_utf8_can_be_an_error_naming_file_and_line(invalid_utf8_files, tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'd.jsonl'}:2: not valid UTF-8")):
        list(DocumentReader(invalid_utf8_files, on_decode_error="error"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.txt'}: not valid UTF-8")):
        list(DocumentReader(invalid_utf8_files[1:], on_decode_error="error"))


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "keyless.jsonl").write_text('{"body": "a"}\n')
    (tmp_path / "doc.xml").write_text("<doc/>")
    cases = {"missing.jsonl": "raw data file not found", "empty.jsonl.gz": "empty file",
             "broken.jsonl:2": "invalid JSON", "keyless.jsonl:1": r"no key 'text' \(found \['body'\]\)",
             "nothing*.txt": "no file matches", "doc.xml": "cannot tell the format"}
    for file, problem in cases.items():
        with pytest.raises(DataError, match=re.escape(str(tmp_path / file)) + ".*" + problem):
            list(DocumentReader(str(tmp_path / file.split(":")[0])))


def test_a_null_split_key_in_parquet_is_named_not_hashed_as_none(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "section": ["s1", None, "s2"]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: no 'section' (split_key)")):
        list(DocumentReader(str(path), split_key="section").with_split_ids())


def test_odd_rows_read_as_their_documents(tmp_path):
    """Empty texts are no documents (each was a lone EOS in the shards, every one in the same split); a
    UTF-8 byte-order mark is not text; a split key may be the text column itself, or hold a lone surrogate."""
    from slmlab.data.records import is_val_record, read_jsonl

    (tmp_path / "d.jsonl").write_bytes('\ufeff{"text": "a", "section": "s1"}\n{"text": ""}\n{"text": "b"}\n'.encode())
    assert list(DocumentReader(str(tmp_path / "d.jsonl"))) == ["a", "b"]
    assert [record for _, record in read_jsonl(tmp_path / "d.jsonl")][0] == {"text": "a", "section": "s1"}
    (tmp_path / "d.txt").write_bytes("\ufeffhallo".encode())
    assert list(DocumentReader(str(tmp_path / "d.txt"))) == ["hallo"]
    pq.write_table(pa.table({"text": ["a", "", "b"]}), tmp_path / "d.parquet")
    assert list(DocumentReader(str(tmp_path / "d.parquet"), split_key="text").with_split_ids()) == [("a", b"a"), ("b", b"b")]
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty.jsonl: empty file, no documents"):
        list(DocumentReader(str(tmp_path / "empty.jsonl")))
    (tmp_path / "s.jsonl").write_text('{"text": "x", "section": "sec\\ud800"}\n')
    (reader_id,) = [key for _, key in DocumentReader(str(tmp_path / "s.jsonl"), split_key="section").with_split_ids()]
    (where, record), = read_jsonl(tmp_path / "s.jsonl")
    assert is_val_record(record, "section", 0.5, where) == is_val_document(reader_id, 0.5)  # one rule for both


# -- prepare -----------------------------------------------------------------------------------

def documents_in_shards(out_dir, manifest: Manifest, split: str) -> list[list[int]]:
    """The token ids of each document of a split, read back from its shards."""
    tokens = np.concatenate([np.fromfile(out_dir / s.file, manifest.dtype) for s in manifest.splits[split].shards])
    ends = np.flatnonzero(tokens == manifest.eos_id)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1  # every document ends in EOS
    return [d.tolist() for d in np.split(tokens, ends + 1)[:-1]]


def test_shards_hold_every_document_once_split_by_its_hash(tmp_path, tokenizer_path):
    docs = documents(300) + ["a document that says <|endoftext|> in its text"]
    reader = DocumentReader(str(write_jsonl(tmp_path / "docs.jsonl", docs)))
    manifest = prepare_shards(reader, tmp_path / "out", tokenizer_path, val_fraction=0.2, shard_tokens=3000)
    tokenizer = load_tokenizer(tokenizer_path)
    decoded = {split: [tokenizer.decode(ids) for ids in documents_in_shards(tmp_path / "out", manifest, split)]
               for split in ("train", "val")}
    hashes = {split: {hashlib.sha256(d.encode()).hexdigest() for d in texts} for split, texts in decoded.items()}
    assert not hashes["train"] & hashes["val"]  # no validation document is ever trained on
    for split in ("train", "val"):
        expected = [d for d in docs if is_val_document(d.encode(), 0.2) == (split == "val")]
        assert decoded[split] == [unicodedata.normalize("NFKC", d) for d in expected]
        info = manifest.splits[split]
        assert info.documents == len(expected)
        assert info.bytes == sum(len(d.encode()) for d in expected)
        assert info.tokens == sum(s.tokens for s in info.shards)
        assert all(s.tokens <= 3000 for s in info.shards)
    assert 40 < manifest.splits["val"].documents < 80  # ~20% of 301
    assert open_shards(tmp_path / "out", verify="hash") == manifest


def test_the_split_does_not_depend_on_document_order(tmp_path, tokenizer_path):
    docs = documents(100)
    val_docs = []
    for name, order in {"forward": docs, "reversed": docs[::-1]}.items():
        reader = DocumentReader(str(write_jsonl(tmp_path / f"{name}.jsonl", order)))
        manifest = prepare_shards(reader, tmp_path / name, tokenizer_path, val_fraction=0.3)
        val_docs.append(sorted(map(tuple, documents_in_shards(tmp_path / name, manifest, "val"))))
    assert val_docs[0] == val_docs[1] and len(val_docs[0]) > 0


def test_output_is_the_same_for_any_num_proc(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 2000)  # many batches, so several processes share them
    path = write_jsonl(tmp_path / "docs.jsonl", documents(200))
    for num_proc in (1, 2):
        prepare_shards(DocumentReader(str(path)), tmp_path / str(num_proc), tokenizer_path, val_fraction=0.1,
                       shard_tokens=5000, num_proc=num_proc)
    for file in (tmp_path / "1").iterdir():
        assert file.read_bytes() == (tmp_path / "2" / file.name).read_bytes(), file.name


def test_max_tokens_stops_reading_after_the_batch_that_reaches_it(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 2000)
    reader = DocumentReader(str(write_jsonl(tmp_path / "docs.jsonl", documents(200))))
    manifest = prepare_shards(reader, tmp_path / "out", tokenizer_path, val_fraction=0.1, max_tokens=3000)
    tokens = sum(s.tokens for s in manifest.splits.values())
    assert 3000 <= tokens < 3000 + 1500  # a 2000-character batch is well under 1500 tokens
    assert sum(s.documents for s in manifest.splits.values()) < 100


def test_skipped_documents_count_only_the_batches_written_for_any_num_proc(tmp_path, tokenizer_path, monkeypatch):
    # with num_proc > 1 the reader runs batches ahead; those past max_tokens are never written
    monkeypatch.setattr(prepare, "_BATCH_CHARS", 2000)
    lines = [json.dumps({"text": text}).encode() + b"\n" for text in documents(200)]
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"".join(line + (b'{"text": "caf\xe9"}\n' if i % 5 == 0 else b"") for i, line in enumerate(lines)))
    manifests = [prepare_shards(DocumentReader(str(path)), tmp_path / str(num_proc), tokenizer_path, val_fraction=0.1,
                                num_proc=num_proc, max_tokens=3000) for num_proc in (1, 2)]
    assert manifests[0] == manifests[1]
    written = sum(s.documents for s in manifests[0].splits.values())
    # the bad lines before the last document written (the one after it is never read)
    assert manifests[0].skipped_documents == len(range(0, written - 1, 5)) > 0


def test_an_interrupted_preparation_never_loads_and_is_redone(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "docs.jsonl", documents(50))

    class KilledMidway:  # stands in for a reader whose process is killed
        skipped = 0

        def with_split_ids(self):
            yield from ((text, text.encode()) for text in documents(10))
            raise KeyboardInterrupt

    out = tmp_path / "shards"
    prepare_shards(DocumentReader(str(path)), out, tokenizer_path, val_fraction=0.1)
    with pytest.raises(KeyboardInterrupt):  # a second run dies: the old manifest must not outlive it
        prepare_shards(KilledMidway(), out, tokenizer_path, val_fraction=0.1)
    with pytest.raises(DataError, match="never prepared, or preparation was interrupted"):
        open_shards(out)
    (out / ".train_00000.bin.123-abcd.tmp").write_bytes(b"torn")  # as a killed writer leaves it
    (out / "train_00000.bin").write_bytes(b"torn")
    (out / "val_00007.bin").write_bytes(b"a larger earlier preparation's")
    dm = TokenShardDataModule({"docs": {"path": str(out), "raw": {"files": [str(path)]}}},
                              {"path": str(tokenizer_path), "vocab_size": 300}, seq_len=8, batch_size=2,
                              val_fraction=0.1, verify="hash")
    dm.prepare_data()
    dm.setup()
    assert dm.manifests["docs"].splits["train"].documents + dm.manifests["docs"].splits["val"].documents == 50
    listed = {shard.file for split in dm.manifests["docs"].splits.values() for shard in split.shards}
    assert {f.name for f in out.iterdir()} == listed | {"manifest.json", ".prepare.lock"}  # nothing left over


def test_embedded_corpus_prepares_end_to_end(tmp_path):
    cfg = compose_config(["data=de_en", f"paths.artifacts={tmp_path}", "model.vocab_size=512"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.val_sources == ["en", "de"] and 300 < dm.vocab_size <= 512
    for lang in dm.val_sources:
        texts = [json.loads(line)["text"] for line in gzip.open(CORPUS_DIR / f"debian_reference.{lang}.jsonl.gz")]
        splits = dm.manifests[lang].splits
        assert splits["train"].documents + splits["val"].documents == len(texts) == 87
        assert splits["train"].bytes + splits["val"].bytes == sum(len(t.encode()) for t in texts)
        assert splits["val"].documents >= 3
        assert 2 < dm.bytes_per_token(lang) < 6  # a 512-token BPE on prose
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (cfg.data.batch_size, cfg.model.max_seq_len)
    # prepared: a second run trains and writes nothing
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    instantiate(cfg.data).prepare_data()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_records_sharing_a_split_key_land_in_the_same_split(tmp_path, tokenizer_path):
    # translations of one section: different texts, one key
    rows = [{"id": f"sec{i // 2}", "text": f"{'Abschnitt' if i % 2 else 'Section'} {i // 2}: {'Text' if i % 2 else 'text'} {i}"}
            for i in range(80)]
    path = tmp_path / "parallel.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_key = DocumentReader(str(path), split_key="id")
    pairs = list(by_key.with_split_ids())
    assert [t for t, _ in pairs] == [r["text"] for r in rows]
    splits = [is_val_document(split_id, 0.3) for _, split_id in pairs]
    assert all(splits[i] == splits[i + 1] for i in range(0, 80, 2))
    assert 0 < sum(splits) < 80
    by_text = [is_val_document(t.encode(), 0.3) for t in by_key]
    assert any(by_text[i] != by_text[i + 1] for i in range(0, 80, 2))  # without the key, pairs split up
    manifest = prepare_shards(by_key, tmp_path / "out", tokenizer_path, val_fraction=0.3)
    assert manifest.splits["val"].documents == sum(splits)
    with pytest.raises(DataError, match="no 'id' \\(split_key\\)"):
        path.write_text(json.dumps({"text": "no id"}) + "\n")
        list(DocumentReader(str(path), split_key="id"))


def test_a_truncated_or_damaged_parquet_file_is_named(tmp_path):
    """pyarrow's own errors (an interrupted download, damaged pages) named no file."""
    pq.write_table(pa.table({"text": documents(50)}), tmp_path / "d.parquet", row_group_size=10)
    whole = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "damaged.parquet").write_bytes(whole[:100] + bytes(200) + whole[300:])
    for name in ("cut.parquet", "damaged.parquet"):
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name)) + ": truncated or corrupt parquet file"):
            list(DocumentReader(str(tmp_path / name)))


def test_a_limit_on_documents_or_tokens_that_is_not_a_positive_integer_is_named(tmp_path, tokenizer_path):
    """islice() failed naming no key (-1), 0 read nothing, and max_tokens=-1 stopped after the first batch."""
    path = str(write_jsonl(tmp_path / "d.jsonl", documents(20)))
    for value in (-1, 0, 2.5):
        with pytest.raises(DataError, match=rf"max_documents={value!r}: must be an integer of at least 1"):
            DocumentReader(path, max_documents=value)
        with pytest.raises(DataError, match=rf"max_tokens={value!r}: must be an integer of at least 1"):
            prepare_shards(DocumentReader(path), tmp_path / "out", tokenizer_path, val_fraction=0.1, max_tokens=value)
    tokenizer = {"path": str(tokenizer_path), "vocab_size": 300}
    for raw, problem in (({"max_tokens": -1}, "source 'a': raw.max_tokens=-1"),
                         ({"max_documents": -1}, "source 'a': raw source: max_documents=-1")):
        with pytest.raises(DataError, match=re.escape(problem) + ": must be an integer of at least 1"):
            TokenShardDataModule({"a": {"path": "x", "raw": {"files": [path], **raw}}}, tokenizer, seq_len=8,
                                 batch_size=2)
    with pytest.raises(DataError, match="tokenizer.max_documents=-1: must be an integer of at least 1"):
        TokenShardDataModule({"a": {"path": "x"}}, tokenizer | {"max_documents": -1}, seq_len=8, batch_size=2)


def test_converting_chat_data_skips_a_tool_call_without_content_and_names_a_missing_column(tmp_path, monkeypatch):
    """A tool call's message has no "content": that failed with a bare KeyError, as did a wrong --messages-key."""
    from slmlab.data.chat import convert_hf

    datasets = pytest.importorskip("datasets")
    answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": answer}, {"messages": [answer[0], {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
            {"messages": None}, {"messages": answer}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: iter(rows))
    out = tmp_path / "chat.jsonl"
    assert convert_hf("org/chat", out) == 2
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["org/chat/train/0", "org/chat/train/3"]
    with pytest.raises(DataError, match=re.escape("org/chat (split train): row 0 has no 'conversations' "
                                                  "(columns: ['messages']); set --messages-key")):
        convert_hf("org/chat", out, messages_key="conversations")


def shard_source(shards, files, tokenizer_path, **raw) -> TokenShardDataModule:
    """A datamodule of one source `docs` with shards in `shards`, prepared from `files` with `raw` settings."""
    return TokenShardDataModule({"docs": {"path": str(shards), "raw": {"files": [str(f) for f in files], **raw}}},
                                {"path": str(tokenizer_path), "vocab_size": 300}, seq_len=8, batch_size=2,
                                val_fraction=0.1)


def test_changed_raw_settings_of_prepared_shards_are_an_error_naming_each(tmp_path, tokenizer_path):
    """A raised max_documents silently kept training on the shards of the first, smaller preparation."""
    path, shards = write_jsonl(tmp_path / "docs.jsonl", documents(60)), tmp_path / "shards"
    shard_source(shards, [path], tokenizer_path, max_documents=20).prepare_data()
    size = path.stat().st_size
    with pytest.raises(DataError) as error:
        shard_source(shards, [path], tokenizer_path, max_documents=40, max_tokens=5000).prepare_data()
    assert str(error.value) == (
        f"source 'docs': the shards in {shards} were prepared with other raw settings: "
        "raw.max_documents: 20 when prepared, 40 now; raw.max_tokens: None when prepared, 5000 now. "
        f"Delete {shards} to prepare it again, or give the source another `path`")
    write_jsonl(path, documents(61))  # the same file with other text
    with pytest.raises(DataError, match=re.escape(f"raw.files: [docs.jsonl ({size:,} bytes)] when prepared, "
                                                  f"[docs.jsonl ({path.stat().st_size:,} bytes)] now")):
        shard_source(shards, [path], tokenizer_path, max_documents=20).prepare_data()


def test_prepared_shards_match_their_raw_settings_from_a_moved_checkout(tmp_path, tokenizer_path):
    (tmp_path / "a").mkdir()
    path, shards = write_jsonl(tmp_path / "a" / "docs.jsonl", documents(30)), tmp_path / "a" / "shards"
    shard_source(shards, [path], tokenizer_path).prepare_data()
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    before = {p: p.stat().st_mtime_ns for p in moved.rglob("*")}
    shard_source(moved / "shards", [moved / "docs.jsonl"], tokenizer_path).prepare_data()
    assert {p: p.stat().st_mtime_ns for p in moved.rglob("*")} == before  # accepted as prepared, nothing rewritten


def test_shards_prepared_before_raw_settings_were_recorded_still_load(tmp_path, tokenizer_path, caplog):
    path, shards = write_jsonl(tmp_path / "docs.jsonl", documents(30)), tmp_path / "shards"
    shard_source(shards, [path], tokenizer_path).prepare_data()
    record = json.loads((shards / "manifest.json").read_text())
    del record["raw"]
    (shards / "manifest.json").write_text(json.dumps(record))
    with caplog.at_level("INFO"):
        dm = shard_source(shards, [path], tokenizer_path, max_documents=10)
        dm.prepare_data()
    dm.setup()
    assert dm.manifests["docs"].raw is None
    assert "records no raw settings (prepared by an older slmlab): cannot check them" in caplog.text


def test_concurrent_preparations_of_one_directory_prepare_it_once(tmp_path, tokenizer_path, monkeypatch):
    """Each process deleted the manifest and the temp files of the other; now one prepares while the
    other waits for it and then uses its shards."""
    import threading
    import time

    import datamodules.token_shards as token_shards

    path, shards = write_jsonl(tmp_path / "docs.jsonl", documents(30)), tmp_path / "shards"
    started, calls = threading.Event(), []

    def slow_prepare(*args, **kwargs):
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the second preparation starts meanwhile
        return prepare_shards(*args, **kwargs)

    monkeypatch.setattr(token_shards, "prepare_shards", slow_prepare)
    finished, errors = {}, []

    def run(name: str) -> None:
        try:
            dm = shard_source(shards, [path], tokenizer_path)
            dm.prepare_data()  # its own open file, so its own lock, as in another process
            dm.setup()
            finished[name] = (time.monotonic(), dm.manifests["docs"])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    first, second = (threading.Thread(target=run, args=(name,), name=name) for name in ("first", "second"))
    first.start()
    assert started.wait(10)
    second.start()
    first.join()
    second.join()
    assert not errors and calls == ["first"]
    assert finished["first"][1] == finished["second"][1] == open_shards(shards, verify="hash")
