"""Token superposition training (`stage.superposition`): bags of tokens in, bags of targets out, by phase."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lightning_modules.pretrain import bag_positions, check_superposition, superposed
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.transformer import to_residual_stream
from slmlab.training.losses import IGNORE_INDEX
from tests.conftest import compose_config, metric, tiny_run_overrides
from train import train

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=48, max_seq_len=32)


def test_a_batch_folds_into_bags_whose_targets_are_the_next_bags():
    tokens = torch.arange(11).repeat(2, 1)  # a block of seq_len + 1 = 11 tokens
    inputs, targets = superposed(tokens[:, :-1], tokens[:, 1:], bag=3)
    assert inputs[0].tolist() == [[0, 1, 2], [3, 4, 5]] and targets[0].tolist() == [[3, 4, 5], [6, 7, 8]]
    assert inputs.shape[1] == bag_positions(10, 3) == 2 and bag_positions(10, 1) == 10
    labels = tokens[:, 1:].clone()
    labels[:, 4] = IGNORE_INDEX  # the label of position 4, token 5
    assert superposed(tokens[:, :-1], labels, bag=3)[1][0].tolist() == [[3, 4, IGNORE_INDEX], [6, 7, 8]]


def test_a_bag_enters_as_the_mean_of_its_embeddings():
    """`CausalLM.hidden` takes each bag's mean from the table (`F.embedding_bag`): the same values and
    embedding gradients as averaging the bag's looked-up embeddings."""
    model = CausalLM(CFG).eval()
    bags = torch.randint(0, 64, (2, 5, 4))
    bags[0, 0] = 7  # a bag of one token four times
    x = to_residual_stream(model.embed(bags).mean(-2))
    for block in model.blocks:
        x = block(x)
    want, got = model.norm(x), model.hidden(bags)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.square().sum(), model.embed.weight)[0] for out in (got, want)]
    torch.testing.assert_close(grads[0], grads[1])


def test_the_bag_loss_is_the_multi_hot_cross_entropy():
    torch.manual_seed(0)
    model = CausalLM(CFG)
    bags, targets = torch.randint(0, 64, (2, 5, 4)), torch.randint(0, 64, (2, 5, 4))
    targets[0, 0] = 7  # a bag holding one token four times puts all its mass there
    logp = F.log_softmax(model.head(model.hidden(bags)).float(), dim=-1)
    multi_hot = torch.zeros_like(logp).scatter_add_(-1, targets, torch.full(targets.shape, 0.25))
    expected = -(multi_hot * logp).sum(-1).mean()
    loss, ce = model.loss(bags, targets, z_loss=0.0)
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ce)


def test_flops_per_token_of_bags_run_the_blocks_once_per_bag_and_the_head_per_target():
    model = CausalLM(CFG)
    head = 3 * 2 * CFG.d_model * CFG.vocab_size
    body = model.flops_per_token(8) - head
    assert model.flops_per_token(8, bag=4) == pytest.approx(body / 4 + head)


@pytest.mark.parametrize("phases,match", [([[4, 0.2], [4, 0.3]], "shrink"), ([[2, 0.2], [4, 0.3]], "shrink"),
                                          ([[1, 0.2]], "> 1"), ([[4, 0.3], [2, 0.2]], "grow"),
                                          ([[4, 1.5]], r"\(0, 1\]"), ([4, 0.2], "pairs")])
def test_a_bad_schedule_is_named(phases, match):
    with pytest.raises(ValueError, match=f"stage.superposition.*{match}"):
        check_superposition(phases)


class RowLengths(Callback):
    """Writes the tokens per row of each training batch to `out`."""

    def __init__(self, out: str) -> None:
        self.out, self.lengths = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.lengths.append(batch["input_ids"].shape[1])
        self.out.write_text(json.dumps(self.lengths))


def test_a_run_anneals_its_bags_by_phase_reading_bag_times_the_tokens(tmp_path):
    """16 steps of seq_len 32: bag steps keep the 32 positions and read 4 or 2 times the tokens."""
    out = tmp_path / "rows.json"
    train(compose_config(tiny_run_overrides(tmp_path, steps=16, val_every=8) + [
        "stage.superposition=[[4,0.25],[2,0.5]]", "trainer.log_every_n_steps=1",
        "+callbacks.rows._target_=tests.test_superposition.RowLengths", f"+callbacks.rows.out={out}"]))
    bags = metric(tmp_path / "run", "train/bag_size")
    assert bags == [4.0] * 4 + [2.0] * 4 + [1.0] * 8, bags
    assert json.loads(out.read_text()) == [4 * 33 - 1] * 4 + [2 * 33 - 1] * 4 + [32] * 8
    loss = metric(tmp_path / "run", "train/loss")
    assert all(torch.isfinite(torch.tensor(loss))) and metric(tmp_path / "run", "val/loss")


def test_distillation_refuses_superposition(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage=distill", f"teacher={tmp_path / 'teacher.ckpt'}",
                                                         "+stage.superposition=[[4,0.2]]"])
    with pytest.raises(Exception, match="stage.superposition is pretraining's"):
        instantiate(cfg.stage)


def test_phases_end_after_the_steps_before_their_fraction_of_the_run():
    from slmlab.data.bags import BagSchedule

    schedule = BagSchedule.from_steps([(4, 0.3), (2, 0.35)], total_steps=10, samples_per_step=8)
    # 0.3 of 10 steps is steps 0-2 (in floats 0.3 * 10 is a hair above 3); 0.35 adds step 3
    assert [schedule.bag(step * 8 + 7) for step in range(6)] == [4, 4, 4, 2, 1, 1]
    # Fraction(0.2) is a hair above 1/5: the README's [[4, 0.2], [2, 0.3]] gives 60 and 30 of 300 steps
    readme = BagSchedule.from_steps([(4, 0.2), (2, 0.3)], total_steps=300, samples_per_step=1)
    assert readme.phases == ((4, 60), (2, 90))


@pytest.mark.slow
def test_a_run_stopped_inside_a_bag_phase_resumes_to_the_uninterrupted_weights(tmp_path):
    """Stopped at step 3 of 4 steps of bags of 4: the resumed run reads the same bag rows (the stream's
    phase follows the sample position, the stage's the step) and ends with the same weights."""
    from tests.test_train import assert_resume_is_exact

    assert_resume_is_exact(tmp_path, ["stage.superposition=[[4,0.25],[2,0.5]]"], steps=16, val_every=8, stop_at=3)


def test_a_data_module_that_cannot_read_bags_is_named(tmp_path):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    module = instantiate(compose_config(tiny_run_overrides(tmp_path) + ["stage.superposition=[[4,0.2]]"]).stage)

    class ChatData:  # no read_bags
        batch_size, vocab_size, seq_len = 4, 512, 32

    module.trainer = SimpleNamespace(datamodule=ChatData(), callbacks=[], world_size=1,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                     accumulate_grad_batches=1, val_check_interval=4, max_steps=8)
    with pytest.raises(ValueError, match="stage.superposition: the data module ChatData cannot read bags"):
        module.setup("fit")
