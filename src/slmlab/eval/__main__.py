"""python -m slmlab.eval ckpt=PATH suite=bpb|probes|lm_eval[,...] [key=value ...] [Hydra overrides ...]

ckpt: a Lightning checkpoint or an exported folder (`slmlab.export.load_pretrained`).
Keys: tokenizer (default: the tokenizer.json of an exported folder, else the data config's
tokenizer at the model's vocabulary size), probes (a jsonl; default: the Debian en/de probes),
tasks (lm_eval, comma-separated), include_path (a folder of extra lm_eval task YAMLs), limit,
num_fewshot, batch_size (16), seed (1234), device.
Any other argument is a Hydra override of the training config; it picks the validation data of
`suite=bpb`, e.g. `data=de_en paths.artifacts=/data/artifacts data.batch_size=32`; a model trained with
`stage.document_mask=true` is evaluated so with that override too.
Each suite starts from `seed_everything(seed)` and prints a table.
"""

import sys

from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from slmlab.config import tokenizer_path, training_config
from slmlab.eval.bpb import bits_per_byte
from slmlab.eval.probes import DEFAULT_PROBES, load_probes, probe_report
from slmlab.eval.seed import seed_everything
from slmlab.export.load import load_pretrained, to_device
from slmlab.export.tokenizer import find_tokenizer
from slmlab.models import CausalLM

SUITES = ("bpb", "probes", "lm_eval")
KEYS = {"ckpt", "suite", "tokenizer", "probes", "tasks", "include_path", "limit", "num_fewshot", "batch_size",
        "seed", "device"}


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(our key=value arguments, Hydra overrides)."""
    args, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in KEYS:
            args[key] = value
        else:
            overrides.append(arg)
    if missing := {"ckpt", "suite"} - set(args):
        raise ValueError(f"missing arguments {sorted(missing)}")
    if unknown := set(args["suite"].split(",")) - set(SUITES):
        raise ValueError(f"suite: {sorted(unknown)} not among {SUITES}")
    if "lm_eval" in args["suite"] and "tasks" not in args:
        raise ValueError("suite=lm_eval needs tasks=<task>[,<task>...]")
    return args, overrides


def table(rows: dict[str, dict[str, float]]) -> str:
    """Right-aligned columns: one row per name, floats to 4 decimals."""
    columns = list(next(iter(rows.values())))
    cells = [["", *columns]] + [[name, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values())]
                                for name, row in rows.items()]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)


def run_suite(suite: str, model: CausalLM, args: dict[str, str], cfg: DictConfig) -> str:
    seed = int(args.get("seed", 1234))
    seed_everything(seed)
    batch_size = int(args.get("batch_size", 16))
    if suite == "bpb":
        return table(bits_per_byte(model, instantiate(cfg.data), cfg.stage.get("document_mask", False)))
    tokens = find_tokenizer(args["ckpt"], tokenizer_path(cfg.data), args.get("tokenizer"))
    tokens.check_fits(model.cfg.vocab_size)  # else ids past the embedding fail inside it, naming no file
    if suite == "probes":
        return table(probe_report(model, tokens.tokenizer, load_probes(args.get("probes", DEFAULT_PROBES)), batch_size))
    # lm-eval is an optional dependency: imported only for its suite
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from slmlab.eval.lm_eval_adapter import SlmlabLM

    results = lm_eval.simple_evaluate(
        model=SlmlabLM(model, str(tokens.path), batch_size, device=args.get("device")),
        tasks=args["tasks"].split(","), num_fewshot=int(args["num_fewshot"]) if "num_fewshot" in args else None,
        limit=float(args["limit"]) if "limit" in args else None,
        task_manager=TaskManager(include_path=args.get("include_path")),
        **{f"{kind}_seed": seed for kind in ("random", "numpy_random", "torch_random", "fewshot_random")})
    return make_table(results)


def main(argv: list[str]) -> None:
    try:
        args, overrides = split_args(argv)
        model = load_pretrained(args["ckpt"])
        if "device" in args:
            model = to_device(model, args["device"])
        cfg = training_config(model.cfg, overrides)
        for suite in args["suite"].split(","):
            print(f"== {suite}\n{run_suite(suite, model, args, cfg)}")
    except (FileNotFoundError, ValueError, HydraException) as e:  # a wrong path or argument: no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
