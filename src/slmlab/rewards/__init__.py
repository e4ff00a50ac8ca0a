"""Verifiable rewards: IFEval-style checkable instructions, scored by rule for GRPO.

    constraints = random_constraints(random.Random(0), k=3)          # plain dicts
    prompt = question + "\n" + " ".join(map(describe, constraints))
    reward = score(answer, constraints)                              # fraction satisfied
"""

from slmlab.rewards.constraints import CONSTRAINTS, DESCRIPTIONS, check, describe
from slmlab.rewards.language import LANGUAGES, detect_language
from slmlab.rewards.reward import INCOMPATIBLE, MAX_CONSTRAINTS, all_pass, compatible, random_constraints, score

__all__ = [
    "CONSTRAINTS", "DESCRIPTIONS", "INCOMPATIBLE", "LANGUAGES", "MAX_CONSTRAINTS", "all_pass", "check",
    "compatible", "describe", "detect_language", "random_constraints", "score",
]
