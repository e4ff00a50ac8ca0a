"""chat.py: the ChatML prompt, streamed greedy answers, stop tokens, context-bounded history."""

import pytest
import torch

from chat import Chat, main, parse_args
from slmlab.data.chat import encode_chat
from slmlab.export.load import load_pretrained
from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models.generate import generate

pytest_plugins = ["tests.model_fixtures"]  # `tiny_runs`


@pytest.fixture(scope="module")
def run(tiny_runs):
    return tiny_runs[True]


def expected_answer(run, messages: list[dict], max_new_tokens: int) -> str:
    tokens = TokenizerFiles.load(run.tokenizer)
    model = load_pretrained(run.ckpt)
    ids, _ = encode_chat(tokens.tokenizer, messages, add_generation_prompt=True)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0)[0, len(ids):].tolist()
    stops = {tokens.token_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|pad|>")}
    end = next((i for i, t in enumerate(out) if t in stops), len(out))
    return tokens.tokenizer.decode(out[:end])


def test_one_shot_prompt_prints_the_greedy_chat_answer(run, capsys):
    main([f"ckpt={run.ckpt}", f"tokenizer={run.tokenizer}", "temperature=0", "repetition_penalty=1.0",
          "max_new_tokens=10", "--prompt", "What is apt?"])
    printed = capsys.readouterr().out
    assert printed == expected_answer(run, [{"role": "user", "content": "What is apt?"}], 10) + "\n"


def test_the_tokenizer_comes_from_a_chat_data_config_and_arguments_may_follow_the_prompt(run, capsys):
    # chat data configs name their tokenizer by its path alone, pretraining ones by a table
    artifacts = run.tokenizer.parents[2]
    main([f"ckpt={run.ckpt}", "data=chat_embedded", f"paths.artifacts={artifacts}", "--prompt", "What is apt?",
          "temperature=0", "repetition_penalty=1.0", "max_new_tokens=10"])
    printed = capsys.readouterr().out
    assert printed == expected_answer(run, [{"role": "user", "content": "What is apt?"}], 10) + "\n"


def test_history_is_kept_and_dropped_oldest_first_to_fit_the_context(run):
    tokens = TokenizerFiles.load(run.tokenizer)
    model = load_pretrained(run.ckpt)
    args, _, _ = parse_args([f"ckpt={run.ckpt}", "temperature=0", "max_new_tokens=2", "system=Be brief."])
    chat = Chat(model, tokens, args)
    for question in ("What is apt?", "And dpkg?", "Wie geht das?"):
        "".join(chat.answer(question))
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3
    chat.messages.append({"role": "user", "content": "Und apt?"})  # what answer() does first
    ids = chat.prompt_ids()
    assert len(ids) <= model.cfg.max_seq_len - 2  # room left for the answer (the tiny model's context is 32)
    text = tokens.tokenizer.decode(ids, skip_special_tokens=False)
    assert "Be brief." in text and "Und apt?" in text and "What is apt?" not in text
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_bad_arguments_are_named(run, capsys):
    with pytest.raises(SystemExit):
        parse_args([f"ckpt={run.ckpt}", "temperature=hot"])
    assert "temperature='hot' is not a float" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before the model loads, not a traceback from int() after it
        parse_args([f"ckpt={run.ckpt}", "seed=abc"])
    assert "seed='abc' is not a int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([f"ckpt={run.ckpt}", "max_new_tokens=0"])
    assert "max_new_tokens=0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model not found: nowhere.ckpt"):
        main(["ckpt=nowhere.ckpt", "--prompt", "hi"])
    with pytest.raises(SystemExit, match="error: device='gpu0': "):  # an error line, not a traceback
        main([f"ckpt={run.ckpt}", "device=gpu0", "--prompt", "hi"])


def test_sampling_settings_out_of_range_are_named_before_the_model_loads(capsys):
    """repetition_penalty=0 failed at the first answer with torch's "probability tensor contains inf";
    temperature=-0.7 sampled the least likely tokens."""
    for arg, message in (("repetition_penalty=0", "repetition_penalty=0.0 must be > 0"),
                         ("temperature=-0.7", "temperature=-0.7 must be >= 0"),
                         ("top_p=2", "top_p=2.0 must lie in [0, 1]"), ("top_k=-5", "top_k=-5 must be >= 0")):
        with pytest.raises(SystemExit):
            parse_args(["ckpt=never_loaded.ckpt", arg])
        assert message in capsys.readouterr().err, arg
