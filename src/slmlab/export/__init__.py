"""Export slmlab models (safetensors, Hugging Face transformers, GGUF) and load them back.

    python -m slmlab.export ckpt=outputs/<run>/checkpoints/last.ckpt format=hf tokenizer=<tokenizer.json> out=exported/
"""

from slmlab.export.hf import UnsupportedModelError, export_hf
from slmlab.export.load import load_pretrained
from slmlab.export.native import export_safetensors_folder
from slmlab.export.tokenizer import TokenizerFiles

__all__ = ["TokenizerFiles", "UnsupportedModelError", "export_hf", "export_safetensors_folder", "load_pretrained"]
