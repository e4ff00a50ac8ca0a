"""Schedules, losses and weight-decay groups against hand-computed values."""

import json
import re
import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import IterableDataset

from datamodules.stream import TimedDataLoader
from slmlab.models import CausalLM, ModelConfig
from slmlab.training.callbacks import ProgressBar, ThroughputMonitor
from slmlab.training.losses import IGNORE_INDEX, chunked_lm_loss, lm_loss
from slmlab.training.optim import weight_decay_groups
from tests.conftest import compose_config, tiny_run_overrides
from slmlab.training.schedules import WSD, Constant, Cosine


def lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_wsd_warms_up_holds_then_decays_to_the_floor():
    got = lrs(lambda o: WSD(o, total_steps=20, warmup_steps=4, decay_fraction=0.25, decay_shape="linear", min_lr_ratio=0.1), 20)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert got[4:15] == pytest.approx([1.0] * 11)
    # 5 decay steps, linear from 1 to 0.1: 1 - 0.9 * k/5 for k = 1..5
    assert got[15:] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])


def test_wsd_cosine_and_sqrt_shapes_end_at_the_floor():
    for shape in ("cosine", "sqrt"):
        got = lrs(lambda o: WSD(o, total_steps=10, decay_fraction=0.5, decay_shape=shape, min_lr_ratio=0.2), 10)
        assert got[-1] == pytest.approx(0.2)
        assert all(a >= b for a, b in zip(got, got[1:]))
    cos = lrs(lambda o: WSD(o, total_steps=10, decay_fraction=0.5, decay_shape="cosine"), 10)
    assert cos[5] == pytest.approx(0.5 * (1 + math.cos(math.pi / 5)))


def test_cosine_and_constant():
    got = lrs(lambda o: Cosine(o, total_steps=12, warmup_steps=2, min_lr_ratio=0.0), 12)
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert got[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs(lambda o: Constant(o, total_steps=5, warmup_steps=1), 5) == pytest.approx([1.0] * 5)


def stepped(make, steps: int) -> tuple[torch.optim.Optimizer, WSD | Cosine]:
    """A schedule made by `make(optimizer)` after `steps` optimizer steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make(opt)
    for _ in range(steps):
        opt.step(); schedule.step()
    return opt, schedule


def test_schedule_state_round_trips_mid_run():
    opt, a = stepped(lambda o: WSD(o, total_steps=20, warmup_steps=3, decay_fraction=0.5), 12)
    opt2, b = stepped(lambda o: WSD(o, total_steps=20, warmup_steps=3, decay_fraction=0.5), 0)
    b.load_state_dict(a.state_dict())
    opt2.param_groups[0]["lr"] = b.get_last_lr()[0]
    opt.step(); a.step(); opt2.step(); b.step()
    assert a.get_last_lr() == b.get_last_lr() != [1.0]


def test_a_run_resumed_with_more_steps_follows_the_longer_schedule():
    """The checkpoint's schedule used to replace this run's: resumed with trainer.max_steps 10 -> 20, the
    LR stayed at the floor it had reached at step 10."""
    _, short = stepped(lambda o: Cosine(o, total_steps=10, warmup_steps=2, min_lr_ratio=0.1), 10)
    opt2, extended = stepped(lambda o: Cosine(o, total_steps=20, warmup_steps=2, min_lr_ratio=0.1), 0)
    opt2.param_groups[0]["lr"] = short.get_last_lr()[0]  # Lightning restores the optimizer's state first
    with pytest.warns(UserWarning, match=r"total_steps 10 -> 20\): the LR follows this run's schedule from step 10"):
        extended.load_state_dict(short.state_dict())
    longer = lrs(lambda o: Cosine(o, total_steps=20, warmup_steps=2, min_lr_ratio=0.1), 20)
    assert opt2.param_groups[0]["lr"] == pytest.approx(longer[10])  # at once, not the old schedule's floor
    opt2.step(); extended.step()
    assert extended.get_last_lr() == pytest.approx(longer[11:12])


@pytest.mark.parametrize("other", [Cosine, Constant])
def test_a_run_resumed_with_another_schedule_follows_it(other):
    """WSD's checkpoint resumed with schedule=cosine or constant: a warning naming the switch, then the new
    schedule's LR. Asking the new schedule for WSD's decay_steps once raised an AttributeError."""
    _, wsd = stepped(lambda o: WSD(o, total_steps=20, warmup_steps=2, decay_fraction=0.5), 12)
    opt2, resumed = stepped(lambda o: other(o, total_steps=20, warmup_steps=2), 0)
    with pytest.warns(UserWarning, match=rf"decay_shape cosine -> none, decay_steps 10 -> none, schedule WSD -> {other.__name__}"):
        resumed.load_state_dict(wsd.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs(lambda o: other(o, total_steps=20, warmup_steps=2), 20)[12])


def test_a_run_resumed_with_another_peak_lr_follows_it():
    """optim.lr 1.0 -> 0.5 on resume: the checkpoint's peak LR used to win, silently."""
    def cosine(lr: float) -> tuple[torch.optim.Optimizer, Cosine]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return opt, Cosine(opt, total_steps=20, warmup_steps=2, min_lr_ratio=0.1)

    opt, first = cosine(1.0)
    for _ in range(10):
        opt.step(); first.step()
    opt2, resumed = cosine(0.5)
    opt2.load_state_dict(opt.state_dict())  # Lightning restores the optimizer (its lr included) first
    with pytest.warns(UserWarning, match=r"base_lrs \[1.0\] -> \[0.5\]\): the LR follows this run's schedule"):
        resumed.load_state_dict(first.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * first.get_last_lr()[0])


def test_bad_schedule_arguments_name_the_value():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"schedule.warmup_steps=30 must lie in \[0, trainer.max_steps=10\]"):
        WSD(opt, total_steps=10, warmup_steps=30)
    with pytest.raises(ValueError, match="schedule.decay_shape='square': use cosine, linear, sqrt"):
        WSD(opt, total_steps=1000, decay_fraction=0.1, decay_shape="square")  # before step 900, where it decays


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
@pytest.mark.parametrize("schedule", [WSD, Cosine])
def test_a_floor_outside_zero_to_one_is_refused(schedule, ratio):
    """min_lr_ratio=-0.1 used to end the decay at a negative LR (gradient ascent), 1.5 to raise the LR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=rf"schedule.min_lr_ratio={ratio} must lie in \[0, 1\]"):
        schedule(opt, total_steps=10, min_lr_ratio=ratio)


def test_lm_loss_with_z_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 2, IGNORE_INDEX]])
    lse = torch.log(torch.tensor([math.exp(2) + 2, math.e + 2]))
    ce = ((lse[0] - 2.0) + (lse[1] - 0.0)) / 2
    loss, got_ce = lm_loss(logits, labels, z_loss=1e-2)
    assert got_ce.item() == pytest.approx(ce.item())
    assert loss.item() == pytest.approx(ce.item() + 1e-2 * lse.square().mean().item())


def test_ignored_positions_get_no_gradient():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    loss, _ = lm_loss(logits, torch.tensor([[1, IGNORE_INDEX, 3, IGNORE_INDEX]]), z_loss=1e-3)
    loss.backward()
    assert logits.grad[0, [1, 3]].abs().sum() == 0
    assert logits.grad[0, [0, 2]].abs().sum() > 0


@pytest.mark.parametrize("softcap,z_loss,chunk", [(None, 0.0, 5), (30.0, 1e-2, 7), (None, 1e-3, 1000)])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(softcap, z_loss, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss, ce = lm_loss(logits, labels, z_loss)
    expected = torch.autograd.grad(2 * loss, (hidden, weight))
    got_loss, got_ce = chunked_lm_loss(hidden, weight, labels, softcap, z_loss, chunk)
    torch.testing.assert_close((got_loss, got_ce), (loss, ce))
    torch.testing.assert_close(torch.autograd.grad(2 * got_loss, (hidden, weight)), expected)


def test_the_model_loss_is_the_loss_of_its_logits_with_a_tied_head():
    from slmlab.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16,
                                 logit_softcap=5.0)).double()
    ids, labels = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    loss, _ = lm_loss(model(ids), labels, 1e-3)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    chunked, _ = model.loss(ids, labels, 1e-3, chunk_tokens=5)
    torch.testing.assert_close(chunked, loss)
    torch.testing.assert_close(torch.autograd.grad(chunked, list(model.parameters())), expected)


def test_weight_decay_skips_norms_and_tied_embeddings():
    model = CausalLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, qk_norm=True))
    decay, no_decay = weight_decay_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"blocks.0.mixer.q.weight", "blocks.0.mixer.k.weight", "blocks.0.mixer.v.weight",
                     "blocks.0.mixer.o.weight", "blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    with_embed, _ = weight_decay_groups(model, 0.1, decay_embeddings=True)
    assert any(p is model.embed.weight for p in with_embed["params"])


def test_the_optimizer_decays_the_matrices_even_after_fsdp_flattens_them():
    """FSDP (use_orig_params) makes every parameter a 1-D view of its shard before Lightning asks for the
    optimizer: decided then, no matrix would decay. The module decides on the model as built."""
    from functools import partial

    from lightning_modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), scheduler=partial(Constant))
    module.trainer = SimpleNamespace(max_steps=10)
    matrices = {id(p) for p in module.model.parameters() if p.dim() >= 2 and p is not module.model.embed.weight}
    for p in module.model.parameters():
        p.data = p.data.flatten()  # as FSDP leaves them
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in groups[0]["params"]} == matrices and groups[0]["weight_decay"] == 0.1
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == len(list(module.model.parameters())) - len(matrices)


def test_a_tokenizer_larger_than_the_model_vocab_is_a_clear_error():
    from functools import partial

    from lightning_modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW), scheduler=partial(Constant))
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), val_check_interval=1,
                                     accumulate_grad_batches=1, datamodule=SimpleNamespace(vocab_size=64, seq_len=16))
    with pytest.raises(ValueError, match="tokenizer has 64 tokens but model.vocab_size=50"):
        module.setup("fit")
    module.trainer.datamodule = SimpleNamespace(vocab_size=50, seq_len=32)
    with pytest.raises(ValueError, match="data.seq_len=32 exceeds model.max_seq_len=16"):
        module.setup("fit")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "unfused"])
def test_fp16_clipping_unscales_the_gradients_once_whatever_the_optimizer(fused):
    """Under fp16 Lightning's plugin unscales the gradients of optimizers that cannot unscale themselves
    before the module clips; the module unscales the others' (fused AdamW): never twice (an error). Fused
    AdamW then divides the gradients by its `grad_scale` (the clipping factor) as it reads them."""
    from functools import partial

    from lightning_modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW), scheduler=partial(Constant))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = torch.optim.AdamW(module.model.parameters(), fused=fused)
    module.trainer = SimpleNamespace(strategy=None, global_step=0, precision_plugin=SimpleNamespace(scaler=scaler),
                                     optimizers=[optimizer])
    scaler.scale(module.model(torch.randint(0, 50, (2, 16))).float().square().mean()).backward()
    if not fused:
        scaler.unscale_(optimizer)  # what Lightning's MixedPrecision does before clipping
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    applied = [p.grad / getattr(optimizer, "grad_scale", 1.0) for p in module.model.parameters()]
    norm = torch.nn.utils.get_total_norm(applied)
    assert norm == pytest.approx(1e-3, rel=1e-3)  # unscaled, then clipped: a still-scaled one is 1024x larger


def test_token_logprobs_in_row_chunks_equal_a_full_log_softmax():
    from slmlab.training.losses import token_logprobs

    logits = torch.randn(5, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (5, 7))
    labels[1, :3] = IGNORE_INDEX
    want = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE_INDEX)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk_rows=2), want.float())


def full_token_logprobs(hidden, weight, labels, softcap, temperature=1.0):
    from slmlab.training.losses import token_logprobs

    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logprobs(logits / temperature, labels)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 1.0), (3.0, 0.7)])
def test_chunked_token_logprobs_and_their_gradients_equal_the_full_computation(softcap, temperature):
    from slmlab.training.losses import chunked_token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    upstream = torch.randn(3, 7, dtype=torch.float64)  # per-token weights, as GRPO's advantages give
    got = chunked_token_logprobs(hidden, weight, labels, softcap, chunk_tokens=5,  # 5 does not divide 21 rows
                                 temperature=temperature)
    want = full_token_logprobs(hidden, weight, labels, softcap, temperature)
    torch.testing.assert_close(got, want.float())
    assert (got[0, :4] == 0).all()
    grads = torch.autograd.grad((got.double() * upstream).sum(), (hidden, weight))
    want_grads = torch.autograd.grad((want.double() * upstream).sum(), (hidden, weight))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # both take the log-softmax in float32


def test_chunked_token_logprobs_under_bf16_autocast_match_the_full_computation():
    from slmlab.training.losses import chunked_token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(4, 16, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    labels = torch.randint(0, 300, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_token_logprobs(hidden, weight, labels, chunk_tokens=16)
        want = full_token_logprobs(hidden, weight, labels, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)  # the same bf16 head, float32 softmax
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    want_grads = torch.autograd.grad(want.sum(), (hidden, weight))
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype == torch.float32
        assert ((g - w).norm() / w.norm()).item() < 1e-2


def test_chunked_token_logprobs_keep_no_logits_for_the_backward():
    """What autograd stores between forward and backward: the full path keeps (tokens, vocab)
    logits in float32; the chunked one only its inputs."""
    from slmlab.training.losses import chunked_token_logprobs

    hidden = torch.randn(2, 64, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64))

    def largest_saved(fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    tokens_x_vocab = 2 * 64 * 1000
    assert largest_saved(lambda: full_token_logprobs(hidden, weight, labels, None)) >= tokens_x_vocab
    assert largest_saved(lambda: chunked_token_logprobs(hidden, weight, labels, chunk_tokens=32)) == weight.numel()


def test_dpo_loss_by_hand():
    from slmlab.training.losses import dpo_loss

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    h = (-3.0 + 5.0) - (-4.0 + 4.5)  # 1.5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1 * h)))
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1 * 1.0, 0.1 * -0.5))
    smooth, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15)))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.5 - 5.0) ** 2)


def test_group_advantages_are_normalised_within_each_group():
    from slmlab.training.losses import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    assert adv[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4  # a group that all scored the same teaches nothing


def test_grpo_loss_by_hand():
    from slmlab.training.losses import grpo_loss

    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.5, 0.0], [-0.7, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.1, kl_beta=0.5)
    k3 = lambda lr: math.exp(lr) - lr - 1  # noqa: E731
    r00 = math.exp(0.2)  # > 1.1: clipped, and min(r A, 1.1 A) = 1.1 * 2 for A > 0
    row0 = ((min(r00 * 2, 1.1 * 2) - 0.5 * k3(0.0)) + (1.0 * 2 - 0.5 * k3(0.5))) / 2
    row1 = (1.0 * -1 - 0.5 * k3(-0.2)) / 1
    assert loss.item() == pytest.approx(-(row0 + row1) / 2, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    assert stats["kl"].item() == pytest.approx(((k3(0.0) + k3(0.5)) / 2 + k3(-0.2)) / 2, rel=1e-6)
    loss.backward()
    assert logps.grad[0, 2] == 0 and logps.grad[1, 1] == 0  # padding gets no gradient


def test_a_micro_batch_without_labels_has_zero_loss_and_gradient_as_the_chunked_loss():
    """Chat rows cut before their answer can leave a micro-batch without labels: a NaN there would void
    the whole optimizer step (the non-finite guard skips it)."""
    from slmlab.training.losses import distill_loss

    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    loss, ce = lm_loss(logits, labels, z_loss=1e-3)
    kd = distill_loss(logits, torch.randn(2, 3, 5), labels, temperature=2.0)
    chunked, _ = chunked_lm_loss(logits.detach().flatten(0, 1)[None], torch.eye(5), labels.flatten()[None], None, 1e-3, 4)
    assert loss.item() == ce.item() == kd.item() == chunked.item() == 0.0
    (loss + kd).backward()
    assert logits.grad.abs().sum() == 0


def test_distill_loss_is_zero_for_the_teacher_itself_and_matches_kl_by_hand():
    from slmlab.training.losses import distill_loss

    t = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])
    assert distill_loss(t, t, labels, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)
    s = torch.randn(2, 3, 5, dtype=torch.float64)
    p, q = (t / 2).softmax(-1), (s / 2).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    want = 4 * (kl[0, 0] + kl[0, 1] + kl[1, 0]) / 3
    assert distill_loss(s, t, labels, temperature=2.0).item() == pytest.approx(want.item())


@pytest.mark.parametrize("softcaps,temperature,alpha,z_loss,chunk", [
    ((None, None), 1.0, 0.5, 0.0, 5), ((30.0, 5.0), 2.0, 0.3, 1e-2, 7), ((None, 8.0), 0.5, 1.0, 1e-3, 1000),
    ((4.0, None), 3.0, 0.0, 0.0, 4)])
def test_chunked_distill_loss_equals_the_full_logits_objective_and_its_gradients(softcaps, temperature, alpha, z_loss,
                                                                                 chunk):
    """The teacher may differ in width and softcap; its head and hidden states get no gradient."""
    from slmlab.training.losses import chunked_distill_loss, distill_loss

    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)
    teacher_weight = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX

    def capped(logits, softcap):
        return softcap * torch.tanh(logits / softcap) if softcap else logits

    logits = capped(hidden @ weight.T, softcaps[0])
    teacher_logits = capped(teacher_hidden @ teacher_weight.T, softcaps[1]).detach()
    kd = distill_loss(logits, teacher_logits, labels, temperature)
    ce_and_z, ce = lm_loss(logits, labels, z_loss)
    loss = alpha * kd + (1 - alpha) * ce + (ce_and_z - ce)
    expected = torch.autograd.grad(2 * loss, (hidden, weight))
    got = chunked_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels, temperature, alpha, z_loss,
                               *softcaps, chunk_tokens=chunk)
    torch.testing.assert_close(got, (loss, kd, ce))
    assert not got[1].requires_grad and not got[2].requires_grad
    grads = torch.autograd.grad(2 * got[0], (hidden, weight, teacher_hidden, teacher_weight), allow_unused=True)
    torch.testing.assert_close(grads[:2], expected)
    assert grads[2] is None and grads[3] is None


def test_distillation_never_holds_the_logits_of_the_whole_batch(tmp_path):
    """Nothing autograd keeps for the backward is as large as either model's (tokens, vocab) logits: the
    heads' gradients are computed with the loss, a chunk of rows at a time (`chunked_distill_loss`)."""
    from dataclasses import asdict
    from functools import partial

    from lightning_modules.distill import DistillModule

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, max_seq_len=64, ffn_hidden=32)
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"model_config": asdict(cfg), "state_dict": {f"model.{k}": v for k, v in CausalLM(cfg).state_dict().items()}},
               teacher)
    module = DistillModule(cfg, partial(torch.optim.AdamW), partial(Constant), teacher=str(teacher), alpha=0.5)
    module.log_dict = lambda *args, **kwargs: None
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=4))
    batch = {"input_ids": torch.randint(0, 512, (4, 64)), "labels": torch.randint(0, 512, (4, 64))}
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert max(saved) < 4 * 64 * 512 / 4
    assert module.model.lm_head.weight.grad.abs().sum() > 0


def test_stage_compile_compiles_the_teacher_too_and_keeps_the_loss(tmp_path):
    """The teacher's forward runs every step: with `stage.compile` its blocks are compiled as the student's,
    and the step's loss is the eager one."""
    from dataclasses import asdict
    from functools import partial

    from lightning_modules.distill import DistillModule

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, ffn_hidden=32)
    teacher_cfg = ModelConfig(vocab_size=64, d_model=24, n_layers=1, n_heads=2, max_seq_len=16, ffn_hidden=48)
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"model_config": asdict(teacher_cfg),
                "state_dict": {f"model.{k}": v for k, v in CausalLM(teacher_cfg).state_dict().items()}}, teacher)
    batch = {"input_ids": torch.randint(0, 64, (2, 16)), "labels": torch.randint(0, 64, (2, 16))}
    losses = []
    for compile in (False, True):
        torch.manual_seed(1)
        module = DistillModule(cfg, partial(torch.optim.AdamW), partial(Constant), teacher=str(teacher), compile=compile)
        module.log_dict = lambda *args, **kwargs: None
        module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=2))
        module.configure_model()
        compiled = [block._compiled_call_impl is not None for block in (*module.model.blocks, *module.teacher.blocks)]
        assert compiled == [compile] * 3
        losses.append(module.training_step(batch, 0).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_distillation_adds_the_z_loss_to_its_objective(tmp_path):
    from dataclasses import asdict
    from functools import partial

    from lightning_modules.distill import DistillModule

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, ffn_hidden=32)
    student = CausalLM(cfg)
    teacher = tmp_path / "teacher.ckpt"  # the student itself: the KL term is 0
    torch.save({"model_config": asdict(cfg), "state_dict": {f"model.{k}": v for k, v in student.state_dict().items()}},
               teacher)
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
    module = DistillModule(cfg, partial(torch.optim.AdamW), partial(Constant), teacher=str(teacher), alpha=1.0,
                           z_loss=0.5)
    module.model.load_state_dict(student.state_dict())
    module.log_dict = lambda *args, **kwargs: None
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=2))
    z_term = 0.5 * torch.logsumexp(student(batch["input_ids"]), dim=-1).square().mean()
    # `token_weighted`: the mean times the micro-batch's label tokens (16) over the positions a batch holds
    # (2 x 16), never above the mean, or fp16's loss scale overflows
    assert module.training_step(batch, 0).item() == pytest.approx(z_term.item() * 16 / 32, rel=1e-5)


def test_under_bf16_autocast_the_residual_stream_is_bf16_and_the_loss_tracks_float32():
    """bf16 autocast: the blocks pass bf16 between them (fp16: float32), and loss and gradients stay
    close to the float32 model's."""
    from slmlab.models import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, ffn_hidden=128, max_seq_len=32,
                                 qk_norm=True))
    ids, labels = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    seen = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    want, _ = model.loss(ids, labels, 1e-3)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = model.loss(ids, labels, 1e-3, chunk_tokens=24)
    grads = torch.autograd.grad(got, list(model.parameters()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        model.hidden(ids)  # fp16's range would overflow a residual stream: it stays float32
    handle.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert abs(got.item() - want.item()) < 0.02 * want.item()
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32  # parameters stay float32: their gradients too
        assert ((g - w).norm() / w.norm()).item() < 0.05


def test_progress_bar_reads_training_metrics_back_only_every_n_steps():
    class Trainer:  # what the bar reads of Lightning's trainer
        training, loggers, global_step = True, [], 0
        reads: list[int] = []

        @property
        def progress_bar_metrics(self) -> dict[str, float]:  # in Lightning: `.item()` of each, a GPU sync
            return {"val/loss": 2.5}

        @property
        def callback_metrics(self) -> dict[str, torch.Tensor]:  # device tensors: the bar's float() syncs
            self.reads.append(self.global_step)
            return {"train/loss": torch.tensor(float(self.global_step)), "train/kl": torch.tensor(0.0)}

    bar, trainer = ProgressBar(metrics_every_n_steps=3, train_keys=["train/loss", "train/reward"]), Trainer()
    shown = []
    for step in range(1, 8):
        trainer.global_step = step
        shown.append(bar.get_metrics(trainer, None))
    assert trainer.reads == [1, 3, 6] and [m["train/loss"] for m in shown] == [1, 1, 3, 3, 3, 6, 6]
    assert shown[-1]["val/loss"] == 2.5 and "train/kl" not in shown[-1] and "train/reward" not in shown[-1]
    trainer.training = False  # validation reads them at every call
    assert [bar.get_metrics(trainer, None)["train/loss"] for _ in range(2)] == [7, 7] and trainer.reads[-2:] == [7, 7]


@pytest.mark.parametrize("max_epochs,description", [(-1, "Epoch 4"), (3, "Epoch 4/2")])
def test_the_progress_bar_names_no_last_epoch_when_max_steps_ends_the_run(max_epochs, description):
    from types import SimpleNamespace

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    assert bar._get_train_description(4).strip() == description


@pytest.mark.parametrize("global_step,accumulate,batches,total", [
    (20, 1, math.inf, 40), (0, 2, math.inf, 80), (10, 2, math.inf, 80), (10, 2, 30, 30)])
def test_the_progress_bar_total_counts_the_epochs_batches_after_a_resume_and_with_accumulation(
        global_step, accumulate, batches, total):
    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=40, global_step=global_step,
                                   accumulate_grad_batches=accumulate, num_training_batches=batches)
    assert bar.total_train_batches == total


def test_training_logs_no_metric_lightning_would_read_back_every_step(tmp_path):
    """Lightning turns each metric logged with `prog_bar=True` into a number after every batch: on a GPU,
    a wait for the whole queued step each time. Pretraining logs none; the bar reads its keys every n steps."""
    from train import train

    record = tmp_path / "keys.json"
    train(compose_config(tiny_run_overrides(tmp_path, steps=3, val_every=3) + [
        "callbacks.sample=null", "+callbacks.record._target_=tests.helpers.RecordProgressBarKeys",
        f"+callbacks.record.path={record}"]))
    seen = json.loads(record.read_text())
    assert len(seen) == 3 and seen == [[], [], []], seen


def test_timed_loader_counts_the_time_spent_producing_batches_not_the_time_between_them():
    class SlowBatches(IterableDataset):
        def __iter__(self):
            for i in range(4):
                time.sleep(0.02)
                yield torch.tensor([i])

    loader = TimedDataLoader(SlowBatches(), batch_size=None)
    start = time.perf_counter()
    got = []
    for batch in loader:
        got.append(int(batch))
        time.sleep(0.05)  # the consumer's step (or a host blocked on a full GPU queue)
    total = time.perf_counter() - start
    assert got == [0, 1, 2, 3]
    assert 0.08 <= loader.loading_seconds < total - 0.2, (loader.loading_seconds, total)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA L4", 121e12), ("NVIDIA GeForce GTX 1080", None)])
def test_mfu_peaks_are_those_of_the_named_gpu_not_of_a_name_inside_it(name, peak, monkeypatch):
    from slmlab.training.callbacks import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert peak_flops(SimpleNamespace(type="cuda")) == peak  # "L40" held "L4": MFU 1.5x too high


def test_throughput_windows_hold_each_batchs_loading_once_and_its_own_steps_flops(monkeypatch):
    """A window runs from one logging step's end to the next: each batch's loading (fetched before its
    step starts) is in it once. FLOPs per token are those of each batch's own step, though the last
    micro-batch ends after the step counter moved on (a superposition phase may end there). A resumed run
    logs its start-up time at the end of its own first optimizer step."""
    from slmlab.training import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    loading = SimpleNamespace(train_loading_seconds=0.0)
    trainer = SimpleNamespace(datamodule=loading, world_size=1, global_step=10, training=True)  # resumed at 10
    module = SimpleNamespace(device=torch.device("cpu"), logged=[],
                             # packed documents' counts are device tensors (read once per window)
                             flops_per_data_token=lambda seq_len, batch: torch.tensor(100.0, dtype=torch.float64)
                             if trainer.global_step < 12 else 50.0)
    module.log_dict = module.logged.append
    monitor = ThroughputMonitor(log_every_n_steps=2, peak_flops_per_device=1e6)
    startups = []
    monitor._log_startup = lambda trainer, module: startups.append((trainer.global_step, clock[0]))
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.full((2, 8), -100)}  # 16 tokens
    batch["labels"][0, 5:] = 1  # 3 of them with a label
    monitor.on_train_start(trainer, module)

    def micro_batch(load: float, compute: float, ends_step: bool) -> None:
        clock[0] += load  # the loader fetching it
        loading.train_loading_seconds += load
        monitor.on_train_batch_start(trainer, module, batch, 0)
        clock[0] += compute
        trainer.global_step += ends_step
        monitor.on_train_batch_end(trainer, module, None, batch, 0)

    for step in range(2):  # steps 10 and 11, two micro-batches each, logged at the end of step 11
        micro_batch(0.5, 1.5, False)
        micro_batch(0.5, 1.5, True)
    assert startups == [(11, 4.0)]  # after both micro-batches of step 10
    assert module.logged == [{"perf/tokens_per_s": 64 / 8.0, "perf/loss_tokens_per_s": 12 / 8.0, "perf/data_wait": 2.0 / 8.0,
                              "perf/mfu": 64 * 100.0 / 8.0 / 1e6}]  # step 11's FLOPs, not step 12's
    for step in range(2):  # steps 12 and 13: one fast micro-batch each
        micro_batch(1.0, 1.0, True)
    assert module.logged[-1] == {"perf/tokens_per_s": 32 / 4.0, "perf/loss_tokens_per_s": 6 / 4.0, "perf/data_wait": 0.5,
                                 "perf/mfu": 32 * 50.0 / 4.0 / 1e6}
    assert len(startups) == 1


def test_start_up_counts_from_launch_for_a_process_first_job_and_from_its_own_start_after(monkeypatch):
    """A Hydra multirun runs its jobs one after another in one process: each later job's perf/startup_s
    counted from the process's launch, so that of the fourth job of a grid held the three before it."""
    from slmlab.training import callbacks
    from slmlab.training.callbacks import ThroughputMonitor

    monkeypatch.setattr(ThroughputMonitor, "built_in_process", 0)
    monkeypatch.setattr(callbacks, "seconds_since_launch", lambda: 100.0)
    clock = [5.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"))
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.extend(metrics.items()))
    trainer = SimpleNamespace(is_global_zero=False, loggers=[logger], global_step=1)
    first, second = ThroughputMonitor(), ThroughputMonitor()  # built at 5.0 s
    clock[0] = 12.5
    first._log_startup(trainer, module)
    second._log_startup(trainer, module)
    assert logged == [("perf/startup_s", 100.0), ("perf/startup_s", 7.5)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("fused", [False, True], ids=["clipped-in-place", "clipped-by-fused-adamw"])
def test_norm_clipping_reuses_this_steps_norm_and_matches_clip_grad_norm(fused, device, monkeypatch):
    """One gradient norm per step, shared by the non-finite guard, `train/grad_norm` and clipping. An
    unfused optimizer gets its gradients scaled in place; fused AdamW divides them by `grad_scale` as it
    reads them. Either way the update is AdamW's on clip_grad_norm_'s gradients."""
    from functools import partial

    from lightning_modules import PretrainModule
    from slmlab.training.faults import NonFiniteGuard

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW), scheduler=partial(Constant)).to(device)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=0,  # bf16 / fp32: no grad scaler
                              strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    module.trainer = trainer
    logged = {}
    module.log = lambda name, value, **kw: logged.update({name: value})
    norms = []
    total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads: norms.append(1) or total_norm(grads))
    params = list(module.model.parameters())
    reference = [p.detach().clone().requires_grad_() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused)
    expected = torch.optim.AdamW(reference, lr=0.1)
    guard = NonFiniteGuard()
    for step, scale in enumerate((10.0, 0.001, 5.0)):  # above the clip, below, above: a stale norm or factor fails
        trainer.global_step = step
        torch.manual_seed(step)
        grads = [scale * torch.randn_like(p) for p in params]
        for p, r, g in zip(params, reference, grads):
            p.grad, r.grad = g.clone(), g.clone()
        guard.on_before_optimizer_step(trainer, module, optimizer)
        module.on_before_optimizer_step(optimizer)
        module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        optimizer.step()
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads))
        assert logged["train/grad_norm"].item() == pytest.approx(norm, rel=1e-5)
        assert len(norms) == step + 1  # computed once, for the guard; logging and clipping reuse it
        torch.nn.utils.clip_grad_norm_(reference, 1.0)
        expected.step()
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    guard.on_train_end(trainer, module)
    assert guard.skipped == 0


def test_under_fsdp_the_norm_and_its_clipping_cover_every_ranks_shard(monkeypatch):
    """FSDP leaves each rank a shard of every gradient. The norm that clipping, `train/grad_norm` and the
    non-finite guard use is the whole gradient's, or each rank would scale its shard by its own factor:
    here rank 0 of two, the other rank's shard reaching it through the strategy's all-reduce."""
    from functools import partial

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW), scheduler=partial(Constant))
    params = list(module.model.parameters())
    torch.manual_seed(0)
    full = [10 * torch.randn_like(p) for p in params]
    mine = [torch.rand(p.shape) < 0.5 for p in params]  # this rank's elements of each gradient
    theirs = sum(g[~m].double().square().sum() for g, m in zip(full, mine)).float()
    strategy = FSDPStrategy()
    monkeypatch.setattr(strategy, "reduce", lambda t, reduce_op="mean", **kw: t + theirs if reduce_op == "sum" else t)
    module.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=0, strategy=strategy)
    for p, g, m in zip(params, full, mine):
        p.grad = g * m
    reference = [p.detach().clone().requires_grad_() for p in params]
    for r, g in zip(reference, full):
        r.grad = g.clone()
    whole = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert module.gradient_norm().item() == pytest.approx(whole.item(), rel=1e-5)
    module.configure_gradient_clipping(torch.optim.AdamW(params), gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    for p, r, m in zip(params, reference, mine):
        torch.testing.assert_close(p.grad, r.grad * m, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy,runs", [("fsdp", True), ("ddp", False)])
def test_callbacks_run_the_model_on_every_rank_under_fsdp_and_on_rank_zero_alone_otherwise(strategy, runs, monkeypatch,
                                                                                              capsys):
    """Under FSDP every forward gathers each block's parameters from all ranks: a sample or evaluation
    that rank 0 ran alone would wait for the other ranks forever. Seen from rank 1; only rank 0 prints."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from slmlab.eval.callback import EvalSuites
    from slmlab.training import callbacks

    calls = []
    monkeypatch.setattr(callbacks, "generate", lambda model, ids, n, cuda_graph, **kw: calls.append(("sample", cuda_graph)) or ids)
    monkeypatch.setattr(EvalSuites, "evaluate", lambda self, model, dm, cuda_graph: calls.append(("eval", cuda_graph))
                        or {"eval/x": 1.0})
    rank1 = SimpleNamespace(is_global_zero=False, sanity_checking=False,
                            strategy={"fsdp": FSDPStrategy, "ddp": DDPStrategy}[strategy](),
                            datamodule=SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda text: SimpleNamespace(ids=[1, 2]),
                                                                                 decode=lambda ids: ""), eos_id=0))
    monkeypatch.setattr(rank1.strategy, "broadcast", lambda obj, src=0: {"eval/x": 1.0})
    module = SimpleNamespace(model=CausalLM(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, ffn_hidden=8,
                                                        max_seq_len=16)), device=torch.device("cpu"),
                             log_dict=lambda metrics: None)
    callbacks.GenerateSample(prompts=["a", "b"]).on_train_end(rank1, module)
    EvalSuites().on_validation_epoch_end(rank1, module)
    # and none of it decoded from CUDA graphs, which cannot hold FSDP's parameter gathers
    assert calls == ([("sample", False), ("sample", False), ("eval", False)] if runs else [])
    assert capsys.readouterr().out == ""


def test_a_resumed_run_evaluates_after_the_same_validations(monkeypatch):
    from slmlab.eval.callback import EvalSuites

    evaluated = []
    monkeypatch.setattr(EvalSuites, "evaluate", lambda self, model, dm, cuda_graph: {"eval/x": 1.0})
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, strategy=SimpleNamespace(
        broadcast=lambda obj, src=0: obj), datamodule=None)
    module = SimpleNamespace(model=None, log_dict=lambda metrics: evaluated.append(validation))
    first = EvalSuites(every_n_validations=3)
    for validation in (1, 2, 3, 4):
        first.on_validation_epoch_end(trainer, module)
    resumed = EvalSuites(every_n_validations=3)  # from the checkpoint of validation 4
    resumed.load_state_dict(first.state_dict())
    for validation in (5, 6, 7):
        resumed.on_validation_epoch_end(trainer, module)
    assert evaluated == [3, 6]


@pytest.mark.parametrize("name,kind", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "attention"),
    ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at_", "attention"),  # FA4
    ("kernel_cutlass_kernel_quackgemm_sm90GemmSm90_object_at_", "matmul"),
    ("chunk_gla_fwd_kernel_o", "recurrent scan"), ("chunk_bwd_kernel_dh", "recurrent scan"),  # fla
    ("_chunk_scan_chunk_state_bwd_dx_kernel", "recurrent scan"), ("_state_passing_fwd_kernel", "recurrent scan"),  # mamba-ssm
    ("_causal_conv_preactivation_grad_kernel", "causal conv"), ("_qk_norm_rope_backward_kernel", "qk-norm + rope"),
    ("multi_tensor_apply_kernel", "optimizer"),
    ("triton_per_fused__fused_rms_norm_0", "elementwise, other"),
    ("triton_poi_fused_split_with_sizes_chunk_1", "elementwise, other"),  # inductor's, whatever ops it names
])
def test_profiled_kernels_are_grouped_by_what_their_names_say_they_do(name, kind):
    from slmlab.training.profiling import kernel_kind

    assert kernel_kind(name) == kind


def test_kernel_summary_counts_the_gpu_rows_only():
    """Profiled with the CPU, the host rows that launched kernels (a custom op, an inductor kernel's launch
    under the kernel's own name) carry the kernels' device time too: counted, the step would double."""
    from types import SimpleNamespace

    from slmlab.training.profiling import kernel_summary

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    rows = [("nvjet_sm90_tst_256x128", 6000.0, 4, cuda), ("kernel_cutlass_kernel_flash_attncute_fwd", 2000.0, 2, cuda),
            ("slmlab::flash_attn_causal", 2000.0, 2, cpu), ("triton_poi_fused_add_0", 1000.0, 2, cuda),
            ("triton_poi_fused_add_0", 1000.0, 2, cpu), ("aten::mm", 6000.0, 4, cuda)]
    prof = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=k, self_device_time_total=us, count=n, device_type=d)
                                                 for k, us, n, d in rows])
    lines = kernel_summary(prof, steps=2, top=5)
    assert lines[0] == "4.5 ms of GPU kernels per step"
    assert [line.split()[0] for line in lines[1:4]] == ["matmul", "attention", "elementwise,"]
    assert [float(line.split(" ms")[0].split()[-1]) for line in lines[1:4]] == [3.0, 1.0, 0.5]
    assert len(lines) == 4 + 3


def test_idle_gaps_between_overlapping_gpu_intervals():
    from slmlab.training.profiling import idle_gaps, is_kernel

    # two streams overlap (b inside a's span, c starting before a ends); then a gap; then e after d ends
    activity = [(0, 10, "a"), (2, 5, "b"), (8, 12, "c"), (20, 30, "d"), (35, 36, "e"), (30, 31, "f")]
    gaps = idle_gaps(activity)
    assert [(g.start, g.length, g.after, g.before) for g in gaps] == [(12, 8, "c", "d"), (31, 4, "f", "e")]
    # Lightning's optimizer step runs forward and backward inside it: as GPU activity it would hide every gap
    assert not is_kernel("Optimizer.step#AdamW.step") and not is_kernel("aten::mm")
    assert is_kernel("Memcpy HtoD (Pinned -> Device)") and is_kernel("_silu_mul_backward_kernel")


def test_step_profiler_profiles_the_asked_optimizer_steps_of_a_run(tmp_path, capsys):
    """`callbacks.profile.steps=2` from step 3: one report over exactly those two steps, and its trace."""
    from train import train

    train(compose_config(tiny_run_overrides(tmp_path, steps=6, val_every=6) + [
        "callbacks.sample=null", "callbacks.profile.start=3", "callbacks.profile.steps=2", "callbacks.profile.trace=true"]))
    out = capsys.readouterr().out
    assert out.count("== profile of optimizer steps") == 1 and "== profile of optimizer steps 3-4:" in out
    trace = json.loads((tmp_path / "run" / "profile" / "trace.json").read_text())
    # the window ran two optimizer steps' forward passes: the model's embedding lookups, one per step
    assert sum(e.get("name") == "aten::embedding" for e in trace["traceEvents"]) == 2


@pytest.mark.parametrize("start,steps,message", [
    (20, 2, r"steps 20-21 are not all in this run \(steps 0-5\), so nothing is profiled"),
    (5, 2, r"steps 5-6 are not all in this run"),
])
def test_a_profile_window_outside_the_run_is_a_warning(tmp_path, start, steps, message):
    """The default start (20) in a shorter run, or a window past its end, once printed nothing at all."""
    from train import train

    with pytest.warns(UserWarning, match=rf"callbacks.profile: {message}"):
        train(compose_config(tiny_run_overrides(tmp_path, steps=6, val_every=6) + [
            "callbacks.sample=null", f"callbacks.profile.start={start}", f"callbacks.profile.steps={steps}"]))


def test_compiled_blocks_keep_a_compiled_variant_for_every_mixer_kind_and_use(monkeypatch):
    """All blocks share one compiled forward, whose variants dynamo caps (8 by default). Each kind of
    mixer needs its own for training, evaluation, training-mode forwards without gradients (GRPO's and
    DPO's reference log-probs) and the dynamic batch a partial last batch brings: with helix's three
    kinds the ninth variant ran eagerly, with dynamo's warning."""
    from hydra.utils import instantiate

    compile_eagerly = torch.nn.Module.compile  # dynamo's tracing and guards, without inductor's compile time
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_eagerly(self, backend="eager"))
    torch._dynamo.reset()
    # dynamo's own patch: pytest's monkeypatch deletes a config entry when it undoes a setting of it
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True,
                                    recompile_limit=torch._dynamo.config.recompile_limit):
        module = instantiate(compose_config(["model=tiny_hybrid", "model.layout='M,G,S,A'", "model.n_layers=4",
                                             "stage.compile=true"]).stage)
        module.configure_model()
        model = module.model
        ids = torch.randint(0, model.cfg.vocab_size, (4, 16))
        model.train()
        model(ids).sum().backward()
        with torch.no_grad():
            model(ids)
            model.eval()
            for batch in (4, 3, 2):
                model(ids[:batch])
            model.train()
            model(ids[:3])
        model(ids[:3]).sum().backward()


def test_sampled_batches_are_padded_to_a_few_shapes_within_the_context():
    """CUDA graphs and compiled blocks record per input shape: sampled completions of every length
    would each record their own."""
    from slmlab.training.batching import cat_right_padded, padded_length

    assert [padded_length(n, limit=2048) for n in (1, 63, 64, 65, 2000)] == [64, 64, 64, 128, 2048]
    assert padded_length(40, limit=48) == 48 and padded_length(50, limit=48) == 50  # the context caps it
    rows = cat_right_padded([torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], value=-1, length=8)
    assert rows.shape == (3, 8) and rows[0].tolist() == [1, 1, 1] + [-1] * 5 and rows[2, :5].tolist() == [1] * 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-true", "16-true"])
def test_fused_adamw_clips_weights_held_in_half_precision(dtype):
    """Under bf16-true or 16-true the weights, their gradients and so their norm are in half precision;
    fused AdamW reads the clipping factor (`grad_scale`) as float32 only. A clip far below the gradients'
    norm leaves Adam's first step at lr * g / eps, below half precision's resolution: nothing moves."""
    from functools import partial

    from lightning_modules import PretrainModule

    module = PretrainModule(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16),
                            optimizer=partial(torch.optim.AdamW), scheduler=partial(Constant)).to(dtype)
    module.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), global_step=0, strategy=None)
    params = list(module.model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0, fused=True)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1e-12, gradient_clip_algorithm="norm")
    optimizer.step()
    assert max((p - b).abs().max().item() for p, b in zip(params, before)) < 1e-3  # unclipped: 0.1


@pytest.mark.parametrize("optim,switch,off", [("adamw", "fused", "false"), ("muon", "neuron_beta2", "null")])
def test_a_run_resumed_with_other_optimizer_settings_applies_them(optim, switch, off, recwarn):
    """optim.weight_decay 0.1 -> 0.0 and optim.betas on resume: the checkpoint's optimizer state used to
    bring its own values back, silently. The LR stays the schedule's (restored beside it); a switch that
    decides what state the optimizer keeps (fused AdamW, NorMuon's moment) stays the checkpoint's, named."""
    from hydra.utils import instantiate

    def module_and_optimizer(overrides: list[str]):
        cfg = compose_config([f"optim={optim}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                              "model.ffn_hidden=48", "model.vocab_size=64", *overrides])
        module = instantiate(cfg.stage)
        module.trainer = SimpleNamespace(max_steps=100, global_step=4)
        optimizer = module.configure_optimizers()["optimizer"]
        module.trainer.optimizers = [optimizer]
        return module, optimizer

    _, saved = module_and_optimizer(["optim.weight_decay=0.1"])
    saved.param_groups[0]["lr"] = 1e-5  # where the schedule had brought it
    switched = saved.param_groups[0][switch]
    module, resumed = module_and_optimizer(["optim.weight_decay=0.0", "optim.betas=[0.8,0.9]", f"optim.{switch}={off}"])
    resumed.load_state_dict(saved.state_dict())  # what Lightning does before training starts
    module.on_train_start()
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.0] * len(resumed.param_groups)
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in resumed.param_groups)
    assert resumed.param_groups[0]["lr"] == 1e-5
    assert all(g[switch] == switched for g in resumed.param_groups)
    messages = [str(w.message) for w in recwarn]
    assert any("optim.weight_decay 0.1 -> 0.0" in m and "from step 4" in m for m in messages), messages
    assert any(f"keeps the checkpoint's optim.{switch} {switched} (not " in m for m in messages), messages
    recwarn.clear()
    module, again = module_and_optimizer(["optim.weight_decay=0.0", "optim.betas=[0.8,0.9]"])
    again.load_state_dict(resumed.state_dict())
    module.on_train_start()  # the same settings: nothing to say
    assert not [w for w in recwarn if "optimizer" in str(w.message)]


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_decay_fraction_outside_zero_to_one_is_named_with_its_key(fraction):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=rf"schedule.decay_fraction={fraction} must lie in \(0, 1\]"):
        WSD(opt, total_steps=10, decay_fraction=fraction)


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9,1.5]"])
def test_adamw_betas_that_are_not_two_values_in_zero_to_one_are_named(tmp_path, betas):
    """One beta failed inside torch with an index error naming no key; 1.5 with torch's own wording."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_config(tiny_run_overrides(tmp_path) + [f"optim.betas={betas}"])
    with pytest.raises(InstantiationException, match=re.escape(f"optim.betas={betas.replace(',', ', ')}: Adam's two")):
        instantiate(cfg.stage)
