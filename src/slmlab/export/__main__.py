"""python -m slmlab.export ckpt=PATH format=safetensors|hf|gguf|peft out=DIR [tokenizer=PATH]
                          [dtype=float32|bfloat16] [gguf_type=F16|Q8_0]

ckpt: a Lightning checkpoint, or a folder `load_pretrained` reads (to convert between formats).
tokenizer: the tokenizer.json the model was trained with (required for hf, gguf and peft).
gguf writes OUT/model-<gguf_type>.gguf, or OUT itself when it ends in .gguf.
peft: the LoRA adapters of a `stage.lora_rank` run's checkpoint, and OUT/base, its base model (`export/peft.py`).
"""

import sys
from pathlib import Path

import torch

from slmlab.export.hf import export_hf
from slmlab.export.load import load_pretrained
from slmlab.export.native import export_safetensors_folder
from slmlab.export.peft import export_peft
from slmlab.export.tokenizer import TokenizerFiles

FORMATS = ("safetensors", "hf", "gguf", "peft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARGS = {"ckpt", "format", "out", "tokenizer", "dtype", "gguf_type"}


def parse_args(argv: list[str]) -> dict[str, str]:
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if malformed := [arg for arg in argv if "=" not in arg]:
        raise ValueError(f"arguments are key=value, got {malformed}")
    if unknown := set(args) - ARGS:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(ARGS)}")
    if missing := {"ckpt", "format", "out"} - set(args):
        raise ValueError(f"missing arguments {sorted(missing)}")
    if args["format"] not in FORMATS:
        raise ValueError(f"format={args['format']!r} is not one of {FORMATS}")
    if args["format"] in ("hf", "gguf", "peft") and "tokenizer" not in args:
        raise ValueError(f"format={args['format']} needs tokenizer=<tokenizer.json>: checkpoints do not record theirs")
    if args.setdefault("dtype", "float32") not in DTYPES:
        raise ValueError(f"dtype={args['dtype']!r} is not one of {sorted(DTYPES)}")
    return args


def export(args: dict[str, str]) -> Path:
    tokens = TokenizerFiles.load(args["tokenizer"]) if "tokenizer" in args else None
    out = Path(args["out"])
    if args["format"] == "peft":  # the checkpoint's adapters as trained, not the merged model
        if Path(args["ckpt"]).is_dir():
            raise ValueError(f"format=peft reads the Lightning checkpoint of a stage.lora_rank run; {args['ckpt']} "
                             "is a folder (exported models hold no adapters)")
        return export_peft(args["ckpt"], tokens, out, DTYPES[args["dtype"]])
    model = load_pretrained(args["ckpt"]).to(DTYPES[args["dtype"]])
    if args["format"] == "safetensors":
        return export_safetensors_folder(model, out, tokens)
    if args["format"] == "hf":
        return export_hf(model, tokens, out)
    from slmlab.export.gguf import export_gguf  # the gguf package is only needed here

    gguf_type = args.get("gguf_type", "F16")
    return export_gguf(model, tokens, out if out.suffix == ".gguf" else out / f"model-{gguf_type}.gguf", gguf_type)


def main(argv: list[str]) -> None:
    try:
        print(export(parse_args(argv)))
    except (FileNotFoundError, ValueError) as e:  # a wrong path or an unsupported model: no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
