"""GRPO (Shao et al. 2024, DeepSeekMath) with verifiable rule-based rewards.

Each step: for every prompt of the batch, sample `group_size` completions with the policy's own
cached/recurrent-state generation, score them with the prompt's checkable constraints
(`slmlab.rewards`), normalise rewards within the group, and maximise the clipped surrogate with a
k3 KL penalty to the frozen initial policy. One gradient step per batch of rollouts, so the
"old" policy is the current one and its log-probs are the detached current ones (no extra forward).
"""

import torch

from datamodules.prompts import PromptDataModule
from lightning_modules.policy import PolicyModule
from slmlab.rewards import all_pass, score
from slmlab.training.batching import cat_right_padded, padded_length
from slmlab.training.losses import IGNORE_INDEX, group_advantages, grpo_loss


class GRPOModule(PolicyModule):
    stage = "grpo"

    def __init__(self, *args, group_size: int = 8, clip_eps: float = 0.2, kl_beta: float = 0.04, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if group_size < 2:
            raise ValueError(f"stage.group_size={group_size}: advantages are normalised within a group of >= 2")
        if self.temperature <= 0:
            raise ValueError(f"stage.temperature={self.temperature}: GRPO samples its groups (greedy gives one answer)")
        if kl_beta < 0:  # a negative penalty rewards drifting away from the reference
            raise ValueError(f"stage.kl_beta={kl_beta} must be >= 0")
        self.refuse_per_shape_tuning("stage=grpo")
        self.group_size, self.clip_eps, self.kl_beta = group_size, clip_eps, kl_beta

    def setup(self, stage: str) -> None:
        self.require_data(PromptDataModule, "stage=grpo samples answers to constraint prompts: data=ifeval_prompts "
                                            "(a PromptDataModule)")
        super().setup(stage)

    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        seqs, labels, rewards, passed = [], [], [], []
        for item, (seq, lab, texts) in zip(batch, self.sample(batch, self.group_size, self.temperature)):
            rewards += [score(t, item["constraints"]) for t in texts]
            passed += [all_pass(t, item["constraints"]) for t in texts]
            seqs.append(seq)
            labels.append(lab)
        n = padded_length(max(lab.shape[1] for lab in labels), self.model_config.max_seq_len)  # seq[:, :-1]'s labels
        seq = cat_right_padded(seqs, value=0, length=n + 1)
        lab = cat_right_padded(labels, value=IGNORE_INDEX, length=n)
        ids, mask = seq[:, :-1], (lab != IGNORE_INDEX).float()
        # of the distribution the completions were drawn from (as TRL's GRPO): the policy at its temperature
        logps = self.model.token_logprobs(ids, lab, temperature=self.temperature)
        with torch.no_grad():
            ref_logps = self.reference.token_logprobs(ids, lab, temperature=self.temperature)
        rewards_t = torch.tensor(rewards, device=self.device, dtype=torch.float32)
        advantages = group_advantages(rewards_t, self.group_size)
        loss, stats = grpo_loss(logps, logps.detach(), ref_logps, advantages, mask, self.clip_eps, self.kl_beta)
        self.log("train/reward", rewards_t.mean())
        pass_rate = torch.tensor(sum(passed) / len(passed))  # on the CPU, as `train/lr` (see `LMModule`)
        self.log_dict({"train/loss": loss, "train/pass_rate": pass_rate, "train/kl": stats["kl"],
                       "train/clip_fraction": stats["clip_fraction"], "train/completion_len": mask.sum(dim=1).mean()})
        return loss
