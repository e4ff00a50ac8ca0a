"""Evaluation of slmlab models: bits-per-byte on validation data, contrastive knowledge probes,
and lm-evaluation-harness tasks (`python -m slmlab.eval`; `lm_eval_adapter.py` for the harness)."""

from slmlab.eval.bpb import bits_per_byte
from slmlab.eval.probes import load_probes, probe_report
from slmlab.eval.seed import seed_everything

__all__ = ["bits_per_byte", "load_probes", "probe_report", "seed_everything"]
