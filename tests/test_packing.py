"""Document-masked packing: a row of several documents, with each token's position in its own document,
is modelled exactly as each document alone, by every mixer and every implementation of its ops."""

import pytest
import torch

from slmlab.models import CausalLM, ModelConfig
from slmlab.ops import gla_chunked, gla_recurrent, ssd_chunked, ssd_recurrent
from slmlab.ops.causal_conv import causal_conv1d_silu_reference
from slmlab.training.losses import IGNORE_INDEX

LENGTHS = [(5, 19, 1, 23), (30, 18)]  # per row: its documents' lengths (48 tokens each)


def packed_positions(lengths) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in lengths])


def segments(lengths):
    """(row, start, end) of every document."""
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            yield r, start, start + n
            start += n


@pytest.mark.parametrize("layout", ["A*3", "S*3", "G*3", "H*3", "M*3", "M,G,S"])
def test_a_packed_row_gives_each_document_the_logits_and_loss_it_has_alone(layout):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                      layout=layout, sliding_window=6, global_tokens=2, hgrn2_expand_ratio=16, rope_layers="all",
                      ssm_d_state=16, ssm_headdim=16, init_std=0.1, kernel="torch")
    model = CausalLM(cfg).double().eval()
    ids = torch.randint(0, 97, (2, 48))
    labels = torch.randint(0, 97, (2, 48))
    positions = packed_positions(LENGTHS)
    packed = model(ids, positions=positions)
    for r, a, b in segments(LENGTHS):
        alone = model(ids[r : r + 1, a:b])[0]
        torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-9, atol=1e-9, msg=f"row {r}, tokens {a}:{b}")
    # unpacked, the documents do see each other: the test can fail
    assert not torch.allclose(model(ids)[1, 30:], packed[1, 30:])
    loss, _ = model.loss(ids, labels, positions=positions)
    want = torch.nn.functional.cross_entropy(packed.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_a_decoding_state_with_packed_positions_is_refused():
    """No mixer continues a state across documents (the KV cache and Mamba-2's convolution would mix
    them), so the two together are refused rather than decoded wrong."""
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
                      layout="A,M", ssm_d_state=16, ssm_headdim=16, kernel="torch")
    model = CausalLM(cfg).eval()
    state = model.init_state(2, 64)
    with pytest.raises(ValueError, match="decoding state and packed-document positions"):
        model(torch.randint(0, 97, (2, 48)), state=state, positions=packed_positions(LENGTHS))


def test_gradients_do_not_cross_documents():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=64,
                      layout="G,A", init_std=0.1, kernel="torch")
    model = CausalLM(cfg).double()
    embeds = []

    def keep(module, args, out):
        out.retain_grad()
        embeds.append(out)

    model.embed.register_forward_hook(keep)
    ids = torch.randint(0, 97, (1, 20))
    labels = torch.full((1, 20), IGNORE_INDEX)
    labels[0, 12:] = ids[0, 12:]  # loss on the second document only
    loss, _ = model.loss(ids, labels, positions=packed_positions([(10, 10)]))
    loss.backward()
    grad = embeds[0].grad[0].abs().sum(-1)
    assert grad[:10].max() < 1e-12 < grad[10:].min()  # zero up to the chunked decay sums' rounding


def random_starts(B: int, T: int) -> torch.Tensor:
    starts = torch.rand(B, T) < 0.15
    starts[0, [0, 16, 17]] = True  # at row and chunk starts, and a document of one step
    return starts


@pytest.mark.parametrize("per_channel", [True, False])
def test_gla_with_starts_equals_each_document_alone_and_the_chunked_form_agrees(per_channel):
    torch.manual_seed(0)
    B, T, H, K, V = 2, 45, 2, 8, 4
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, *([K] if per_channel else []), dtype=torch.float64))
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    starts = random_starts(B, T)
    o, S = gla_recurrent(q, k, v, g, initial_state=h0, output_final_state=True, starts=starts)
    for r in range(B):  # the first document continues h0 unless a document starts at step 0
        bounds = [0, *starts[r].nonzero().flatten().tolist(), T]
        for a, b in zip(bounds, bounds[1:]):
            if a == b:
                continue
            init = h0[r : r + 1] if a == 0 and not starts[r, 0] else None
            alone, S_alone = gla_recurrent(q[r : r + 1, a:b], k[r : r + 1, a:b], v[r : r + 1, a:b], g[r : r + 1, a:b],
                                           initial_state=init, output_final_state=True)
            torch.testing.assert_close(o[r : r + 1, a:b], alone)
        torch.testing.assert_close(S[r : r + 1], S_alone)  # the last document's
    for chunk in (4, 16, 64):
        o_c, S_c = gla_chunked(q, k, v, g, initial_state=h0, output_final_state=True, starts=starts, chunk_size=chunk)
        torch.testing.assert_close(o_c, o)
        torch.testing.assert_close(S_c, S)


def test_ssd_with_starts_chunked_equals_recurrent_and_a_start_drops_the_state():
    torch.manual_seed(0)
    b, T, H, P, G, N = 2, 40, 4, 8, 2, 6
    f64 = dict(dtype=torch.float64)
    x, dt = torch.randn(b, T, H, P, **f64), torch.rand(b, T, H, **f64)
    A, D = -3 * torch.rand(H, **f64), torch.randn(H, **f64)
    B, C = torch.randn(b, T, G, N, **f64), torch.randn(b, T, G, N, **f64)
    starts = random_starts(b, T)
    y, S = ssd_recurrent(x, dt, A, B, C, D, output_final_state=True, starts=starts)
    y_c, S_c = ssd_chunked(x, dt, A, B, C, D, output_final_state=True, starts=starts, chunk_size=16)
    torch.testing.assert_close(y_c, y)
    torch.testing.assert_close(S_c, S)
    alone, _ = ssd_recurrent(x[:1, 17:], dt[:1, 17:], A, B[:1, 17:], C[:1, 17:], D, starts=starts[:1, 17:])
    torch.testing.assert_close(y[:1, 17:], alone)  # step 17 starts a document: nothing before it matters


def test_causal_conv_with_starts_sees_only_its_own_document():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x, w, bias = torch.randn(2, 30, 5, **f64), torch.randn(5, 4, **f64), torch.randn(5, **f64)
    starts = torch.zeros(2, 30, dtype=torch.bool)
    starts[0, [2, 10, 11]] = True
    y = causal_conv1d_silu_reference(x, w, bias, starts=starts)
    for a, b in [(0, 2), (2, 10), (10, 11), (11, 30)]:
        torch.testing.assert_close(y[:1, a:b], causal_conv1d_silu_reference(x[:1, a:b], w, bias))
    torch.testing.assert_close(y[1:], causal_conv1d_silu_reference(x[1:], w, bias))  # no start: the plain conv


def test_document_positions_restart_after_each_eos_and_at_each_row():
    from slmlab.training.batching import document_positions

    eos = 9
    ids = torch.tensor([[1, 2, 9, 3, 9, 9, 4, 5], [9, 1, 2, 3, 4, 5, 6, 9]])
    assert document_positions(ids, eos).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_pretraining_with_document_mask_keeps_the_streams_documents_apart(tmp_path):
    """Validation rows that hold the end of one document and the start of the next: the document mask
    changes their loss, so the two runs' val/loss differ; everything else is the same run."""
    from tests.conftest import compose_config, metric, tiny_run_overrides
    from train import train

    losses = []
    for mask in (False, True):
        run = tmp_path / str(mask)
        train(compose_config(tiny_run_overrides(run, steps=2, val_every=2) + [f"stage.document_mask={mask}"]))
        losses.append(metric(run / "run", "val/loss"))
    assert len(losses[0]) == len(losses[1]) == 1 and losses[0] != losses[1]


def test_document_mask_refuses_token_superposition(tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config, tiny_run_overrides

    cfg = compose_config(tiny_run_overrides(tmp_path) + ["stage.document_mask=true", "stage.superposition=[[4,0.2]]"])
    with pytest.raises(Exception, match="document_mask with stage.superposition"):
        instantiate(cfg.stage)


@pytest.mark.parametrize("layout", ["A", "S"])
def test_flex_attention_document_mask_equals_the_sdpa_reference(layout):
    """The CUDA path's block mask (`document_mask_mod`), run here by FlexAttention's eager reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from slmlab.mixers.attention import document_mask_mod

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      layout=layout, sliding_window=6, global_tokens=2)
    attention = CausalLM(cfg).blocks[0].mixer
    q, k, v = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    positions = packed_positions(LENGTHS)
    block_mask = create_block_mask(document_mask_mod(positions, attention.visible), 2, None, 48, 48, device="cpu")
    flex = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(flex, attention.document_attend(q, k, v, positions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fla_variable_length_call_sees_the_documents_as_its_sequences(per_channel, monkeypatch):
    """`fla_gla_varlen` flattens the batch and hands fla the boundaries of rows and documents; here fla's
    `chunk_gla` / `chunk_simple_gla` are stand-ins that run the oracle on each sequence `cu_seqlens` names,
    so the boundaries are checked without a GPU."""
    import sys
    from types import ModuleType

    from slmlab.ops.gla import fla_gla_varlen

    def per_sequence(q, k, v, g, scale=None, cu_seqlens=None):
        assert q.shape[0] == 1 and cu_seqlens[0] == 0 and cu_seqlens[-1] == q.shape[1]
        pieces = [gla_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], scale)[0]
                  for a, b in zip(cu_seqlens.tolist(), cu_seqlens[1:].tolist())]
        return torch.cat(pieces, dim=1), None

    fla_gla, fla_simple = ModuleType("fla.ops.gla"), ModuleType("fla.ops.simple_gla")
    fla_gla.chunk_gla = lambda q, k, v, g, **kw: per_sequence(q, k, v, g, **kw)
    fla_simple.chunk_simple_gla = lambda q, k, v, g, **kw: per_sequence(q, k, v, g, **kw)
    for name, module in [("fla", ModuleType("fla")), ("fla.ops", ModuleType("fla.ops")),
                         ("fla.ops.gla", fla_gla), ("fla.ops.simple_gla", fla_simple)]:
        monkeypatch.setitem(sys.modules, name, module)
    torch.manual_seed(0)
    B, T, H, K, V = 2, 40, 2, 8, 4
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, *([K] if per_channel else []))).double()  # fla's float32
    starts = random_starts(B, T)
    starts[1, 0] = False  # a row that does not open with a start is still a sequence of its own
    got = fla_gla_varlen(q, k, v, g, None, starts)
    torch.testing.assert_close(got, gla_recurrent(q, k, v, g, starts=starts)[0])


def test_flops_count_each_mixer_within_its_documents():
    """MFU over packed rows: a row of two 64-token documents costs what a 64-token row costs, a row of one
    document what the unpacked row costs, for every mixer; attention by hand for documents of 5, 19, 1 and
    23 tokens and of 30 and 18 (the causal half of each document: n^2 / 2 keys)."""
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=128,
                      layout="A,S,G,H,M", sliding_window=6, global_tokens=2, hgrn2_expand_ratio=16, ssm_d_state=16,
                      ssm_headdim=16)
    model = CausalLM(cfg)
    whole, halves = packed_positions([(128,), (128,)]), packed_positions([(64, 64), (64, 64)])
    for mixer in [block.mixer for block in model.blocks]:
        assert mixer.flops_per_token(128, whole).item() == pytest.approx(mixer.flops_per_token(128)), type(mixer)
        assert mixer.flops_per_token(128, halves).item() == pytest.approx(mixer.flops_per_token(64)), type(mixer)
    assert model.flops_per_token(128, positions=halves) < model.flops_per_token(128)
    attention = model.blocks[0].mixer
    keys = sum(n * n / 2 for row in LENGTHS for n in row) / (2 * 48)
    assert attention.flops_per_token(48, packed_positions(LENGTHS)).item() == pytest.approx(
        attention.projection_flops() + 2 * 2 * 4 * 16 * keys)


def test_the_stages_count_flops_within_the_documents_they_train_on(tmp_path):
    """What the throughput monitor's MFU counts: a packed batch's `positions`, and in pretraining with
    `stage.document_mask` the documents of the stream (ended by EOS)."""
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from tests.conftest import compose_config, tiny_run_overrides

    ids = torch.randint(1, 50, (2, 48))
    ids[:, 23] = 0  # the tokenizer's EOS: two documents of 24 tokens
    for mask in (False, True):
        module = instantiate(compose_config(tiny_run_overrides(tmp_path) + [f"stage.document_mask={mask}"]).stage)
        module.trainer = SimpleNamespace(datamodule=SimpleNamespace(eos_id=0), global_step=0)
        flops = module.flops_per_data_token(48, {"input_ids": ids})
        want = module.model.flops_per_token(24 if mask else 48)
        assert float(flops) == pytest.approx(want)
    sft = instantiate(compose_config(tiny_run_overrides(tmp_path) + ["stage=sft"]).stage)
    packed = {"input_ids": ids, "labels": ids, "positions": packed_positions([(24, 24), (24, 24)])}
    assert float(sft.flops_per_data_token(48, packed)) == pytest.approx(sft.model.flops_per_token(24))
    assert sft.flops_per_data_token(48, {"input_ids": ids, "labels": ids}) == sft.model.flops_per_token(48)
