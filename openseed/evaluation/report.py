"""What a run reports from its evaluators' results: the table it prints, the scalars its loggers and metrics.json
get, and the metrics of the classes the segmentation training never saw (training and ``openseed.evaluate``
alike)."""

from __future__ import annotations


def metrics_table(results: dict[str, dict]) -> str:
    """A markdown table of validation metrics (x100), one row per validation set."""
    keys = sorted({k for metrics in results.values() for k in metrics if k != "per_class"})
    lines = ["| data set | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, metrics in results.items():
        cells = [f"{100 * metrics[k]:.1f}" if k in metrics else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scalar_metrics(results: dict[str, dict]) -> dict[str, dict]:
    """``{data set: metrics}`` without the ``per_class`` details (what metrics.json and the loggers get)."""
    return {name: {k: v for k, v in metrics.items() if k != "per_class"} for name, metrics in results.items()}


def add_unseen_class_metrics(results: dict[str, dict], seg_classes: set[str]) -> None:
    """Adds ``box_AP_unseen`` / ``mask_AP_unseen`` to every validation set that has classes outside the segmentation
    training vocabulary (e.g. synthshapes' detection-only shapes): the mean per-class AP over those classes (COCO AP is
    the mean over classes with ground truth, so this is the AP of that class subset)."""
    for metrics in results.values():
        per_class = metrics.get("per_class", {})
        for key in ("box_AP", "mask_AP"):
            unseen = [ap for name, ap in per_class.get(key, {}).items() if name not in seg_classes]
            if unseen:
                values = [ap for ap in unseen if ap is not None and ap == ap and ap >= 0]  # classes with GT
                metrics[f"{key}_unseen"] = sum(values) / len(values) if values else 0.0
