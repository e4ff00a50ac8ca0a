"""Sampling completions of chat prompts from the policy being trained, and reading them back:
the rollouts of GRPO and of on-policy DPO."""

import torch
from tokenizers import Tokenizer

from slmlab.models import CausalLM
from slmlab.models.generate import generate
from slmlab.training.losses import IGNORE_INDEX


def rollout(model: CausalLM, prompt_ids: list[int], n: int, max_new_tokens: int, eos_id: int, temperature: float = 1.0,
            top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """n completions of one prompt with the model's cached generation: (n, prompt_len + new) ids."""
    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids] * n, device=device)
    return generate(model, prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=eos_id, generator=generator)


def completion_labels(seq: torch.Tensor, prompt_len: int, eos_id: int) -> torch.Tensor:
    """Next-token labels of `seq` (n, T) -> (n, T - 1): the completion tokens up to and including the
    first end-of-turn, IGNORE_INDEX elsewhere (the prompt, and the padding generate adds after the end)."""
    labels = seq[:, 1:].clone()
    labels[:, : prompt_len - 1] = IGNORE_INDEX  # the prompt has end-of-turn tokens of its own
    is_end = (labels == eos_id).int()
    after_end = (is_end.cumsum(dim=1) - is_end) > 0
    return labels.masked_fill(after_end, IGNORE_INDEX)


def completion_texts(tokenizer: Tokenizer, seq: torch.Tensor, labels: torch.Tensor, eos_id: int) -> list[str]:
    """The decoded completions (without the end-of-turn token)."""
    return [tokenizer.decode([t for t, keep in zip(row.tolist(), mask.tolist()) if keep and t != eos_id])
            for row, mask in zip(seq[:, 1:], labels != IGNORE_INDEX)]
