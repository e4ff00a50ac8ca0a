from lightning_modules.base import LMModule
from lightning_modules.distill import DistillModule
from lightning_modules.dpo import DPOModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.pretrain import PretrainModule
from lightning_modules.sft import SFTModule

__all__ = ["DPOModule", "DistillModule", "GRPOModule", "LMModule", "PretrainModule", "SFTModule"]
