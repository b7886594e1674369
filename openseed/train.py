"""Training entry point: ``python -m openseed.train [experiment=NAME] [overrides]`` (Hydra; configs in conf/).

The default trains the small model on synthshapes (segmentation + detection) on the CPU: the data set is generated
and converted on first use, then the run trains, validates on every validation set, saves checkpoints
(``<output_dir>/checkpoints/last.ckpt``) and prints a table of its validation metrics. ``ckpt_path=...`` resumes.
Missing data or unknown config keys stop the run before any heavy work, with a message that says what to set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("openseed.train")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def metrics_table(results: dict[str, dict]) -> str:
    """A markdown table of validation metrics (x100), one row per validation set."""
    keys = sorted({k for metrics in results.values() for k in metrics if k != "per_class"})
    lines = ["| data set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, metrics in results.items():
        cells = [f"{100 * metrics[k]:.1f}" if k in metrics else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict:
    """Build everything the config names, check the data, fit; returns the last validation metrics."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True)
    if cfg.prepare_synthshapes:
        from data_prep.prepare_synthshapes import prepare_synthshapes

        prepare_synthshapes(Path(cfg.paths.data_dir) / "synthshapes", progress=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup()  # missing or wrong data stops here, before the model is built
    model = instantiate(cfg.model)
    module = instantiate(cfg.module, model=model, criterion=instantiate(cfg.criterion))
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    resolved = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                for key, value in cfg.items() if key != "hydra"}
    for logger in loggers or []:
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except BaseException:
        _finish_wandb(loggers, exit_code=1)  # the run is closed (and synced later) even when training crashes
        raise
    _finish_wandb(loggers, exit_code=0)
    results = getattr(module, "val_results", {})
    if results and trainer.is_global_zero:
        print(metrics_table(results))
    return results


def _finish_wandb(loggers, exit_code: int) -> None:
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers or []):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
