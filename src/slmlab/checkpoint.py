"""Reading Lightning checkpoints: the model for inference or the next stage, the path to resume from.

Exporting to other formats is `slmlab.export`.
"""

import logging
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import torch

from slmlab.models import CausalLM, ModelConfig
from slmlab.models.lora import merged_state

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # the LightningModule holds the network as `self.model`


def check_checkpoint_file(path: str | Path) -> Path:
    """Check, without unpickling anything, that a checkpoint exists and is a complete, intact torch zip
    archive: its directory sits at the end of the file (a truncated write fails here) and every
    record matches its CRC-32 (torch.load checks none: damaged weights would load silently). Costs one
    read of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".gguf":  # not a damaged checkpoint: a format slmlab writes for llama.cpp only
        raise ValueError(f"{path} is a GGUF file (for llama.cpp); slmlab reads a checkpoint (.ckpt) or a folder "
                         "exported with format=hf or safetensors")
    if path.suffix == ".safetensors":  # not damaged either: an exported folder's weights, without its config.json
        raise ValueError(f"{path} holds an exported model's weights alone; pass the folder that holds it and its "
                         "config.json")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except Exception as e:  # damaged headers also raise EOFError, NotImplementedError, RuntimeError ("encrypted")
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if bad_record is not None:
        raise ValueError(f"checkpoint {path} is truncated or corrupt (record {bad_record} fails its CRC check)")
    return path


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with errors that name the file: missing, truncated/corrupt, or not from slmlab."""
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # zip/pickle errors say nothing about which file is bad
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: {e})") from e
    if "model_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an slmlab checkpoint (no 'model_config' / 'state_dict')")
    return ckpt


def resolve_ckpt_path(ckpt_path: str | None, resume: bool, trainer) -> str | None:
    """What `trainer.fit` should resume from. `ckpt_path=last` and `resume=true` take the newest intact
    checkpoint of the run's checkpoint directory (normally last.ckpt; see `newest_checkpoint`).
    `ckpt_path=last` must find one (a typo'd run name must not silently start over); `resume=true`
    starts afresh when the directory holds none."""
    if ckpt_path not in (None, "last"):
        check_checkpoint_file(ckpt_path)  # a clear error before any set-up
        return str(ckpt_path)
    if ckpt_path is None and not resume:
        return None
    dirpath = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback is not None else None
    newest = newest_checkpoint(dirpath) if dirpath else None
    if newest is None and ckpt_path == "last":
        raise FileNotFoundError(f"ckpt_path=last, but there is no last.ckpt (nor any other checkpoint) in {dirpath}; "
                                "pass the run_name of the run to resume")
    return newest


def newest_checkpoint(dirpath: str | Path) -> str | None:
    """The newest (by modification time) intact `*.ckpt` of a directory, or None when it holds none.

    A damaged one (truncated by a crash in a non-atomic write, or bit rot) is skipped with a warning
    naming it, so a run resumes from the one before. When every one is damaged that is an error: starting
    afresh would overwrite them.
    """
    # on equal times last.ckpt first: a validation writes its top-k copy and last.ckpt of one state
    candidates = sorted(Path(dirpath).glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"),
                        reverse=True)
    damaged = []
    for path in candidates:
        try:
            check_checkpoint_file(path)
        except ValueError as e:
            log.warning("skipping a damaged checkpoint: %s", e)
            damaged.append(path.name)
            continue
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint in %s", path.name, dirpath)
        return str(path)
    if damaged:
        raise ValueError(f"every checkpoint in {dirpath} is damaged ({', '.join(damaged)}); "
                         "move them away to start afresh")
    return None


def adapted_state(ckpt: dict) -> dict:
    """The network's state dict as trained: LoRA's base weights and adapters apart (`models.lora`)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def _model_state(ckpt: dict) -> dict:
    """The plain model's state dict (LoRA adapters folded into their weights)."""
    return merged_state(adapted_state(ckpt))


# kernels a training run asked for by name (model.kernel=fla, attention_kernel=flash_attn) need its
# machine; a model loaded to be used elsewhere (evaluation, chat, export, a teacher) takes what the machine
# it runs on has. They compute the same function (FREE_FIELDS).
PORTABLE_KERNELS = {"kernel": "auto", "attention_kernel": "auto"}


def load_model(path: str | Path) -> CausalLM:
    """The network of a checkpoint, in float32 on the CPU, in eval mode, on the kernels the device it
    moves to has (`PORTABLE_KERNELS`)."""
    ckpt = read_checkpoint(path)
    model = CausalLM(ModelConfig(**{**ckpt["model_config"], **PORTABLE_KERNELS}))
    model.load_state_dict(_model_state(ckpt))
    return model.eval()


# fields that neither shape the weights nor change what the model computes (initialisation included)
FREE_FIELDS = {"kernel", "attention_kernel", "mlp_kernel", "max_seq_len", "init_std", "activation_checkpointing",
               "gla_decay_init", "ssm_dt_min", "ssm_dt_max"}
# the fields of one mixer: compared only where a model has that mixer (a Hugging Face folder holds none)
MIXER_FIELDS = {"sparse_attention": ("sliding_window", "global_tokens"), "hgrn2": ("hgrn2_expand_ratio",),
                "mamba2": ("ssm_d_state", "ssm_d_conv", "ssm_expand", "ssm_headdim", "ssm_ngroups")}


def load_weights(model: CausalLM, path: str | Path) -> None:
    """Copies the weights of `path` into `model` (init_from): a Lightning checkpoint, or a folder
    exported by `slmlab.export` (ours or Hugging Face). Its model must be the configured one: any other
    difference (vocabulary, width, mixers...) is an error naming it."""
    if Path(path).is_dir():
        from slmlab.export import load_pretrained  # imported here: slmlab.export imports this module

        source = load_pretrained(path)
        theirs, state = asdict(source.cfg), source.state_dict()
    else:
        ckpt = read_checkpoint(path)
        theirs, state = ckpt["model_config"], _model_state(ckpt)
    check_architecture(theirs, model.cfg, f"init_from={path}")
    model.load_state_dict(state)


def check_architecture(theirs: dict, ours: ModelConfig, source: str) -> None:
    """ValueError naming each field in which a checkpoint's `model_config` differs from the configured
    model, among those that shape its weights or computation: the mixer of each layer however written
    (`mixer`, `layout`), and a mixer's own fields only where the model has that mixer; `source` says
    which checkpoint."""
    known = {f.name for f in fields(ModelConfig)}
    their_cfg = ModelConfig(**{k: v for k, v in theirs.items() if k in known})
    # as `load_model` reads it: a field the checkpoint predates has its default, n_kv_heads/head_dim resolved
    theirs, mixers = asdict(their_cfg), their_cfg.layer_mixers
    ignored = FREE_FIELDS | {"mixer", "layout"} | {
        key for mixer, keys in MIXER_FIELDS.items() if mixer not in mixers + ours.layer_mixers for key in keys}
    diff = [f"{key}: checkpoint {theirs.get(key)!r}, config {value!r}" for key, value in asdict(ours).items()
            if key not in ignored and theirs.get(key) != value]
    if mixers != ours.layer_mixers:
        diff.insert(0, f"layer mixers: checkpoint {','.join(mixers)}, config {','.join(ours.layer_mixers)}")
    if diff:
        raise ValueError(f"{source}: the checkpoint holds another architecture than model=... configures "
                         f"({'; '.join(diff)})")
