"""Loss functions as pure functions of logits and labels."""

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from slmlab.ops import autocast_dtype

IGNORE_INDEX = -100


def lm_loss(logits: Tensor, labels: Tensor, z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy over labels != IGNORE_INDEX, plus `z_loss * mean(logsumexp^2)`.

    logits: (batch, seq, vocab); labels: (batch, seq), already shifted. Returns (loss to optimise,
    cross-entropy alone). The z-loss keeps the softmax normaliser near 1 (PaLM), which helps low
    precision training; it is computed over the same unmasked positions.
    """
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    mask = labels != IGNORE_INDEX
    # a sum over at least one: a micro-batch without labels (chat rows cut before their answer) gives 0,
    # as `chunked_lm_loss` does, not a NaN that would void its whole optimizer step
    count = mask.sum().clamp(min=1)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    if not z_loss:
        return ce, ce
    lse = torch.logsumexp(logits[mask], dim=-1)
    return ce + z_loss * lse.square().sum() / count, ce


def compute_dtype_of(hidden: Tensor) -> torch.dtype:
    """The dtype the head runs in: autocast's when it is on, else the hidden states'."""
    return autocast_dtype(hidden.device) or hidden.dtype


def _softmax_xent_grad(raw: Tensor, labels: Tensor, row_scale: Tensor, softcap: float | None,
                       z_loss: float, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """For one chunk of raw head outputs (rows, vocab): each row's logsumexp and target logit (float32,
    after the softcap and division by `temperature`), and the gradient of
    sum_r row_scale_r (lse_r - z_r[y_r] + z_loss lse_r^2) with respect to the raw outputs, in their
    dtype. Labels must be valid indices (mask through row_scale).

    Compiled on CUDA this is two passes over the bf16 logits and one bf16 write: none of the float32
    tensors autograd through `cross_entropy` writes and reads back (the logits' copy, their
    log-softmax, its gradient) is ever stored."""
    z = raw.float()
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    if temperature != 1.0:  # a Python float: the compiled kernel of the LM loss has no division
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.arange(z.shape[1], device=z.device) == labels[:, None]
    grad = torch.exp(z - lse[:, None]) * (row_scale * (1 + 2 * z_loss * lse))[:, None] - onehot * row_scale[:, None]
    if temperature != 1.0:
        grad = grad / temperature
    if t is not None:
        grad = grad * (1 - t * t)
    return lse, target, grad.to(raw.dtype)


@cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def softmax_xent_grad(raw: Tensor, labels: Tensor, row_scale: Tensor, softcap: float | None,
                      z_loss: float = 0.0, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """`_softmax_xent_grad`, fused by torch.compile on CUDA."""
    fn = _compiled(_softmax_xent_grad) if raw.is_cuda else _softmax_xent_grad
    return fn(raw, labels, row_scale, softcap, z_loss, temperature)


def _head(h: Tensor, w: Tensor) -> Tensor:
    """Raw logits of a chunk of rows through the head `w`, both in w's dtype (the compute dtype)."""
    with torch.autocast(h.device.type, enabled=False):
        return h.to(w.dtype) @ w.T


def _accumulate_head_grads(grad_logits: Tensor, h: Tensor, w: Tensor, grad_h: Tensor, grad_w: Tensor) -> None:
    """Writes d/dh into grad_h (the chunk's rows) and adds d/dw into float32 grad_w."""
    with torch.autocast(h.device.type, enabled=False):
        grad_h.copy_(grad_logits @ w)
        grad_w += (grad_logits.T @ h.to(w.dtype)).float()


def _fused_head_pass(hidden: Tensor, weight: Tensor, chunk_rows: int,
                     chunk_loss: Callable[[slice, Tensor], tuple[list[Tensor], Tensor]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Runs the head `weight` over `hidden` (tokens, d) a chunk of rows at a time. chunk_loss(rows, raw
    logits) gives the chunk's loss terms, each a sum over its rows, and the gradient of the loss with
    respect to the raw logits; the logits are freed before the next chunk. Returns the terms summed
    over all chunks, d loss / d hidden and d loss / d weight (float32)."""
    w = weight.to(compute_dtype_of(hidden))  # cast once, not per chunk
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    sums: list[Tensor] = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows]
        terms, grad_logits = chunk_loss(rows, _head(h, w))
        _accumulate_head_grads(grad_logits, h, w, grad_hidden[rows], grad_weight)
        sums = [a + b for a, b in zip(sums, terms)] if sums else terms
    return sums, grad_hidden, grad_weight


class _FusedHeadLoss(torch.autograd.Function):
    """A loss whose forward has already computed its gradients (`_fused_head_pass`) and saved them for
    hidden (input 0) and the head's weight (input 1): backward scales them; its other inputs get none."""

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *grad_logged: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
                *[None] * (len(ctx.needs_input_grad) - 2))


class _ChunkedLMLoss(_FusedHeadLoss):
    """Cross-entropy of `hidden @ weight.T` computed a chunk of rows at a time: forward computes each
    chunk's logits, loss and gradients at once (`softmax_xent_grad`) and frees the logits, so neither
    the (tokens, vocab) logits nor their float32 copy ever exist for the whole batch (Liger's fused
    linear cross-entropy). backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None, z_loss: float,
                chunk_rows: int) -> tuple[Tensor, Tensor]:
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)

        def chunk_loss(rows: slice, raw: Tensor) -> tuple[list[Tensor], Tensor]:
            scale = valid[rows].float()
            lse, target, grad_logits = softmax_xent_grad(raw, labels[rows].clamp(min=0), scale, softcap, z_loss)
            return [((lse - target) * scale).sum(), (lse.square() * scale).sum()], grad_logits

        (ce_sum, z_sum), grad_hidden, grad_weight = _fused_head_pass(hidden, weight, chunk_rows, chunk_loss)
        ctx.save_for_backward(grad_hidden / n_valid, (grad_weight / n_valid).to(weight.dtype))
        ce_mean = ce_sum / n_valid
        ctx.mark_non_differentiable(ce_mean)
        return (ce_sum + z_loss * z_sum) / n_valid, ce_mean


def chunked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None,
                    z_loss: float = 0.0, chunk_tokens: int = 8192) -> tuple[Tensor, Tensor]:
    """`lm_loss(softcap(hidden @ weight.T), labels, z_loss)` without materialising the logits of the
    whole batch: hidden (batch, seq, d), weight (vocab, d) (the LM head), labels (batch, seq).
    Returns (loss to optimise, cross-entropy alone; the latter carries no gradient)."""
    return _ChunkedLMLoss.apply(hidden.flatten(0, 1), weight, labels.flatten(), softcap, z_loss, chunk_tokens)


def token_logprobs(logits: Tensor, labels: Tensor, chunk_rows: int = 4) -> Tensor:
    """log p(label) per position: (batch, seq, vocab), (batch, seq) -> (batch, seq) float32, 0 where
    labels == IGNORE_INDEX. Rows are done a few at a time so the float32 log-softmax of the whole
    batch is never materialised (the largest tensor of DPO/GRPO steps otherwise)."""
    out = []
    for rows, row_labels in zip(logits.split(chunk_rows), labels.split(chunk_rows)):
        mask = row_labels != IGNORE_INDEX
        picked = rows.gather(-1, row_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
        out.append((picked - torch.logsumexp(rows.float(), dim=-1)) * mask)
    return torch.cat(out)


def _softcapped(raw: Tensor, softcap: float | None, temperature: float) -> Tensor:
    logits = raw.float()
    return (softcap * torch.tanh(logits / softcap) if softcap else logits) / temperature


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(label) per row of `softcap(hidden @ weight.T) / temperature`, a chunk of rows at a time. Per-row
    gradients arrive only in backward, which therefore recomputes each chunk's logits instead of
    autograd keeping them: neither pass ever holds the (tokens, vocab) logits or their float32 copy.
    The head runs in the autocast dtype of the forward, in both passes."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None, chunk_rows: int,
                temperature: float) -> Tensor:
        dtype = compute_dtype_of(hidden)
        w = weight.to(dtype)  # cast once, not per chunk
        out = torch.cat([token_logprobs(_softcapped(_head(h, w), softcap, temperature), lab, chunk_rows=len(h))
                         for h, lab in zip(hidden.split(chunk_rows), labels.split(chunk_rows))])
        ctx.save_for_backward(hidden, weight, labels)
        ctx.softcap, ctx.chunk_rows, ctx.dtype, ctx.temperature = softcap, chunk_rows, dtype, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(ctx.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, lab = hidden[rows], labels[rows]
            # d log p(y) / d logits = onehot(y) - softmax: the cross-entropy gradient scaled by -grad
            scale = -grad_out[rows].float() * (lab != IGNORE_INDEX)
            _, _, grad_logits = softmax_xent_grad(_head(h, w), lab.clamp(min=0), scale, ctx.softcap,
                                                  temperature=ctx.temperature)
            _accumulate_head_grads(grad_logits, h, w, grad_hidden[rows], grad_weight)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None,
                           chunk_tokens: int = 1024, temperature: float = 1.0) -> Tensor:
    """`token_logprobs(softcap(hidden @ weight.T) / temperature, labels)` without the whole batch's logits,
    in the forward or kept for the backward: hidden (batch, seq, d), weight (vocab, d), labels (batch, seq)
    -> (batch, seq) float32. DPO's and GRPO's per-token log-probs (GRPO's of the distribution it sampled
    from, at its temperature)."""
    out = _ChunkedTokenLogprobs.apply(hidden.flatten(0, 1), weight, labels.flatten(), softcap, chunk_tokens,
                                      temperature)
    return out.view(labels.shape)


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) on sequence log-probs, (batch,) each (summed; IPO's per-token means).

    sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h = policy margin - reference margin
             (eps = label_smoothing: conservative DPO, for noisy preferences);
    ipo:     (h - 1 / (2 beta))^2 (Azar et al. 2023).
    Returns (mean loss, chosen rewards, rejected rewards); reward = beta (policy - reference) log-prob.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use one of {DPO_LOSS_TYPES}")
    return losses.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantage: each reward normalised by the mean and std of its group of completions of
    the same prompt. rewards: (n_prompts * group_size,), groups contiguous."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def grpo_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor, advantages: Tensor, mask: Tensor,
              clip_eps: float = 0.2, kl_beta: float = 0.04) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's objective (Shao et al. 2024, DeepSeekMath eq. 3), to minimise.

    Per completion token: min(r A, clip(r, 1 - eps, 1 + eps) A) - beta KL, r = exp(logp - old_logp),
    KL the k3 estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0); averaged over each
    completion's tokens, then over completions. logps etc.: (n, seq); advantages: (n,); mask: (n, seq).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logps - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -(surrogate - kl_beta * kl)
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip_eps) & mask.bool()
    stats = {"kl": ((kl * mask).sum(dim=1) / lengths).mean().detach(),
             "clip_fraction": (clipped.sum() / mask.sum().clamp(min=1)).detach()}
    return loss, stats


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Forward KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et
    al. 2015) so gradients keep their scale across temperatures; mean over positions with a label (0
    without any, as `lm_loss`)."""
    t = temperature
    mask = (labels != IGNORE_INDEX).flatten()
    s = F.log_softmax(student_logits.float().flatten(0, 1)[mask] / t, dim=-1)
    p = F.log_softmax(teacher_logits.float().flatten(0, 1)[mask] / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="sum") / mask.sum().clamp(min=1) * t * t


def _distill_grad(raw: Tensor, teacher_raw: Tensor, labels: Tensor, valid: Tensor, softcap: float | None,
                  teacher_softcap: float | None, temperature: float, alpha: float,
                  z_loss: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For one chunk of raw student and teacher head outputs (rows, vocab): per row the student's
    logsumexp, its target logit and KL(teacher_T || student_T) (float32, after each model's softcap),
    and the gradient of sum_r valid_r (alpha T^2 KL_r + (1 - alpha) CE_r + z_loss lse_r^2) with respect
    to the raw student outputs, in their dtype. Labels must be valid indices (mask through `valid`)."""
    z = raw.float()
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, labels[:, None]).squeeze(1)
    log_student = torch.log_softmax(z / temperature, dim=-1)
    log_teacher = torch.log_softmax(_softcapped(teacher_raw, teacher_softcap, temperature), dim=-1)
    p_teacher = log_teacher.exp()
    kl = (p_teacher * (log_teacher - log_student)).sum(-1)
    p = torch.exp(z - lse[:, None])
    onehot = torch.arange(z.shape[1], device=z.device) == labels[:, None]
    # d(T^2 KL)/dz = T (p_student_T - p_teacher_T); d CE/dz = p - onehot; d lse^2/dz = 2 lse p
    grad = (alpha * temperature * (log_student.exp() - p_teacher) + (1 - alpha) * (p - onehot.float())
            + 2 * z_loss * lse[:, None] * p) * valid[:, None]
    if t is not None:
        grad = grad * (1 - t * t)
    return lse, target, kl, grad.to(raw.dtype)


class _ChunkedDistillLoss(_FusedHeadLoss):
    """`chunked_distill_loss`: both heads run a chunk of rows at a time; forward keeps the student's
    gradients and backward scales them, as `_ChunkedLMLoss`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, labels: Tensor,
                temperature: float, alpha: float, z_loss: float, softcap: float | None, teacher_softcap: float | None,
                chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        teacher_w = teacher_weight.to(compute_dtype_of(hidden))
        grad_fn = _compiled(_distill_grad) if hidden.is_cuda else _distill_grad

        def chunk_loss(rows: slice, raw: Tensor) -> tuple[list[Tensor], Tensor]:
            scale = valid[rows].float()
            lse, target, kl, grad_logits = grad_fn(raw, _head(teacher_hidden[rows], teacher_w), labels[rows].clamp(min=0),
                                                   scale, softcap, teacher_softcap, temperature, alpha, z_loss)
            return [(kl * scale).sum(), ((lse - target) * scale).sum(), (lse.square() * scale).sum()], grad_logits

        (kl_sum, ce_sum, z_sum), grad_hidden, grad_weight = _fused_head_pass(hidden, weight, chunk_rows, chunk_loss)
        ctx.save_for_backward(grad_hidden / n_valid, (grad_weight / n_valid).to(weight.dtype))
        kd, ce = kl_sum * temperature ** 2 / n_valid, ce_sum / n_valid
        ctx.mark_non_differentiable(kd, ce)
        return alpha * kd + (1 - alpha) * ce + z_loss * z_sum / n_valid, kd, ce


def chunked_distill_loss(hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                         labels: Tensor, temperature: float = 1.0, alpha: float = 0.5, z_loss: float = 0.0,
                         softcap: float | None = None, teacher_softcap: float | None = None,
                         chunk_tokens: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
    """Distillation's objective, `alpha * distill_loss + (1 - alpha) * cross-entropy` plus the z-loss term
    of `lm_loss`, for the logits `softcap(hidden @ weight.T)` (batch, seq, d) against the teacher's
    `teacher_softcap(teacher_hidden @ teacher_weight.T)`, without either model's logits of the whole
    batch: a chunk of `chunk_tokens` rows at a time, as `chunked_lm_loss`. Returns (loss to optimise,
    the distillation term, cross-entropy); the last two carry no gradient, and the teacher gets none."""
    return _ChunkedDistillLoss.apply(hidden.flatten(0, 1), weight, teacher_hidden.flatten(0, 1).detach(),
                                     teacher_weight.detach(), labels.flatten(), temperature, alpha, z_loss, softcap,
                                     teacher_softcap, chunk_tokens)
