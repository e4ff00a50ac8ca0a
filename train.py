"""Compose the config, instantiate data, stage, callbacks, loggers and trainer, then fit.

    python train.py                                          # tiny model, embedded en/de corpus, CPU
    python train.py experiment=helios_nova_pretrain          # a named recipe
    python train.py model=helium_nano trainer=gpu optim.lr=1e-3
    python train.py run_name=my_run ckpt_path=last           # resume outputs/my_run exactly
"""

import logging
import warnings
from contextlib import nullcontext

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from slmlab.checkpoint import resolve_ckpt_path
from slmlab.config import check_argument_types, register_configs
from slmlab.training.kernel_warmup import KernelWarmup

register_configs()
# Lightning advertises its cloud logger in every run (a filter set once, not per train() of a multirun)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡"))


def train(cfg: DictConfig) -> float | None:
    """Runs one configuration; returns the final validation loss (the metric sweeps optimise)."""
    warmup = instantiate(cfg.kernel_warmup) if cfg.get("kernel_warmup") else KernelWarmup()
    # imported once the warm-up compiles: Lightning alone takes seconds to import
    import lightning as L
    from lightning.pytorch.callbacks import WeightAveraging

    from slmlab.training.faults import preflight
    from slmlab.training.strategies import shards_parameters

    # `import lightning` adds a console handler of its own; beside Hydra's (console, train.log) every
    # Lightning message printed twice
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()

    check_argument_types(cfg)  # stage.*, trainer.* and callbacks.* have no schema: a wrong type is named here
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    # `callbacks.sample=null` / `logger.csv=null` switch one off
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    # a weight average first: its weights are in the module before the others' end-of-training hooks
    callbacks.sort(key=lambda c: not isinstance(c, WeightAveraging))
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    # built on the training device: on a GPU the weights are drawn there (seconds saved for 1B models);
    # FSDP builds on the CPU and shards in setup
    with nullcontext() if shards_parameters(trainer.strategy) else trainer.init_module():
        module = instantiate(cfg.stage)
    preflight(cfg.paths.output_dir, module)  # writable, room for a checkpoint: fail now, not at the first save
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    warmup.wait()  # before the first step, so the step finds every kernel compiled
    with warnings.catch_warnings():
        # the EMA callback warns that a module overriding configure_model may shard layers it cannot
        # average: slmlab's only compiles the blocks, and EMA under FSDP is refused before the first step
        warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model that")
        # Lightning's own use of a torch pytree API that newer torch deprecates, once in every run
        warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)` is deprecated")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, cfg.resume, trainer))
    val_loss = trainer.callback_metrics.get("val/loss")
    return None if val_loss is None else float(val_loss)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
