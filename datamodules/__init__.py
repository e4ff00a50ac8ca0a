from datamodules.chat import ChatDataModule
from datamodules.preferences import PreferenceDataModule
from datamodules.prompts import PromptDataModule
from datamodules.token_shards import TokenShardDataModule

__all__ = ["TokenShardDataModule", "ChatDataModule", "PreferenceDataModule", "PromptDataModule"]
