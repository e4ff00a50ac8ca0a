"""TokenShardDataModule over two synthetic sources whose tokens tell them apart:
`a` uses ids 4..99 (39 train blocks), `b` ids 100..199 (13 train blocks); blocks of 8 + 1 tokens."""

import re
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import TokenShardDataModule
from slmlab.data.errors import DataError
from slmlab.data.shards import MANIFEST
from slmlab.data.tokenizer import tokenizer_hash
from tests.data_fixtures import tokenizer_path_fixture, write_shards  # noqa: F401 (a fixture)

SEQ_LEN = 8
SOURCES = {"a": (4, 100, 321, 50), "b": (100, 200, 105, 30)}  # id range, train tokens, val tokens


@pytest.fixture
def make_dm(tmp_path, tokenizer_path):
    """make_dm(weights, **kwargs) -> a set-up datamodule over sources `a` and `b`."""
    for seed, (name, (low, high, n_train, n_val)) in enumerate(SOURCES.items()):
        rng = np.random.default_rng(seed)
        splits = {"train": rng.integers(low, high, n_train), "val": rng.integers(low, high, n_val)}
        write_shards(tmp_path / name, splits, tokenizer_hash=tokenizer_hash(tokenizer_path), shard_tokens=200)

    def make(weights=(0.5, 0.5), rank=0, world_size=1, **kwargs) -> TokenShardDataModule:
        kwargs = {"seq_len": SEQ_LEN, "batch_size": 4, "seed": 7, **kwargs}
        sources = {name: {"path": str(tmp_path / name), "weight": w} for name, w in zip(SOURCES, weights)}
        dm = TokenShardDataModule(sources, {"path": str(tokenizer_path), "vocab_size": 300}, **kwargs)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, training=True)
        dm.setup("fit")
        return dm

    return make


def take(dm: TokenShardDataModule, n: int) -> list[dict]:
    """The next n training batches, counted as delivered to the model."""
    batches = list(islice(dm.train_dataloader(), n))
    for batch in batches:
        dm.on_after_batch_transfer(batch, 0)
    return batches


def rows(batches: list[dict]) -> torch.Tensor:
    """Each sample's whole block: input_ids plus the last label, [N, seq_len + 1]."""
    return torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], dim=1) for b in batches])


def from_a(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 0] < 100


def test_batches_are_shifted_blocks_of_the_shards(make_dm):
    dm = make_dm()
    batch = take(dm, 1)[0]
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ_LEN)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    all_blocks = {tuple(row) for blocks in dm.train_blocks.values()
                  for row in blocks.read(np.arange(blocks.num_blocks)).tolist()}
    assert all(tuple(row) in all_blocks for row in rows([batch]).tolist())


def test_mixture_follows_the_weights_within_one_sample(make_dm):
    samples = rows(take(make_dm(weights=(3, 1)), 20))
    seen = torch.arange(1, len(samples) + 1)
    from_a_so_far = from_a(samples).cumsum(0)
    assert from_a_so_far[-1] == 60
    assert ((from_a_so_far - 0.75 * seen).abs() <= 1).all()  # after every sample, not just on average


def test_a_weight_zero_source_is_validated_but_never_trained_on(make_dm):
    dm = make_dm(weights=(1, 0))
    assert from_a(rows(take(dm, 10))).all()
    assert dm.val_sources == ["a", "b"] and len(dm.val_dataloader()) == 2


def test_each_pass_visits_every_block_once_in_a_new_order(make_dm):
    dm = make_dm(weights=(0, 1), batch_size=13)  # source b alone: one batch is one pass over it
    first, second = (rows([b]) for b in take(dm, 2))
    all_b = torch.from_numpy(dm.train_blocks["b"].read(np.arange(13)).astype(np.int64))
    for one_pass in (first, second):
        assert sorted(map(tuple, one_pass.tolist())) == sorted(map(tuple, all_b.tolist()))
    assert not torch.equal(first, second)


def test_shuffle_is_deterministic_in_the_seed(make_dm):
    same = [rows(take(make_dm(seed=1), 5)) for _ in range(2)]
    other = rows(take(make_dm(seed=2), 5))
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], other)


def test_ranks_and_workers_split_one_stream_disjointly(make_dm):
    single = take(make_dm(batch_size=4), 6)
    per_rank = [take(make_dm(batch_size=2, rank=r, world_size=2, num_workers=2), 6) for r in range(2)]
    for b in range(6):  # global batch b is rank 0's b-th batch, then rank 1's
        assert torch.equal(rows([single[b]]), rows([per_rank[0][b], per_rank[1][b]]))


@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_resume_continues_the_exact_stream_across_a_pass_boundary(make_dm, resume_ranks):
    uninterrupted = rows(take(make_dm(), 12))
    first = make_dm()
    take(first, 5)
    state = first.state_dict()
    assert state["batches_consumed"] == 5
    # b has 13 blocks and half the samples: its first pass ends after sample 26, i.e. after the resume
    assert (~from_a(uninterrupted[:20])).sum() < 13 < (~from_a(uninterrupted)).sum()
    resumed = []
    for rank in range(resume_ranks):  # also on 2 ranks with half the batch: the global stream is the same
        dm = make_dm(batch_size=4 // resume_ranks, rank=rank, world_size=resume_ranks)
        dm.load_state_dict(state)
        resumed.append(take(dm, 7))
    continued = rows([batch for step in zip(*resumed) for batch in step])
    assert torch.equal(continued, uninterrupted[20:])


class _Recorder(L.LightningModule):
    """Records the training batches it is given; learns nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"])
        return self.weight * batch["input_ids"].float().mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_checkpoint_resumes_the_exact_stream(make_dm, tmp_path):
    def fit(max_steps: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, _Recorder]:
        trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                            limit_val_batches=1, num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        dm, module = make_dm(), _Recorder()
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, module

    trainer, _ = fit(3)
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=False)["TokenShardDataModule"]
    assert saved == {"batches_consumed": 3, "samples_consumed": 12}  # validation batches are not counted
    _, resumed = fit(7, tmp_path / "step3.ckpt")
    _, uninterrupted = fit(7)
    assert len(resumed.seen) == 4 and len(uninterrupted.seen) == 7
    assert torch.equal(torch.cat(resumed.seen), torch.cat(uninterrupted.seen[3:]))


def test_validation_reads_every_block_once_in_order_split_over_ranks(make_dm):
    dm = make_dm(batch_size=4)
    loaders = dm.val_dataloader()
    for name, loader in zip(dm.val_sources, loaders):
        blocks = dm.val_blocks[name]
        expected = torch.from_numpy(blocks.read(np.arange(blocks.num_blocks)).astype(np.int64))
        batches = list(loader)
        assert len(batches) == -(-blocks.num_blocks // 4)  # the last batch may be short
        assert torch.equal(rows(batches), expected)
        per_rank = [rows(list(make_dm(rank=r, world_size=2).val_dataloader()[dm.val_sources.index(name)]))
                    for r in range(2)]
        assert torch.equal(per_rank[0], expected[0::2]) and torch.equal(per_rank[1], expected[1::2])


def test_bytes_per_token_comes_from_the_val_manifest(make_dm):
    dm = make_dm()
    val = dm.manifests["a"].splits["val"]
    assert dm.bytes_per_token("a") == val.bytes / val.tokens


def test_a_val_split_shorter_than_one_block_is_an_error(make_dm):
    with pytest.raises(DataError, match=r"source 'b': its val split is shorter than one block .* raise val_fraction"):
        make_dm(seq_len=40)  # b has 30 val tokens


def test_setup_refuses_shards_of_another_tokenizer_or_val_fraction(make_dm, tmp_path, tokenizer_path):
    write_shards(tmp_path / "b", {"train": np.arange(100, 200), "val": np.arange(100, 140)}, tokenizer_hash="feedbeef")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "b" / MANIFEST)) + ".*feedbeef.*"
                       + tokenizer_hash(tokenizer_path)):
        make_dm()
    with pytest.raises(DataError, match="prepared with val_fraction=0.05, split_key=None; configured val_fraction=0.1"):
        make_dm(val_fraction=0.1)


def test_prepare_data_leaves_prepared_sources_alone(make_dm, tmp_path, tokenizer_path):  # make_dm wrote a, b
    raw = {"files": [str(tmp_path / "gone.jsonl")]}  # would fail if it were read
    dm = TokenShardDataModule({"a": {"path": str(tmp_path / "a"), "raw": raw}},
                              {"path": str(tokenizer_path), "vocab_size": 300}, seq_len=SEQ_LEN, batch_size=2)
    dm.prepare_data()
    (tmp_path / "a" / MANIFEST).unlink()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "gone.jsonl"))):
        dm.prepare_data()


def test_config_mistakes_are_named(tmp_path, tokenizer_path):
    tokenizer = {"path": str(tokenizer_path), "vocab_size": 300}
    with pytest.raises(DataError, match=r"source 'a': unknown keys \['wieght'\]"):
        TokenShardDataModule({"a": {"path": "x", "wieght": 1}}, tokenizer, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match=r"source weights .* not all 0"):
        TokenShardDataModule({"a": {"path": "x", "weight": 0}}, tokenizer, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match="source 'a': raw"):
        TokenShardDataModule({"a": {"path": "x", "raw": {"file": "y"}}}, tokenizer, seq_len=8, batch_size=2)
    # float() and iteration named neither the source nor the key (`data.sources.de=null`, `weight=null`)
    with pytest.raises(DataError, match=r"source 'a': expected a mapping with keys \['path', 'raw', 'weight'\], got None"):
        TokenShardDataModule({"a": None}, tokenizer, seq_len=8, batch_size=2)
    for weight in (None, "half"):
        with pytest.raises(DataError, match=rf"source 'a': weight={weight!r} must be a number"):
            TokenShardDataModule({"a": {"path": "x", "weight": weight}}, tokenizer, seq_len=8, batch_size=2)
    with pytest.raises(DataError, match=r"source 'a': raw='y.jsonl' must be a mapping"):
        TokenShardDataModule({"a": {"path": "x", "raw": "y.jsonl"}}, tokenizer, seq_len=8, batch_size=2)
    for key, value in (("vocab_size", "abc"), ("vocab_size", 300.5), ("min_frequency", 0)):
        with pytest.raises(DataError, match=rf"tokenizer.{key}={value!r}: must be an integer of at least 1"):
            TokenShardDataModule({"a": {"path": "x"}}, tokenizer | {key: value}, seq_len=8, batch_size=2)


def test_superposition_phases_read_runs_of_bag_times_the_tokens_and_resume_exactly(make_dm):
    """Token superposition training: a sample of a bag step reads bag * (seq_len + 1) contiguous tokens of
    one shard, a later sample an ordinary block; a stream resumed inside a bag phase continues exactly."""
    from slmlab.data.bags import BagSchedule

    schedule = BagSchedule(((4, 8), (2, 16)))  # 4 samples a batch: 2 batches of bags of 4, 2 of 2, then tokens
    dm = make_dm()
    dm.read_bags(schedule)
    batches = take(dm, 6)
    assert [b["input_ids"].shape for b in batches] == [(4, 35)] * 2 + [(4, 17)] * 2 + [(4, SEQ_LEN)] * 2
    shards = [np.memmap(path, dtype=blocks.dtype, mode="r") for blocks in dm.train_blocks.values()
              for path in blocks.paths]
    for batch in batches:
        for row in rows([batch]).numpy():
            windows = (np.lib.stride_tricks.sliding_window_view(shard, len(row)) for shard in shards if len(shard) >= len(row))
            assert any((w == row).all(axis=1).any() for w in windows), row
    resumed = make_dm()
    resumed.read_bags(schedule)
    resumed.load_state_dict({"batches_consumed": 1, "samples_consumed": 4})
    for got, want in zip(take(resumed, 5), batches[1:], strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_a_source_too_short_for_a_bag_is_named(make_dm):
    from slmlab.data.bags import BagSchedule

    dm = make_dm()
    dm.read_bags(BagSchedule(((16, 8),)))  # 16 * 9 = 144 tokens: source b has 105
    with pytest.raises(DataError, match=r"b: its train split has no run of 144 tokens .* bags of 16"):
        take(dm, 1)


def test_two_sources_of_one_shard_directory_are_named(tmp_path, tokenizer_path):
    """The second source's raw text was never read: its shards counted as prepared by the first."""
    paths = {"en": tmp_path / "shards" / "en", "de": tmp_path / "shards" / "de" / ".." / "en"}
    sources = {name: {"path": str(path), "raw": {"files": [str(tmp_path / f"{name}.jsonl")]}}
               for name, path in paths.items()}
    with pytest.raises(DataError, match=re.escape(f"sources 'en' and 'de': both have the shard directory {paths['en'].resolve()};")):
        TokenShardDataModule(sources, {"path": str(tokenizer_path), "vocab_size": 300}, seq_len=SEQ_LEN, batch_size=2)
