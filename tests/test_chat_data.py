"""Chat template and post-training datamodules (SFT conversations, preference pairs, GRPO prompts),
on small conversation files and on the embedded data, with a 512-token tokenizer of the corpus."""

import gzip
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from tokenizers import Tokenizer

from datamodules import ChatDataModule, PreferenceDataModule, PromptDataModule, TokenShardDataModule
from slmlab import CORPUS_DIR
from slmlab.data.chat import (CHATML_TEMPLATE, CONFIG_FILE, IM_END, PAD, apply_chat_template, convert_hf, encode_chat,
                              render, write_tokenizer_config)
from slmlab.data.errors import DataError
from slmlab.data.sequences import pack_greedily
from slmlab.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from slmlab.training.losses import IGNORE_INDEX
from tests.conftest import compose_config
from tests.data_fixtures import write_shards
from tests.test_datamodule import take

SEQ_LEN = 96  # the longest test conversation has 82 tokens
EMBEDDED = {"chat.jsonl.gz": 400, "prefs.jsonl.gz": 300, "constraint_prompts.jsonl.gz": 300}  # promised minimums

MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is section 1.2 about?"},
    {"role": "assistant", "content": "Section 1.2 is titled “Unix-like filesystem”."},
    {"role": "user", "content": "Und auf Deutsch?"},
    {"role": "assistant", "content": "Abschnitt 1.2 heißt „Unix-ähnliches Dateisystem“."},
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 512-token tokenizer of the embedded corpus (both languages)."""
    texts = [json.loads(line)["text"] for lang in ("en", "de")
             for line in gzip.open(CORPUS_DIR / f"debian_reference.{lang}.jsonl.gz", "rt", encoding="utf-8")]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(texts, 512, path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return load_tokenizer(tokenizer_path)


def conversation(i: int) -> list[dict]:
    """A distinct conversation; every third has a second exchange."""
    messages = [{"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"Answer {i}: the package manager installs it."}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Then {i} ends."}]
    return messages


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def make_chat(tmp_path, tokenizer_path):
    """make_chat(rank=0, world_size=1, **kwargs) -> a set-up ChatDataModule over 40 conversations."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": f"c{i}", "messages": conversation(i)} for i in range(40)])

    def make(rank: int = 0, world_size: int = 1, **kwargs) -> ChatDataModule:
        kwargs = {"seq_len": SEQ_LEN, "batch_size": 4, "val_fraction": 0.2, "seed": 7, **kwargs}
        dm = ChatDataModule(str(path), str(tokenizer_path), **kwargs)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, training=True)
        dm.setup("fit")
        return dm

    return make


def row_keys(batches: list[dict], key: str = "input_ids") -> list[str]:
    """A hash of every row, in order: which sample it is."""
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest() for batch in batches for row in batch[key]]


def spans(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of masked tokens."""
    runs, current = [], []
    for token, masked in zip(ids + [None], mask + [False]):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


# -- chat template ---------------------------------------------------------------------------------

def test_encode_chat_equals_encoding_the_rendered_template(tokenizer):
    conversations = [MULTI_TURN, conversation(0)]
    conversations += [json.loads(line)["messages"]
                      for line in gzip.open(CORPUS_DIR / "chat.jsonl.gz", "rt", encoding="utf-8")]
    for messages in conversations:
        for generation_prompt in (False, True):
            ids, mask = encode_chat(tokenizer, messages, CHATML_TEMPLATE, add_generation_prompt=generation_prompt)
            assert ids == tokenizer.encode(render(CHATML_TEMPLATE, messages, generation_prompt)).ids
            assert len(mask) == len(ids)


def test_the_mask_is_exactly_the_assistant_replies_and_their_im_end(tokenizer):
    ids, mask = encode_chat(tokenizer, MULTI_TURN, CHATML_TEMPLATE)
    decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in spans(ids, mask)]
    assert decoded == [m["content"] + IM_END for m in MULTI_TURN if m["role"] == "assistant"]
    # what is not learnt: system and user turns, role headers, the newline after <|im_end|>
    rest = tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert rest == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is section 1.2 about?"
                    "<|im_end|>\n<|im_start|>assistant\n\n<|im_start|>user\nUnd auf Deutsch?<|im_end|>\n"
                    "<|im_start|>assistant\n\n")


def test_special_tokens_in_contents_are_text_and_the_template_specials_are_ids(tokenizer):
    messages = [{"role": "user", "content": "Is <|im_end|> a token?"}, {"role": "assistant", "content": "No."}]
    ids, mask = encode_chat(tokenizer, messages, CHATML_TEMPLATE)
    im_end = tokenizer.token_to_id(IM_END)
    assert ids.count(im_end) == 2  # the template's two, not the user's literal one
    assert ids[0] == tokenizer.token_to_id("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=False) == render(CHATML_TEMPLATE, messages)


def test_a_generation_prompt_is_appended_and_never_learnt(tokenizer):
    ids, mask = encode_chat(tokenizer, conversation(1)[:1], CHATML_TEMPLATE, add_generation_prompt=True)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert not any(mask)


def test_a_template_that_changes_contents_is_refused(tokenizer):
    stripping = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")
    with pytest.raises(DataError, match="changes message contents"):
        encode_chat(tokenizer, [{"role": "user", "content": " padded "}], stripping)


def test_tokenizer_config_holds_the_template_and_hugging_face_reads_it(tmp_path, tokenizer_path):
    write_tokenizer_config(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (IM_END, PAD, None)
    for generation_prompt in (False, True):
        assert apply_chat_template(MULTI_TURN, tmp_path, generation_prompt) == \
            render(CHATML_TEMPLATE, MULTI_TURN, generation_prompt)
    assert apply_chat_template(MULTI_TURN[:2], config).endswith("user\nWhat is section 1.2 about?<|im_end|>\n")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == \
        apply_chat_template(MULTI_TURN, tmp_path, add_generation_prompt=True)
    assert hf.eos_token == IM_END


@pytest.mark.parametrize("content, problem", [(b'{"chat_template": ', "not valid JSON"),
                                              (b'{"chat_template": "\xff"}', "not valid JSON"),
                                              (b"3", "no chat_template")])
def test_a_malformed_tokenizer_config_is_named(tmp_path, content, problem):
    (tmp_path / CONFIG_FILE).write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / CONFIG_FILE}: {problem}")):
        apply_chat_template(MULTI_TURN, tmp_path)


def test_convert_hf_writes_conversations_the_datamodule_reads(tmp_path, tokenizer_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": conversation(i) + [{"role": "user", "content": "extra", "weight": 0}]} for i in range(30)]
    rows[3]["messages"].append({"role": "tool", "content": "{}"})  # a role we have no template for
    rows[5]["messages"] = [{"role": "user", "content": "no answer"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: iter(rows))
    out = tmp_path / "converted" / "chat.jsonl"
    assert convert_hf("org/chat", out) == 28
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0] == {"id": "org/chat/train/0",
                          "messages": conversation(0) + [{"role": "user", "content": "extra"}]}
    assert "org/chat/train/3" not in {r["id"] for r in records}
    dm = ChatDataModule(str(out), str(tokenizer_path), seq_len=SEQ_LEN, batch_size=2, val_fraction=0.2)
    dm.setup()
    assert dm.train_size + len(dm.val_collate) == 28


# -- ChatDataModule --------------------------------------------------------------------------------

def test_labels_are_the_next_token_on_assistant_replies_and_padding_is_ignored(make_chat):
    dm = make_chat()
    batch = dm.train_collate(np.arange(4))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (4, SEQ_LEN) and ids.dtype == labels.dtype == torch.int64
    for row in range(4):
        tokens, mask = (torch.from_numpy(a) for a in dm.train_collate.sequences[row])
        n = len(tokens) - 1
        assert torch.equal(ids[row, :n], tokens[:-1].long()) and (ids[row, n:] == dm.tokenizer.token_to_id(PAD)).all()
        assert torch.equal(labels[row, :n], torch.where(mask[1:], tokens[1:].long(), IGNORE_INDEX))
        assert (labels[row, n:] == IGNORE_INDEX).all()
        number = int(re.search(r"Question number (\d+)", dm.tokenizer.decode(tokens.tolist())).group(1))
        replies = "".join(m["content"] + IM_END for m in conversation(number) if m["role"] == "assistant")
        learnt = labels[row][labels[row] != IGNORE_INDEX]
        assert dm.tokenizer.decode(learnt.tolist(), skip_special_tokens=False) == replies
    assert dm.eos_id == dm.tokenizer.token_to_id(IM_END) and dm.vocab_size <= 512


def test_rows_without_an_assistant_turn_are_named_or_skipped(tmp_path, tokenizer_path):
    records = [{"id": f"c{i}", "messages": conversation(i)} for i in range(30)]
    records.insert(4, {"id": "lonely", "messages": [{"role": "user", "content": "Anyone?"}]})
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{path}:5 (id 'lonely'): no assistant turn")):
        ChatDataModule(str(path), str(tokenizer_path), seq_len=SEQ_LEN, batch_size=2, val_fraction=0.2).setup()
    dm = ChatDataModule(str(path), str(tokenizer_path), seq_len=SEQ_LEN, batch_size=2, val_fraction=0.2,
                        on_bad_row="skip")
    dm.setup()
    assert dm.skipped == 1 and dm.train_size + len(dm.val_collate) == 30
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "messages": []}\n{oops\n')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'broken.jsonl'}:2: invalid JSON")):
        ChatDataModule(str(tmp_path / "broken.jsonl"), str(tokenizer_path), seq_len=8, batch_size=2,
                       on_bad_row="skip").setup()


def test_long_conversations_are_cut_to_seq_len_plus_one(make_chat):
    dm = make_chat(seq_len=36)
    assert (dm.truncated, dm.dropped) == (40, 0)  # every conversation is longer than 37 tokens
    batch = take(dm, 1)[0]
    assert (batch["input_ids"] != dm.tokenizer.token_to_id(PAD)).all()  # full rows, no padding
    with pytest.raises(DataError, match="no train conversations"):
        make_chat(seq_len=6)  # cut before any reply: every conversation is dropped


def test_each_epoch_visits_every_conversation_once_in_a_new_order(make_chat):
    dm = make_chat(batch_size=1)
    n = dm.train_size
    keys = row_keys(take(dm, 2 * n))
    first, second = keys[:n], keys[n:]
    assert len(set(first)) == n and set(first) == set(second) and first != second


def test_shuffle_is_deterministic_in_the_seed(make_chat):
    same = [row_keys(take(make_chat(seed=1), 5)) for _ in range(2)]
    assert same[0] == same[1] and same[0] != row_keys(take(make_chat(seed=2), 5))


@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_resume_continues_the_exact_stream_across_an_epoch_boundary(make_chat, resume_ranks):
    dm = make_chat()
    per_epoch = dm.train_size  # not a multiple of the batch size: a batch straddles the boundary
    steps = -(-2 * per_epoch // 4)
    uninterrupted = row_keys(take(make_chat(), steps))
    take(dm, 5)
    state = dm.state_dict()
    assert state == {"batches_consumed": 5, "samples_consumed": 20} and 20 < per_epoch
    resumed = []
    for rank in range(resume_ranks):
        other = make_chat(batch_size=4 // resume_ranks, rank=rank, world_size=resume_ranks)
        other.load_state_dict(state)
        resumed.append(take(other, steps - 5))
    continued = row_keys([batch for step in zip(*resumed) for batch in step])
    assert continued == uninterrupted[20:]


def test_ranks_and_workers_split_the_stream_disjointly(make_chat):
    single = take(make_chat(batch_size=4), 6)
    per_rank = [take(make_chat(batch_size=2, rank=r, world_size=2, num_workers=2), 6) for r in range(2)]
    for step in range(6):  # global batch b is rank 0's b-th batch, then rank 1's
        assert row_keys([single[step]]) == row_keys([per_rank[0][step], per_rank[1][step]])
    assert not set(row_keys(per_rank[0])) & set(row_keys(per_rank[1]))


def test_steps_per_epoch_counts_optimizer_steps_of_one_epoch(make_chat):
    dm = make_chat(batch_size=3)
    assert dm.steps_per_epoch(world_size=2, accumulate=4) == pytest.approx(dm.train_size / 24)
    assert dm.steps_per_epoch(world_size=1, accumulate=1) == pytest.approx(dm.train_size / 3)


def test_validation_covers_the_held_out_conversations_once_split_over_ranks(make_chat):
    dm = make_chat(batch_size=3)
    (loader,) = dm.val_dataloader()
    everything = row_keys(list(loader))
    assert len(everything) == len(dm.val_collate) == len(set(everything)) > 0
    assert not set(everything) & set(row_keys(take(dm, dm.train_size)))
    per_rank = [row_keys(list(make_chat(batch_size=3, rank=r, world_size=2).val_dataloader()[0])) for r in range(2)]
    assert per_rank[0] == everything[0::2] and per_rank[1] == everything[1::2]


def test_packing_fills_rows_with_whole_conversations(make_chat):
    plain, packed = make_chat(seq_len=100), make_chat(seq_len=100, packing=True)
    assert packed.num_train_conversations == plain.train_size > packed.train_size
    decode = lambda tokens: plain.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)  # noqa: E731
    conversations = sorted(decode(plain.train_collate.sequences[i][0]) for i in range(plain.train_size))
    assert all(len(plain.train_collate.sequences[i][0]) <= 101 for i in range(plain.train_size))  # none was cut
    pieces = []
    for i in range(packed.train_size):
        tokens = packed.train_collate.sequences[i][0]
        assert len(tokens) <= 101
        pieces += re.split(r"(?=<\|im_start\|>user\nQuestion number)", decode(tokens))[1:]
    assert sorted(pieces) == conversations  # each conversation whole, in exactly one row


def test_pack_greedily_never_splits_and_keeps_the_order():
    groups = pack_greedily([5, 4, 3, 9, 1, 1], capacity=9)
    assert groups == [[0, 1], [2], [3], [4, 5]]
    assert pack_greedily([12, 2], capacity=9) == [[0], [1]]  # too long for any block: alone


def test_pretraining_sources_follow_the_chat_validation(make_chat, tmp_path, tokenizer_path, tokenizer):
    rng, vocab = np.random.default_rng(0), tokenizer.get_vocab_size()
    write_shards(tmp_path / "en", {"train": rng.integers(4, vocab, 200), "val": rng.integers(4, vocab, 50)},
                 vocab_size=vocab, tokenizer_hash=tokenizer_hash(tokenizer_path))
    shards = TokenShardDataModule({"en": {"path": str(tmp_path / "en")}},
                                  {"path": str(tokenizer_path), "vocab_size": vocab}, seq_len=8, batch_size=2)
    dm = make_chat(pretrain_val=shards)
    assert dm.val_sources == ["chat", "en"]
    chat_loader, en_loader = dm.val_dataloader()
    assert next(iter(en_loader))["input_ids"].shape == (2, 8)
    val = shards.manifests["en"].splits["val"]
    assert dm.bytes_per_token("en") == val.bytes / val.tokens
    assert 1 < dm.bytes_per_token("chat") < 8
    other = tmp_path / "other" / "tokenizer.json"
    other_vocab = train_tokenizer(["something else entirely"] * 10, 300, other).get_vocab_size()
    write_shards(tmp_path / "other_en", {"train": rng.integers(4, 200, 200), "val": rng.integers(4, 200, 50)},
                 vocab_size=other_vocab, tokenizer_hash=tokenizer_hash(other))
    with pytest.raises(DataError, match="differs from the chat data's tokenizer"):
        make_chat(pretrain_val=TokenShardDataModule({"en": {"path": str(tmp_path / "other_en")}},
                                                    {"path": str(other), "vocab_size": other_vocab}, seq_len=8,
                                                    batch_size=2))


# -- PreferenceDataModule --------------------------------------------------------------------------

def pair(i: int) -> dict:
    prompt = MULTI_TURN[:4] if i % 2 else [{"role": "user", "content": f"Which section covers topic {i}?"}]
    return {"id": f"p{i}", "prompt": prompt, "chosen": f"Section {i}.", "rejected": f"Abschnitt {i + 1}, vielleicht."}


def test_preference_batches_label_only_the_replies(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [pair(i) for i in range(60)])
    dm = PreferenceDataModule(str(path), str(tokenizer_path), seq_len=SEQ_LEN, batch_size=4, val_fraction=0.2)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
    dm.setup()
    batch = take(dm, 1)[0]
    assert set(batch) == {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "pair_index"}
    assert all(batch[k].shape == (4, SEQ_LEN) for k in batch if k != "pair_index")
    assert dm.state_dict()["samples_consumed"] == 4 and len(set(batch["pair_index"].tolist())) == 4
    decode = lambda ids: dm.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    for side in ("chosen", "rejected"):
        for ids, labels in zip(batch[f"{side}_ids"], batch[f"{side}_labels"]):
            learnt = labels != IGNORE_INDEX
            reply = decode(labels[learnt])
            assert re.fullmatch(r"(Section \d+\.|Abschnitt \d+, vielleicht\.)<\|im_end\|>", reply)
            # learning starts right after the last assistant header: not on the prompt's own assistant turn
            assert decode(ids[:int(learnt.nonzero()[0]) + 1]).endswith("<|im_start|>assistant\n")
    assert len(list(dm.val_dataloader())) > 0


def test_pairs_missing_a_field_are_named(tmp_path, tokenizer_path):
    records = [pair(i) for i in range(10)]
    del records[6]["rejected"]
    path = write_jsonl(tmp_path / "prefs.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{path}:7 (id 'p6'): no 'rejected'")):
        PreferenceDataModule(str(path), str(tokenizer_path), seq_len=SEQ_LEN, batch_size=2).setup()


# -- PromptDataModule ------------------------------------------------------------------------------

def prompt(i: int, split: str) -> dict:
    question = f"What is section {i} about?" + (" Answer briefly, please." if i % 2 else "")  # odd ones longer
    return {"id": f"q{i}", "prompt": question, "language": "en", "split": split,
            "constraints": [{"kind": "all_lowercase"}, {"kind": "max_words", "n": 50}]}


def test_prompts_carry_the_generation_prompt_and_split_train_from_heldout(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [prompt(i, "heldout" if i % 4 == 0 else "train") for i in range(20)])
    dm = PromptDataModule(str(path), str(tokenizer_path), batch_size=3)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
    dm.setup()
    batches = take(dm, 5)
    assert dm.state_dict() == {"batches_consumed": 5, "samples_consumed": 15}
    first_epoch = [item["id"] for batch in batches for item in batch][:15]
    assert sorted(first_epoch) == sorted(f"q{i}" for i in range(20) if i % 4)
    item = batches[0][0]
    assert dm.tokenizer.decode(item["prompt_ids"], skip_special_tokens=False) == \
        f"<|im_start|>user\n{item['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    assert item["constraints"][0] == {"kind": "all_lowercase"} and item["language"] == "en"
    assert [p["id"] for p in dm.heldout()] == ["q0", "q4", "q8", "q12", "q16"]
    assert [p["id"] for batch in dm.val_dataloader() for p in batch] == ["q0", "q4", "q8", "q12", "q16"]
    lengths = [len(p["prompt_ids"]) for p in dm.heldout() + dm.prompts["train"]]
    assert dm.seq_len == max(lengths)
    longest_even = max(len(p["prompt_ids"]) for p in dm.heldout())  # the held-out ones are even
    short = PromptDataModule(str(path), str(tokenizer_path), batch_size=3, max_prompt_len=longest_even)
    short.setup()
    assert short.dropped == 10 and short.seq_len == longest_even
    assert all(int(p["id"][1:]) % 2 == 0 for p in short.prompts["train"])


def test_validation_only_prompts_need_no_training_split(tmp_path, tokenizer_path):
    """As data.constraint_val (split null) a file of held-out prompts alone serves; training on it says why not."""
    path = write_jsonl(tmp_path / "prompts.jsonl", [prompt(i, "heldout") for i in range(4)])
    with pytest.raises(DataError, match="no prompts of split 'train'"):
        PromptDataModule(str(path), str(tokenizer_path), batch_size=2).setup()
    dm = PromptDataModule(str(path), str(tokenizer_path), batch_size=2, split=None)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=False)
    dm.setup()
    assert [p["id"] for batch in dm.val_dataloader() for p in batch] == ["q0", "q1", "q2", "q3"]
    with pytest.raises(DataError, match=re.escape(f"{path}: split=null serves validation only")):
        dm.train_size


def test_prompts_with_unknown_constraints_are_named(tmp_path, tokenizer_path):
    records = [prompt(i, "train") for i in range(5)]
    records[2]["constraints"] = [{"kind": "rhymes"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    with pytest.raises(DataError, match=re.escape(f"{path}:3 (id 'q2'): unknown constraint kind 'rhymes'")):
        PromptDataModule(str(path), str(tokenizer_path), batch_size=2).setup()


# -- the embedded data -----------------------------------------------------------------------------

def read(name: str) -> list[dict]:
    return [json.loads(line) for line in gzip.open(CORPUS_DIR / name, "rt", encoding="utf-8")]


def test_the_embedded_files_have_the_promised_sizes_and_licence_note():
    assert sum((CORPUS_DIR / name).stat().st_size for name in EMBEDDED) <= 1_000_000
    for name, minimum in EMBEDDED.items():
        records = read(name)
        assert len(records) >= minimum, name
        assert len({r["id"] for r in records}) == len(records), f"{name}: ids must be unique"
        assert {r["language"] for r in records} == {"en", "de"}
    replies = [m["content"] for r in read("chat.jsonl.gz") for m in r["messages"] if m["role"] == "assistant"]
    assert max(len(reply.split()) for reply in replies) <= 80
    assert any(len(r["messages"]) > 3 for r in read("chat.jsonl.gz"))  # some multi-turn
    prompts = read("constraint_prompts.jsonl.gz")
    assert 0.15 < sum(p["split"] == "heldout" for p in prompts) / len(prompts) < 0.25
    assert sum(any(c["kind"] == "all_lowercase" for c in p["constraints"]) for p in prompts) > 0.35 * len(prompts)
    readme = (CORPUS_DIR / "README.md").read_text()
    section = readme[readme.index("## Post-training data"):]
    assert all(name in section for name in EMBEDDED) and "GPL-2 or later" in section


def test_the_builder_rebuilds_the_embedded_files_exactly(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("build_posttrain", CORPUS_DIR / "build_posttrain.py")
    builder = module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.main(tmp_path)
    for name in EMBEDDED:
        assert (tmp_path / name).read_bytes() == (CORPUS_DIR / name).read_bytes(), \
            f"{name} is stale: run python src/slmlab/corpus/build_posttrain.py"


def test_the_embedded_data_loads_with_held_out_sections(tokenizer_path):
    chat = ChatDataModule(str(CORPUS_DIR / "chat.jsonl.gz"), str(tokenizer_path), seq_len=256, batch_size=4,
                          val_fraction=0.15, split_key="section")
    chat.setup()
    assert chat.train_size >= 1500 and len(chat.val_collate) >= 150
    prefs = PreferenceDataModule(str(CORPUS_DIR / "prefs.jsonl.gz"), str(tokenizer_path), seq_len=256,
                                 batch_size=4, val_fraction=0.15, split_key="section")
    prefs.setup()
    assert prefs.train_size >= 300 and len(prefs.val_collate) >= 30
    prompts = PromptDataModule(str(CORPUS_DIR / "constraint_prompts.jsonl.gz"), str(tokenizer_path), batch_size=4)
    prompts.setup()
    assert len(prompts.heldout()) >= 60
    # the tokenizer directory got its chat template
    assert json.loads((tokenizer_path.parent / CONFIG_FILE).read_text())["chat_template"] == CHATML_TEMPLATE


def test_no_training_pair_holds_a_held_out_sections_answers():
    """`wrong_section` rejects another section's answer: it once took held-out sections' too (8 training
    pairs held text that chat and DPO validation hold out)."""
    from slmlab.data.prepare import is_val_document

    def rows(name: str) -> list[dict]:
        with gzip.open(CORPUS_DIR / name, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def held_out(row: dict) -> bool:  # conf/data/chat_embedded.yaml and prefs.yaml: split_key section, 0.15
        return is_val_document(row["section"].encode(), 0.15)

    chat, prefs = rows("chat.jsonl.gz"), rows("prefs.jsonl.gz")
    held = {m["content"] for row in chat if held_out(row) for m in row["messages"] if m["role"] == "assistant"}
    held |= {row["chosen"] for row in prefs if held_out(row)}
    training = [row for row in prefs if not held_out(row)]
    assert len(training) > 300 and not [row["id"] for row in training if row["rejected"] in held]


def test_the_data_configs_instantiate_with_the_pretraining_tokenizer():
    chat = instantiate(compose_config(["data=chat_embedded"]).data)
    assert isinstance(chat.pretrain_val, TokenShardDataModule) and chat.val_sources == ["chat", "en", "de"]
    assert chat.tokenizer_path == chat.pretrain_val.tokenizer_path
    for data, cls in (("prefs", PreferenceDataModule), ("ifeval_prompts", PromptDataModule),
                      ("smoltalk", ChatDataModule)):
        dm = instantiate(compose_config([f"data={data}"]).data)
        assert isinstance(dm, cls) and dm.tokenizer_path == chat.tokenizer_path


def test_packed_batches_carry_each_tokens_position_in_its_conversation(make_chat):
    plain, packed = make_chat(seq_len=100, batch_size=4), make_chat(seq_len=100, batch_size=4, packing=True)
    assert "positions" not in plain.train_collate(np.arange(4))
    batch = packed.train_collate(np.arange(4))
    im_start = packed.tokenizer.token_to_id("<|im_start|>")
    conversations = []
    for row in range(4):
        sequence = packed.train_collate.sequences[row][0]
        n = len(sequence) - 1  # the inputs; the rest of the row is padding
        starts = (batch["positions"][row, :n] == 0).nonzero().flatten()
        # a conversation starts at each position 0 and counts up from there until the next one
        assert starts[0] == 0 and all(batch["input_ids"][row, s] == im_start for s in starts.tolist())
        conversations.append(len(starts))
        ends = [*starts.tolist()[1:], n]
        for a, b in zip(starts.tolist(), ends):
            assert batch["positions"][row, a:b].tolist() == list(range(b - a))
        assert batch["positions"][row, n:].tolist() == list(range(100 - n))
    assert max(conversations) > 1


def test_validation_only_prompts_fit_the_model_by_their_held_out_prompts_alone(tmp_path, tokenizer_path):
    """As data.constraint_val (split null) only the held-out prompts are served: a long training prompt in the
    same file no longer raised `seq_len` (the length a stage checks against model.max_seq_len) or counted as
    dropped."""
    records = [prompt(i, "heldout") for i in range(4)]
    records.append({**prompt(9, "train"), "prompt": "What is section 9 about? " + "Tell me more. " * 40})
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    both = PromptDataModule(str(path), str(tokenizer_path), batch_size=2, split="heldout")
    both.setup()
    longest_held_out = max(len(p["prompt_ids"]) for p in both.heldout())
    dm = PromptDataModule(str(path), str(tokenizer_path), batch_size=2, split=None)
    dm.setup()
    assert dm.seq_len == longest_held_out  # not the training prompt's length, several times longer
    assert [p["id"] for p in dm.heldout()] == ["q0", "q1", "q2", "q3"]
    capped = PromptDataModule(str(path), str(tokenizer_path), batch_size=2, split=None, max_prompt_len=longest_held_out)
    capped.setup()
    assert capped.dropped == 0
