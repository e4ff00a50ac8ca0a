"""slmlab's own export: `model.safetensors` + `config.json` (the ModelConfig) + the tokenizer files.

Holds any model, hybrids included; `slmlab.export.load_pretrained` reads it back.
"""

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_model

from slmlab.export.tokenizer import TokenizerFiles
from slmlab.models import CausalLM

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def export_safetensors_folder(model: CausalLM, out_dir: str | Path, tokens: TokenizerFiles | None = None) -> Path:
    """Weights in the model's own dtype; the tokenizer files when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE))  # tied weights are stored once
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")
    if tokens is not None:
        tokens.copy_to(out)
    return out
