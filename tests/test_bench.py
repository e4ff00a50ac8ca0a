"""`bench/throughput.py --smoke` and `bench/ops.py --smoke`: the benchmarks the README's GPU numbers come from,
at tiny shapes on the CPU."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

def throughput_table(*args: str, script: str = "bench/throughput.py") -> dict[tuple[str, str], dict[str, str]]:
    """Runs the benchmark; its final table as {(model, layer or op, impl): row}."""
    proc = subprocess.run([sys.executable, script, *args, "--smoke", "--warmup", "1", "--iters", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[1:2] == ["impl"])
    columns = lines[start].split()
    table = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        row = dict(zip(columns, cells + [""] * (len(columns) - len(cells))))  # an empty last cell (ratio)
        table[row[columns[0]], row["impl"]] = row
    return table


def tokens_per_s(row: dict[str, str]) -> float:
    return float(row["tokens_per_s"].replace(",", ""))


def test_model_rows_compare_each_model_with_its_baseline_from_the_same_run():
    table = throughput_table("models")
    comparisons = {("helix_hybrid", "ours"): ("helix_hybrid: all-attention twin", "ours"),
                   ("odinnext", "ours"): ("odinnext: all-attention twin", "ours"),
                   ("helios_nova", "ours"): ("helios_nova", "hf+compile")}
    assert set(table) == set(comparisons) | set(comparisons.values()) | {("helium_nano", "ours")}
    for row, baseline in comparisons.items():
        expected = tokens_per_s(table[row]) / tokens_per_s(table[baseline])
        assert float(table[row]["ratio"]) == pytest.approx(expected, rel=5e-3), row
    assert table[("helium_nano", "ours")]["ratio"] == ""  # no baseline


def test_compiled_rows_name_the_mode_and_compare_with_the_twin_in_the_same_mode():
    table = throughput_table("models", "--only", "helix_hybrid", "--compile", "--compile-mode", "reduce-overhead")
    impl = "ours +compile(reduce-overhead)"
    assert set(table) == {("helix_hybrid", impl), ("helix_hybrid: all-attention twin", impl)}
    expected = tokens_per_s(table["helix_hybrid", impl]) / tokens_per_s(table["helix_hybrid: all-attention twin", impl])
    assert float(table["helix_hybrid", impl]["ratio"]) == pytest.approx(expected, rel=5e-3)


def test_layer_rows_time_every_mixer_and_each_recurrent_or_sparse_one_against_its_pytorch_reference():
    table = throughput_table("layers")
    mixers = ("sparse_attention", "gla", "mamba2", "hgrn2")
    # no kernel library on the CPU: its rows are left out; odinnext's first HGRN2 layer rotates (RoPE)
    expected = {("attention", "ours"), ("hgrn2", "ours +RoPE")} | {(m, i) for m in mixers for i in ("ours", "ours, torch reference")}
    assert set(table) == expected
    assert all(float(row["ms"]) > 0 and float(row["saved_KiB_per_token"]) > 0 for row in table.values())


@pytest.mark.parametrize("model,ops", [("helios_nova", ("silu_mul", "qk_norm_rope")),
                                       ("helix_hybrid", ("silu_mul", "qk_norm_rope", "causal_conv1d_silu"))])
def test_op_rows_time_each_triton_op_of_the_preset_against_its_reference_and_agree_with_it(model, ops):
    table = throughput_table("--model", model, script="bench/ops.py")
    assert set(table) == {(op, impl) for op in ops for impl in ("slmlab", "reference")}
    for op in ops:
        ours, reference = table[op, "slmlab"], table[op, "reference"]
        assert float(ours["ratio"]) == pytest.approx(float(reference["fwd_bwd_us"].replace(",", ""))
                                                     / float(ours["fwd_bwd_us"].replace(",", "")), rel=1.5e-2)  # 3 digits
        assert float(ours["max_error"]) < 2e-2  # bf16 outputs: the Triton op computes the reference's function


def test_pipeline_rows_run_train_py_with_the_accumulation_and_compare_with_the_twin_at_the_same_batch():
    before = set((ROOT / "outputs").glob("bench-pipeline-*"))
    try:
        # an accumulation that does not divide 100,000 and fewer steps than the default warmup: the bench
        # fits its validation interval and warmup to the run
        table = throughput_table("pipeline", "--accumulate", "3", "--pipeline-steps", "18")
    finally:
        for run in set((ROOT / "outputs").glob("bench-pipeline-*")) - before:
            shutil.rmtree(run)
    assert set(table) == {("tiny", "train.py"), ("tiny", "hf+compile")}
    ours, hf = table["tiny", "train.py"], table["tiny", "hf+compile"]
    assert ours["batch"] == hf["batch"] == "2x3"  # micro-batch x accumulation, the same for both
    # train.py's own throughput windows (one per 10 optimizer steps of 3 micro-batches), the first dropped
    assert tokens_per_s(ours) > 0 and 0 <= float(ours["data_wait"]) < 1 and float(ours["startup_s"]) > 0
    assert float(ours["ratio"]) == pytest.approx(tokens_per_s(ours) / tokens_per_s(hf), rel=5e-3)
