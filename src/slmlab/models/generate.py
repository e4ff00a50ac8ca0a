"""Sampling from a `CausalLM` with its decoding state (KV cache / recurrent state)."""

import torch
from torch import Tensor

from slmlab.models.transformer import CausalLM


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits: (batch, vocab) -> token ids (batch,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """prompt: (batch, prompt_len) ids, same length per row -> (batch, prompt_len + new) ids.

    Prefills the state with the prompt, then feeds one token at a time; rows that emitted `eos_id`
    keep emitting it so the batch stays rectangular.
    """
    batch, prompt_len = prompt.shape
    if prompt_len >= model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room to generate within max_seq_len={model.cfg.max_seq_len}")
    total = min(prompt_len + max_new_tokens, model.cfg.max_seq_len)
    state = model.init_state(batch, total)
    logits = model(prompt, state)[:, -1]
    out = [prompt]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for step in range(total - prompt_len):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if step == total - prompt_len - 1 or done.all():
            break
        logits = model(token[:, None], state)[:, -1]
    return torch.cat(out, dim=1)
