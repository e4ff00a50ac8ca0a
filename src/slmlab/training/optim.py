"""Parameter groups for weight decay, and for the optimizer a config names."""

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn


def embedding_and_head(model: nn.Module) -> list[Tensor]:
    """The token embeddings and the LM head (`model.lm_head`), each once when tied."""
    found = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        found[id(head.weight)] = head.weight
    return list(found.values())


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Decay matrices only: norms and biases (1-D) never, embeddings (and a head tied to them)
    only when asked — decaying them shrinks rare-token rows towards zero."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        if p.dim() < 2 or (id(p) in embedding_ids and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_groups_for(optimizer: partial, model: nn.Module, decay_embeddings: bool = False) -> list[dict]:
    """The groups the optimizer of `optimizer` (a partial from conf/optim) takes for `model`: its own
    split where it has one (`group_parameters`, as Muon's), else `weight_decay_groups`."""
    split = getattr(optimizer.func, "group_parameters", weight_decay_groups)
    return split(model, optimizer.keywords.get("weight_decay", 0.0), decay_embeddings)


def check_betas(betas: Sequence[float]) -> None:
    """ValueError naming `optim.betas` unless it is Adam's two moment decay rates, each in [0, 1) (one
    value failed inside torch with an index error naming no key)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"optim.betas={list(betas)}: Adam's two betas, each in [0, 1)")
