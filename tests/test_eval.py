"""Evaluation: seeding, bits-per-byte, contrastive probes, the lm-eval adapter and the CLI."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from slmlab.data.tokenizer import load_tokenizer, train_tokenizer
from slmlab.eval import bits_per_byte, load_probes, probe_report, seed_everything
from slmlab.eval.__main__ import main as eval_main
from slmlab.eval.callback import EvalSuites
from slmlab.eval.probes import DEFAULT_PROBES, item_margins
from slmlab.eval.scoring import encode_pair, score_continuations
from slmlab.export import export_safetensors_folder, load_pretrained
from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.generate import generate
from slmlab.training.batching import document_positions
from tests.conftest import ROOT, compose_config, metric, tiny_run_overrides
from train import train

pytest_plugins = ["tests.model_fixtures"]  # `tiny_runs`, trained once for both test modules

LM_EVAL_TASKS = ROOT / "tests" / "assets" / "lm_eval"


def test_seed_everything_repeats_every_generator():
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]


def test_bits_per_byte_matches_a_hand_count_and_repeats(tiny_runs):
    run = tiny_runs[True]
    model = load_pretrained(run.ckpt)
    datamodule = instantiate(compose_config(run.overrides).data)
    result = bits_per_byte(model, datamodule)
    assert bits_per_byte(model, datamodule) == result
    nats = bytes_ = 0.0
    for name, loader in zip(datamodule.val_sources, datamodule.val_dataloader()):
        batches = list(loader)
        inputs, labels = torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])
        with torch.no_grad():  # the mean over every token of the split at once, then scaled back to a sum
            mean = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).item()
        split = datamodule.manifests[name].splits["val"]
        source_nats, source_bytes = mean * labels.numel(), labels.numel() * split.bytes / split.tokens
        assert result[name]["loss"] == pytest.approx(mean, rel=1e-5)
        assert result[name]["bpb"] == pytest.approx(source_nats / math.log(2) / source_bytes, rel=1e-5)
        nats, bytes_ = nats + source_nats, bytes_ + source_bytes
    assert result["overall"]["bpb"] == pytest.approx(nats / math.log(2) / bytes_, rel=1e-5)


def test_bits_per_byte_with_document_mask_models_each_document_alone(tiny_runs):
    """As validation of a run with `stage.document_mask=true` does: the positions restart after each EOS."""
    run = tiny_runs[True]
    model = load_pretrained(run.ckpt)
    datamodule = instantiate(compose_config(run.overrides).data)
    result = bits_per_byte(model, datamodule, document_mask=True)
    name = datamodule.val_sources[0]
    batches = list(datamodule.val_dataloader()[0])
    inputs, labels = torch.cat([b["input_ids"] for b in batches]), torch.cat([b["labels"] for b in batches])
    assert (inputs == datamodule.eos_id).any()  # blocks that span documents, else nothing to tell apart
    with torch.no_grad():
        logits = model(inputs, positions=document_positions(inputs, datamodule.eos_id))
    mean = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    # the tiny model tells the two apart by about 1e-5 of the loss
    assert result[name]["loss"] == pytest.approx(mean, rel=1e-6)
    assert result[name]["loss"] != pytest.approx(bits_per_byte(model, datamodule)[name]["loss"], rel=1e-6)


def test_probe_margin_is_the_mean_nll_gap_per_token(tiny_runs):
    run = tiny_runs[False]
    model, tokenizer = load_pretrained(run.ckpt), load_tokenizer(run.tokenizer)
    item = {"prompt": "Das Debian-Paketsystem", "correct": " apt install foo", "wrong": [" rm -rf /", " Strg-Alt-Entf"]}

    def nll(continuation: str) -> float:
        """Mean NLL of the continuation's tokens, from one forward pass over EOS + prompt + continuation."""
        prompt = tokenizer.encode(item["prompt"]).ids
        ids = [tokenizer.token_to_id("<|endoftext|>"), *tokenizer.encode(item["prompt"] + continuation).ids]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        targets = range(1 + len(prompt), len(ids))
        return -sum(logprobs[t - 1, ids[t]].item() for t in targets) / len(targets)

    expected = (nll(item["wrong"][0]) + nll(item["wrong"][1])) / 2 - nll(item["correct"])
    assert item_margins(model, tokenizer, [item])[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    report = probe_report(model, tokenizer, [item, {**item, "lang": "de"}])
    assert report["all"] == {"margin": pytest.approx(expected, rel=1e-5, abs=1e-6), "accuracy": float(expected > 0),
                             "items": 2}


def test_the_shipped_probes_cover_both_languages():
    items = load_probes(DEFAULT_PROBES)
    assert len(items) >= 60
    assert {lang: sum(i["lang"] == lang for i in items) >= 30 for lang in ("en", "de")} == {"en": True, "de": True}
    assert all(i["correct"] not in i["wrong"] for i in items)
    assert any("GNU General Public License" in i["prompt"] and i["correct"] == " 2 or higher" for i in items)


def test_a_malformed_probes_file_names_its_line(tmp_path):
    path = tmp_path / "probes.jsonl"
    good = json.dumps({"prompt": "p", "correct": " a", "wrong": [" b"]})
    path.write_text(f"{good}\n\n{{'prompt': 1}}\n")
    with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
        load_probes(path)
    path.write_text(f"{good}\n" + json.dumps({"prompt": "p", "correct": " a", "wrong": []}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: a probe needs prompt, correct and a non-empty wrong list"):
        load_probes(path)
    for bad in ({"correct": "", "wrong": [" b"]}, {"correct": " a", "wrong": [" b", ""]}, {"correct": " a", "wrong": " b"}):
        path.write_text(f"{good}\n" + json.dumps({"prompt": "p", **bad}) + "\n")
        with pytest.raises(ValueError, match=f"{path}:2: a probe's correct answer and each of its wrong list are non-empty"):
            load_probes(path)


def test_lm_eval_accuracy_is_the_argmax_of_the_adapters_loglikelihoods(tiny_runs, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from slmlab.eval.lm_eval_adapter import SlmlabLM  # registers the `slmlab` model

    run = tiny_runs[True]
    monkeypatch.chdir(ROOT)  # the task's data file path is relative to the repository
    results = lm_eval.simple_evaluate(
        model="slmlab", model_args=f"ckpt={run.ckpt},tokenizer={run.tokenizer},batch_size=4",
        tasks=["slmlab_debian_mc"], task_manager=TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False),
    )["results"]["slmlab_debian_mc"]

    lm = SlmlabLM(str(run.ckpt), str(run.tokenizer), batch_size=2)
    docs = [json.loads(line) for line in (LM_EVAL_TASKS / "debian_mc.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    for doc in docs:  # lm-eval joins question and choice with a space; acc_norm divides by characters
        lls = np.array([ll for ll, _ in lm.loglikelihood([SimpleNamespace(args=(doc["question"], " " + c))
                                                          for c in doc["choices"]])])
        hits += int(np.argmax(lls) == doc["answer"])
        hits_norm += int(np.argmax(lls / [len(c) for c in doc["choices"]]) == doc["answer"])
    assert (results["acc,none"], results["acc_norm,none"]) == (hits / len(docs), hits_norm / len(docs))


def test_adapter_rolling_loglikelihood_and_generation(tiny_runs):
    pytest.importorskip("lm_eval")
    from slmlab.eval.lm_eval_adapter import SlmlabLM

    run = tiny_runs[False]
    lm = SlmlabLM(str(run.ckpt), str(run.tokenizer), batch_size=3)
    model, tokenizer = lm.model, lm.tokenizer
    eos = tokenizer.token_to_id("<|endoftext|>")
    # more than two windows of max_seq_len predicted tokens; each window sees the max_seq_len tokens before
    # its last prediction (lm-eval's rolling windows), the first one starting from EOS
    text = "Die Paketquellen für APT stehen in der Datei /etc/apt/sources.list. " * 4
    ids, window = tokenizer.encode(text).ids, model.cfg.max_seq_len
    assert len(ids) > 2 * window
    seq, expected = [eos, *ids], 0.0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            end = min(start + window, len(ids))
            logprobs = model(torch.tensor([seq[max(0, end - window):end]]))[0, start - end:].log_softmax(-1)
            expected += logprobs[torch.arange(end - start), ids[start:end]].sum().item()
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0] == pytest.approx(expected, rel=1e-5)

    prompt = "Das Debian-Paketsystem"
    greedy = generate(model, torch.tensor([[eos, *tokenizer.encode(prompt).ids]]), 12, temperature=0, stop_ids=eos)
    full = tokenizer.decode(greedy[0, len(tokenizer.encode(prompt).ids) + 1:].tolist(), skip_special_tokens=False)
    assert len(full) >= 5
    stop = full[3:5]  # a stop string the greedy text contains
    (out,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 12}))])
    assert out == full[:full.index(stop)]
    # an empty stop string, as some task configs carry, stops nothing
    (out,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["", stop], "max_gen_toks": 12}))])
    assert out == full[:full.index(stop)]
    no_stop = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [], "max_gen_toks": 12}))])
    assert lm.generate_until([SimpleNamespace(args=(prompt, {"until": "", "max_gen_toks": 12}))]) == no_stop
    assert len(no_stop[0]) > len(out)
    # requests of other lengths and budgets, decoded batch_size at a time: what each gives alone
    requests = [SimpleNamespace(args=(text, {"until": [], "max_gen_toks": budget})) for text, budget in [
        ("Das Debian-Paketsystem", 12), ("apt", 8), ("Die Paketquellen für APT stehen in", 12), ("dpkg", 12),
        ("Mit sudo apt install", 8)]]
    alone = [lm.generate_until([r])[0] for r in requests]
    assert lm.generate_until(requests) == alone and len(set(alone)) > 1


def test_eval_cli_prints_the_same_tables_twice(tiny_runs, capsys):
    run = tiny_runs[True]
    argv = [f"ckpt={run.ckpt}", "suite=bpb,probes", f"tokenizer={run.tokenizer}",
            *[o for o in run.overrides if o.startswith("paths.artifacts=")]]
    eval_main(argv)
    first = capsys.readouterr().out
    eval_main(argv)
    assert capsys.readouterr().out == first
    for text in ("== bpb", "overall", "en", "de", "== probes", "margin", "accuracy"):
        assert text in first
    with pytest.raises(SystemExit, match="suite=lm_eval needs tasks="):
        eval_main([f"ckpt={run.ckpt}", "suite=lm_eval"])


def test_eval_callback_refuses_a_period_below_one_validation_naming_the_key():
    # `validations % every` at each validation: 0 would fail there, with a ZeroDivisionError naming nothing
    for every in (0, -1):
        with pytest.raises(ValueError, match=f"callbacks.eval.every_n_validations={every}: must be at least 1"):
            EvalSuites(every_n_validations=every)


def test_eval_callback_logs_the_suites_during_training_without_changing_the_run(tmp_path):
    pytest.importorskip("lm_eval")
    base = tiny_run_overrides(tmp_path / "plain", steps=8, val_every=4)
    train(compose_config(base))
    evaluated = tiny_run_overrides(tmp_path / "eval", steps=8, val_every=4) + [
        "+callbacks/eval=lm_eval", "callbacks.eval.tasks=[slmlab_debian_mc]", f"callbacks.eval.include_path={LM_EVAL_TASKS}",
        "callbacks.eval.every_n_validations=1", "callbacks.eval.batch_size=4"]
    train(compose_config(evaluated))
    loss = {name: metric(tmp_path / name / "run", "train/loss") for name in ("plain", "eval")}
    # evaluation re-seeds, yet the training run draws the same batches and noise as without it
    assert loss["eval"] == loss["plain"] and len(loss["plain"]) == 4
    margins = metric(tmp_path / "eval" / "run", "eval/probes/all/margin")
    accuracies = metric(tmp_path / "eval" / "run", "eval/slmlab_debian_mc/acc")
    assert len(margins) == len(accuracies) == 2  # one per validation
    # the last logged numbers are those of the final weights, as the evaluation CLI computes them
    run = tmp_path / "eval" / "run"
    report = probe_report(load_pretrained(run / "checkpoints" / "last.ckpt"),
                          TokenizerFiles.load(compose_config(evaluated).data.tokenizer.path).tokenizer,
                          load_probes(DEFAULT_PROBES), batch_size=4)
    assert margins[-1] == pytest.approx(report["all"]["margin"], rel=1e-5)


def test_the_eval_callback_frees_the_decoders_kept_for_the_model(tiny_runs, monkeypatch):
    """Decoders (KV caches, CUDA graphs) kept for the trained model would hold their memory for the rest
    of training after lm-eval's generation."""
    pytest.importorskip("lm_eval")
    from slmlab.models import decode_graph

    run = tiny_runs[True]
    monkeypatch.chdir(ROOT)  # the task's data file path is relative to the repository
    model = load_pretrained(run.ckpt)
    decode_graph.static_decoder(model, 2, 10, graph=False)
    assert model in decode_graph._decoders
    suites = EvalSuites(suites=["lm_eval"], tasks=["slmlab_debian_mc"], include_path=str(LM_EVAL_TASKS), limit=2,
                        batch_size=2)
    metrics = suites.evaluate(model, SimpleNamespace(tokenizer_path=run.tokenizer), cuda_graph=False)
    assert "eval/slmlab_debian_mc/acc" in metrics and model not in decode_graph._decoders


def test_eval_cli_names_a_tokenizer_larger_than_the_models_vocabulary(tmp_path):
    """The probes' token ids then run past the embedding: an IndexError from inside torch, naming no file."""
    train_tokenizer(DEFAULT_PROBES.read_text(encoding="utf-8").splitlines() * 5, 1000, tmp_path / "tokenizer.json",
                    min_frequency=1)
    model = CausalLM(ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, ffn_hidden=16, max_seq_len=64))
    folder = export_safetensors_folder(model, tmp_path / "model")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'tokenizer.json'} has 1000 tokens but the model only 300"):
        eval_main([f"ckpt={folder}", "suite=probes", f"tokenizer={tmp_path / 'tokenizer.json'}"])


def test_a_probe_whose_answer_merges_into_the_prompts_last_token_is_named(tiny_runs):
    """The prompt "Install it with ap" and the answer "t" tokenize as "Install it with" + " apt": the answer has
    no token of its own, and its NLL per token was 0 / 0, a ZeroDivisionError naming no probe."""
    run = tiny_runs[True]
    tokenizer = load_tokenizer(run.tokenizer)
    item = {"prompt": "Install it with ap", "correct": "t", "wrong": [" dpkg"]}
    assert encode_pair(tokenizer, item["prompt"], item["correct"])[1] == []  # the premise
    with pytest.raises(ValueError, match="probe 'Install it with ap': the answer 't' has no token of its own"):
        item_margins(load_pretrained(run.ckpt), tokenizer, [item])


def test_a_batch_size_below_one_is_refused_naming_it():
    """0 failed in range() naming no setting; a negative size scored nothing, and the probes then failed on None."""
    model = CausalLM(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, ffn_hidden=16, max_seq_len=16))
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size={batch_size} must be at least 1"):
            score_continuations(model, [([1, 2], [3])], batch_size)
        with pytest.raises(ValueError, match=f"callbacks.eval.batch_size={batch_size} must be at least 1"):
            EvalSuites(batch_size=batch_size)
    pytest.importorskip("lm_eval")
    from slmlab.eval.lm_eval_adapter import SlmlabLM

    with pytest.raises(ValueError, match="batch_size='0': give a number of at least 1"):  # before the model loads
        SlmlabLM("never_loaded.ckpt", "tokenizer.json", batch_size="0")
