from slmlab.models.config import ModelConfig
from slmlab.models.transformer import CausalLM

__all__ = ["CausalLM", "ModelConfig"]
