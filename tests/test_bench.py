"""`bench/throughput.py --smoke`: the benchmark the README's GPU numbers come from, at tiny shapes on the CPU."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

COLUMNS = ["model", "impl", "seq", "batch", "tokens_per_s", "mfu", "peak_GiB", "MiB_per_token", "ratio"]


def throughput_table(*args: str) -> dict[tuple[str, str], dict[str, str]]:
    """Runs the benchmark; its final table as {(model, impl): row}."""
    proc = subprocess.run([sys.executable, "bench/throughput.py", *args, "--smoke", "--warmup", "1", "--iters", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "impl"])
    table = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        row = dict(zip(COLUMNS, cells + [""] * (len(COLUMNS) - len(cells))))
        table[row["model"], row["impl"]] = row
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
