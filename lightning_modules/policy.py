"""What the stages that improve a policy against a frozen reference share (DPO, GRPO): the reference,
sampling completions of prompts, and the constraint-following pass-rate as validation."""

from time import perf_counter

import numpy as np
import torch

from lightning_modules.base import LMModule, frozen_dtype
from slmlab.models.generate import generate_prompts
from slmlab.training.losses import IGNORE_INDEX
from slmlab.training.rollout import PassRate, completion_labels, completion_texts


class PolicyModule(LMModule):
    """The reference is the policy as loaded (`init_from`), frozen, optionally in a lower precision
    (`reference_dtype: bfloat16` halves its memory). It is not part of the checkpoint: a resumed run
    rebuilds it from `init_from`."""

    stage = "policy"

    def __init__(self, *args, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float | None = 1.0,
                 reference_dtype: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("init_from") is None:
            raise ValueError(f"stage={self.stage} needs init_from=<checkpoint of the policy to improve (usually the SFT run)>")
        if max_new_tokens < 1:
            raise ValueError(f"stage.max_new_tokens={max_new_tokens} must be at least 1")
        if top_p is not None and not 0 < top_p <= 1:  # top_p 0 keeps the likeliest token: greedy, samples all tie
            raise ValueError(f"stage.top_p={top_p} must lie in (0, 1] (1 or null: no nucleus sampling)")
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.hold_frozen("reference", self.frozen_copy(frozen_dtype("stage.reference_dtype", reference_dtype)))

    def refuse_per_shape_tuning(self, where: str) -> None:
        """ValueError unless the MLP's kernels suit batches of sampled completions: their rows and padded
        lengths change from step to step, and `model.mlp_kernel=quack` autotunes each new shape for minutes."""
        if self.model_config.mlp_kernel_in_use() == "quack":
            raise ValueError(f"model.mlp_kernel=quack with {where}: quack autotunes each new (rows, length) shape "
                             "for about 2.5 minutes, and sampled batches change shape from step to step; "
                             "set model.mlp_kernel=torch")

    def samples_on_each_rank(self) -> str | None:
        return f"stage={self.stage} (its pass-rate validation; GRPO's rollouts)"

    def on_fit_start(self) -> None:
        self.reference.to(self.device)

    def sample(self, prompts: list[dict], n: int, temperature: float) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """n completions of each prompt: per prompt, ids (n, T), completion labels (n, T - 1), decoded texts.
        Logs perf/rollout_tokens_per_s: the completion tokens per second of sampling (this rank's).

        Sampling is seeded by (data.seed, rank, training batches this rank has taken): the global RNG is
        not in the checkpoint, so a resumed run would otherwise draw other samples than an uninterrupted one."""
        dm = self.trainer.datamodule
        was_training = self.model.training
        self.model.eval()
        start, tokens, out = perf_counter(), 0, []
        seed = np.random.SeedSequence([dm.seed, self.trainer.global_rank, dm.batches_consumed]).generate_state(1)[0]
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        seqs = generate_prompts(self.model, [item["prompt_ids"] for item in prompts], self.max_new_tokens,
                                stop_id=dm.eos_id, n=n, temperature=temperature, top_p=self.top_p, generator=generator)
        for item, seq in zip(prompts, seqs):
            labels = completion_labels(seq, len(item["prompt_ids"]), dm.eos_id)
            tokens += int((labels != IGNORE_INDEX).sum())  # generate has waited for the GPU at each token anyway
            out.append((seq, labels, completion_texts(dm.tokenizer, seq, labels, dm.eos_id)))
        self.model.train(was_training)
        self.log("perf/rollout_tokens_per_s", tokens / (perf_counter() - start))
        return out

    # -- validation: greedy answers to held-out constraint prompts ------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._pass_rate = PassRate(self.max_new_tokens)

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        dm = self.trainer.datamodule
        self._pass_rate.add(self.model, batch, dm.tokenizer, dm.eos_id)

    def on_validation_epoch_end(self) -> None:
        if metrics := self._pass_rate.metrics(self.trainer.strategy, self.device):
            # val/loss = 1 - pass-rate, so checkpointing on the lowest val/loss keeps the best policy
            self.log_metrics(metrics | {"val/loss": 1 - metrics["val/pass_rate"]}, prog_bar="val/pass_rate")
