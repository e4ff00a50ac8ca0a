"""Generation: cached decoding against full forwards, sampling controls, stop tokens and stop strings."""

import pytest
import torch

from slmlab.data.tokenizer import train_tokenizer
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.generate import generate, generate_prompts, held_back, penalize_repeats, sample_next, stream_text

TEXT = ["apt installs packages. dpkg unpacks them. The package manager keeps a list of packages."] * 20


def tiny_model(vocab_size: int = 97, layout: str | None = None, n_layers: int = 2) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      max_seq_len=64, init_std=0.2, layout=layout)
    return CausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXT, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json", min_frequency=1)


@pytest.mark.parametrize("layout", [None, "G,M"])  # KV cache, and recurrent states
def test_greedy_generation_equals_argmax_of_full_forwards(layout):
    model = tiny_model(layout=layout)
    prompt = torch.randint(0, 97, (2, 4))
    out = model.generate(prompt, 8, temperature=0)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("layout", [None, "G,M"])
def test_rows_with_prompts_of_different_lengths_generate_what_each_prompt_generates_alone(layout):
    """The shorter prompts' rows sample while the longer ones still read their prompts, all at one position."""
    model = tiny_model(layout=layout)
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 8, 5)]
    batch = torch.zeros(3, 8, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, :len(p)] = p
    out = generate(model, batch, 6, temperature=0, prompt_lens=torch.tensor([3, 8, 5]))
    for row, p in enumerate(prompts):
        assert torch.equal(out[row, :len(p) + 6], generate(model, p[None], 6, temperature=0)[0]), row


@pytest.mark.parametrize("layout", [None, "M,A"])
def test_prompts_of_near_lengths_decode_together_and_each_gets_its_own_completions(layout, monkeypatch):
    import slmlab.models.generate as module

    model = tiny_model(layout=layout)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 5, 30, 4)]
    eos = int(generate(model, torch.tensor([prompts[0]]), 3, temperature=0)[0, -1])  # prompt 0's rows stop early
    calls = []
    monkeypatch.setattr(module, "generate", lambda *a, **k: calls.append(a[1].shape) or generate(*a, **k))
    out = module.generate_prompts(model, prompts, 6, stop_id=eos, n=2, max_rows=6, temperature=0)
    # by length 3, 4, 5 | 9 | 30: within 6 tokens of the shortest and 6 rows at most
    assert calls == [(6, 5), (2, 9), (2, 30)]
    for p, seq in zip(prompts, out):
        alone = generate(model, torch.tensor([p] * 2), 6, temperature=0, stop_ids=eos)
        assert torch.equal(seq[:, :alone.shape[1]], alone) and (seq[:, alone.shape[1]:] == eos).all()
    assert (out[0][:, 3:] == eos).any()


def test_decoding_runs_compiled_blocks_eagerly():
    """With `stage.compile=true` the sample callback, pass-rate evaluation and GRPO rollouts decode through
    the compiled blocks. The prompt, the state and the one-token steps each recompiled every kind of block,
    until dynamo's recompile limit left later blocks uncompiled; decoding has CUDA graphs for speed."""
    model, reference = (tiny_model(layout="M,G,S,A", n_layers=4) for _ in range(2))
    for block in model.blocks:
        block.compile(backend="eager")  # dynamo's tracing and guards, without inductor's compile time
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        model(ids)  # what validation compiles
    frames = torch._dynamo.utils.counters["frames"]["total"]
    prompt = torch.randint(0, 97, (2, 5))
    assert torch.equal(model.generate(prompt, 6, temperature=0), reference.generate(prompt, 6, temperature=0))
    assert torch._dynamo.utils.counters["frames"]["total"] == frames


def test_seeded_sampling_repeats_and_another_seed_differs():
    model, prompt = tiny_model(), torch.randint(0, 97, (3, 4))

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_repetition_penalty_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 7))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(penalize_repeats(logits, seen, 1.7), theirs)


def test_a_strong_repetition_penalty_never_repeats_a_token():
    model = tiny_model()
    prompt = torch.tensor([[5, 6, 7]])
    plain = generate(model, prompt, 40, temperature=0)[0].tolist()
    assert len(set(plain)) < len(plain)  # this model repeats itself when left alone
    out = generate(model, prompt, 40, temperature=0, repetition_penalty=1e6)[0].tolist()
    assert len(set(out)) == len(out)


def test_each_row_stops_at_any_stop_token_and_is_padded_after_it():
    model, prompt = tiny_model(), torch.randint(0, 97, (4, 3))
    free = generate(model, prompt, 30, temperature=0)
    stops = sorted({int(free[0, 6]), int(free[1, 9])})  # tokens each of two rows is known to produce
    out = generate(model, prompt, 30, temperature=0, stop_ids=stops)
    for row, full in zip(out, free):
        generated = row[3:].tolist()
        first = next((i for i, t in enumerate(full[3:].tolist()) if t in stops), None)
        if first is None:
            assert generated == full[3 : 3 + len(generated)].tolist()
        else:
            assert generated[: first + 1] == full[3 : 3 + first + 1].tolist()
            assert all(t == stops[0] for t in generated[first + 1 :])
    # the batch ends as soon as every row has stopped, or at the budget
    ends = [next((i for i, t in enumerate(f[3:].tolist()) if t in stops), 29) for f in free]
    assert out.shape[1] == 3 + max(ends) + 1


def test_generation_never_runs_past_the_context():
    model = tiny_model()
    out = generate(model, torch.zeros(1, 60, dtype=torch.long), 100, temperature=0)
    assert out.shape == (1, 64)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, torch.zeros(1, 64, dtype=torch.long), 1)


def test_an_empty_prompt_is_refused_with_a_message_that_says_so():
    """The first token is predicted from the prompt's last position: an empty prompt (e.g. a sample prompt
    "" encoded) has none, and failed deep inside the model with an IndexError."""
    model = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_prompts(model, [[5, 6], []], 3, stop_id=0)


def test_text_that_may_begin_a_stop_string_is_held_back():
    assert held_back("the end</", ["</s>"]) == 2
    assert held_back("the end<", ["</s>", "<|im"]) == 1
    assert held_back("the end", ["</s>"]) == 0
    assert held_back("caf\ufffd", []) == 4  # half a UTF-8 character


def test_streamed_text_is_the_decoded_generation_cut_before_the_first_stop_string(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("apt installs").ids
    full = tokenizer.decode(generate(model, torch.tensor([prompt]), 30, temperature=0)[0, len(prompt):].tolist())
    assert "".join(stream_text(model, tokenizer, prompt, 30, temperature=0)) == full
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a string the model is known to produce
    pieces = list(stream_text(model, tokenizer, prompt, 30, temperature=0, stop_strings=[stop]))
    assert "".join(pieces) == full[: full.index(stop)]
    assert len(pieces) > 1  # streamed, not produced at the end


def test_streaming_stops_at_a_stop_token(tokenizer):
    model = tiny_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("dpkg").ids
    ids = generate(model, torch.tensor([prompt]), 30, temperature=0)[0, len(prompt):].tolist()
    stop = ids[5]
    expected = tokenizer.decode(ids[: ids.index(stop)])
    assert "".join(stream_text(model, tokenizer, prompt, 30, temperature=0, stop_ids=[stop])) == expected


@pytest.mark.parametrize("layout", ["A*2", "S*2", "G,H", "M*2"])
def test_static_decoding_state_gives_the_logits_of_the_growing_cache(layout):
    """The state CUDA graphs replay (device-side positions, the whole cache attended under a mask),
    run eagerly, against the ordinary cache: prefill, then steps past the sparse window."""
    from slmlab.models.decode_graph import static_decoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=300,
                      init_std=0.2, layout=layout, sliding_window=8, global_tokens=2, hgrn2_expand_ratio=16,
                      rope_layers="all", ssm_d_state=16, ssm_headdim=16)
    model = CausalLM(cfg).double().eval()
    prompt, tokens = torch.randint(0, 97, (3, 5)), torch.randint(0, 97, (12, 3))
    decoder = static_decoder(model, 3, 20, graph=False)
    for _ in range(2):  # the second run reuses the decoder: its state must be reset by prefill
        state = model.init_state(3, 20)
        with torch.no_grad():
            torch.testing.assert_close(decoder.prefill(model, prompt), model(prompt, state)[:, -1])
            for token in tokens:
                torch.testing.assert_close(decoder.step(model, token), model(token[:, None], state)[:, -1])


def test_static_decoders_are_reused_per_shape_and_round_the_cache_up():
    from slmlab.models.decode_graph import CACHE_BLOCK, release_decoders, static_decoder

    model = tiny_model()  # max_seq_len 64 < CACHE_BLOCK: the cache is capped at the context
    a = static_decoder(model, 2, 10, graph=False)
    assert static_decoder(model, 2, 50, graph=False) is a and a.state[0].k.shape[2] == 64
    assert static_decoder(model, 3, 10, graph=False) is not a
    big = CausalLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=4096))
    assert static_decoder(big, 1, CACHE_BLOCK + 1, graph=False).state[0].k.shape[2] == 2 * CACHE_BLOCK
    release_decoders(model)
    assert static_decoder(model, 2, 10, graph=False) is not a


def test_static_decoding_under_bf16_autocast_with_float32_weights():
    """As GRPO samples inside a bf16-mixed training step: float32 weights and caches, bf16 activations."""
    from slmlab.models.decode_graph import release_decoders, static_decoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
                      init_std=0.2, layout="A,M", ssm_d_state=16, ssm_headdim=16)
    model = CausalLM(cfg).eval()
    prompt, tokens = torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (6, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = static_decoder(model, 2, 11, graph=False)
        state = model.init_state(2, 11)
        torch.testing.assert_close(decoder.prefill(model, prompt), model(prompt, state)[:, -1])
        for token in tokens:
            # bf16 logits of |z| ~ 2: attention over the 64 cache slots vs the written ones sums in another
            # order (a few ulps); a wrong position or a lost state would be off by far more
            torch.testing.assert_close(decoder.step(model, token), model(token[:, None], state)[:, -1],
                                       rtol=0, atol=0.08)
    release_decoders(model)


def test_nucleus_sampling_keeps_the_smallest_prefix_whose_mass_reaches_top_p():
    """A prefix reaching top_p exactly ends the nucleus: of four equally likely tokens, top_p 0.5 keeps two
    (as Hugging Face's TopPLogitsWarper), not three."""
    generator = torch.Generator().manual_seed(0)
    for logits, top_p, kept in ((torch.zeros(1, 4), 0.5, 2), (torch.zeros(1, 4), 0.25, 1),
                                (torch.tensor([[0.5, 0.25, 0.25]]).log(), 0.5, 1),
                                (torch.tensor([[0.5, 0.25, 0.25]]).log(), 0.75, 2), (torch.zeros(1, 4), 0.0, 1)):
        draws = {int(sample_next(logits, top_p=top_p, generator=generator)) for _ in range(200)}
        assert len(draws) == kept, (logits, top_p, draws)


def test_sampling_settings_out_of_range_are_refused_naming_them():
    """A negative temperature sampled the least likely tokens and a negative penalty flipped the sign of seen
    tokens' logits, silently; a zero penalty, a negative top_k or top_p failed inside torch naming none of them."""
    model, prompt = tiny_model(), torch.randint(0, 97, (2, 4))
    for setting, message in (({"temperature": -0.7}, "temperature=-0.7 must be >= 0"),
                             ({"top_k": -1}, "top_k=-1 must be >= 0"),
                             ({"top_p": -0.1}, r"top_p=-0.1 must lie in \[0, 1\]"),
                             ({"top_p": 1.5}, r"top_p=1.5 must lie in \[0, 1\]"),
                             ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be > 0"),
                             ({"repetition_penalty": -1.1}, "repetition_penalty=-1.1 must be > 0")):
        with pytest.raises(ValueError, match=message):
            generate(model, prompt, 3, **setting)
