"""Evaluation entry point: ``python -m openseed.evaluate ckpt_path=PATH [data=NAME] [overrides]`` (conf/evaluate.yaml).

Loads a model from a Lightning checkpoint of ``openseed.train`` or a model file (``openseed.modeling.checkpoint``),
evaluates it on every validation set of the data config (by default the same sets and batch sizes as the training's
validation, resized as the model records when it does, e.g. 800 / 1333 for converted released checkpoints, else as
the data config says; ``eval_resize=data`` forces the latter) with the evaluation runner's ``DatasetEvaluator`` (each
data set on its own vocabulary, prompt-ensembled class names; the model's recorded instance top-k and box clipping
unless ``inference`` overrides them), prints a metrics table and writes ``<output_dir>/metrics.json``:
``{"ckpt_path": ..., "metrics": {set name: {"PQ": ..., "box_AP": ...}}, "per_class": {set name: {...}}}``, metrics as
fractions (the training's ``metrics.json`` has the same ``metrics``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from openseed.config import CONF, check_values
from openseed.evaluation.report import metrics_table, scalar_metrics

log = logging.getLogger("openseed.evaluate")
USAGE = ("python -m openseed.evaluate ckpt_path=PATH, PATH a training checkpoint (e.g. "
         "outputs/<run>/checkpoints/last.ckpt) or a model file written by openseed.modeling.checkpoint.save_model")


def checkpoint_file(ckpt_path) -> Path:
    """The checkpoint file ``ckpt_path`` names. Raises ValueError when unset, FileNotFoundError when not a file."""
    if ckpt_path is None or str(ckpt_path).strip() == "":
        raise ValueError(f"ckpt_path is required. Usage: {USAGE}")
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"ckpt_path={path}: {what}. Usage: {USAGE}")
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Evaluate ``cfg.ckpt_path`` on every ``cfg.data.val`` set; returns ``{set name: metrics}`` and writes them to
    ``<cfg.output_dir>/metrics.json``."""
    from hydra.utils import instantiate

    from openseed.config import check_config
    from openseed.evaluation.runner import DatasetEvaluator, evaluate_batches
    from openseed.modeling.openseed import load_model, read_model_config
    from openseed.modeling.postprocess import InferenceConfig

    check_values(cfg, {"device": str, "eval_resize": str, "model_overrides": dict, "inference": dict})
    check_config(cfg, keys=("data",))  # wrong-typed data values named before anything is read
    path = checkpoint_file(cfg.get("ckpt_path"))
    if cfg.get("benchmark"):
        return evaluate_benchmark(cfg, path)
    if not cfg.data.get("val"):
        raise ValueError("the data config has no validation sets (data.val): nothing to evaluate")
    if cfg.eval_resize not in ("auto", "data"):
        raise ValueError(f"eval_resize must be 'auto' or 'data', not {cfg.eval_resize!r}")
    recorded = read_model_config(path)  # the file's config only: its weights are not read yet
    resize = {}
    if cfg.eval_resize == "auto" and recorded.eval_short_edge is not None:
        resize = {"eval_short_edge": recorded.eval_short_edge, "eval_max_size": recorded.eval_max_size}
        log.info("evaluation resize of the model: shortest edge %s, longest at most %s", *resize.values())
    datamodule = instantiate(cfg.data, seg=None, det=None, **resize)  # the validation sets only
    datamodule.setup()  # missing data stops here, before the model is loaded
    inference = InferenceConfig.for_model(recorded, **OmegaConf.to_container(cfg.inference, resolve=True))
    overrides = OmegaConf.to_container(cfg.model_overrides, resolve=True)
    device = _device(cfg.device)
    model = load_model(path, **overrides).to(device).eval()
    log.info("evaluating %s on %s", path, ", ".join(s.name for s in datamodule.val_sets))
    results = {}
    for shards, loader in zip(datamodule.val_sets, datamodule.val_dataloader()):
        results[shards.name] = evaluate_batches(model, loader, DatasetEvaluator.for_shards(shards, inference), device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scalars = scalar_metrics(results)
    per_class = {name: metrics.get("per_class", {}) for name, metrics in results.items()}
    (out / "metrics.json").write_text(json.dumps({"ckpt_path": str(path), "metrics": scalars, "per_class": per_class},
                                                 indent=1))
    print(metrics_table(results))
    log.info("metrics written to %s", out / "metrics.json")
    return results


def evaluate_benchmark(cfg: DictConfig, path: Path) -> dict[str, dict]:
    """One protocol of conf/benchmark (``cfg.benchmark``, composed by Hydra) on its sets under
    ``cfg.benchmark_root``; writes ``benchmarks.json`` / ``benchmarks.md`` to ``cfg.output_dir`` and returns
    ``{set name: metrics}``."""
    from openseed.evaluation.benchmark import PAPER_MODELS, Protocol, model_evaluator, run_benchmarks, write_report
    from openseed.modeling.openseed import load_model

    check_values(cfg, {"benchmark_root": str, "benchmark_batch_size": int, "benchmark_paper_model": str})
    if cfg.benchmark_paper_model not in PAPER_MODELS:
        raise ValueError(f"benchmark_paper_model must be one of {PAPER_MODELS}, not {cfg.benchmark_paper_model!r}")
    data = OmegaConf.to_container(cfg.benchmark, resolve=True)
    protocol = Protocol.from_dict(str(data.get("name")), data, "benchmark")
    root = Path(cfg.benchmark_root)
    found, missing = protocol.shard_sets(root)
    if missing:
        raise FileNotFoundError(f"benchmark {protocol.name}: {', '.join(missing)} not found under {root} "
                                "(convert them first: docs/evaluation.md)")
    model = load_model(path, **OmegaConf.to_container(cfg.model_overrides, resolve=True)).eval()
    evaluate_set = model_evaluator(model, cfg.benchmark_batch_size, str(_device(cfg.device)))
    report = run_benchmarks(evaluate_set, root, [protocol], cfg.benchmark_paper_model)
    json_path, _ = write_report(report, cfg.output_dir)
    print(report.markdown())
    log.info("benchmark written to %s", json_path)
    return report.metrics


@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
