"""Sampling from a `CausalLM` with its decoding state (KV cache / recurrent state).

`decode` yields one token per row per step; `generate` collects a batch of them with stop tokens;
`generate_prompts` batches prompts of different lengths; `stream_text` turns one row into text pieces
with stop strings, for chat.
"""

import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from slmlab.models.decode_graph import static_decoder

if TYPE_CHECKING:  # transformer.py imports this module for CausalLM.generate
    from slmlab.models.transformer import CausalLM


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits: (batch, vocab) -> token ids (batch,). temperature 0 is greedy; top_k 0 and top_p 1 are off,
    as in Hugging Face (a float32 cumulative sum can pass 1 before the last token)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does
        before = F.pad(sorted_logits.softmax(dim=-1).cumsum(dim=-1)[:, :-1], (1, 0))
        drop = before >= top_p
        drop[:, 0] = False  # top_p 0 keeps the likeliest token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0) -> None:
    """ValueError naming a sampling setting outside its range: a negative temperature would sample the
    least likely tokens, a penalty <= 0 turn seen tokens' logits to infinities or flip their sign."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 is off)")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in [0, 1] (1 is off)")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 is off)")


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as in Hugging Face: the logit of every token
    already in the row is divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 always makes a repeat less likely. seen: (batch, vocab) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def eager_blocks() -> AbstractContextManager:
    """Inside, blocks compiled for training (`stage.compile=true`) run eagerly. Decoding through them
    recompiled every kind of block for the prompt, the state and the one-token steps, until dynamo's
    recompile limit; decoding's own speed-up is its CUDA graphs. FlexAttention, only fast compiled,
    stays compiled (`mixers/sparse_attention.py`)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled; the stance would import dynamo (1.5 s)
        return nullcontext()
    return torch.compiler.set_stance("force_eager")


@torch.no_grad()
def decode(model: "CausalLM", prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
           generator: torch.Generator | None = None, cuda_graph: bool = True,
           forced: Tensor | None = None) -> Iterator[Tensor]:
    """Yields the next token of each row, (batch,), up to `max_new_tokens` or the context's end.

    Prefills the state with the prompt (batch, prompt_len), then feeds one token at a time: O(1) per
    token for recurrent mixers. On CUDA each step replays a CUDA graph of the whole model
    (`models/decode_graph.py`) unless `cuda_graph=False`. The caller stops early by not asking for more.
    forced (batch, k): at the first k steps, the token fed and yielded where it is >= 0 instead of the
    sampled one (the rest of a longer prompt; see `generate`'s `prompt_lens`).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    batch, prompt_len = prompt.shape
    if prompt_len == 0:  # the first token is predicted from the last prompt position: there must be one
        raise ValueError("cannot decode from an empty prompt: start it with at least one token (the end-of-text "
                         "token that precedes every training document, for an unconditioned sample)")
    if prompt_len >= model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room to generate within max_seq_len={model.cfg.max_seq_len}")
    steps = min(max_new_tokens, model.cfg.max_seq_len - prompt_len)
    graphed = prompt.is_cuda and cuda_graph
    with eager_blocks():
        decoder = static_decoder(model, batch, prompt_len + steps, graph=True) if graphed else None
        if decoder is not None:
            logits = decoder.prefill(model, prompt)
        else:
            state = model.init_state(batch, prompt_len + steps)
            logits = model.next_token_logits(prompt, state)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=prompt.device).scatter_(1, prompt, True)
    for step in range(steps):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if forced is not None and step < forced.shape[1]:
            token = torch.where(forced[:, step] >= 0, forced[:, step], token)
        yield token
        if step == steps - 1:
            return  # no forward for a token that will not be sampled from
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        with eager_blocks():  # not across the yield: the caller's code keeps its compiled functions
            if decoder is not None:
                logits = decoder.step(model, token)
            else:
                logits = model.next_token_logits(token[:, None], state)


def generate(model: "CausalLM", prompt: Tensor, max_new_tokens: int, *, stop_ids: int | Sequence[int] = (),
             prompt_lens: Tensor | None = None, **sampling) -> Tensor:
    """prompt: (batch, prompt_len) ids -> (batch, prompt_len + new) ids.

    A row stops at its first token in `stop_ids` and is padded with `stop_ids[0]` after it, so the
    batch stays rectangular; generation ends when every row has stopped. `sampling`: the keyword
    arguments of `decode` (temperature 0 is greedy; a seeded `generator` makes sampling repeatable).

    prompt_lens (batch,): the rows' own prompt lengths when they differ (`prompt` right-padded). Every
    row steps at the same position, as in Meta's first LLaMA `generate`: the shortest prompt's length
    is prefilled, then a row still inside its prompt is fed its next prompt token while the others
    sample, so attention and recurrent states need no padding mask. Row r's completion starts at
    prompt_lens[r] and ends at its stop or after `max_new_tokens` tokens; the columns after that
    budget are not a completion (the caller cuts them).
    """
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), dtype=torch.long,
                         device=prompt.device)
    lens = torch.full((prompt.shape[0],), prompt.shape[1], device=prompt.device) if prompt_lens is None \
        else prompt_lens.to(prompt.device)
    start, longest = int(lens.min()), int(lens.max())
    if longest >= model.cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within max_seq_len={model.cfg.max_seq_len}")
    columns = torch.arange(start, longest, device=prompt.device)
    forced = prompt[:, start:longest].masked_fill(columns >= lens[:, None], -1) if longest > start else None
    out = [prompt[:, :start]]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens = decode(model, prompt[:, :start], max_new_tokens + longest - start, forced=forced, **sampling)
    for position, token in enumerate(tokens, start):
        if len(stops):
            token = token.masked_fill(done, stops[0])
            done |= (position >= lens) & torch.isin(token, stops)
        out.append(token[:, None])
        if (done | (position + 1 - lens >= max_new_tokens)).all():
            break
    return torch.cat(out, dim=1)


def generate_prompts(model: "CausalLM", prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_id: int,
                     n: int = 1, max_rows: int | None = None, **sampling) -> list[Tensor]:
    """n completions of each prompt (token ids, any lengths): per prompt, (n, prompt_len + new) ids,
    right-padded with `stop_id` after each row's end.

    Prompts whose lengths lie within `max_new_tokens` of the shortest among them decode as one batch of
    at most `max_rows` rows (`generate`'s `prompt_lens`: every row at the same position), which takes at
    most twice the steps of a single prompt's decoding, however many prompts it holds."""
    device = next(model.parameters()).device
    per_batch = max(1, (max_rows or n * len(prompts)) // n)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Tensor] = [torch.empty(0)] * len(prompts)
    while order:
        group = [i for i in order[:per_batch] if len(prompts[i]) - len(prompts[order[0]]) <= max_new_tokens]
        order = order[len(group):]
        lens = torch.tensor([len(prompts[i]) for i in group], device=device).repeat_interleave(n)
        batch = torch.zeros(len(lens), int(lens.max()), dtype=torch.long, device=device)  # the padding is never read
        for g, i in enumerate(group):
            batch[g * n:(g + 1) * n, :len(prompts[i])] = torch.tensor(prompts[i], device=device)
        seq = generate(model, batch, max_new_tokens, prompt_lens=lens, stop_ids=stop_id, **sampling)
        for g, i in enumerate(group):
            out[i] = seq[g * n:(g + 1) * n, :len(prompts[i]) + max_new_tokens]
    return out


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (or are an incomplete UTF-8
    character), and so must not be shown yet."""
    if text.endswith("\ufffd"):  # byte-level BPE: the rest of this character comes with the next token
        return len(text)
    return max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream_text(model: "CausalLM", tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, *,
                stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), **sampling) -> Iterator[str]:
    """The continuation of one prompt as text pieces, yielded as the tokens are generated.

    Ends at a token of `stop_ids` or before the first stop string (neither is yielded). Text that
    might be the start of a stop string is held back until the next tokens decide it.
    """
    device = next(model.parameters()).device
    ids: list[int] = []
    shown = 0
    for token in decode(model, torch.tensor([list(prompt_ids)], device=device), max_new_tokens, **sampling):
        if int(token) in stop_ids:
            break
        ids.append(int(token))
        text = tokenizer.decode(ids)  # whole-sequence decode: merges across token boundaries come out right
        cut = min((i for s in stop_strings if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            if cut > shown:
                yield text[shown:cut]
            return
        end = len(text) - held_back(text, stop_strings)
        if end > shown:
            yield text[shown:end]
            shown = end
    text = tokenizer.decode(ids)  # what was held back was not a stop string after all
    if len(text) > shown:
        yield text[shown:]
