"""Direct preference optimisation against a frozen copy of the initial policy: offline on
(prompt, chosen, rejected) pairs, or on-policy on pairs ranked by a reward from the policy's samples."""

import numpy as np
import torch

from datamodules.preferences import PreferenceDataModule
from datamodules.prompts import PromptDataModule
from lightning_modules.policy import PolicyModule
from slmlab.rewards import score
from slmlab.training.batching import cat_right_padded, padded_length
from slmlab.training.losses import DPO_LOSS_TYPES, IGNORE_INDEX, dpo_loss


class DPOModule(PolicyModule):
    """on_policy: batches are constraint prompts (data=ifeval_prompts); for each, `candidates`
    samples are scored by the constraint reward and the best and worst form the pair (prompts whose
    samples all score the same are skipped). Validation is then the pass-rate, as for GRPO.

    precompute_reference (offline pairs): the reference's log-probs of every pair are computed once
    when training starts (each rank a share), and the reference model is then freed: its memory, and
    one forward per step, for one pass over the pairs up front."""

    stage = "dpo"

    def __init__(self, *args, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 on_policy: bool = False, candidates: int = 4, precompute_reference: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in DPO_LOSS_TYPES:  # before any reference pass or rollout, not at the first step
            raise ValueError(f"stage.loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
        if beta <= 0:  # 0: no gradient; below: the rejected replies are preferred
            raise ValueError(f"stage.beta={beta} must be positive: the implicit reward is beta times the policy's "
                             "log-prob ratio to the reference")
        if not 0 <= label_smoothing < 0.5:  # 0.5: no preference is learnt; above: the rejected replies are preferred
            raise ValueError(f"stage.label_smoothing={label_smoothing} must lie in [0, 0.5): the share of pairs "
                             "assumed to be mislabelled")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError(f"stage.label_smoothing={label_smoothing} applies to stage.loss_type=sigmoid, not "
                             f"{loss_type}")
        if precompute_reference and on_policy:
            raise ValueError("stage.precompute_reference=true needs fixed pairs: on-policy pairs are new each step "
                             "(set stage.on_policy=false, or stage.precompute_reference=false)")
        if on_policy:
            # else every prompt's samples tie, every step is skipped, and the policy never changes
            if candidates < 2:
                raise ValueError(f"stage.candidates={candidates}: on-policy DPO pairs the best and worst of "
                                 ">= 2 samples")
            if self.temperature <= 0:
                raise ValueError(f"stage.temperature={self.temperature}: on-policy DPO samples its candidates "
                                 "(greedy gives one answer)")
            self.refuse_per_shape_tuning("stage=dpo stage.on_policy=true")
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.on_policy, self.candidates, self.precompute_reference = on_policy, candidates, precompute_reference
        self.reference_logps: dict[str, torch.Tensor] = {}  # split -> (pairs, 2): chosen, rejected

    def setup(self, stage: str) -> None:
        expected, data = ((PromptDataModule, "constraint prompts: data=ifeval_prompts") if self.on_policy
                          else (PreferenceDataModule, "preference pairs: data=prefs"))
        self.require_data(expected, f"stage=dpo stage.on_policy={str(self.on_policy).lower()} trains on {data} "
                                    f"(a {expected.__name__})")
        super().setup(stage)

    def sequence_logps(self, model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each row's log-prob of its response tokens, (batch,): summed; for IPO their mean, as TRL computes
        it, so that IPO's target margin 1/(2 beta) does not depend on the responses' lengths."""
        logps = model.token_logprobs(ids, labels).sum(dim=1)
        return logps / (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1) if self.loss_type == "ipo" else logps

    @staticmethod
    def both_sides(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen then rejected rows as one batch (one forward each for policy and reference)."""
        return (cat_right_padded([batch["chosen_ids"], batch["rejected_ids"]], value=0),
                cat_right_padded([batch["chosen_labels"], batch["rejected_labels"]], value=IGNORE_INDEX))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.precompute_reference:
            return
        dm, rank, world = self.trainer.datamodule, self.trainer.global_rank, self.trainer.world_size
        for split, collate in (("train", dm.train_collate), ("val", dm.val_collate)):
            table = torch.zeros(len(collate), 2, device=self.device)
            for start in range(rank * dm.batch_size, len(collate), world * dm.batch_size):  # this rank's share
                batch = collate(np.arange(start, min(start + dm.batch_size, len(collate))))
                ids, labels = (t.to(self.device) for t in self.both_sides(batch))
                with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                    table[batch["pair_index"]] = self.sequence_logps(self.reference, ids, labels).view(2, -1).T.float()
            self.reference_logps[split] = self.trainer.strategy.reduce(table, reduce_op="sum")
        self.__dict__["reference"] = None  # freed: its log-probs are all that was needed

    def step(self, batch: dict, prefix: str) -> torch.Tensor:
        n = batch["chosen_ids"].shape[0]
        ids, labels = self.both_sides(batch)
        policy = self.sequence_logps(self.model, ids, labels)
        if self.reference_logps:
            ref = self.reference_logps[prefix][batch["pair_index"]].T.reshape(-1)
        else:
            with torch.no_grad():
                ref = self.sequence_logps(self.reference, ids, labels)
        loss, chosen_r, rejected_r = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta,
                                              self.label_smoothing, self.loss_type)
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/reward_accuracy": (chosen_r > rejected_r).float().mean(),
                       f"{prefix}/reward_margin": (chosen_r - rejected_r).mean(),
                       f"{prefix}/logp_chosen": policy[:n].mean().detach(), f"{prefix}/logp_rejected": policy[n:].mean().detach()},
                      sync_dist=prefix == "val")
        return loss

    def ranked_pairs(self, prompts: list[dict]) -> dict | None:
        """Preference batch from the policy's own samples: per prompt, best vs worst by reward."""
        rows = {"chosen_ids": [], "chosen_labels": [], "rejected_ids": [], "rejected_labels": []}
        sampled = []
        for item, (seq, labels, texts) in zip(prompts, self.sample(prompts, self.candidates, self.temperature)):
            rewards = torch.tensor([score(t, item["constraints"]) for t in texts])
            sampled.append(rewards)
            best, worst = int(rewards.argmax()), int(rewards.argmin())
            if rewards[best] == rewards[worst]:
                continue
            for side, row in (("chosen", best), ("rejected", worst)):
                rows[f"{side}_ids"].append(seq[row : row + 1, :-1])
                rows[f"{side}_labels"].append(labels[row : row + 1])
        self.log("train/reward", torch.cat(sampled).mean())
        if not rows["chosen_ids"]:
            return None
        length = padded_length(max(t.shape[1] for t in rows["chosen_ids"] + rows["rejected_ids"]),
                               self.model_config.max_seq_len)
        return {k: cat_right_padded(v, value=IGNORE_INDEX if k.endswith("labels") else 0, length=length)
                for k, v in rows.items()}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.on_policy:
            batch = self.ranked_pairs(batch)
            if batch is None:  # every prompt's samples tied: nothing to prefer. A zero loss over every
                # parameter, not a skipped step, so DDP ranks still all-reduce the same gradients
                self.log_dict({"train/loss": 0.0, "train/skipped": 1.0})
                return sum(p.sum() for p in self.model.parameters()) * 0.0
            self.log("train/skipped", 0.0)  # logged every step: Lightning's rows would repeat a stale 1.0
        return self.step(batch, "train")

    # offline pairs validate on held-out pairs; on-policy runs validate the pass-rate (PolicyModule)

    def on_validation_epoch_start(self) -> None:
        if self.on_policy:
            super().on_validation_epoch_start()

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.on_policy:
            super().validation_step(batch, batch_idx)
        else:
            self.step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.on_policy:
            super().on_validation_epoch_end()
