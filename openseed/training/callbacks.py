"""Lightning callbacks the platform adds: training throughput, and validation overlays for W&B (or PNG files
without W&B)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from lightning import Callback
from PIL import Image

from openseed.core.codecs import decode_panoptic_png
from openseed.modeling.postprocess import InferenceConfig, postprocess_batch


def _label_map(ids: np.ndarray, segments: list[dict], label_of: dict[int, int]) -> np.ndarray:
    """Panoptic id map -> class map (contiguous label + 1; 0 = void)."""
    out = np.zeros(ids.shape, dtype=np.int32)
    for segment in segments:
        out[ids == segment["id"]] = label_of[segment["category_id"]] + 1
    return out


class Throughput(Callback):
    """Logs training throughput every ``every_n_steps`` optimizer steps, measured over the steps since the last log
    (wall clock, data loading included; validation excluded): ``train/images_per_sec`` (all images of a step: seg +
    det), ``train/<task>/images_per_sec`` per data set, and ``train/sec_per_step``. Rates are per process: multiply by
    the world size for the whole job.

    Lightning's ``ThroughputMonitor`` was weighed for this and does not fit a joint step: it counts one batch size per
    step (no per-data-set rate of the seg + det step), logs no rate before its window of steps is full (a short run
    shows none), and logs validation throughput with the validation batch index as the step, which interleaves with
    the training steps on the logger's step axis."""

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._reset()

    def _reset(self) -> None:
        self.start: float | None = None
        self.steps = 0
        self.images: dict[str, int] = {}

    def on_train_epoch_start(self, trainer, module) -> None:
        self._reset()  # epoch boundaries (and validation before them) are not training time

    def on_validation_start(self, trainer, module) -> None:
        self._reset()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is None:
            return
        self.steps += 1
        parts = batch.items() if isinstance(batch, dict) else [("all", batch)]
        for task, part in parts:
            self.images[task] = self.images.get(task, 0) + len(part)
        if self.steps < self.every_n_steps:
            return
        seconds = max(time.perf_counter() - self.start, 1e-9)
        metrics = {"train/images_per_sec": sum(self.images.values()) / seconds,
                   "train/sec_per_step": seconds / self.steps}
        metrics.update({f"train/{task}/images_per_sec": n / seconds for task, n in self.images.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._reset()
        self.start = time.perf_counter()


class ValidationOverlays(Callback):
    """Logs the first ``num_images`` of every validation set, each validation.

    Panoptic sets: the image with the predicted and the ground-truth panoptic class maps as W&B mask overlays.
    Detection sets: the image with the predicted instances scoring at least ``score_threshold`` (boxes, and their masks
    as a class map when the model predicts masks) and the ground-truth boxes (W&B box overlays). Without a W&B logger,
    writes side-by-side PNGs (prediction | ground truth) under ``<log dir>/overlays``."""

    def __init__(self, num_images: int = 4, inference: InferenceConfig | None = None, score_threshold: float = 0.3):
        self.num_images, self.inference = num_images, inference or InferenceConfig()
        self.score_threshold = score_threshold
        self.pending: dict[int, list[dict]] = {}

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.pending = {}

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        kept = self.pending.setdefault(dataloader_idx, [])
        if outputs is None or len(kept) >= self.num_images or batch.annotations is None:
            return
        padded = tuple(batch.images.shape[-2:])
        task = "panoptic" if batch.task == "seg" else "instance"
        results = postprocess_batch(outputs, batch.targets, batch.vocabulary, padded, task, self.inference)
        label_of = {c.id: i for i, c in enumerate(batch.vocabulary.categories)}
        classes = {i + 1: n for i, n in enumerate(batch.vocabulary.prompt_names())}
        for result, annotation, target, image in zip(results, batch.annotations, batch.targets, batch.images):
            if len(kept) >= self.num_images:
                break
            height, width = target.orig_size
            picture = Image.fromarray(image[:, : target.image_size[0], : target.image_size[1]].permute(1, 2, 0)
                                      .cpu().numpy()).resize((width, height))
            item = {"image": np.asarray(picture), "classes": classes}
            if task == "panoptic":
                truth_ids = decode_panoptic_png(annotation["panoptic_png"])
                truth_segments = [{"id": o["segment_id"], "category_id": o["category_id"]}
                                  for o in annotation["json"]["objects"]]
                item["prediction"] = _label_map(result.panoptic_seg.cpu().numpy(), result.segments_info, label_of)
                item["truth"] = _label_map(truth_ids, truth_segments, label_of)
            else:
                shown = result.cpu()[result.scores.cpu() >= self.score_threshold]
                item["pred_boxes"] = shown.boxes.numpy()
                item["pred_labels"] = shown.labels.numpy() + 1
                item["pred_scores"] = shown.scores.numpy()
                if shown.masks is not None:
                    item["pred_masks"] = shown.masks.numpy()
                objects = [o for o in annotation["json"]["objects"] if not o.get("iscrowd")]
                item["true_boxes"] = np.array([o["bbox"] for o in objects], dtype=np.float32).reshape(-1, 4)
                item["true_labels"] = np.array([label_of[o["category_id"]] + 1 for o in objects], dtype=np.int64)
            kept.append(item)

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        names = [s.name for s in trainer.datamodule.val_sets]
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        for index, items in self.pending.items():
            if not items:
                continue
            name = names[index]
            if wandb_loggers:
                images = [_wandb_image(item) for item in items]
                for logger in wandb_loggers:
                    logger.experiment.log({f"val/{name}/overlays": images, "trainer/global_step": trainer.global_step})
            else:
                folder = Path(trainer.log_dir or trainer.default_root_dir) / "overlays"
                folder.mkdir(parents=True, exist_ok=True)
                _overlay_grid(items).save(folder / f"{name}_step{trainer.global_step:07d}.png")


def _wandb_boxes(boxes: np.ndarray, labels: np.ndarray, classes: dict[int, str], scores=None) -> dict:
    data = []
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        entry = {"position": {"minX": box[0], "minY": box[1], "maxX": box[2], "maxY": box[3]}, "domain": "pixel",
                 "class_id": int(label), "box_caption": classes[int(label)]}
        if scores is not None:
            entry["scores"] = {"score": float(scores[k])}
            entry["box_caption"] += f" {float(scores[k]):.2f}"
        data.append(entry)
    return {"box_data": data, "class_labels": classes}


def _wandb_image(item: dict):
    import wandb

    masks = {}
    if "truth" in item:  # panoptic
        masks["prediction"] = {"mask_data": item["prediction"], "class_labels": item["classes"]}
        masks["ground_truth"] = {"mask_data": item["truth"], "class_labels": item["classes"]}
    boxes = None
    if "pred_boxes" in item:  # detection
        if item.get("pred_masks") is not None:
            label_map = np.zeros(item["image"].shape[:2], dtype=np.int32)
            for index in np.argsort(item["pred_scores"]):  # higher scores painted last, on top
                label_map[item["pred_masks"][index]] = item["pred_labels"][index]
            masks["prediction"] = {"mask_data": label_map, "class_labels": item["classes"]}
        boxes = {"prediction": _wandb_boxes(item["pred_boxes"], item["pred_labels"], item["classes"],
                                            item["pred_scores"]),
                 "ground_truth": _wandb_boxes(item["true_boxes"], item["true_labels"], item["classes"])}
    return wandb.Image(item["image"], masks=masks or None, boxes=boxes)


def _overlay_grid(items: list[dict]):
    """Rows of (prediction | ground truth) pictures."""
    from openseed.visualize import draw_overlay, grid

    def from_label_map(label_map, classes):
        present = [v for v in np.unique(label_map) if v]
        masks = np.stack([label_map == v for v in present]) if present else None
        return masks, [classes[int(v)] for v in present]

    pictures = []
    for item in items:
        if "pred_boxes" in item:
            masks = item.get("pred_masks")
            masks = masks if masks is not None and len(masks) else None
            names = [f"{item['classes'][int(v)]} {s:.2f}" for v, s in zip(item["pred_labels"], item["pred_scores"])]
            pictures.append(draw_overlay(item["image"], masks, item["pred_boxes"], names))
            pictures.append(draw_overlay(item["image"], None, item["true_boxes"],
                                         [item["classes"][int(v)] for v in item["true_labels"]]))
        else:
            for key in ("prediction", "truth"):
                masks, names = from_label_map(item[key], item["classes"])
                pictures.append(draw_overlay(item["image"], masks, None, names))
    return grid(pictures, columns=2)
