"""What every training stage shares: the model, AdamW groups, a per-step LR schedule, grad-norm
logging, weights from a previous stage (`init_from`), and per-source validation loss sums."""

import copy
import logging
import warnings
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging

from datamodules.prompts import PromptDataModule
from slmlab.checkpoint import check_architecture, load_weights
from slmlab.mixers import check_kernel_settings
from slmlab.models import CausalLM, ModelConfig
from slmlab.models.lora import add_lora, merge_lora
from slmlab.models.transformer import BACKBONE, COMPILE_MODES, CUDA_GRAPH_MODES
from slmlab.training.losses import IGNORE_INDEX
from slmlab.training.optim import check_betas, param_groups_for
from slmlab.training.strategies import shards_parameters

log = logging.getLogger(__name__)

# a parameter group's keys that are no hyperparameter of the optimizer: its tensors, and the LR the schedule sets
NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr")


def _as_setting(value: object) -> object:
    """A parameter group's value, comparable: betas come as a list from the config, a tuple from a checkpoint."""
    return tuple(value) if isinstance(value, list) else value


def _numeric(value: object) -> bool:
    """Whether a parameter group's value is a number or a tuple of them (lr, betas, eps, momentum...), not a
    switch (fused, amsgrad, a NorMuon moment or none) that decides what optimizer state there is."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The precisions a frozen model (a reference policy, a teacher) may be kept in."""


def frozen_dtype(key: str, name: str | None) -> torch.dtype | None:
    """The dtype of setting `key` (None: the model's own); ValueError naming the key for another name."""
    if name is not None and name not in FROZEN_DTYPES:
        raise ValueError(f"{key}={name!r} is not one of {', '.join(FROZEN_DTYPES)} (or null: float32)")
    return FROZEN_DTYPES[name] if name is not None else None


class LMModule(L.LightningModule):
    """Base LightningModule of all stages; a stage adds its `training_step` / `validation_step`.

    `optimizer` and `scheduler` are partials from `conf/optim` and `conf/schedule`; the schedule's
    length is the trainer's `max_steps`. `compile`: false, true (torch.compile each block), a
    torch.compile mode for the blocks ("reduce-overhead": CUDA graphs) or "backbone" (the blocks as one
    graph). `init_from` loads the weights (only) of a checkpoint of another run, typically the previous
    stage, and refuses one of another architecture. `lora_rank` > 0 freezes the model and trains LoRA
    adapters of that rank on the blocks' linear layers named in `lora_targets` (all of them when null),
    scaled by `lora_alpha / lora_rank` (`lora_dora`: DoRA's trained row magnitudes too).
    """

    def __init__(self, model_config: ModelConfig, optimizer: partial, scheduler: partial,
                 decay_embeddings: bool = False, compile: bool | str = False, init_from: str | None = None,
                 lora_rank: int = 0, lora_alpha: float = 16.0, lora_targets: list[str] | None = None,
                 lora_dora: bool = False) -> None:
        super().__init__()
        if not isinstance(compile, bool) and compile not in (*COMPILE_MODES, BACKBONE):
            raise ValueError(f"stage.compile={compile!r}: expected true, false, {BACKBONE} (the blocks as one graph) "
                             f"or a torch.compile mode for each block ({', '.join(COMPILE_MODES)})")
        self.model_config = model_config
        self.model = CausalLM(model_config)
        if init_from is not None:
            load_weights(self.model, init_from)
        self.lora_rank = lora_rank
        if lora_dora and not lora_rank:
            raise ValueError("stage.lora_dora=true adapts with DoRA, which needs stage.lora_rank >= 1")
        if lora_rank:
            add_lora(self.model, lora_rank, lora_alpha, lora_targets, lora_dora)
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("LoRA rank %d: %s trainable parameters of %s", lora_rank, f"{trainable:,}",
                     f"{sum(p.numel() for p in self.model.parameters()):,}")
        if "betas" in optimizer.keywords:
            check_betas(optimizer.keywords["betas"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.decay_embeddings, self.compile_blocks = decay_embeddings, compile
        # which parameters decay is decided on the model as built (matrices only): FSDP turns each
        # parameter into a 1-D view of its shard before the optimizer is made
        self.param_groups = param_groups_for(optimizer, self.model, decay_embeddings)
        self._grad_norm: tuple[int, torch.Tensor | None] | None = None  # (optimizer step, its norm)
        self._step_tokens: torch.Tensor | None = None  # label tokens of this step so far (`token_weighted`)
        self._train_sums: torch.Tensor | None = None  # `log_train_means`: this step's label tokens and sums
        self._train_keys: list[str] = []  # ... and the metrics they are the sums of

    def frozen_copy(self, dtype: torch.dtype | None = None) -> CausalLM:
        """A copy of the current model that never trains (a reference policy or a teacher)."""
        ref = merge_lora(copy.deepcopy(self.model)).eval().requires_grad_(False)
        return ref.to(dtype) if dtype is not None else ref

    def hold_frozen(self, name: str, model: CausalLM) -> None:
        """Keeps a model that never trains (a reference policy, a teacher) as `self.<name>`, outside
        nn.Module's registry: no gradients, not in the checkpoint, moved to the device by the stage."""
        self.__dict__[name] = model
        self.__dict__.setdefault("_frozen_names", []).append(name)

    def __deepcopy__(self, memo: dict) -> "LMModule":
        # the EMA callback deep-copies the whole module to hold the average: a frozen model's average is
        # itself, so the copy shares it rather than holding a second reference policy or teacher
        for name in self.__dict__.get("_frozen_names", ()):
            memo[id(self.__dict__[name])] = self.__dict__[name]
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def require_data(self, kinds: type | tuple[type, ...], needs: str) -> None:
        """ValueError "<needs>, not a <class>" unless the data module is one of `kinds`: a stage given another
        kind of data failed at its first step, on a batch of another shape."""
        dm = self.trainer.datamodule
        if dm is not None and not isinstance(dm, kinds):
            raise ValueError(f"{needs}, not a {type(dm).__name__}")

    def setup(self, stage: str) -> None:
        if self.compile_blocks in CUDA_GRAPH_MODES:
            # a replay reuses the memory of the last one's outputs, gradients included: PyTorch sums the
            # micro-batches' gradients wrongly or fails (pytorch/pytorch#169545), and recomputing a block
            # inside the backward (activation checkpointing) has not been tried with CUDA graphs
            if self.trainer.accumulate_grad_batches > 1:
                raise ValueError(f"stage.compile={self.compile_blocks} (CUDA graphs) needs "
                                 f"trainer.accumulate_grad_batches=1, not {self.trainer.accumulate_grad_batches}: "
                                 "raise data.batch_size, or use stage.compile=true")
            if self.model_config.activation_checkpointing:
                raise ValueError(f"stage.compile={self.compile_blocks} (CUDA graphs) does not go with "
                                 "model.activation_checkpointing=true: use stage.compile=true")
        if shards_parameters(self.trainer.strategy):
            self.refuse_what_fsdp_cannot_do()
        check_kernel_settings(self.model_config, self.trainer.strategy.root_device)
        # a time (Lightning's "DD:HH:MM:SS") leaves the trainer without val_check_interval
        every, accumulate = getattr(self.trainer, "val_check_interval", None), self.trainer.accumulate_grad_batches
        if every is None and accumulate > 1:
            raise ValueError(f"a time-based trainer.val_check_interval validates (and checkpoints) after whichever "
                             f"batch the time runs out on, inside an optimizer step of trainer.accumulate_grad_batches="
                             f"{accumulate}: give a number of batches, a multiple of {accumulate}")
        if isinstance(every, int) and every % accumulate:
            # the validation's checkpoint would hold a data position inside an optimizer step
            raise ValueError(f"trainer.val_check_interval={every} counts batches: with trainer.accumulate_grad_batches="
                             f"{accumulate} it must be a multiple of {accumulate}, or a validation (and its "
                             "checkpoint) lands inside an optimizer step")
        dm = self.trainer.datamodule
        if dm is None:
            return
        if dm.vocab_size > self.model_config.vocab_size:
            raise ValueError(f"the tokenizer has {dm.vocab_size} tokens but model.vocab_size={self.model_config.vocab_size}; "
                             "set model.vocab_size to at least the tokenizer's size")
        for key, prompts in (("data", dm), ("data.constraint_val", getattr(dm, "constraint_val", None))):
            # sampled from (GRPO, on-policy DPO, the pass-rate validation): else the first rollout fails mid-run
            if isinstance(prompts, PromptDataModule) and prompts.seq_len >= self.model_config.max_seq_len:
                raise ValueError(f"{key}: a prompt of {prompts.seq_len} tokens leaves no room to generate within "
                                 f"model.max_seq_len={self.model_config.max_seq_len}: set {key}.max_prompt_len "
                                 "below it")
        if dm.seq_len > self.model_config.max_seq_len:
            raise ValueError(f"data.seq_len={dm.seq_len} exceeds model.max_seq_len={self.model_config.max_seq_len}")

    def flops_per_data_token(self, seq_len: int, batch: dict) -> float | torch.Tensor:
        """Training FLOPs per token of this batch of seq_len tokens per row at this step (what MFU counts):
        rows of packed documents (`positions`) count attention within each document."""
        return self.model.flops_per_token(seq_len, positions=batch.get("positions"))

    def refuse_what_fsdp_cannot_do(self) -> None:
        """ValueError naming the setting, before the first step, for what breaks on FSDP's flat shards."""
        if getattr(self.optimizer_factory.func, "needs_whole_matrices", False):
            raise ValueError(f"optim={self.optimizer_factory.func.__name__} updates each matrix as a whole, and FSDP "
                             "gives each rank a flat shard of it: use trainer=ddp or one device, or optim=adamw")
        if self.compile_blocks == BACKBONE:
            raise ValueError(f"stage.compile={BACKBONE} traces the whole stack of blocks, which FSDP wraps block by "
                             "block (untested): use stage.compile=true under FSDP")
        if self.lora_rank:
            raise ValueError(f"stage.lora_rank={self.lora_rank}: LoRA adapters are parametrizations of the weights, "
                             "which FSDP's flat shards do not keep: use trainer=ddp or one device")
        if any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            raise ValueError("callbacks.ema (weight averaging) keeps an unsharded copy and swaps it with FSDP's "
                             "shards: use trainer=ddp or one device")
        if what := self.samples_on_each_rank():
            # every FSDP forward gathers each block's parameters from all ranks, in step
            raise ValueError(f"{what} samples completions on each rank, which FSDP cannot do: ranks sampling "
                             "different prompts and lengths fall out of step in its parameter gathers (and a "
                             "CUDA-graph decoding step cannot hold them). Use trainer=ddp or one device")

    def samples_on_each_rank(self) -> str | None:
        """What in this run samples from the model on each rank during training or validation (the config
        key, for errors), or None."""
        return None

    def configure_model(self) -> None:
        if self.compile_blocks:
            mode = None if self.compile_blocks is True else self.compile_blocks
            self.model.compile_blocks(mode)
            # a teacher's or reference policy's forward runs every step too; their blocks are compiled
            # without CUDA graphs, whose output buffers the trained model's graphs would overwrite
            for name in self.__dict__.get("_frozen_names", ()):
                self.__dict__[name].compile_blocks(BACKBONE if mode == BACKBONE else None)

    # CUDA graphs of compiled blocks reuse their output memory from one step to the next; marking each
    # step's start tells torch that the last step's outputs are dead (without it, a replay that finds
    # one pending backward falls back to a slow path). It does nothing where no CUDA graph runs.
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.compile_blocks:
            torch.compiler.cudagraph_mark_step_begin()

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.compile_blocks:
            torch.compiler.cudagraph_mark_step_begin()

    def total_steps(self) -> int:
        """Optimizer steps of the run, the length of the LR schedule."""
        if self.trainer.max_steps is None or self.trainer.max_steps < 1:
            raise ValueError("trainer.max_steps must be set: the LR schedule is defined over optimizer steps")
        return self.trainer.max_steps

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.param_groups)
        # this run's settings, which a resumed optimizer state replaces by the checkpoint's (see on_train_start)
        self._configured_groups = [{k: v for k, v in group.items() if k not in NOT_HYPERPARAMETERS}
                                   for group in optimizer.param_groups]
        scheduler = self.scheduler_factory(optimizer, total_steps=self.total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # Loading an optimizer state also loads the checkpoint's hyperparameters: a run resumed with another
        # optim.weight_decay, optim.betas... silently kept the old ones. This run's numbers apply from the
        # step reached, as another optim.lr does (the schedule's load_state_dict); a switch stays the
        # checkpoint's, as the optimizer state was built for it.
        applied, kept = {}, {}
        for group, configured in zip(self.trainer.optimizers[0].param_groups, self._configured_groups):
            for key, value in configured.items():
                old = group.get(key)
                if _as_setting(old) == _as_setting(value):
                    continue
                if _numeric(old) and _numeric(value):
                    applied.setdefault(key, f"optim.{key} {old} -> {value}")
                    group[key] = value
                else:
                    kept.setdefault(key, f"optim.{key} {old} (not {value})")
        if applied:
            warnings.warn(f"the optimizer's settings differ from the checkpoint's ({', '.join(applied.values())}): "
                          f"this run's apply from step {self.trainer.global_step}", stacklevel=2)
        if kept:
            warnings.warn(f"the resumed optimizer keeps the checkpoint's {', '.join(kept.values())}: its state was "
                          "made for them. Start a new run from its weights to change them: init_from=<checkpoint>",
                          stacklevel=2)

    def gradient_norm(self) -> torch.Tensor | None:
        """The total norm of the model's gradients at this optimizer step, before clipping (under FSDP over
        every rank's shards); None when no parameter has one. Computed once per step (foreach kernels, one
        pass over the gradients): the non-finite guard, `train/grad_norm` and clipping share it. The first
        call of a step finishes its gradients: unscaled (fp16), label tokens weighed equally (`token_weighted`)."""
        step = self.trainer.global_step
        if self._grad_norm is None or self._grad_norm[0] != step:
            self._unscale_fp16_gradients()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._weigh_label_tokens_equally(grads)
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if shards_parameters(self.trainer.strategy):
                # each rank holds a shard of every gradient: clipped by its shard's norm, the ranks would
                # scale their parts differently. The whole norm from the shards' squares (every rank joins)
                local = norm if norm is not None else torch.zeros((), device=self.device)
                norm = self.trainer.strategy.reduce(local.square(), reduce_op="sum").sqrt()
            self._grad_norm = (step, norm)
        return self._grad_norm[1]

    def _unscale_fp16_gradients(self) -> None:
        # Under fp16 Lightning unscales the gradients before on_before_optimizer_step, except those of an
        # optimizer that unscales inside its own step (fused AdamW). Unscaled here, once a step: the norm,
        # the non-finite guard and clipping see true gradients, and GradScaler records the overflow check
        # that its update needs, also when the guard then drops the gradients.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            return
        for optimizer in self.trainer.optimizers:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                scaler.unscale_(optimizer)

    def token_weighted(self, mean_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate for `mean_loss`, the mean over this micro-batch's label tokens, so
        that every label token of the optimizer step weighs the same whichever micro-batch and rank it
        is in (chat data, where micro-batches hold different numbers of them). A mean per micro-batch,
        averaged over micro-batches and ranks, would weigh the tokens of short answers more, and results
        would change with trainer.accumulate_grad_batches and the number of devices."""
        tokens = (labels != IGNORE_INDEX).sum()
        self._step_tokens = tokens if self._step_tokens is None else self._step_tokens + tokens
        # over a constant of every micro-batch and rank, the positions a batch can hold: a sum over the
        # tokens, kept near the mean's magnitude (fp16's loss scale would overflow a plain sum)
        return mean_loss * tokens / self._token_scale()

    def log_train_means(self, metrics: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Logs each of `metrics` (means over this micro-batch's label tokens) as its mean over the label
        tokens of the whole optimizer step: every micro-batch, on every rank, reduced once per step
        (`on_before_optimizer_step`). Logged from training_step, a metric was rank 0's last micro-batch."""
        tokens = (labels != IGNORE_INDEX).sum().float()
        sums = torch.stack([tokens, *(value.detach().float() * tokens for value in metrics.values())])
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        self._train_keys = list(metrics)

    def _log_step_means(self) -> None:
        if self._train_sums is None:
            return
        tokens, *totals = self.trainer.strategy.reduce(self._train_sums, reduce_op="sum")
        self._train_sums = None
        self.log_dict({key: total / tokens.clamp(min=1.0) for key, total in zip(self._train_keys, totals)})

    def _token_scale(self) -> int:
        return self.trainer.datamodule.batch_size * self.model_config.max_seq_len

    def _weigh_label_tokens_equally(self, grads: list[torch.Tensor]) -> None:
        # Lightning divided each micro-batch's loss by the accumulation and DDP averages over ranks: the
        # gradients are the sum over the step's label tokens over (accumulation x ranks x token scale);
        # now their mean
        if self._step_tokens is None:
            return
        tokens = self.trainer.strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        self._step_tokens = None
        factor = (self.trainer.accumulate_grad_batches * self.trainer.world_size * self._token_scale()
                  / tokens.clamp(min=1.0))
        if grads:
            torch._foreach_mul_(grads, factor)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._log_step_means()
        norm = self.gradient_norm()  # non-finite where NonFiniteGuard skips the step
        if norm is not None:
            self.log("train/grad_norm", norm)  # before clipping
        # a CPU tensor: Lightning copies a Python float to the GPU, and that copy waits for the backward
        self.log("train/lr", torch.tensor(optimizer.param_groups[0]["lr"]))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for optimizers that unscale fp16 gradients
        # themselves (fused AdamW), even under bf16 where nothing is scaled: clip here (the gradients are
        # unscaled by now, see gradient_norm)
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = self.gradient_norm()
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        elif norm is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused Adam(W) divides each gradient by `grad_scale` as it reads it (GradScaler's unscaling):
            # clip_grad_norm_'s factor without a pass of its own over the gradients. The kernel reads it as
            # float32, whatever the weights' dtype (bf16-true, 16-true: the norm is in theirs)
            optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / gradient_clip_val, min=1.0)
        elif norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # stopping on the last step makes Lightning validate (and checkpoint) the final weights,
        # whether or not max_steps is a multiple of val_check_interval
        if self.trainer.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def optimizer_layout(self) -> dict:
        """The optimizer's class and its groups' sizes: what a resumed optimizer state must fit."""
        func = self.optimizer_factory.func
        return {"class": f"{func.__module__}.{func.__qualname__}", "group_sizes": [len(g["params"]) for g in self.param_groups]}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_config"] = asdict(self.model_config)
        checkpoint["optimizer_layout"] = self.optimizer_layout()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # before Lightning loads the weights and the optimizer: a changed model=... or optim=... is named,
        # not a tensor size or parameter group mismatch
        source = f"ckpt_path={self.trainer.ckpt_path}"
        check_architecture(checkpoint["model_config"], self.model_config, source)
        theirs, ours = checkpoint.get("optimizer_layout"), self.optimizer_layout()
        if theirs is not None and theirs != ours:
            raise ValueError(f"{source}: the checkpoint's optimizer state is of {theirs['class']} with parameter "
                             f"groups of {theirs['group_sizes']} tensors, this run's optimizer {ours['class']} with "
                             f"{ours['group_sizes']} (optim=... or stage.decay_embeddings changed). Resume with the "
                             "settings it was saved with, or start a new run from its weights: init_from=<checkpoint>")

    # -- validation loss per data source (one val dataloader per source) -------------------------

    def on_validation_epoch_start(self) -> None:
        # per source: summed cross-entropy (nats) and token count, reduced over ranks at the end
        n = len(self.trainer.datamodule.val_sources)
        self._val_sums = torch.zeros(n, 2, dtype=torch.float64, device=self.device)

    def accumulate_val_loss(self, batch: dict, dataloader_idx: int) -> None:
        logits = self.model(batch["input_ids"], positions=batch.get("positions"))
        nats = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        self._val_sums[dataloader_idx, 0] += nats.double()
        self._val_sums[dataloader_idx, 1] += (batch["labels"] != IGNORE_INDEX).sum()

    def val_loss_sums(self) -> dict[str, tuple[float, float]]:
        """Source name -> (summed nats, tokens) over all ranks, for sources that had tokens."""
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        return {name: (nats, tokens) for (nats, tokens), name in zip(sums, self.trainer.datamodule.val_sources) if tokens}

    def log_metrics(self, metrics: dict[str, float], prog_bar: str = "val/loss") -> None:
        for key, value in metrics.items():  # already reduced over ranks: no sync_dist
            self.log(key, value, prog_bar=key == prog_bar)
