"""Muon with NorMuon's per-neuron normalisation for the hidden matrices, AdamW for everything else,
as one optimizer: one LR schedule (over both groups' peaks), one state in the checkpoint.

Muon (Jordan et al., 2024) replaces a matrix's momentum by its nearest semi-orthogonal matrix, found
by a few Newton-Schulz iterations, so every direction of the update moves by about the same amount.
NorMuon (Li et al., 2025) then evens out the output neurons (rows): each row is divided by the root
of a running mean of its squared entries, and the update is rescaled to its norm before that.
Embeddings, the LM head, norms, gates, biases and convolution filters are not hidden matrices; they
take AdamW (`adamw_lr`). OdinNext trained this way (`experiment=odinnext_pretrain`).
"""

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from slmlab.models.lora import LoRA
from slmlab.training.optim import check_betas, embedding_and_head, weight_decay_groups

# the quintic iteration's coefficients (Muon's): steepest at zero, so small singular values grow
# fast; after five steps every singular value lies within about [0.7, 1.2] instead of exactly at 1
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """About U V^T for each matrix g = U S V^T of a batch (..., m, n) (Newton-Schulz, in `dtype`),
    returned in g's dtype."""
    a, b, c = _NS_COEFFICIENTS
    x = g.to(dtype).reshape(-1, *g.shape[-2:])  # one batch dimension, for baddbmm
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on X X^T of the smaller side
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: singular values <= 1
    for _ in range(steps):  # x <- a x + (b s + c s^2) x with s = x x^T; the scalings ride in the matmuls
        s = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(g.shape).to(g.dtype)


def orthogonalize_across_ranks(g: Tensor, steps: int = 5) -> Tensor:
    """`orthogonalize` of a batch (k, m, n) with the work split over the data-parallel ranks: under DDP
    every rank holds the same all-reduced gradients, so each orthogonalises about k / world of the
    matrices and the ranks gather the results (in bf16, the iteration's own precision)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return orthogonalize(g, steps)
    world, rank = dist.get_world_size(), dist.get_rank()
    share = -(-g.size(0) // world)
    mine = g.new_zeros((share, *g.shape[1:]), dtype=torch.bfloat16)  # the last ranks' shares may be short
    if len(part := g[rank * share:(rank + 1) * share]):
        mine[:len(part)] = orthogonalize(part.to(torch.bfloat16), steps)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return torch.cat(gathered)[:g.size(0)].to(g.dtype)


def orthogonalize_reference(g: Tensor) -> Tensor:
    """U V^T exactly, from the SVD: what `orthogonalize` approximates (tests)."""
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return (u @ vh).to(g.dtype)


def muon_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """AdamW's groups (`weight_decay_groups`) with the hidden matrices moved into a first group of their
    own, for Muon: every 2-D parameter but the embedding, the LM head and LoRA's low-rank factors (Muon's
    orthogonalised step of a rank-r factor barely moved a LoRA SFT run: val loss 5.93 -> 5.92)."""
    outer = {id(p) for p in embedding_and_head(model)}
    outer |= {id(p) for m in model.modules() if isinstance(m, LoRA) for p in m.parameters()}
    decay, no_decay = weight_decay_groups(model, weight_decay, decay_embeddings)
    hidden = [p for p in decay["params"] if p.dim() == 2 and id(p) not in outer]
    hidden_ids = {id(p) for p in hidden}
    decay["params"] = [p for p in decay["params"] if id(p) not in hidden_ids]
    groups = [{"params": hidden, "weight_decay": weight_decay, "use_muon": True},
              {**decay, "use_muon": False}, {**no_decay, "use_muon": False}]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """NorMuon on groups with `use_muon` (`lr`), AdamW on the others (`adamw_lr`, `betas`, `eps`).

    Every group's weight decay is decoupled and scaled by its own LR, as in AdamW. A Muon step of an
    (m, n) matrix is `lr * max(1, m / n) ** 0.5` times the normalised update (rows are output features).
    `neuron_beta2=None` gives plain Muon. Under DDP the ranks share out the orthogonalisation of each
    shape's batch and gather the results (the gradients are all-reduced first, so every rank ends with
    the same update); FSDP's flat shards are not matrices and are refused by the training module.
    """

    group_parameters = staticmethod(muon_groups)  # how LMModule splits a model for this optimizer
    needs_whole_matrices = True  # FSDP's flat shards are not matrices

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, neuron_beta2: float | None = 0.95, adamw_lr: float = 3e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        check_betas(betas)  # else its first AdamW step fails unpacking them
        groups = list(params)
        if not groups or not isinstance(groups[0], dict) or not all("use_muon" in g for g in groups):
            raise ValueError("Muon takes parameter groups that each say `use_muon` (see muon_groups)")
        for group in groups:
            if not group["use_muon"]:
                group.setdefault("lr", adamw_lr)
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      neuron_beta2=neuron_beta2, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            if group["use_muon"] and (bad := [tuple(p.shape) for p in group["params"] if p.dim() != 2]):
                raise ValueError(f"Muon orthogonalises matrices only; this group holds parameters of shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # a parameter without a gradient (unused, or a step the non-finite guard skipped) is left alone
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[Tensor]) -> None:
        beta, beta2 = group["momentum"], group["neuron_beta2"]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                if beta2 is not None:
                    self.state[p]["neuron_second_moment"] = torch.zeros_like(p[:, :1])
        by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
        for p in params:
            by_shape[p.shape].append(p)
        for (rows, cols), same in by_shape.items():  # matrices of one shape orthogonalised as one batch
            states = [self.state[p] for p in same]
            buffers, grads = [s["momentum_buffer"] for s in states], [p.grad for p in same]
            torch._foreach_lerp_(buffers, grads, 1 - beta)
            update = orthogonalize_across_ranks(torch.stack(torch._foreach_lerp(grads, buffers, beta)
                                                            if group["nesterov"] else buffers), group["ns_steps"])
            if beta2 is not None:
                norm = update.norm(dim=(-2, -1), keepdim=True)
                second = torch.stack([s["neuron_second_moment"] for s in states])
                second.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
                torch._foreach_copy_([s["neuron_second_moment"] for s in states], list(second))
                update = update / (second.sqrt() + 1e-10)
                update.mul_(norm / (update.norm(dim=(-2, -1), keepdim=True) + 1e-10))  # only rows' proportions change
            torch._foreach_mul_(same, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(same, list(update), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def _adamw_step(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            self.state[p]["step"] += 1
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])  # bias corrections
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avg, denom, [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])
