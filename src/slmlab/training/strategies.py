"""Distributed strategies that need Python objects Hydra cannot write in YAML."""

from lightning.pytorch.strategies import FSDPStrategy, Strategy

from slmlab.models.transformer import Block


def fsdp(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = False) -> FSDPStrategy:
    """FSDP with one unit per transformer block (and optionally activation checkpointing per block)."""
    return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy,
                        activation_checkpointing_policy={Block} if activation_checkpointing else None)


def shards_parameters(strategy: Strategy) -> bool:
    """Whether each rank holds only a shard of every parameter and gradient (FSDP): every forward then
    gathers each block's parameters from all ranks, in step, and a gradient norm needs all shards."""
    return isinstance(strategy, FSDPStrategy)
