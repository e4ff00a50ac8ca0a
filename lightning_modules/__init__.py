from lightning_modules.base import LMModule
from lightning_modules.pretrain import PretrainModule

__all__ = ["LMModule", "PretrainModule"]
