"""Post-training stages end to end at tiny size, each from a pretrained checkpoint."""

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from slmlab.checkpoint import load_model
from slmlab.models.generate import generate
from slmlab.rewards import score
from tests.conftest import compose_config, lowercase_prompts, metric, tiny_run_overrides
from train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    train(compose_config(tiny_run_overrides(tmp, steps=30, val_every=15) + ["optim.lr=3e-3"]))
    return tmp / "run" / "checkpoints" / "last.ckpt"


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_sft_stops_after_exactly_the_asked_fraction_of_an_epoch(pretrained, tmp_path):
    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage=sft", f"init_from={pretrained}", "stage.epochs=0.5",
                                                         "trainer.val_check_interval=10"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    train(cfg)
    ckpt = checkpoint(tmp_path / "run")
    steps = round(0.5 * dm.train_size / cfg.data.batch_size)
    assert ckpt["global_step"] == steps
    consumed = next(v for k, v in ckpt.items() if k.endswith("ChatDataModule"))["samples_consumed"]
    assert consumed == steps * cfg.data.batch_size and abs(consumed - dm.train_size / 2) <= cfg.data.batch_size / 2
    run = tmp_path / "run"
    assert metric(run, "val/loss") and metric(run, "val/pretrain/en/loss") and metric(run, "val/pretrain/de/bpb")


def test_sft_logs_the_pass_rate_of_greedy_answers_to_held_out_constraint_prompts(pretrained, tmp_path):
    cfg = compose_config(tiny_run_overrides(tmp_path) + [
        "stage=sft", f"init_from={pretrained}", "stage.epochs=0.3", "trainer.val_check_interval=5",
        "+data/constraint_val=embedded", f"data.constraint_val.prompts={lowercase_prompts(tmp_path)}",
        "stage.max_new_tokens=6"])
    train(cfg)
    rewards = metric(tmp_path / "run", "val/reward")
    assert len(rewards) == len(metric(tmp_path / "run", "val/loss")) >= 2  # at every validation
    # the last one is that of the final weights: recompute it from the checkpoint
    prompts = instantiate(cfg.data.constraint_val)
    prompts.setup()
    model = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    expected = []
    for item in prompts.heldout():
        ids = item["prompt_ids"]
        out = generate(model, torch.tensor([ids]), 6, temperature=0, stop_ids=prompts.eos_id)[0, len(ids):].tolist()
        text = prompts.tokenizer.decode([t for t in out if t != prompts.eos_id])
        expected.append(score(text, item["constraints"]))
    assert rewards[-1] == pytest.approx(sum(expected) / len(expected))


def test_dpo_trains_the_policy_and_leaves_the_reference(pretrained, tmp_path):
    train(compose_config(tiny_run_overrides(tmp_path, steps=6, val_every=3) + ["stage=dpo", f"init_from={pretrained}",
                                                                               "optim.lr=1e-3"]))
    run = tmp_path / "run"
    accuracy, margin = metric(run, "train/reward_accuracy"), metric(run, "train/reward_margin")
    assert accuracy and all(0 <= a <= 1 for a in accuracy) and margin[-1] > margin[0]
    assert metric(run, "val/loss")
    weights = checkpoint(run)["state_dict"]
    assert not any(k.startswith("reference") for k in weights)  # the frozen copy is not saved


def test_dpo_with_the_reference_log_probs_precomputed_trains_as_with_the_reference_and_frees_it(
        pretrained, tmp_path, monkeypatch):
    from lightning_modules import DPOModule

    modules, on_fit_start = [], DPOModule.on_fit_start
    monkeypatch.setattr(DPOModule, "on_fit_start", lambda self: (on_fit_start(self), modules.append(self)))
    runs = {}
    for precompute in (False, True):
        run = tmp_path / str(precompute)
        train(compose_config(tiny_run_overrides(run, steps=6, val_every=3) + [
            "stage=dpo", f"init_from={pretrained}", "optim.lr=1e-3", f"stage.precompute_reference={precompute}"]))
        runs[precompute] = {key: metric(run / "run", key) for key in ("train/loss", "val/loss", "train/reward_margin")}
    assert runs[True] == {key: pytest.approx(values, rel=1e-5, abs=1e-6) for key, values in runs[False].items()}
    assert len(runs[True]["val/loss"]) == 2 and modules[0].reference is not None and modules[1].reference is None
    dm_pairs = modules[1].reference_logps
    assert dm_pairs["train"].shape[1] == 2 and dm_pairs["train"].shape[0] > dm_pairs["val"].shape[0] > 0
    with pytest.raises(InstantiationException, match="stage.precompute_reference=true needs fixed pairs"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=dpo", f"init_from={pretrained}",
                                                             "stage.on_policy=true", "stage.precompute_reference=true"]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_scores_responses_by_summed_or_for_ipo_mean_token_log_probs(pretrained, tmp_path, loss_type):
    """Against log_softmax over full logits: DPO's sigmoid loss on summed response log-probs, IPO's on their
    mean per token (TRL's IPO), so that IPO's target margin means the same for short and long responses."""
    module = instantiate(compose_config(tiny_run_overrides(tmp_path) + [
        "stage=dpo", f"init_from={pretrained}", f"stage.loss_type={loss_type}"]).stage)
    module.log_dict = lambda *args, **kwargs: None
    with torch.no_grad():  # a policy that differs from the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(0)
    batch = {}
    for side, lengths in (("chosen", (3, 9)), ("rejected", (7, 2))):  # response tokens of the two pairs
        ids = torch.randint(1, 400, (2, 16), generator=gen)
        labels = torch.full_like(ids, -100)
        for row, n in enumerate(lengths):
            labels[row, 4:4 + n] = ids[row, 5:5 + n]  # a 5-token prompt, then the response
        batch[f"{side}_ids"], batch[f"{side}_labels"] = ids, labels

    def scores(model, side):
        ids, labels = batch[f"{side}_ids"], batch[f"{side}_labels"]
        logps = torch.log_softmax(model(ids).double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        logps = (logps * (labels != -100)).sum(1)
        return logps / (labels != -100).sum(1) if loss_type == "ipo" else logps

    with torch.no_grad():
        loss = module.step(batch, "train")
        h = (scores(module.model, "chosen") - scores(module.model, "rejected")
             - scores(module.reference, "chosen") + scores(module.reference, "rejected"))
    beta = module.beta
    want = ((h - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -torch.nn.functional.logsigmoid(beta * h)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("stage,frozen", [("dpo", "reference"), ("distill", "teacher")])
def test_the_weight_average_shares_the_frozen_model_rather_than_copying_it(pretrained, tmp_path, stage, frozen):
    """`+callbacks/ema=default` deep-copies the stage module to hold the average: the copy holds
    its own policy or student weights and shares the frozen reference policy or teacher."""
    from torch.optim.swa_utils import AveragedModel

    stage_args = [f"init_from={pretrained}"] if stage == "dpo" else [f"teacher={pretrained}"]
    module = instantiate(compose_config(tiny_run_overrides(tmp_path) + [f"stage={stage}", *stage_args]).stage)
    average = AveragedModel(module).module
    assert getattr(average, frozen) is getattr(module, frozen)
    own = {p.data_ptr() for p in module.model.parameters()}
    assert own.isdisjoint(p.data_ptr() for p in average.model.parameters())
    assert torch.equal(next(average.model.parameters()), next(module.model.parameters()))


def test_grpo_raises_an_easy_reward(pretrained, tmp_path):
    prompts = lowercase_prompts(tmp_path)
    train(compose_config(tiny_run_overrides(tmp_path, steps=40, val_every=40) + [
        "stage=grpo", f"init_from={pretrained}", f"data.prompts={prompts}", "data.batch_size=2",
        "stage.group_size=8", "stage.max_new_tokens=6", "stage.kl_beta=0.0", "optim.lr=3e-3"]))
    reward = metric(tmp_path / "run", "train/reward")
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    # at least 40% of the way from the starting reward to the ceiling of 1 (a fixed margin cannot be
    # reached from a start near the ceiling); each logged value averages 16 samples, so without
    # learning the gap closed scatters by about +-0.2 around 0
    assert last - first >= 0.4 * (1 - first), reward
    assert metric(tmp_path / "run", "val/pass_rate")


def test_grpo_logs_its_rollouts_completion_tokens_per_second(pretrained, tmp_path, monkeypatch):
    # a clock that advances one second per reading: each step's sampling takes 1 s
    monkeypatch.setattr("lightning_modules.policy.perf_counter", itertools.count(0.0).__next__)
    train(compose_config(tiny_run_overrides(tmp_path, steps=4, val_every=4) + [
        "stage=grpo", f"init_from={pretrained}", f"data.prompts={lowercase_prompts(tmp_path)}", "data.batch_size=2",
        "stage.group_size=4", "stage.max_new_tokens=6"]))
    speed, lengths = metric(tmp_path / "run", "perf/rollout_tokens_per_s"), metric(tmp_path / "run", "train/completion_len")
    # completion_len is the mean over the step's 2 x 4 completions, each counted to its end-of-turn
    assert len(speed) == 2 and speed == pytest.approx([8 * n for n in lengths]), (speed, lengths)


@pytest.mark.parametrize("overrides", [["stage=grpo", "stage.group_size=4"],
                                       ["stage=dpo", "stage.on_policy=true", "data=ifeval_prompts"]])
def test_stages_that_sample_their_training_data_resume_exactly(pretrained, tmp_path, overrides):
    """The samples after a resume are those the uninterrupted run drew at the same step."""
    from tests.test_train import assert_resume_is_exact

    prompts = lowercase_prompts(tmp_path)
    assert_resume_is_exact(tmp_path, overrides + [f"init_from={pretrained}", f"data.prompts={prompts}", "data.batch_size=2",
                                                  "stage.max_new_tokens=6"], steps=6, val_every=3, stop_at=3)


@pytest.mark.parametrize("overrides,what", [(["stage=dpo"], "stage=dpo"), (["stage=grpo"], "stage=grpo"),
                                            (["stage=sft", "+data/constraint_val=embedded"], "data.constraint_val"),
                                            (["stage=sft"], None), ([], None)])
def test_runs_that_sample_on_each_rank_refuse_fsdp_naming_what_samples(pretrained, tmp_path, overrides, what):
    """Every FSDP forward gathers each block's parameters from all ranks in step; ranks that sample
    completions of their own prompts fall out of step and wait forever: refused before the first step."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config(tiny_run_overrides(tmp_path) + [f"init_from={pretrained}", *overrides])
    module = instantiate(cfg.stage)
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=instantiate(cfg.data), callbacks=[])
    found = module.samples_on_each_rank()
    assert found is None if what is None else what in found
    if what is not None:
        with pytest.raises(ValueError, match=f"{what}.*FSDP cannot do.*trainer=ddp"):
            module.setup("fit")


@pytest.mark.parametrize("overrides,refused", [(["stage=grpo"], "stage=grpo"),
                                               (["stage=dpo", "stage.on_policy=true"], "stage=dpo stage.on_policy=true"),
                                               (["stage=dpo"], None), (["stage=grpo", "model.kernel=torch"], None)])
def test_stages_that_train_on_their_own_samples_refuse_per_shape_tuned_mlp_kernels(pretrained, tmp_path, overrides,
                                                                                  refused):
    """Sampled batches change rows and padded length from step to step, and quack's GEMMs autotune each
    new shape for minutes: refused at construction, naming the setting. Fixed pairs keep one shape."""
    cfg = compose_config(tiny_run_overrides(tmp_path) + [f"init_from={pretrained}", "model.mlp_kernel=quack",
                                                         *overrides])
    if refused is None:
        assert instantiate(cfg.stage).model_config.mlp_kernel == "quack"
    else:
        with pytest.raises(InstantiationException, match=f"model.mlp_kernel=quack with {refused}: .*model.mlp_kernel=torch"):
            instantiate(cfg.stage)


def test_on_policy_dpo_prefers_the_better_of_its_own_samples(pretrained, tmp_path):
    train(compose_config(tiny_run_overrides(tmp_path, steps=40, val_every=40) + [
        "stage=dpo", "stage.on_policy=true", "data=ifeval_prompts", f"data.prompts={lowercase_prompts(tmp_path)}",
        f"init_from={pretrained}", "data.batch_size=4", "stage.candidates=8", "stage.max_new_tokens=6",
        "optim.lr=1e-2"]))
    run = tmp_path / "run"
    reward = metric(run, "train/reward")  # mean reward of the samples the pairs were ranked from
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.2, reward
    assert metric(run, "train/reward_accuracy") and metric(run, "val/pass_rate")


@pytest.mark.parametrize("setting,match", [("stage.candidates=1", "stage.candidates=1: .* >= 2 samples"),
                                           ("stage.temperature=0", "stage.temperature=0: .*greedy"),
                                           ("stage.loss_type=hinge", r"stage.loss_type='hinge' is not one of \('sigmoid'")])
def test_on_policy_dpo_refuses_settings_whose_samples_always_tie(pretrained, tmp_path, setting, match):
    """One candidate, or greedy candidates, never make a pair: every step would be skipped. An unknown loss is
    named before the first rollout."""
    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage=dpo", "stage.on_policy=true", f"init_from={pretrained}",
                                                         setting])
    with pytest.raises(InstantiationException, match=match):
        instantiate(cfg.stage)


def test_logit_distillation_pulls_the_student_to_the_teacher(pretrained, tmp_path):
    train(compose_config(tiny_run_overrides(tmp_path, steps=12, val_every=6) + [
        "stage=distill", f"teacher={pretrained}", "optim.lr=3e-3", "stage.alpha=1.0"]))
    kd = metric(tmp_path / "run", "train/kd")
    assert kd[-1] < kd[0] * 0.8, kd


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_a_distillation_temperature_that_is_not_positive_is_named(pretrained, tmp_path, temperature):
    """The logits are divided by it: at 0 every loss would be NaN."""
    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage=distill", f"teacher={pretrained}",
                                                         f"stage.temperature={temperature}"])
    with pytest.raises(InstantiationException, match=f"stage.temperature={temperature} must be positive"):
        instantiate(cfg.stage)


def test_distillation_with_document_mask_trains_student_and_teacher_within_documents(pretrained, tmp_path):
    """`stage.document_mask` on token shards: the second document's loss (the first's labels ignored) does
    not depend on the first document's tokens, for the student's cross-entropy and the teacher's targets
    alike, as in validation and the FLOP count. Training once ran both models over whole rows."""
    from types import SimpleNamespace

    module = instantiate(compose_config(tiny_run_overrides(tmp_path) + [
        "stage=distill", f"teacher={pretrained}", "+stage.document_mask=true", "stage.alpha=0.5"]).stage)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(eos_id=0, batch_size=2))
    module.log_dict = lambda *args, **kwargs: None
    ids = torch.randint(1, 400, (2, 33), generator=torch.Generator().manual_seed(0))
    ids[:, 11] = 0  # EOS: a document of 12 tokens, then one of 21
    labels = ids[:, 1:].clone()
    labels[:, :12] = -100  # only the second document is scored
    other = ids.clone()
    other[:, :11] = torch.randint(1, 400, (2, 11), generator=torch.Generator().manual_seed(1))
    losses = [module.training_step({"input_ids": x[:, :-1], "labels": labels}, 0) for x in (ids, other)]
    module.document_mask = False  # whole rows: the first document leaks into the second's loss
    leaked = [module.training_step({"input_ids": x[:, :-1], "labels": labels}, 0) for x in (ids, other)]
    assert abs(losses[0].item() - losses[1].item()) < 1e-6  # 0.0 here
    assert abs(leaked[0].item() - leaked[1].item()) > 1e-5  # 1.6e-4 here: the tiny teacher looks back little


def test_sft_weights_every_answer_token_the_same_whatever_the_accumulation(pretrained, tmp_path):
    """4 conversations a step as one batch or as two micro-batches of 2: the same loss over the same answer
    tokens, so the same weights. Averaging each micro-batch's mean weighed the tokens of the micro-batch
    with fewer answer tokens more."""
    weights = {}
    for name, batch, accumulate in (("one_batch", 4, 1), ("accumulated", 2, 2)):
        train(compose_config(tiny_run_overrides(tmp_path / name) + [
            "stage=sft", f"init_from={pretrained}", "stage.epochs=0.05", "trainer.val_check_interval=2",
            f"data.batch_size={batch}", f"trainer.accumulate_grad_batches={accumulate}", "optim.lr=1e-2",
            "callbacks.sample=null"]))
        ckpt = checkpoint(tmp_path / name / "run")
        weights[name] = (ckpt["global_step"], ckpt["state_dict"])
    (steps, one), (accumulated_steps, accumulated) = weights["one_batch"], weights["accumulated"]
    assert steps == accumulated_steps >= 2
    for key in one:
        # float noise that AdamW normalises up: 6e-6 at most; 0.03 when each micro-batch was a mean
        torch.testing.assert_close(accumulated[key], one[key], rtol=0, atol=5e-5, msg=key)


def test_a_warmup_longer_than_the_sft_run_names_stage_epochs(pretrained, tmp_path):
    # SFT's length comes from stage.epochs, not trainer.max_steps, which the schedule's own error names
    with pytest.raises(ValueError, match=r"schedule.warmup_steps=30 is more than the \d+ optimizer steps of "
                                         r"stage.epochs=0.01 \(\d+ conversations, data.batch_size=4\)"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=sft", f"init_from={pretrained}",
                                                             "stage.epochs=0.01", "schedule.warmup_steps=30"]))


def test_init_from_another_architecture_or_a_missing_file_is_named(pretrained, tmp_path):
    # Hydra wraps errors raised while instantiating `stage` (InstantiationException), keeping the message
    with pytest.raises(InstantiationException, match="d_model: checkpoint 32, config 48"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=sft", f"init_from={pretrained}", "model.d_model=48"]))
    with pytest.raises(InstantiationException, match="checkpoint not found: .*nope.ckpt"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=sft", f"init_from={tmp_path / 'nope.ckpt'}"]))
    with pytest.raises(InstantiationException, match="stage=dpo needs init_from"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=dpo"]))
    # GRPO's log-probs are those of the distribution it samples from, at its temperature
    with pytest.raises(InstantiationException, match="stage.temperature=0.0: GRPO samples its groups"):
        train(compose_config(tiny_run_overrides(tmp_path) + ["stage=grpo", f"init_from={pretrained}",
                                                             "stage.temperature=0.0"]))


@pytest.mark.parametrize("key,overrides", [
    ("data.constraint_val", ["stage=sft", "+data/constraint_val=embedded", "data.constraint_val.max_prompt_len=null"]),
    ("data", ["stage=grpo", "data.max_prompt_len=null"]),
])
def test_prompts_that_leave_no_room_to_generate_are_refused_before_training(pretrained, tmp_path, key, overrides):
    """The tiny model has 32 positions. The pass-rate validation's prompts went unchecked, and GRPO's
    check let a prompt of exactly max_seq_len through: both failed at their first rollout, mid-run."""
    if key == "data":  # lowercase_prompts with one question as long as the context
        prompts = lowercase_prompts(tmp_path)
        rows = [json.loads(line) for line in prompts.read_text().splitlines()]
        rows[0]["prompt"] = "what is debian? " * 8
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        overrides = [*overrides, f"data.prompts={prompts}"]
    with pytest.raises(ValueError, match=rf"^{key}: a prompt of \d+ tokens leaves no room to generate within "
                                         rf"model.max_seq_len=32: set {key}.max_prompt_len below it"):
        train(compose_config(tiny_run_overrides(tmp_path) + [f"init_from={pretrained}", *overrides]))
    assert not list(tmp_path.rglob("*.ckpt"))


def test_seqkd_writes_teacher_answers_as_a_chat_dataset_deterministically(pretrained, tmp_path):
    from slmlab.seqkd import teacher_conversations
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    prompts = tmp_path / "prompts.jsonl"  # short: the tiny teacher has 32 positions
    prompts.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                               for i, q in enumerate(["what is apt?", "was ist dpkg?", "what is sudo?", "hi"])))
    # the tiny teacher never ends a turn within 6 tokens: its answers are kept for this test
    a, b = (teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=6, limit=3,
                                  keep_unfinished=True) for _ in range(2))
    assert a == b and len(a) == 3
    for row in a:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert isinstance(row["messages"][-1]["content"], str)


@pytest.mark.parametrize("row", [{"id": "q1", "conversation": []},
                                 {"id": "q1", "messages": [{"role": "user"}]},
                                 {"id": "q1", "messages": ["what is apt?"]}])
def test_seqkd_names_the_file_line_and_id_of_a_row_without_valid_messages(pretrained, tmp_path, row):
    from slmlab.data.errors import DataError
    from slmlab.seqkd import teacher_conversations
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "messages": [{"role": "user", "content": "hi"}]}) + "\n"
                       + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(prompts))}:2 \(id 'q1'\): "):
        teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=2, keep_unfinished=True)


def test_seqkd_skips_the_answers_the_teacher_did_not_finish_or_left_empty(pretrained, tmp_path, monkeypatch, capsys):
    """An answer cut by max_new_tokens, written as a closed turn, would teach the student to stop there; an
    empty one, to say nothing."""
    import slmlab.seqkd
    from slmlab.data.chat import IM_END, load_chat_tokenizer
    from slmlab.data.errors import DataError
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    end = load_chat_tokenizer(tokenizer)[0].token_to_id(IM_END)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                               for i, q in enumerate(["what is apt?", "was ist dpkg?", "what is sudo?"])))
    asked = []

    def teacher(model, prompts, budget, **kwargs):  # the second prompt's answer ends its turn, the others run out
        answers = []
        for ids in prompts:
            asked.append(ids)
            answer = [100, 101, end, end] if len(asked) == 2 else [100 + i for i in range(budget)]  # end-padded
            answers.append(torch.tensor([list(ids) + answer]))
        return answers

    monkeypatch.setattr(slmlab.seqkd, "generate_prompts", teacher)
    rows = slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=4)
    assert [row["messages"][0]["content"] for row in rows] == ["was ist dpkg?"]
    assert "1 prompts answered; 0 prompts fill the teacher's max_seq_len=32; 2 answers unfinished" in capsys.readouterr().out
    kept = slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=4,
                                              keep_unfinished=True)
    assert len(kept) == 3
    asked.clear()
    monkeypatch.setattr(slmlab.seqkd, "generate_prompts", lambda model, prompts, budget, **kwargs: [
        torch.tensor([list(ids) + [end] * budget]) for ids in prompts])  # the teacher ends its turn at once
    with pytest.raises(DataError, match="no prompt answered: .* 3 answers empty"):
        slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=4)
    monkeypatch.setattr(slmlab.seqkd, "generate_prompts", teacher)
    prompts.write_text(prompts.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no prompt answered: .* 1 answers unfinished"):
        slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=4)


def seqkd_prompts(tmp_path: Path, questions: list[str]) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                            for i, q in enumerate(questions)))
    return path


# prompts of 15 to 27 tokens, and one that fills the tiny teacher's 32 positions (skipped)
SEQKD_QUESTIONS = ["hi", "what is apt?", "was ist dpkg und wozu dient es?", "was ist dpkg und sudo?", "what is sudo?",
                   "ls", "wie geht es dir?"]


@pytest.mark.parametrize("max_new_tokens", [6, None])
def test_seqkd_answers_in_batches_as_one_prompt_at_a_time_when_greedy(pretrained, tmp_path, monkeypatch,
                                                                       max_new_tokens):
    """Batched rows step at the same position, each from its own prompt: a greedy teacher answers as it does
    alone, with max_new_tokens or up to the end of its context (None), whatever the other rows' lengths."""
    import slmlab.models.generate
    import slmlab.seqkd
    from slmlab.data.chat import encode_chat, load_chat_tokenizer
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    chat_tokenizer, template = load_chat_tokenizer(tokenizer)

    class AnswerIds:  # answers written as their token ids: the tiny greedy teacher's decode to whitespace
        def __getattr__(self, name):
            return getattr(chat_tokenizer, name)

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    monkeypatch.setattr(slmlab.seqkd, "load_chat_tokenizer", lambda path: (AnswerIds(), template))
    rows_per_call = []

    def counted(model, prompt, *args, **kwargs):
        rows_per_call.append(len(prompt))
        return generate(model, prompt, *args, **kwargs)

    monkeypatch.setattr(slmlab.models.generate, "generate", counted)
    prompts = seqkd_prompts(tmp_path, SEQKD_QUESTIONS)
    batched, alone = (slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens,
                                                         temperature=0, keep_unfinished=True, batch_size=batch_size)
                      for batch_size in (4, 1))
    assert max(rows_per_call) > 1  # the first run decoded prompts of different lengths together
    assert len(batched) == len(SEQKD_QUESTIONS) - 1 and batched == alone
    for row in batched:  # no end of turn: each answer runs to its budget or the context's end, never past
        ids, _ = encode_chat(chat_tokenizer, row["messages"][:1], template, add_generation_prompt=True)
        assert len(row["messages"][1]["content"].split()) == min(max_new_tokens or 32, 32 - len(ids))


def test_seqkd_samples_in_batches_repeatably_and_one_at_a_time_as_generate_does(pretrained, tmp_path):
    """The same arguments write the same rows; `--limit` writes the first rows of the run without it;
    batch_size 1 samples as `generate` on each prompt in turn, from the one seeded generator."""
    from slmlab.data.chat import IM_END, encode_chat, load_chat_tokenizer
    from slmlab.seqkd import teacher_conversations
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    prompts = seqkd_prompts(tmp_path, SEQKD_QUESTIONS)

    def answers(batch_size: int, limit: int | None = None) -> list[dict]:
        return teacher_conversations(str(pretrained), str(tokenizer), str(prompts), 6, seed=3, limit=limit,
                                     keep_unfinished=True, batch_size=batch_size)

    first = answers(4)
    assert answers(4) == first and answers(4, limit=4) == first[:4] and len(first) == len(SEQKD_QUESTIONS) - 1
    model = load_model(pretrained)
    chat_tokenizer, template = load_chat_tokenizer(tokenizer)
    end = chat_tokenizer.token_to_id(IM_END)
    generator = torch.Generator().manual_seed(3)
    one_at_a_time = answers(1)
    assert len(one_at_a_time) == len(first)
    for row in one_at_a_time:
        ids, _ = encode_chat(chat_tokenizer, row["messages"][:1], template, add_generation_prompt=True)
        seq = generate(model, torch.tensor([ids]), 6, temperature=0.7, top_p=0.9, stop_ids=end,
                       generator=generator)[0, len(ids):].tolist()
        assert row["messages"][1]["content"] == chat_tokenizer.decode([t for t in seq if t != end]).strip()


def test_seqkd_limit_counts_answered_prompts_past_skipped_answers_and_held_out_rows(pretrained, tmp_path,
                                                                                    monkeypatch, capsys):
    """A skipped answer leaves its place to a later prompt, in the batch after; once `limit` prompts are
    answered, no more are generated, and the held-out rows keep their places among the answered ones."""
    import slmlab.seqkd
    from slmlab.data.records import is_val_record
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    val = next(s for s in map(str, range(100)) if is_val_record({"section": s}, "section", 0.1, "test"))
    train = next(s for s in map(str, range(100)) if not is_val_record({"section": s}, "section", 0.1, "test"))
    # how the teacher ends each prompt's answer: its turn (answered), not at all (unfinished), or at once (empty)
    script = {"q0": "answer", "q1": "unfinished", "q2": "empty", "q3": "answer", "q4": "answer", "q5": "answer",
              "q6": "answer"}
    rows = [{"id": q, "section": train, "messages": [{"role": "user", "content": q}]} for q in script]
    held_out = {"id": "v", "section": val, "messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "the reference answer"}]}
    rows.insert(2, held_out)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat_tokenizer = slmlab.seqkd.load_chat_tokenizer(tokenizer)[0]
    calls = []

    def teacher(model, prompts, budget, *, stop_id, max_rows, **kwargs):
        calls.append((len(prompts), max_rows))
        answers = []
        for ids in prompts:
            q = re.findall(r"q\d", chat_tokenizer.decode(ids))[-1]
            answer = {"answer": chat_tokenizer.encode(f"a{q[1]}").ids + [stop_id], "empty": [stop_id],
                      "unfinished": chat_tokenizer.encode("and then").ids}[script[q]]
            answers.append(torch.tensor([list(ids) + answer + [stop_id] * (budget - len(answer))]))
        return answers

    monkeypatch.setattr(slmlab.seqkd, "generate_prompts", teacher)
    out = slmlab.seqkd.teacher_conversations(str(pretrained), str(tokenizer), str(prompts), max_new_tokens=4,
                                             limit=3, split_key="section", val_fraction=0.1, batch_size=2)
    assert [row["id"] for row in out] == ["q0", "v", "q3", "q4"]
    assert [row["messages"][-1]["content"] for row in out] == ["a0", "the reference answer", "a3", "a4"]
    assert calls == [(2, 2), (2, 2), (2, 2)]  # q0 q1 | q2 q3 | q4 q5: q5's answer is not written, q6 not asked
    assert re.search("^3 prompts answered; .* 1 answers unfinished .* 1 answers empty .* 1 held out",
                     capsys.readouterr().out, re.M)


@pytest.mark.parametrize("stage,key,extra", [
    ("dpo", "train/loss", []),
    ("grpo", "train/loss", ["data.batch_size=2", "stage.group_size=4", "stage.max_new_tokens=4"]),
    ("distill", "train/kd", []),
])
@pytest.mark.parametrize("mode,device,rtol", [
    ("true", "cpu", 1e-4),
    pytest.param("reduce-overhead", "gpu", 1e-3, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
def test_a_stage_with_compiled_blocks_trains_as_the_eager_stage_does(pretrained, tmp_path, stage, key, extra, mode,
                                                                    device, rtol):
    """`stage.compile` next to a frozen reference or teacher (a copy of the compiled model, or a second
    model) and, for GRPO, rollouts that run the compiled blocks eagerly: the eager run's losses. On CUDA
    the blocks replay CUDA graphs (`reduce-overhead`), whose outputs reuse their memory from one call to
    the next, while the reference's or teacher's forward and the rollouts run in between."""
    source = [f"data.prompts={lowercase_prompts(tmp_path)}"] if stage == "grpo" else []
    weights = [f"teacher={pretrained}"] if stage == "distill" else [f"init_from={pretrained}"]
    losses = {}
    for name, compile in (("eager", []), ("compiled", [f"stage.compile={mode}"])):
        train(compose_config(tiny_run_overrides(tmp_path / name, steps=4, val_every=2) + [
            f"stage={stage}", *weights, *source, *extra, *compile, f"trainer.accelerator={device}"]))
        losses[name] = metric(tmp_path / name / "run", key)
    assert losses["eager"]
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=rtol, atol=1e-6)


def seqkd_source(tmp_path: Path, val_fraction: float, questions: list[str]) -> tuple[Path, list[dict], list[dict]]:
    """A chat file like the embedded one (reference answers, `section`, `language`), with sections on
    both sides of the split; returns it and its (train rows, held-out rows)."""
    from slmlab.data.records import is_val_record

    sections = [str(i) for i in range(100)]
    val = [s for s in sections if is_val_record({"section": s}, "section", val_fraction, "test")][:2]
    train = [s for s in sections if s not in val][:len(questions)]
    rows = [{"id": f"{s}/en/{i}", "section": s, "language": "en",
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "the reference answer"}]}
            for i, (s, q) in enumerate(zip(train + val, questions + questions[:len(val)]))]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows[:len(train)], rows[len(train):]


def test_seqkd_output_is_sft_data_split_as_its_source_with_the_held_out_rows_unanswered(pretrained, tmp_path):
    """The README's two steps at the defaults: every prompt fits the teacher's context (32 positions
    here), the rows keep `section`, and the SFT data module splits the output as it splits the source."""
    from slmlab.seqkd import main as seqkd
    from tests.conftest import ROOT

    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage=sft", f"init_from={pretrained}"])
    source, train_rows, val_rows = seqkd_source(tmp_path, cfg.data.val_fraction,
                                                ["what is apt?", "was ist dpkg?", "what is sudo?"])
    out = tmp_path / "seqkd.jsonl"
    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    seqkd(["--teacher", str(pretrained), "--tokenizer", str(tokenizer), "--prompts", str(source), "--out", str(out),
           "--keep-unfinished"])  # the tiny teacher's 32 positions end its answers before an end of turn
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(train_rows) + len(val_rows)
    for row, src in zip(written, train_rows + val_rows):
        assert {k: v for k, v in row.items() if k != "messages"} == {k: v for k, v in src.items() if k != "messages"}
    for row, src in zip(written, train_rows):  # the prompt, then the teacher's answer
        assert row["messages"][:-1] == src["messages"][:-1] and row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"] != "the reference answer"
    assert written[len(train_rows):] == val_rows  # held out: copied with their reference answers

    cfg.data.conversations = str(out)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_train_conversations, len(dm.val_collate)) == (len(train_rows), len(val_rows))


def test_seqkd_fails_and_writes_nothing_when_no_prompt_is_answered(pretrained, tmp_path):
    from slmlab.seqkd import main as seqkd
    from tests.conftest import ROOT

    val_fraction = compose_config(["data=chat_embedded"]).data.val_fraction
    source, _, _ = seqkd_source(tmp_path, val_fraction, ["apt " * 40])  # longer than the teacher's 32 positions
    out = tmp_path / "seqkd.jsonl"
    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    with pytest.raises(SystemExit) as failed:
        seqkd(["--teacher", str(pretrained), "--tokenizer", str(tokenizer), "--prompts", str(source),
               "--out", str(out)])
    message = str(failed.value.code)  # a message as the code: exit status 1
    assert message.startswith(f"error: {source}: no prompt answered: 1 prompts fill the teacher's max_seq_len=32")
    assert not out.exists()


def test_seqkd_names_a_batch_size_below_one_before_loading_the_teacher(tmp_path):
    from slmlab.seqkd import main as seqkd, teacher_conversations

    teacher, tokenizer, out = (str(tmp_path / name) for name in ("teacher.ckpt", "tokenizer.json", "seqkd.jsonl"))
    with pytest.raises(SystemExit) as failed:
        seqkd(["--teacher", teacher, "--tokenizer", tokenizer, "--out", out, "--batch-size", "0"])
    assert str(failed.value.code) == "error: --batch-size 0 must be at least 1"
    assert not Path(out).exists()
    with pytest.raises(ValueError, match="^batch_size=0 must be at least 1$"):
        teacher_conversations(teacher, tokenizer, str(tmp_path / "prompts.jsonl"), batch_size=0)


def test_seqkd_names_a_missing_teacher_and_an_unknown_device(pretrained, tmp_path):
    from slmlab.seqkd import main as seqkd
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    out = tmp_path / "seqkd.jsonl"
    for teacher, device, message in [(tmp_path / "none.ckpt", "cpu", f"error: checkpoint not found: {tmp_path / 'none.ckpt'}"),
                                     (pretrained, "cuda:99" if torch.cuda.is_available() else "nope", "error: device=")]:
        with pytest.raises(SystemExit) as failed:
            seqkd(["--teacher", str(teacher), "--tokenizer", str(tokenizer), "--out", str(out), "--device", device])
        assert str(failed.value.code).startswith(message)
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seqkd_answers_on_the_gpu_repeatably(pretrained, tmp_path):
    from slmlab.seqkd import teacher_conversations
    from tests.conftest import ROOT

    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    prompts = seqkd_prompts(tmp_path, SEQKD_QUESTIONS)
    a, b = (teacher_conversations(str(pretrained), str(tokenizer), str(prompts), 6, seed=3, keep_unfinished=True,
                                  batch_size=4, device="cuda") for _ in range(2))
    assert a == b and len(a) == len(SEQKD_QUESTIONS) - 1


@pytest.mark.parametrize("overrides,match", [
    (["stage=sft", "data=prefs"], "stage=sft trains on conversations: data=chat_embedded .*not a PreferenceDataModule"),
    (["stage=dpo", "stage.on_policy=true"],
     "stage=dpo stage.on_policy=true trains on constraint prompts: data=ifeval_prompts .*not a PreferenceDataModule"),
    (["stage=dpo", "data=ifeval_prompts"],
     "stage=dpo stage.on_policy=false trains on preference pairs: data=prefs .*not a PromptDataModule"),
    (["stage=grpo", "data=chat_embedded"], "stage=grpo samples answers to constraint prompts: .*not a ChatDataModule"),
    (["stage=distill", "data=prefs"], "stage=distill trains on token shards .*not a PreferenceDataModule"),
    (["stage=distill", "data=chat_embedded", "+data/constraint_val=embedded"],
     "stage=distill validates the loss on held-out text: remove data.constraint_val"),
    (["stage=distill", "data=chat_embedded", "+stage.document_mask=true"],
     r"stage.document_mask splits rows .* every turn of a conversation ends with one \(<\|im_end\|>\)"),
    (["stage=pretrain", "data=chat_embedded", "stage.document_mask=true"],
     r"stage.document_mask splits rows .* every turn of a conversation ends with one \(<\|im_end\|>\)")])
def test_a_stage_given_data_of_another_kind_names_the_data_it_needs_before_training(pretrained, tmp_path, overrides,
                                                                                   match):
    """Forgetting `data=ifeval_prompts` for on-policy DPO (or any other stage/data mismatch) failed at the first
    step with a TypeError or KeyError about the batch. Document masks on conversations trained silently with
    every turn cut off from the ones before it: the replies never saw their questions."""
    with pytest.raises(ValueError, match=match):
        train(compose_config(tiny_run_overrides(tmp_path, steps=2, val_every=2) + [
            f"init_from={pretrained}", f"teacher={pretrained}", *overrides]))
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_distilling_past_the_teachers_context_warns(pretrained, tmp_path):
    """The teacher was trained at 32 positions: a student trained at 64 learns extrapolated targets there."""
    with pytest.warns(UserWarning, match=r"data.seq_len=64 is longer than the teacher's max_seq_len=32"):
        train(compose_config(tiny_run_overrides(tmp_path, steps=2, val_every=2) + [
            "stage=distill", f"teacher={pretrained}", f"init_from={pretrained}", "model.max_seq_len=64",
            "data.seq_len=64", "+trainer.limit_val_batches=1"]))


@pytest.mark.parametrize("overrides,match", [
    (["stage=distill"], "stage=distill needs teacher=<checkpoint"),
    (["stage=distill", "teacher=PRETRAINED", "stage.teacher_dtype=bf16"],
     "stage.teacher_dtype='bf16' is not one of float32, bfloat16, float16"),
    (["stage=dpo", "stage.reference_dtype=half"], "stage.reference_dtype='half' is not one of float32, bfloat16"),
    (["stage=dpo", "stage.beta=0"], "stage.beta=0 must be positive"),
    (["stage=dpo", "stage.beta=-0.1"], "stage.beta=-0.1 must be positive"),
    (["stage=dpo", "stage.label_smoothing=0.5"], r"stage.label_smoothing=0.5 must lie in \[0, 0.5\)"),
    (["stage=dpo", "stage.loss_type=ipo", "stage.label_smoothing=0.1"],
     "stage.label_smoothing=0.1 applies to stage.loss_type=sigmoid, not ipo"),
    (["stage=grpo", "stage.kl_beta=-0.04"], "stage.kl_beta=-0.04 must be >= 0"),
    (["stage=grpo", "stage.top_p=0"], r"stage.top_p=0 must lie in \(0, 1\]"),
    (["stage=grpo", "stage.max_new_tokens=0"], "stage.max_new_tokens=0 must be at least 1")])
def test_post_training_settings_that_cannot_work_are_named(pretrained, tmp_path, overrides, match):
    """Each was taken silently (a beta of 0 or a label smoothing of 0.5 learns no preference, a negative one
    prefers the rejected replies, IPO ignored label smoothing, top_p 0 samples greedily so every group ties)
    or failed without naming the setting (a missing teacher, a dtype torch does not know)."""
    overrides = [o.replace("PRETRAINED", str(pretrained)) for o in overrides]
    cfg = compose_config(tiny_run_overrides(tmp_path) + [f"init_from={pretrained}", *overrides])
    with pytest.raises(InstantiationException, match=match):
        instantiate(cfg.stage)


@pytest.mark.parametrize("data", ["de_en", "ifeval_prompts"])
def test_seqkd_names_a_data_config_that_is_not_chat_data(pretrained, tmp_path, data):
    """`--data` names the SFT data whose validation split the output keeps: pretraining or prompt data has no
    such split, and failed with a traceback about a missing config key."""
    from slmlab.seqkd import main as seqkd
    from tests.conftest import ROOT

    out = tmp_path / "seqkd.jsonl"
    tokenizer = ROOT / ".pytest_cache" / "artifacts" / "tokenizers" / "de_en-v512" / "tokenizer.json"
    with pytest.raises(SystemExit) as failed:
        seqkd(["--teacher", str(pretrained), "--tokenizer", str(tokenizer), "--out", str(out), "--data", data])
    assert re.match(f"error: --data {data} configures a datamodules.*DataModule, not SFT data: .*--data chat_embedded",
                    str(failed.value.code))
    assert not out.exists()
