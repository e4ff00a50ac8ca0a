"""Distributed strategies that need Python objects Hydra cannot write in YAML."""

from lightning.pytorch.strategies import FSDPStrategy

from slmlab.models.transformer import Block


def fsdp(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False) -> FSDPStrategy:
    """FSDP with one unit per transformer block (and optionally activation checkpointing per block)."""
    return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy,
                        activation_checkpointing_policy={Block} if activation_checkpointing else None)
