import json
import re

import numpy as np
import pytest

from slmlab.data.atomic import atomic_write
from slmlab.data.blocks import Blocks
from slmlab.data.errors import DataError
from slmlab.data.shards import MANIFEST, ShardWriter, check_tokenizer, open_shards, token_dtype
from tests.data_fixtures import write_shards


def test_tokens_round_trip_through_shards_of_bounded_size(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, 4321)
    writer = ShardWriter(tmp_path, "train", token_dtype(300), shard_tokens=1000)
    for part in np.split(tokens, [7, 1500, 1501, 3999]):  # uneven appends, one crossing two shards
        writer.write(part)
    shards = writer.close()
    assert [s.tokens for s in shards] == [1000, 1000, 1000, 1000, 321]
    read = np.concatenate([np.fromfile(tmp_path / s.file, dtype="<u2") for s in shards])
    np.testing.assert_array_equal(read, tokens)


@pytest.mark.parametrize("vocab_size, dtype", [(65536, "uint16"), (65537, "uint32")])
def test_dtype_switches_to_uint32_above_65536_tokens(tmp_path, vocab_size, dtype):
    tokens = np.array([0, 1, vocab_size - 1, 12345, vocab_size - 2] * 20)
    write_shards(tmp_path, {"train": tokens, "val": tokens}, vocab_size=vocab_size)
    manifest = open_shards(tmp_path, verify="hash")
    assert json.loads((tmp_path / MANIFEST).read_text())["dtype"] == dtype
    blocks = Blocks(tmp_path, manifest, "train", seq_len=99)
    np.testing.assert_array_equal(blocks.read([0])[0], tokens)


def test_blocks_are_seq_len_plus_one_windows_that_never_cross_shards(tmp_path):
    tokens = np.arange(2500) % 300
    manifest = write_shards(tmp_path, {"train": tokens, "val": tokens[:10]}, shard_tokens=1000)
    blocks = Blocks(tmp_path, manifest, "train", seq_len=100)
    # shards of 1000, 1000, 500 tokens hold 9, 9, 4 blocks: (tokens - 1) // seq_len
    assert blocks.num_blocks == 22
    read = blocks.read(np.arange(22))
    for block, (shard, i) in zip(read, [(s, i) for s, n in enumerate([9, 9, 4]) for i in range(n)]):
        start = shard * 1000 + i * 100
        np.testing.assert_array_equal(block, tokens[start:start + 101])
    with pytest.raises(IndexError):
        blocks.read([22])


def test_truncated_shard_is_named_on_open(tmp_path):
    write_shards(tmp_path, {"train": np.arange(2500) % 300, "val": np.arange(50)})
    shard = tmp_path / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=re.escape(f"{shard}: 1998 bytes, the manifest says 2000")):
        open_shards(tmp_path)


def test_flipped_byte_is_caught_by_hash_verification_only(tmp_path):
    write_shards(tmp_path, {"train": np.arange(2500) % 300, "val": np.arange(50)})
    shard = tmp_path / "val_00000.bin"
    data = bytearray(shard.read_bytes())
    data[17] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_shards(tmp_path, verify="size")  # same size: the cheap check cannot see it
    with pytest.raises(DataError, match=re.escape(f"{shard}: sha256 differs")):
        open_shards(tmp_path, verify="hash")


def test_missing_manifest_or_shard_is_named(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST} not found")):
        open_shards(tmp_path)
    write_shards(tmp_path, {"train": np.arange(2500) % 300, "val": np.arange(50)})
    (tmp_path / "train_00002.bin").unlink()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train_00002.bin'}: shard listed in")):
        open_shards(tmp_path)


def test_malformed_manifest_is_named(tmp_path):
    write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["tokenizer_hash"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST}: malformed manifest")):
        open_shards(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "tokenizer_hash": "x", "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        open_shards(tmp_path)


@pytest.mark.parametrize("shape, problem", [
    (lambda m: [m], "the top level is a list"),
    (lambda m: "manifest", "the top level is a str"),
    (lambda m: {**m, "splits": list(m["splits"].values())}, "`splits` must be an object of objects"),
    (lambda m: {**m, "splits": {**m["splits"], "train": []}}, "`splits` must be an object of objects"),
], ids=["top-level list", "top-level string", "splits list", "split list"])
def test_a_manifest_with_lists_for_objects_is_named(tmp_path, shape, problem):
    write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)})
    (tmp_path / MANIFEST).write_text(json.dumps(shape(json.loads((tmp_path / MANIFEST).read_text()))))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST}: malformed manifest") + ".*" + problem):
        open_shards(tmp_path)


def with_first_shard(m: dict, **changes) -> dict:
    train = m["splits"]["train"]
    return {**m, "splits": {**m["splits"], "train": {**train, "shards": [{**train["shards"][0], **changes}]}}}


@pytest.mark.parametrize("change, problem", [
    (lambda m: {**m, "vocab_size": "300"}, "manifest field vocab_size='300' is not int"),
    (lambda m: {**m, "eos_id": None}, "manifest field eos_id=None is not int"),
    (lambda m: {**m, "val_fraction": True}, "manifest field val_fraction=True is not float"),
    (lambda m: with_first_shard(m, file=None), "shard field file=None is not str"),
    (lambda m: with_first_shard(m, tokens=50.0), "shard field tokens=50.0 is not int"),
], ids=["vocab_size string", "eos_id null", "val_fraction bool", "shard file null", "shard tokens float"])
def test_a_manifest_field_of_the_wrong_type_is_named(tmp_path, change, problem):
    write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)})
    (tmp_path / MANIFEST).write_text(json.dumps(change(json.loads((tmp_path / MANIFEST).read_text()))))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST}: malformed manifest (TypeError: {problem}")):
        open_shards(tmp_path)


def test_a_split_total_that_its_shards_do_not_add_up_to_is_named(tmp_path):
    write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)})
    record = json.loads((tmp_path / MANIFEST).read_text())
    record["splits"]["val"]["tokens"] = 49
    (tmp_path / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST}: split 'val' counts 49 tokens, its shards 50")):
        open_shards(tmp_path)


def test_a_manifest_that_is_not_utf8_is_named(tmp_path):
    write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)})
    data = bytearray((tmp_path / MANIFEST).read_bytes())
    data[data.index(b'"tokenizer_hash"') + 20] ^= 0xB0  # one byte of bit rot
    (tmp_path / MANIFEST).write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / MANIFEST}: malformed manifest (UnicodeDecodeError")):
        open_shards(tmp_path)


def test_tokenizer_mismatch_names_both_tokenizers(tmp_path):
    manifest = write_shards(tmp_path, {"train": np.arange(50), "val": np.arange(50)}, tokenizer_hash="aaaa")
    check_tokenizer(manifest, tmp_path, "aaaa", 300)
    with pytest.raises(DataError, match="made with tokenizer aaaa .* configured tokenizer is bbbb"):
        check_tokenizer(manifest, tmp_path, "bbbb", 300)
    with pytest.raises(DataError, match=r"\(vocab 300\).*\(vocab 512\)"):
        check_tokenizer(manifest, tmp_path, "aaaa", 512)


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new cont")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
