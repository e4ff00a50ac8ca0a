"""Callbacks that make a run report itself: throughput and MFU, a progress bar, a console summary, a
text sample."""

import itertools
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, WeightAveraging

from slmlab.data.chat import encode_chat
from slmlab.models.generate import generate
from slmlab.training.losses import IGNORE_INDEX
from slmlab.training.strategies import shards_parameters

# dense bf16 tensor-core peak, FLOP/s, by substring of torch.cuda.get_device_name(): the first that matches,
# so a name that contains another comes before it ("H100 PCIe" before "H100", "L40S" before "L40" before "L4")
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def token_tensors(batch, suffix: str = "ids") -> list[torch.Tensor]:
    """The token-id tensors of a batch ("input_ids", "chosen_ids", ...), or with suffix "labels" its
    label tensors; none for other batch types."""
    if not isinstance(batch, dict):
        return []
    return [v for k, v in batch.items() if k.endswith(suffix) and isinstance(v, torch.Tensor)]


def runs_rank_zeros_model_calls(trainer: L.Trainer) -> bool:
    """Whether this rank runs the model calls rank 0 makes in a callback (samples, evaluations): rank 0
    alone, except under FSDP, where every forward gathers each block's parameters from all ranks, so
    every rank makes the same calls (rank 0 alone would wait for the others forever)."""
    return trainer.is_global_zero or shards_parameters(trainer.strategy)


def console_print(trainer: L.Trainer, text: str) -> None:
    """Prints on rank 0, above the progress bar where there is one."""
    if trainer.is_global_zero:
        bar = trainer.progress_bar_callback
        bar.print(text) if bar is not None else print(text, flush=True)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_loading_seconds(trainer: L.Trainer) -> float | None:
    """Seconds this process has waited for training batches, from datamodules that count them."""
    return getattr(trainer.datamodule, "train_loading_seconds", None)


def seconds_since_launch() -> float | None:
    """How long this process has run, from the kernel's records (Linux); None where there are none."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class ThroughputMonitor(Callback):
    """Logs perf/tokens_per_s (the positions of the batches, padding included), perf/loss_tokens_per_s
    (the tokens with a label, this rank's times the number of ranks: what SFT packing raises), perf/mfu
    (CUDA, from the model's own FLOPs per token at each batch's shape, step and packed documents) and
    perf/data_wait: the fraction of wall time spent waiting for training batches (the datamodule's
    `train_loading_seconds`, where it has one). The host runs ahead of the GPU, so that is the most the
    GPU can have waited for data. A window runs from the end of one logging step to the end of the next,
    so it holds each of its batches' loading once; validation time is excluded. Once, perf/startup_s:
    launch to the end of the first optimizer step this process ran (imports, data, model, compilation,
    kernel autotuning), also printed; in a process that runs several jobs one after another (a Hydra
    multirun), each later job's from its own start (this callback's construction)."""

    built_in_process = 0  # a Hydra multirun builds one per job, one job after another

    def __init__(self, log_every_n_steps: int = 10, peak_flops_per_device: float | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.peak = peak_flops_per_device
        ThroughputMonitor.built_in_process += 1
        self._job_start = None if ThroughputMonitor.built_in_process == 1 else time.perf_counter()
        self._first_step = self._seen_step = 0  # the step this process started from (a resumed run's), the last seen
        self._t0: float | None = None

    def _start_window(self, trainer: L.Trainer) -> None:
        self._t0 = time.perf_counter()
        self._loading0 = train_loading_seconds(trainer)
        self._tokens, self._flops, self._loss_tokens = 0, 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = self._seen_step = trainer.global_step
        self._peak = self.peak or peak_flops(pl_module.device)
        self._start_window(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = None  # the window's steps so far are dropped with the validation's time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._start_window(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._t0 is None:
            self._start_window(trainer)
        tokens = token_tensors(batch)
        # at the batch's own step: the last micro-batch ends after the step counter has moved on (a token
        # superposition phase may end there); a device tensor for packed documents, read with the window's metrics
        self._batch_flops = (pl_module.flops_per_data_token(tokens[0].shape[1], batch)
                             if self._peak and tokens else 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        tokens = sum(t.numel() for t in token_tensors(batch)) * trainer.world_size
        self._tokens += tokens
        # a device tensor, read with the window's metrics (no wait for the GPU per batch)
        labelled = sum((t != IGNORE_INDEX).sum() for t in token_tensors(batch, "labels"))
        self._loss_tokens += labelled * trainer.world_size
        self._flops += tokens * self._batch_flops
        step = trainer.global_step  # advances once per optimizer step, i.e. after the last micro-batch
        if step == self._seen_step:  # inside an accumulation
            return
        self._seen_step = step
        if step == self._first_step + 1:
            self._log_startup(trainer, pl_module)
        if not tokens or step % self.log_every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        metrics = {"perf/tokens_per_s": self._tokens / elapsed}
        if token_tensors(batch, "labels"):
            metrics["perf/loss_tokens_per_s"] = float(self._loss_tokens) / elapsed
        if self._loading0 is not None:
            metrics["perf/data_wait"] = (train_loading_seconds(trainer) - self._loading0) / elapsed
        if self._peak:
            metrics["perf/mfu"] = float(self._flops) / elapsed / (self._peak * trainer.world_size)
        pl_module.log_dict(metrics)
        self._start_window(trainer)

    def _log_startup(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # the step has run, not just been queued
        seconds = seconds_since_launch() if self._job_start is None else time.perf_counter() - self._job_start
        if seconds is None:
            return
        # to the loggers directly: through `pl_module.log` Lightning repeats a step metric on every later row
        for logger in trainer.loggers:
            logger.log_metrics({"perf/startup_s": seconds}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"first optimizer step done {seconds:.1f} s after launch", flush=True)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading training metrics back only every `metrics_every_n_steps`
    optimizer steps. Reading a metric (`.item()`) waits for the GPU to finish every queued kernel; done
    after each step, it leaves the GPU idle while Python fetches the next batch and launches its kernels.

    Lightning converts every metric logged with `prog_bar=True` to a number after every batch, whether or
    not a bar shows it, so the stages log their training metrics without it: the bar shows `train_keys`
    from the trainer's callback metrics (device tensors until read), and what is logged with `prog_bar`.
    """

    def __init__(self, metrics_every_n_steps: int = 10, train_keys: tuple[str, ...] = ("train/loss", "train/reward"),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self.train_keys = tuple(train_keys)
        self._shown: dict[str, Any] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if trainer.training and trainer.global_step % self.metrics_every_n_steps and self._shown:
            return self._shown
        metrics = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        metrics.update({key: float(logged[key]) for key in self.train_keys if key in logged})
        self._shown = metrics
        return metrics

    @property
    def total_train_batches(self) -> int | float:
        # Lightning gives the optimizer steps left, but the bar counts the epoch's batches from its first: a
        # resumed run read "40/19", accumulation "20/10". The stream is one epoch that max_steps ends.
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps > 0:
            return min(trainer.num_training_batches, trainer.max_steps * trainer.accumulate_grad_batches)
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/{max_epochs - 1}", "Epoch 0/-2" for the runs max_steps ends (max_epochs -1)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}".ljust(len(self.validation_description))
        return super()._get_train_description(current_epoch)


def model_line(model: torch.nn.Module) -> str:
    """One line on a CausalLM: parameters, layers by mixer, and the training FLOPs per token that MFU uses."""
    cfg = model.cfg
    layers = ", ".join(f"{name} x{len(list(run))}" for name, run in itertools.groupby(cfg.layer_mixers))
    flops = model.flops_per_token(cfg.max_seq_len)
    flops_text = f"{flops / 1e9:.3g} GFLOPs" if flops >= 1e9 else f"{flops / 1e6:.3g} MFLOPs"
    return (f"model: {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} without the "
            f"embedding), {cfg.n_layers} layers ({layers}), d_model {cfg.d_model}; {flops_text} per token "
            f"trained at seq {cfg.max_seq_len}")


class ConsoleSummary(Callback):
    """Prints the model in one line before training (in place of Lightning's summary table, whose FLOPs
    column reads 0 without an example input), one line per validation and a summary at the end, so a
    plain log shows the run."""

    KEYS = ("train/loss", "val/loss", "val/bpb")

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, float]] = {}  # key -> (step, value) when first seen
        self.last: dict[str, tuple[int, float]] = {}
        self.tokens_per_s: list[float] = []

    def _record(self, trainer: L.Trainer) -> dict[str, float]:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        for key in self.KEYS:
            if key in metrics:
                self.first.setdefault(key, (trainer.global_step, metrics[key]))
                self.last[key] = (trainer.global_step, metrics[key])
        return metrics

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the strategy wraps or shards the model (FSDP)
            console_print(trainer, model_line(pl_module.model))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if "train/loss" not in self.first:
            self._record(trainer)  # the loss before training has taught the model anything

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._record(trainer)
        if "perf/tokens_per_s" in metrics:
            self.tokens_per_s.append(metrics["perf/tokens_per_s"])
        parts = [f"step {trainer.global_step:>6}", f"train loss {metrics.get('train/loss', math.nan):.4f}",
                 f"val loss {metrics.get('val/loss', math.nan):.4f}"]
        per_source = "  ".join(f"{k[4:-4]} {v:.3f}" for k, v in sorted(metrics.items())
                               if k.startswith("val/") and k.endswith("/bpb") and k.count("/") >= 2)
        if per_source:  # val/<source>/bpb, val/pretrain/<source>/bpb
            overall = f"{metrics['val/bpb']:.4f} " if "val/bpb" in metrics else ""
            parts.append(f"val bits-per-byte {overall}({per_source})")
        if "val/pass_rate" in metrics:
            parts.append(f"val pass-rate {metrics['val/pass_rate']:.3f}")
        if "perf/tokens_per_s" in metrics:
            parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tokens/s")
        console_print(trainer, " | ".join(parts))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = [f"== summary after {trainer.global_step} steps"]
        for key in self.KEYS:
            if key in self.last:
                (s0, v0), (s1, v1) = self.first[key], self.last[key]
                lines.append(f"{key:<12} {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1})")
        if self.tokens_per_s:
            lines.append(f"{'tokens/s':<12} {sum(self.tokens_per_s) / len(self.tokens_per_s):,.0f} (mean)")
        console_print(trainer, "\n".join(lines))


class AveragedWeights(WeightAveraging):
    """Lightning's `WeightAveraging` (an average of the weights, updated after every optimizer step) with
    the average in the module for all that should read it, whatever the order of the callbacks:
    - for the whole validation, from its start to its end. Lightning swaps at the validation epoch's
      start and end, so an evaluation suite whose epoch-end hook came after it scored the training weights;
    - from the end of training on, before the other callbacks' `on_train_end` (the end-of-run sample):
      train.py puts averaging callbacks first.
    A checkpoint written while the average is in the module (a SIGTERM during a validation) still keeps
    the average as its `state_dict` and the training weights beside it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._swapped = False

    @property
    def state_key(self) -> str:  # WeightAveraging's: a run resumed from a checkpoint it wrote keeps its state
        return WeightAveraging.__qualname__

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # on_validation_start swaps

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # on_validation_end swaps back

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:  # before the checkpoint callbacks, which Lightning runs last
            self._swap_models(pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:  # the module holds the average
            checkpoint["state_dict"], checkpoint["current_model_state"] = (checkpoint["current_model_state"],
                                                                           checkpoint["state_dict"])


class GenerateSample(Callback):
    """At the end of training, re-seeds and prints a continuation of each prompt."""

    def __init__(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 0) -> None:
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not runs_rank_zeros_model_calls(trainer):
            return
        tokenizer = trainer.datamodule.tokenizer
        model = pl_module.model
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)

        def show(text: str) -> None:  # the other ranks (FSDP) sample alike, silently
            if trainer.is_global_zero:
                print(text, flush=True)

        show("\n== samples")
        template = getattr(trainer.datamodule, "chat_template", None)
        for prompt in self.prompts:
            if template is None:
                ids = tokenizer.encode(prompt).ids
            else:  # a chat model answers the prompt as a user turn
                ids, _ = encode_chat(tokenizer, [{"role": "user", "content": prompt}], template, add_generation_prompt=True)
            # a prompt longer than the context keeps its end, so the sample still shows the model's answer
            keep = model.cfg.max_seq_len - max(1, min(self.max_new_tokens, model.cfg.max_seq_len // 2))
            if len(ids) > keep:
                show(f"  (prompt cut to its last {keep} of {len(ids)} tokens to fit max_seq_len={model.cfg.max_seq_len})")
                ids = ids[-keep:]
            ids = torch.tensor([ids], device=pl_module.device)
            out = generate(model, ids, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                           stop_ids=trainer.datamodule.eos_id, generator=generator,
                           cuda_graph=not shards_parameters(trainer.strategy))  # FSDP's gathers: not in a graph
            show(f"> {prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:].tolist())!r}")
        model.train(was_training)
