"""Muon / NorMuon (`optim=muon`): the orthogonalisation against the SVD, the groups it splits a model
into, each half of its step against its definition, and a run through train.py that resumes exactly."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from slmlab.models import CausalLM
from slmlab.training import muon as muon_module
from slmlab.training.muon import Muon, muon_groups, orthogonalize, orthogonalize_reference
from slmlab.training.optim import embedding_and_head
from tests.conftest import compose_config, metric, tiny_run_overrides


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (256, 64)])
def test_newton_schulz_points_where_the_svd_does(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3  # gradients are small
    o = orthogonalize(g)
    singular = torch.linalg.svdvals(o.double())
    # five quintic steps leave every singular value near 1 (not at it: Muon trades that for speed)
    assert singular.min() > 0.6 and singular.max() < 1.2, singular
    exact = orthogonalize_reference(g)
    cosine = (o * exact).sum() / (o.norm() * exact.norm())
    assert cosine > 0.97, cosine
    assert o.dtype == g.dtype and o.shape == g.shape


@pytest.mark.parametrize("preset", ["tiny", "tiny_hybrid", "odinnext"])
def test_hidden_matrices_take_muon_and_the_rest_adamw(preset):
    with torch.device("meta"):
        model = CausalLM(instantiate(compose_config([f"model={preset}"]).model))
    groups = muon_groups(model, weight_decay=0.1)
    hidden = groups[0]["params"]
    assert groups[0]["use_muon"] and not any(g["use_muon"] for g in groups[1:])
    outer = {id(p) for p in embedding_and_head(model)}
    expected = [p for p in model.parameters() if p.dim() == 2 and id(p) not in outer]
    assert [id(p) for p in hidden] == [id(p) for p in expected] and hidden
    # every parameter once (the tied head is the embedding); norms, gates, filters, embedding on AdamW
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    rest = [p for g in groups[1:] for p in g["params"]]
    assert all(p.dim() != 2 or id(p) in outer for p in rest)
    assert {id(p) for p in rest} >= outer
    if preset == "tiny_hybrid":  # Mamba-2's convolution filter is 3-D: AdamW, decayed as a matrix
        conv = model.blocks[0].mixer.conv1d.weight
        assert any(p is conv for g in groups[1:] if g["weight_decay"] == 0.1 for p in g["params"])


def _fresh_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_its_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7)), nn.Parameter(torch.randn(4, 2))]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon([{"params": ours[:2], "weight_decay": 0.1, "use_muon": False},
                {"params": ours[2:], "weight_decay": 0.0, "use_muon": False}], adamw_lr=1e-2, betas=(0.8, 0.9))
    ref = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1}, {"params": theirs[2:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.8, 0.9), eps=1e-8)
    for step in range(6):
        _fresh_grads(ours, step)
        _fresh_grads(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _one_muon_step(shape: tuple[int, int], neuron_beta2: float | None, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step taken, the gradient) of one Muon step from zero momentum without Nesterov."""
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    start = w.detach().clone()
    opt = Muon([{"params": [w], "weight_decay": 0.0, "use_muon": True}], lr=lr, momentum=0.0, nesterov=False,
               neuron_beta2=neuron_beta2)
    opt.step()
    return (start - w.detach()) / lr, w.grad


@pytest.mark.parametrize("shape", [(16, 32), (64, 16)])
def test_a_muon_step_is_the_orthogonalised_gradient_scaled_by_its_shape(shape):
    step, grad = _one_muon_step(shape, neuron_beta2=None)
    scale = max(1.0, shape[0] / shape[1]) ** 0.5  # a tall matrix's rows are fewer than its columns' length
    torch.testing.assert_close(step, scale * orthogonalize(grad), rtol=1e-5, atol=1e-6)


def test_normuon_evens_out_the_rows_and_keeps_the_step_size():
    step, grad = _one_muon_step((32, 48), neuron_beta2=0.0)  # beta2 0: this step's own row means
    plain = orthogonalize(grad)
    plain_rms, row_rms = (m.square().mean(dim=1).sqrt() for m in (plain, step))
    assert plain_rms.std() / plain_rms.mean() > 0.02  # Newton-Schulz leaves rows uneven...
    assert row_rms.std() / row_rms.mean() < 1e-4, row_rms  # ...which NorMuon levels
    torch.testing.assert_close(step.norm(), plain.norm(), rtol=1e-5, atol=0)


def test_matrices_of_one_shape_step_together_as_each_would_alone():
    """Same-shape matrices are orthogonalised as one batch: nothing (norms, row means) mixes them."""
    gen = torch.Generator().manual_seed(3)
    together = [nn.Parameter(torch.randn(24, 40, generator=gen) * s) for s in (1.0, 10.0, 0.1)]
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    opt = Muon([{"params": together, "use_muon": True}], weight_decay=0.1)
    singles = [Muon([{"params": [p], "use_muon": True}], weight_decay=0.1) for p in alone]
    for step in range(3):
        _fresh_grads(together, step)
        _fresh_grads(alone, step)
        opt.step()
        for single in singles:
            single.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


SHAPES = [(24, 40)] * 5 + [(40, 24)] * 2 + [(16, 16)]  # 5 matrices: 3 on rank 0, 2 on rank 1; 1 matrix: rank 0


def _muon_steps(out_dir: str, rank: int = 0) -> None:
    """Three Muon steps on fixed matrices and gradients; writes the weights and the batch sizes this
    process orthogonalised."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]
    sizes = []

    def counted(g, steps=5, dtype=torch.bfloat16):
        sizes.append(g.size(0))
        return orthogonalize(g, steps, dtype)

    muon_module.orthogonalize = counted
    opt = Muon([{"params": params, "use_muon": True}], weight_decay=0.1)
    for step in range(3):
        _fresh_grads(params, step)
        opt.step()
    torch.save({"weights": [p.detach() for p in params], "sizes": sizes}, f"{out_dir}/rank{rank}.pt")


def _muon_steps_on_a_rank(rank: int, world: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        _muon_steps(out_dir, rank)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_ranks_share_out_the_orthogonalisation_and_step_as_one_process(tmp_path, monkeypatch):
    """Under DDP each rank orthogonalises its share of each shape's matrices and gathers the rest: every
    rank ends with the weights one process computes alone, having done about half the work."""
    (tmp_path / "one").mkdir()
    monkeypatch.setattr(muon_module, "orthogonalize", orthogonalize)  # restored after _muon_steps patches it
    _muon_steps(str(tmp_path / "one"))
    torch.multiprocessing.spawn(_muon_steps_on_a_rank, args=(2, str(tmp_path)), nprocs=2)
    alone = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert alone["sizes"] == [5, 2, 1] * 3
    assert ranks[0]["sizes"] == [3, 1, 1] * 3 and ranks[1]["sizes"] == [2, 1] * 3
    for rank in ranks:
        for got, expected in zip(rank["weights"], alone["weights"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_parameters_without_a_gradient_are_left_alone():
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    a.grad = torch.randn(8, 8)
    before = b.detach().clone()
    opt = Muon([{"params": [a], "use_muon": True}, {"params": [b], "use_muon": False}], weight_decay=0.1)
    opt.step()
    assert torch.equal(b, before) and b not in opt.state and a in opt.state


def test_muon_refuses_what_it_cannot_update(tmp_path):
    with pytest.raises(ValueError, match="use_muon"):
        Muon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match=r"matrices only.*\(4,\)"):
        Muon([{"params": [nn.Parameter(torch.randn(4))], "use_muon": True}])
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_config(tiny_run_overrides(tmp_path) + ["optim=muon"])
    module = instantiate(cfg.stage)
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), datamodule=None, callbacks=[])
    with pytest.raises(ValueError, match="optim=Muon.*FSDP.*trainer=ddp"):
        module.setup("fit")


@pytest.mark.slow
def test_a_muon_run_learns_and_resumes_exactly(tmp_path):
    from tests.test_train import assert_resume_is_exact

    assert_resume_is_exact(tmp_path, ["optim=muon", "optim.weight_decay=0.01"], steps=12, val_every=6, stop_at=6)
    val = metric(tmp_path / "a" / "run", "val/loss")
    assert val[0] > val[1] and val[1] < math.log(512) - 0.25, val  # an untrained model scores ln(vocab)
    state = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    assert {"momentum_buffer", "neuron_second_moment"} <= set(state["state"][0])  # the first group is Muon's


@pytest.mark.slow
def test_the_odinnext_recipe_trains_at_tiny_size(tmp_path):
    """The recipe's parts together: gated HGRN2 blocks, NorMuon + AdamW, z-loss, the weight average, and
    fp16 with a GradScaler on CUDA (Lightning runs 16-mixed as bf16 on the CPU)."""
    from train import train

    cuda = torch.cuda.is_available()
    train(compose_config(tiny_run_overrides(tmp_path, steps=20, val_every=10) + [
        "experiment=odinnext_pretrain", "data=de_en", "trainer=gpu" if cuda else "trainer=default",
        "trainer.precision=16-mixed", "trainer.accumulate_grad_batches=1", "stage.compile=false", "data.seq_len=32",
        "model.kernel=torch",
        "model.n_heads=1", "model.head_dim=32", "model.hgrn2_expand_ratio=32", "schedule.warmup_steps=2"]))
    loss = metric(tmp_path / "run", "train/loss")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2, loss
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "current_model_state" in ckpt and "neuron_second_moment" in ckpt["optimizer_states"][0]["state"][0]
    if cuda:
        assert ckpt["MixedPrecision"]["scale"] > 0  # the GradScaler's state resumes with the run


@pytest.mark.parametrize("betas", [[0.9], [0.9, 0.95, 0.99], [0.9, 1.5]])
def test_betas_that_are_not_two_values_in_zero_to_one_are_named(betas):
    """A single beta used to pass, and the first step of the AdamW groups failed unpacking it."""
    cfg = compose_config(["optim=muon", f"optim.betas=[{','.join(map(str, betas))}]"])
    with pytest.raises(ValueError, match=re.escape(f"optim.betas={betas}")):
        instantiate(cfg.optim)([{"params": [nn.Parameter(torch.randn(4, 4))], "use_muon": True}])
