"""LoRA (Hu et al. 2021): a linear layer's weight W trained as W + (alpha / rank) * B A, W frozen;
optionally DoRA's trained row magnitudes on top.

The adapter is a parametrization of the layer's `weight` (`torch.nn.utils.parametrize`): every path
that reads the weight (the fused q/k/v projection, the SwiGLU op, compiled blocks, decoding) computes
with the adapted one. B starts at zero, so an adapted model starts as its base. A checkpoint holds
the base weights and the adapters; `merged_state` folds them into a plain model's state dict, which is
how `init_from`, `load_model` and the exports read such a checkpoint.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

ORIGINAL = ".parametrizations.weight.original"  # where parametrize keeps the base weight
ADAPTER = ".parametrizations.weight.0."


class LoRA(nn.Module):
    """W + scale * B A; with `dora` (Liu et al. 2024, DoRA) each output row then rescaled to a trained
    magnitude: m * V / ||V|| per row, m starting at W's row norms, the norm not differentiated (as the
    paper's cheaper variant and PEFT)."""

    def __init__(self, weight: Tensor, rank: int, alpha: float, dora: bool = False) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and the LoRA paper's code
        self.register_buffer("scale", torch.tensor(alpha / rank))
        self.magnitude = nn.Parameter(row_norms(weight.detach())) if dora else None

    def forward(self, weight: Tensor) -> Tensor:
        return adapted(weight, self.lora_A, self.lora_B, self.scale, self.magnitude)


def row_norms(weight: Tensor) -> Tensor:
    return torch.linalg.vector_norm(weight.float(), dim=1).to(weight.dtype)


def adapted(weight: Tensor, a: Tensor, b: Tensor, scale: Tensor, magnitude: Tensor | None) -> Tensor:
    v = weight + (scale * (b @ a)).to(weight.dtype)
    return v if magnitude is None else v * (magnitude / row_norms(v).detach())[:, None]


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] | None = None,
             dora: bool = False) -> None:
    """Freezes every parameter of `model` and adapts its blocks' linear layers whose name is in `targets`
    (q, k, v, o, gate, up, down, in_proj, ...), or all of them, with LoRA or DoRA; ValueError naming a
    target that names no linear layer of the blocks."""
    if rank < 1:
        raise ValueError(f"stage.lora_rank={rank}: an adapter has rank >= 1 (0 trains every weight without adapters)")
    model.requires_grad_(False)
    linears = [(name, m) for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
    if targets is not None and not targets:  # would freeze every weight and train nothing
        raise ValueError(f"stage.lora_targets is empty: name some of {names}, or null for all of them")
    if targets is not None and (unknown := sorted(set(targets) - set(names))):
        raise ValueError(f"stage.lora_targets: {unknown} name no linear layer of this model's blocks (they are {names})")
    for name, module in linears:
        if targets is None or name.rsplit(".", 1)[-1] in targets:
            parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, alpha, dora))


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds each adapter into its layer's weight, leaving a plain model (in place)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def base_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of an adapted model as its plain model's without the adapters: the base weights."""
    out = {k: v for k, v in state.items() if ".parametrizations.weight." not in k}
    return out | {k.removesuffix(ORIGINAL) + ".weight": v for k, v in state.items() if k.endswith(ORIGINAL)}


def merged_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of an adapted model as its plain model's: each `<layer>.weight` the adapted one."""
    out = base_state(state)
    for key in state:
        if key.endswith(ORIGINAL):
            layer = key.removesuffix(ORIGINAL)
            a, b, scale = (state[layer + ADAPTER + name].float() for name in ("lora_A", "lora_B", "scale"))
            magnitude = state.get(layer + ADAPTER + "magnitude")
            out[layer + ".weight"] = adapted(state[key].float(), a, b, scale,
                                             None if magnitude is None else magnitude.float()).to(state[key].dtype)
    return out
