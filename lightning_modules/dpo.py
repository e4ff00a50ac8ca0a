"""Direct preference optimisation against a frozen copy of the initial policy."""

import torch

from lightning_modules.base import LMModule
from slmlab.training.batching import cat_right_padded
from slmlab.training.losses import IGNORE_INDEX, dpo_loss, token_logprobs


class DPOModule(LMModule):
    """Offline DPO on (prompt, chosen, rejected) pairs.

    The reference is the policy as loaded (`init_from`), frozen, optionally in a lower precision
    (`reference_dtype: bfloat16` halves its memory). It is not part of the checkpoint: a resumed run
    rebuilds it from `init_from`.
    """

    def __init__(self, *args, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 reference_dtype: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("init_from") is None:
            raise ValueError("stage=dpo needs init_from=<checkpoint of the policy to improve (usually the SFT run)>")
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        # kept out of nn.Module's registry: no gradients, not in state_dict, moved by hand
        self.__dict__["reference"] = self.frozen_copy(getattr(torch, reference_dtype) if reference_dtype else None)

    def on_fit_start(self) -> None:
        self.reference.to(self.device)

    def sequence_logps(self, model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed log-prob of each row's response tokens: (batch,)."""
        return token_logprobs(model(ids), labels).sum(dim=1)

    def step(self, batch: dict, prefix: str) -> torch.Tensor:
        n = batch["chosen_ids"].shape[0]
        # chosen and rejected in one forward each (policy and reference); pad to a common length
        ids = cat_right_padded([batch["chosen_ids"], batch["rejected_ids"]], value=0)
        labels = cat_right_padded([batch["chosen_labels"], batch["rejected_labels"]], value=IGNORE_INDEX)
        policy = self.sequence_logps(self.model, ids, labels)
        with torch.no_grad():
            ref = self.sequence_logps(self.reference, ids, labels)
        loss, chosen_r, rejected_r = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta,
                                              self.label_smoothing, self.loss_type)
        self.log_dict({f"{prefix}/loss": loss, f"{prefix}/reward_accuracy": (chosen_r > rejected_r).float().mean(),
                       f"{prefix}/reward_margin": (chosen_r - rejected_r).mean(),
                       f"{prefix}/logp_chosen": policy[:n].mean().detach(), f"{prefix}/logp_rejected": policy[n:].mean().detach()},
                      prog_bar=False, sync_dist=prefix == "val")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")
