"""LoRA adapters: an adapted model starts as its base, trains only its adapters, and folds back into a
plain model (merge, checkpoints read by init_from and load_model) that computes what it computed."""

import pytest
import torch
from torch.nn.utils import parametrize

from slmlab.checkpoint import load_model
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.lora import add_lora, merge_lora, merged_state
from tests.conftest import compose_config, tiny_run_overrides
from train import train


def tiny(layout: str | None) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=97, d_model=32, n_layers=4 if layout else 2, n_heads=2, n_kv_heads=1,
                                ffn_hidden=64, max_seq_len=32, layout=layout, kernel="torch",
                                hgrn2_expand_ratio=16)).eval()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("layout", [None, "M,G,A,H"])  # attention's fused q/k/v and every recurrent mixer
def test_an_adapted_model_starts_as_its_base_and_merges_into_what_it_computes(layout, dora):
    model, ids = tiny(layout), torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        base = model(ids)
        add_lora(model, rank=4, alpha=8, dora=dora)
        torch.testing.assert_close(model(ids), base, rtol=1e-5, atol=1e-6)  # B = 0 (and m = |W| per row)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
            if name.endswith("magnitude"):
                p.mul_(torch.rand_like(p) + 0.5)
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-2
        plain = tiny(layout)
        plain.load_state_dict(merged_state(model.state_dict()))
        torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_lora(model)(ids), adapted, rtol=1e-5, atol=1e-5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_only_the_adapters_of_the_named_layers_train_and_unknown_names_are_refused():
    model = tiny(None)
    add_lora(model, rank=2, alpha=4, targets=["q", "v"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"blocks.{i}.mixer.{layer}.parametrizations.weight.0.lora_{ab}"
                         for i in range(2) for layer in ("q", "v") for ab in "AB"]
    with pytest.raises(ValueError, match=r"stage.lora_targets: \['qkv'\] name no linear layer.*'gate'"):
        add_lora(tiny(None), rank=2, alpha=4, targets=["q", "qkv"])
    with pytest.raises(ValueError, match=r"stage.lora_targets is empty: name some of \['down', 'gate'"):
        add_lora(tiny(None), rank=2, alpha=4, targets=[])
    with pytest.raises(ValueError, match="stage.lora_rank=0"):
        add_lora(tiny(None), rank=0, alpha=4)


def test_dora_rows_have_the_trained_magnitudes_whatever_the_low_rank_update():
    layer = torch.nn.Linear(8, 6)
    add_lora_layer = torch.nn.Module()
    add_lora_layer.blocks = torch.nn.ModuleList([torch.nn.Sequential(layer)])
    add_lora(add_lora_layer, rank=2, alpha=2, dora=True)
    adapter = layer.parametrizations.weight[0]
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.magnitude.copy_(torch.arange(1.0, 7.0))
    torch.testing.assert_close(torch.linalg.vector_norm(layer.weight, dim=1), torch.arange(1.0, 7.0))
    assert sorted(n for n, p in add_lora_layer.named_parameters() if p.requires_grad) == [
        f"blocks.0.0.parametrizations.weight.0.{name}" for name in ("lora_A", "lora_B", "magnitude")]


def test_mfu_counts_no_weight_gradients_for_the_frozen_matrices():
    model = tiny(None)
    full = model.flops_per_token(32)
    add_lora(model, rank=2, alpha=4, targets=["q", "k", "v", "o"])
    # 2 layers of q 32x32, k and v 16x32, o 32x32 (base weights), gate/up/down 64x32 (not adapted); the
    # head, tied to the frozen embedding, 97x32: 2 FLOPs per frozen weight and token fewer
    blocks, head = 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 64 * 32), 97 * 32
    assert model.flops_per_token(32) == full - 2 * (blocks + head)
    # token superposition: the blocks run once per bag of 2 tokens, the head once per token
    assert model.flops_per_token(32, bag=2) == tiny(None).flops_per_token(32, bag=2) - 2 * (blocks / 2 + head)


def test_under_muon_the_adapters_take_adamw():
    from slmlab.training.muon import muon_groups

    model = tiny(None)
    add_lora(model, rank=2, alpha=4)
    groups = muon_groups(model, weight_decay=0.1)
    adapters = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(adapters) == 28 and not any(g["use_muon"] for g in groups)
    assert {id(p) for g in groups for p in g["params"]} == adapters


def test_sft_with_lora_keeps_the_base_weights_and_the_next_stage_loads_the_merged_model(tmp_path):
    base_run, lora_run = tmp_path / "base", tmp_path / "lora"
    train(compose_config(tiny_run_overrides(base_run, steps=4, val_every=4)))
    base_ckpt = base_run / "run" / "checkpoints" / "last.ckpt"
    train(compose_config(tiny_run_overrides(lora_run, steps=4, val_every=4) + [
        "stage=sft", f"init_from={base_ckpt}", "stage.lora_rank=4", "optim.lr=1e-2"]))
    lora_ckpt = lora_run / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(lora_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    before = torch.load(base_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    q = "model.blocks.0.mixer.q"
    assert torch.equal(state[q + ".parametrizations.weight.original"], before[q + ".weight"])  # frozen
    assert state[q + ".parametrizations.weight.0.lora_B"].abs().max() > 0  # trained
    assert torch.equal(state["model.embed.weight"], before["model.embed.weight"])
    merged = load_model(lora_ckpt)
    lora_b, lora_a = (state[q + f".parametrizations.weight.0.lora_{ab}"] for ab in "BA")
    torch.testing.assert_close(merged.blocks[0].mixer.q.weight, before[q + ".weight"] + 16 / 4 * lora_b @ lora_a)
    # the next stage starts from the merged weights, its DPO reference a plain copy of them
    from hydra.utils import instantiate

    dpo = instantiate(compose_config(tiny_run_overrides(tmp_path / "dpo") + ["stage=dpo", f"init_from={lora_ckpt}"]).stage)
    assert torch.equal(dpo.model.blocks[0].mixer.q.weight, merged.blocks[0].mixer.q.weight)
    assert not any(parametrize.is_parametrized(m) for m in dpo.reference.modules())
