"""Evaluation suites run on the model being trained, at validation time, logged with the run's metrics."""

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from slmlab.eval.probes import DEFAULT_PROBES, load_probes, probe_report
from slmlab.eval.seed import seed_everything
from slmlab.models.decode_graph import release_decoders
from slmlab.training.callbacks import runs_rank_zeros_model_calls
from slmlab.training.strategies import shards_parameters

SUITES = ("probes", "lm_eval")
LM_EVAL_METRICS = ("acc", "acc_norm")  # as lm-eval defines them (acc_norm: per-byte normalised)


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Restores every random generator on exit: an evaluation re-seeds, but the training run it
    interrupts must go on drawing exactly what it would have drawn without it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class EvalSuites(Callback):
    """After every `every_n_validations`-th validation: contrastive probes (`eval/probes/<lang>/margin`,
    `.../accuracy`) and lm-evaluation-harness tasks (`eval/<task>/acc`, `.../acc_norm`), each after
    `seed_everything(seed)`. Rank 0 evaluates (under FSDP every rank, in step) and the others receive
    its numbers, so every rank logs the same values.

        python train.py +callbacks/eval=probes     # or =lm_eval: conf/callbacks/eval/
    """

    def __init__(self, suites: Sequence[str] = ("probes",), probes: str | None = None, tasks: Sequence[str] = (),
                 limit: int | float | None = None, num_fewshot: int | None = None, include_path: str | None = None,
                 batch_size: int = 16, seed: int = 1234, every_n_validations: int = 1) -> None:
        if unknown := set(suites) - set(SUITES):
            raise ValueError(f"callbacks.eval.suites: {sorted(unknown)} not among {SUITES}")
        if "lm_eval" in suites and not tasks:
            raise ValueError("callbacks.eval.suites has lm_eval: give callbacks.eval.tasks=[<task>, ...]")
        if every_n_validations < 1:  # else a ZeroDivisionError at the first validation, hours into the run
            raise ValueError(f"callbacks.eval.every_n_validations={every_n_validations}: must be at least 1 "
                             "(leave the callback out to evaluate never)")
        if batch_size < 1:
            raise ValueError(f"callbacks.eval.batch_size={batch_size} must be at least 1")
        self.suites, self.tasks, self.limit, self.num_fewshot = list(suites), list(tasks), limit, num_fewshot
        self.include_path = include_path  # a folder of extra task YAMLs
        self.probes = load_probes(probes or DEFAULT_PROBES) if "probes" in suites else None
        self.batch_size, self.seed, self.every = batch_size, seed, every_n_validations
        self.validations = 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every:
            return
        graphs = not shards_parameters(trainer.strategy)  # no CUDA-graph decoding of FSDP's gathers
        metrics = (self.evaluate(pl_module.model, trainer.datamodule, cuda_graph=graphs)
                   if runs_rank_zeros_model_calls(trainer) else None)
        metrics = trainer.strategy.broadcast(metrics)
        pl_module.log_dict(metrics)

    def state_dict(self) -> dict[str, int]:  # a resumed run evaluates after the same validations
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, datamodule: L.LightningDataModule,
                 cuda_graph: bool = True) -> dict[str, float]:
        was_training = model.training
        metrics = {}
        with rng_untouched():
            if "probes" in self.suites:
                seed_everything(self.seed)
                report = probe_report(model.eval(), datamodule.tokenizer, self.probes, self.batch_size)
                metrics |= {f"eval/probes/{group}/{k}": float(row[k]) for group, row in report.items()
                            for k in ("margin", "accuracy")}
            if "lm_eval" in self.suites:
                seed_everything(self.seed)
                metrics |= self.lm_eval(model, str(datamodule.tokenizer_path), cuda_graph)
        model.train(was_training)
        return metrics

    def lm_eval(self, model: torch.nn.Module, tokenizer: str, cuda_graph: bool = True) -> dict[str, float]:
        import lm_eval  # optional: pip install -e ".[eval]"
        from lm_eval.tasks import TaskManager

        from slmlab.eval.lm_eval_adapter import SlmlabLM

        device = str(next(model.parameters()).device)
        results = lm_eval.simple_evaluate(
            model=SlmlabLM(model, tokenizer, self.batch_size, device=device, cuda_graph=cuda_graph), tasks=self.tasks,
            num_fewshot=self.num_fewshot, limit=self.limit, log_samples=False,
            task_manager=TaskManager(include_path=self.include_path),
            **{f"{kind}_seed": self.seed for kind in ("random", "numpy_random", "torch_random", "fewshot_random")})
        # the decoders its generation kept (KV caches, CUDA graphs: gigabytes at 2B) would stay allocated
        # for the rest of training; a later rollout or evaluation makes its own again
        release_decoders(model)
        return {f"eval/{task}/{name}": float(value) for task, row in results["results"].items()
                for key, value in row.items() if (name := key.split(",")[0]) in LM_EVAL_METRICS}
