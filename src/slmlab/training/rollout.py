"""Sampling completions of chat prompts from the policy being trained, and reading them back:
the rollouts of GRPO and of on-policy DPO, and the constraint pass-rate of greedy answers."""

import torch
from tokenizers import Tokenizer

from slmlab.models import CausalLM
from slmlab.models.generate import generate_prompts
from slmlab.rewards import all_pass, score
from slmlab.training.losses import IGNORE_INDEX


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


class PassRate:
    """Constraint-following of greedy answers to held-out prompts (`PromptDataModule` items): the
    fraction whose every constraint passes, and the mean reward, summed over ranks."""

    def __init__(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens
        self.passed: list[bool] = []
        self.rewards: list[float] = []

    def add(self, model: CausalLM, items: list[dict], tokenizer: Tokenizer, eos_id: int) -> None:
        was_training = model.training
        model.eval()
        seqs = generate_prompts(model, [item["prompt_ids"] for item in items], self.max_new_tokens, stop_id=eos_id,
                                temperature=0)
        for item, seq in zip(items, seqs):
            text = completion_texts(tokenizer, seq, completion_labels(seq, len(item["prompt_ids"]), eos_id), eos_id)[0]
            self.passed.append(all_pass(text, item["constraints"]))
            self.rewards.append(score(text, item["constraints"]))
        model.train(was_training)

    def metrics(self, strategy, device: torch.device, prefix: str = "val") -> dict[str, float]:
        """{prefix/pass_rate, prefix/reward} over every rank's answers; {} when there were none."""
        counts = torch.tensor([sum(self.passed), sum(self.rewards), len(self.passed)], dtype=torch.float64, device=device)
        passed, reward, n = strategy.reduce(counts, reduce_op="sum").tolist()
        return {f"{prefix}/pass_rate": passed / n, f"{prefix}/reward": reward / n} if n else {}
