from datamodules.token_shards import TokenShardDataModule

__all__ = ["TokenShardDataModule"]
