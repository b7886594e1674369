"""Training entry point: ``python -m openseed.train [experiment=NAME] [overrides]`` (Hydra; configs in conf/).

The default trains the small model on synthshapes (segmentation + detection) on the CPU: the data set is generated
and converted on first use, then the run trains, validates on every validation set, saves checkpoints
(``<output_dir>/checkpoints/last.ckpt``), prints a table of its validation metrics and writes a prediction overlay
of the first image of each validation set (``<output_dir>/prediction_<data set>_<task>.png``). ``ckpt_path=...``
resumes.
Missing data or unknown config keys stop the run before any heavy work, with a message that says what to set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from openseed.config import CONF
from openseed.evaluation.report import add_unseen_class_metrics, metrics_table, scalar_metrics

log = logging.getLogger("openseed.train")


# train.yaml's own keys and their types (the groups are checked against what they instantiate)
TOP_LEVEL_KEYS = {"name": str, "seed": int, "ckpt_path": str | None, "prediction_overlays": bool,
                  "prepare_synthshapes": bool, "synthshapes_variant": str}


def train(cfg: DictConfig) -> dict:
    """Build everything the config names, check the data, fit; returns the last validation metrics."""
    import lightning as L
    from hydra.utils import instantiate

    from openseed.config import check_config, check_values
    from openseed.console import quiet_known_noise
    from openseed.training.checkpoint_io import SafeCheckpointIO, resolve_resume

    quiet_known_noise()
    check_values(cfg, TOP_LEVEL_KEYS)  # wrong-typed values stop here, naming the key, before anything is built
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.prepare_synthshapes:
        _prepare_synthshapes(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup()  # missing or wrong data stops here, before the model is built
    model = instantiate(cfg.model)
    record_eval_resize(model, cfg.data)
    module = instantiate(cfg.module, model=model, criterion=instantiate(cfg.criterion))
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.get("callbacks") else []
    if cfg.trainer.get("enable_progress_bar") is False:  # trainer.enable_progress_bar=false: no progress display
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [SafeCheckpointIO()]}  # atomic checkpoint writes
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks, **plugins)
    ckpt_path = resolve_resume(cfg.ckpt_path, _checkpoint_dir(cfg))
    resolved = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                for key, value in cfg.items() if key != "hydra"}
    for logger in loggers or []:
        logger.log_hyperparams(resolved)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        results = getattr(module, "val_results", {})
        if trainer.is_global_zero:
            _report(cfg, results, datamodule, module, trainer, loggers or [])
    except BaseException:
        _finish_wandb(loggers, exit_code=1)  # the run is closed (and synced later) even when training crashes
        raise
    _finish_wandb(loggers, exit_code=0)
    return results


def _checkpoint_dir(cfg: DictConfig) -> str | None:
    """Where the run's ModelCheckpoint writes (what ``ckpt_path=last`` resumes from)."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint")
    return node.get("dirpath") if node is not None else None


def _prepare_synthshapes(cfg: DictConfig) -> None:
    """Generate + convert the synthshapes variant ``synthshapes_variant`` when missing: ``<data_dir>/synthshapes``
    (standard) or ``<data_dir>/synthshapes_<variant>``. A data config reading another synthshapes folder of the
    data dir is an error naming both keys (it would train on a set this run did not make or check)."""
    from data_prep.prepare_synthshapes import prepare_synthshapes
    from data_prep.synthetic import folder_name

    variant = cfg.synthshapes_variant
    data_dir = Path(cfg.paths.data_dir).resolve()
    root = data_dir / folder_name(variant)  # an unknown variant stops here, listing the known ones
    seg_path = (cfg.data.get("seg") or {}).get("path")
    if seg_path:
        read = Path(seg_path).resolve()
        if read.is_relative_to(data_dir) and read != data_dir:
            folder = read.relative_to(data_dir).parts[0]
            if folder.startswith("synthshapes") and folder != root.name:
                raise ValueError(f"data.seg.path={seg_path} reads {folder}, but synthshapes_variant={variant} "
                                 f"prepares {root.name}: set synthshapes_variant to the data's variant "
                                 f"(experiment=synthshapes_crowded sets both), or prepare_synthshapes=false")
    prepare_synthshapes(root, progress=False, variant=variant)


def record_eval_resize(model, data_cfg: DictConfig) -> None:
    """A model whose config names no evaluation resize records the one its validation uses (``data.eval_short_edge``
    / ``eval_max_size``), so that the tools reading its checkpoint later (``openseed.evaluation.runner``, box
    prompts, ``Predictor``) evaluate it as training did, not at their 1024 px fallback. A recorded resize (the
    released presets: 800 / 1333) is kept."""
    config = model.config
    if config.eval_short_edge is None and config.eval_max_size is None:
        model.config = replace(config, eval_short_edge=data_cfg.get("eval_short_edge"),
                               eval_max_size=data_cfg.get("eval_max_size"))


def _report(cfg: DictConfig, results: dict, datamodule, module, trainer, loggers: list) -> None:
    """The end of a run (global rank 0): metrics.json, final metrics to the loggers, the table, prediction overlays."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if results:
        seg_set = datamodule.train_sets.get("seg")
        if seg_set is not None:
            add_unseen_class_metrics(results, set(seg_set.vocabulary.names))
        scalars = scalar_metrics(results)
        (out / "metrics.json").write_text(json.dumps({"step": trainer.global_step, "metrics": scalars}, indent=1))
        for logger in loggers:
            logger.log_metrics({f"final/{name}/{key}": value for name, metrics in scalars.items()
                                for key, value in metrics.items()}, step=trainer.global_step)
        print(metrics_table(results))
    if cfg.get("prediction_overlays", True) and datamodule.val_sets:
        written = write_prediction_overlays(module.model, datamodule.val_sets, out,
                                            image_size=int(cfg.data.eval_max_size))
        print("prediction overlays: " + ", ".join(str(p) for p in written))
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({f"final/{p.stem}": wandb.Image(str(p)) for p in written})


def write_prediction_overlays(model, val_sets, out_dir: Path, image_size: int) -> list[Path]:
    """Predict the first image of each validation set and write the overlay PNG (+ its JSON) under ``out_dir``:
    ``prediction_<data set>_panoptic.png`` for panoptic sets, ``..._instance.png`` for detection sets (instances
    scoring >= 0.3 drawn; the JSON holds them all)."""
    from openseed.data.shards import read_shards
    from openseed.predict import Predictor

    device = next(model.parameters()).device
    predictor = Predictor(model, device=str(device), image_size=image_size)
    written = []
    for shards in val_sets:
        sample = next(iter(read_shards(shards.root)), None)
        if sample is None:
            continue
        array = sample.image.permute(1, 2, 0).cpu().numpy()
        task = "panoptic" if shards.task == "seg" else "instance"
        result = predictor(array, shards.vocabulary, task=task)
        written.append(result.save(out_dir, stem=f"prediction_{shards.name}", score_threshold=0.3)[0])
    return written


def _finish_wandb(loggers, exit_code: int) -> None:
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers or []):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> None:
    from openseed.config import ConfigError
    from openseed.data.coco import DataError
    from openseed.training.checkpoint_io import DamagedCheckpointError

    try:
        train(cfg)
    except (ConfigError, DataError, DamagedCheckpointError, FileNotFoundError) as err:
        log.error("%s", err)  # a bad value, file or data set: the message says what to change, no traceback
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
