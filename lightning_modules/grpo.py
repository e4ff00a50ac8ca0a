"""GRPO (Shao et al. 2024, DeepSeekMath) with verifiable rule-based rewards.

Each step: for every prompt of the batch, sample `group_size` completions with the policy's own
cached/recurrent-state generation, score them with the prompt's checkable constraints
(`slmlab.rewards`), normalise rewards within the group, and maximise the clipped surrogate with a
k3 KL penalty to the frozen initial policy. One gradient step per batch of rollouts, so the
"old" policy is the current one and its log-probs are the detached current ones (no extra forward).
"""

import torch

from lightning_modules.base import LMModule
from slmlab.models.generate import generate
from slmlab.rewards import all_pass, score
from slmlab.training.batching import cat_right_padded
from slmlab.training.losses import IGNORE_INDEX, group_advantages, grpo_loss, token_logprobs


class GRPOModule(LMModule):
    def __init__(self, *args, group_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float | None = 1.0, clip_eps: float = 0.2, kl_beta: float = 0.04,
                 reference_dtype: str | None = None, eval_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("init_from") is None:
            raise ValueError("stage=grpo needs init_from=<checkpoint of the policy to improve (usually the SFT run)>")
        if group_size < 2:
            raise ValueError(f"stage.group_size={group_size}: advantages are normalised within a group of >= 2")
        self.group_size, self.max_new_tokens, self.temperature, self.top_p = group_size, max_new_tokens, temperature, top_p
        self.clip_eps, self.kl_beta, self.eval_seed = clip_eps, kl_beta, eval_seed
        self.__dict__["reference"] = self.frozen_copy(getattr(torch, reference_dtype) if reference_dtype else None)

    def on_fit_start(self) -> None:
        self.reference.to(self.device)

    def rollout(self, prompt_ids: list[int], n: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        """n completions of one prompt: (n, prompt_len + new) ids."""
        prompt = torch.tensor([prompt_ids] * n, device=self.device)
        return generate(self.model, prompt, self.max_new_tokens, temperature=temperature, top_p=self.top_p,
                        eos_id=self.trainer.datamodule.eos_id, generator=generator)

    def completion_labels(self, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Labels of the completion tokens up to and including the first end-of-turn; IGNORE elsewhere."""
        labels = seq[:, 1:].clone()
        labels[:, : prompt_len - 1] = IGNORE_INDEX  # the prompt has end-of-turn tokens of its own
        is_end = (labels == self.trainer.datamodule.eos_id).int()
        after_end = (is_end.cumsum(dim=1) - is_end) > 0
        return labels.masked_fill(after_end, IGNORE_INDEX)

    def decode(self, seq: torch.Tensor, labels: torch.Tensor) -> list[str]:
        tokenizer, eos = self.trainer.datamodule.tokenizer, self.trainer.datamodule.eos_id
        return [tokenizer.decode([t for t, keep in zip(row.tolist(), mask.tolist()) if keep and t != eos])
                for row, mask in zip(seq[:, 1:], labels != IGNORE_INDEX)]

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        seqs, labels, rewards, passed = [], [], [], []
        self.model.eval()
        for item in batch:
            seq = self.rollout(item["prompt_ids"], self.group_size, self.temperature, None)
            lab = self.completion_labels(seq, len(item["prompt_ids"]))
            texts = self.decode(seq, lab)
            rewards += [score(t, item["constraints"]) for t in texts]
            passed += [all_pass(t, item["constraints"]) for t in texts]
            seqs.append(seq)
            labels.append(lab)
        self.model.train()
        seq = cat_right_padded(seqs, value=0)
        lab = cat_right_padded(labels, value=IGNORE_INDEX)
        ids, mask = seq[:, :-1], (lab != IGNORE_INDEX).float()
        logps = token_logprobs(self.model(ids), lab)
        with torch.no_grad():
            ref_logps = token_logprobs(self.reference(ids), lab)
        rewards_t = torch.tensor(rewards, device=self.device, dtype=torch.float32)
        advantages = group_advantages(rewards_t, self.group_size)
        loss, stats = grpo_loss(logps, logps.detach(), ref_logps, advantages, mask, self.clip_eps, self.kl_beta)
        self.log("train/reward", rewards_t.mean(), prog_bar=True)
        self.log_dict({"train/loss": loss, "train/pass_rate": sum(passed) / len(passed), "train/kl": stats["kl"],
                       "train/clip_fraction": stats["clip_fraction"], "train/completion_len": mask.sum(dim=1).mean()})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_passed: list[bool] = []
        self._val_rewards: list[float] = []
        # the same held-out prompts answered the same way at every validation of the same weights
        self._val_generator = torch.Generator(device=self.device).manual_seed(self.eval_seed)

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        """Greedy answers to held-out constraint prompts: the constraint-following pass-rate."""
        for item in batch:
            seq = self.rollout(item["prompt_ids"], 1, 0.0, self._val_generator)
            text = self.decode(seq, self.completion_labels(seq, len(item["prompt_ids"])))[0]
            self._val_passed.append(all_pass(text, item["constraints"]))
            self._val_rewards.append(score(text, item["constraints"]))

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor([sum(self._val_passed), sum(self._val_rewards), len(self._val_passed)],
                              dtype=torch.float64, device=self.device)
        passed, reward, n = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        if n:
            # val/loss = 1 - pass-rate, so checkpointing on the lowest val/loss keeps the best policy
            self.log_metrics({"val/pass_rate": passed / n, "val/reward": reward / n, "val/loss": 1 - passed / n},
                             prog_bar="val/pass_rate")
