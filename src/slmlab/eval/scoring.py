"""Log-likelihood of continuations given contexts: what the probes and the lm-eval adapter score.

A context starts with `<|endoftext|>`: every training document follows one in the token stream,
so it marks "start of a document" (as BOS does for other models). Contexts and continuations
are tokenized together and split where the context's tokens end, as lm-evaluation-harness does
for causal models, so a continuation's tokens are the ones the model would see after the context.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from slmlab.data.tokenizer import EOS
from slmlab.models import CausalLM
from slmlab.training.losses import IGNORE_INDEX, token_logprobs


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(token) over the continuation, in nats
    greedy: bool  # whether every continuation token is the argmax given what precedes it
    tokens: int  # continuation length in tokens


def encode(tokenizer: Tokenizer, text: str, start_of_document: bool = True) -> list[int]:
    """Token ids of `text`, after EOS if asked; special-token strings in the text (a chat prompt's
    `<|im_start|>`) become their tokens, as Hugging Face tokenizers do."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [tokenizer.token_to_id(EOS), *ids] if start_of_document else ids


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); trailing spaces of the context move to the continuation,
    where byte-level BPE attaches a space (to the word after it)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score_continuations(model: CausalLM, pairs: Sequence[tuple[list[int], list[int]]],
                        batch_size: int = 16) -> list[Score]:
    """One `Score` per (context ids, continuation ids), in order.

    Longest first in right-padded batches (padding after a row cannot change its causal logits);
    contexts are cut from the left to fit `max_seq_len` positions.
    """
    if batch_size < 1:  # else range() fails naming no setting (0), or nothing is scored (negative)
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    max_len = model.cfg.max_seq_len
    device = model.lm_head.weight.device
    for context, continuation in pairs:
        if not context or len(continuation) > max_len:
            raise ValueError(f"cannot score a {len(continuation)}-token continuation after {len(context)} context "
                             f"tokens: needs a context and at most max_seq_len={max_len} continuation tokens")
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    scores: list[Score | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-(max_len + 1):] for i in rows]  # the last token is only a target
        width = max(len(s) for s in seqs) - 1
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, (i, seq) in enumerate(zip(rows, seqs)):
            n, k = len(seq) - 1, len(pairs[i][1])
            inputs[r, :n] = torch.tensor(seq[:-1])
            labels[r, n - k:n] = torch.tensor(seq[n + 1 - k:])  # position t predicts token t + 1
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        logprobs = token_logprobs(logits, labels).double().sum(-1)
        greedy = ((logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(-1)
        for r, i in enumerate(rows):
            scores[i] = Score(logprobs[r].item(), bool(greedy[r]), len(pairs[i][1]))
    return scores
