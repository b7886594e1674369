"""Evaluating a model on any converted data set, with that data set's own vocabulary (zero-shot or not).

``DatasetEvaluator`` turns the model's outputs for evaluation batches (``OpenSeeDDataModule.val_dataloader`` or
``EvalDataset``) into standard predictions and scores them against the ground truth the batches carry, at the
original image size:

- panoptic data (``task == "seg"``): PQ / SQ / RQ (all, things, stuff), mask and box AP of the thing classes
  (COCO instance protocol on the thing segments; crowd segments as crowd), mIoU (void = ignore);
- detection data: box AP, and mask AP when the data set has masks; a federated set (LVIS: its manifest has
  ``category_frequency``) with LVIS's own protocol (``openseed.evaluation.lvis``), which adds APr / APc / APf;
- semantic data (``task == "sem"``): mIoU, fwIoU, pixel and mean class accuracy (void = ignore).

The model runs in evaluation mode, so class names are embedded with the prompt ensemble. Metrics are fractions
(1.0 = perfect). Command line::

    python -m openseed.evaluation.runner ckpt=model.safetensors shards=[data/shards/ade20k_val] \
        [image_size=1024] [json=true]
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from openseed.cli import Option, command, integer, path, string_list
from openseed.core.batch import Batch
from openseed.core.boxes import stored_box_xywh
from openseed.core.coco import instances_to_coco
from openseed.core.codecs import decode_label_png, decode_panoptic_png, encode_rle
from openseed.core.outputs import Outputs
from openseed.core.predictions import Instances, PanopticSegmentation, SemanticSegmentation
from openseed.core.vocabulary import Vocabulary
from openseed.data.shards import PROTOCOLS, TASKS, ShardSet
from openseed.evaluation.cityscapes import evaluate_cityscapes_instances
from openseed.evaluation.common import gather_to_all
from openseed.evaluation.instances import evaluate_coco
from openseed.evaluation.lvis import FEDERATED_KEYS, evaluate_lvis
from openseed.evaluation.panoptic import PanopticEvaluator
from openseed.evaluation.semantic import SemanticEvaluator
from openseed.modeling.postprocess import InferenceConfig, postprocess_batch


class DatasetEvaluator:
    """Accumulates predictions and ground truth of one data set on every rank; ``compute`` gathers them once.

    Args:
        vocabulary: the data set's classes (the model is evaluated against exactly these).
        task: "seg" (panoptic data), "det" (detection data) or "sem" (semantic data).
        mask_format: the shard set's mask format ("panoptic", "rle", "none" or "semantic").
        inference: post-processing thresholds.
        category_frequency: category id -> LVIS frequency ("r" / "c" / "f") for a federated data set
            (``ShardSet.category_frequency``): box / mask AP then follow LVIS's protocol (``evaluate_lvis``: 300
            detections per image over all classes, each class scored only on the images where it is annotated or
            verified absent, unmatched detections of not-exhaustively annotated classes forgiven) and add APr /
            APc / APf. Every image's stored ``extra`` must then hold ``neg_category_ids`` and
            ``not_exhaustive_category_ids``.
        protocol: a data set's own metric beside the standard ones (``ShardSet.protocol``): "cityscapes_instances"
            adds ``mask_AP_cityscapes`` / ``mask_AP50_cityscapes`` (cityscapes' instance-level AP,
            ``openseed.evaluation.cityscapes``; every image's stored ``extra`` must hold its ``void_rle``).
        prompt_vocabulary: detection data only: prompt the model with this larger vocabulary instead (it must hold
            every category of ``vocabulary``, under the same id and thing flag), as the reference scores ADE20K's
            instance AP inside its 150-class panoptic run: the top-k runs over all its classes, and detections of
            categories outside ``vocabulary`` are dropped before scoring.
    """

    def __init__(self, vocabulary: Vocabulary, task: str, mask_format: str, inference: InferenceConfig | None = None,
                 category_frequency: dict[int, str] | None = None, prompt_vocabulary: Vocabulary | None = None,
                 protocol: str | None = None):
        self.vocabulary, self.task, self.mask_format = vocabulary, task, mask_format
        self.prompt_vocabulary = prompt_vocabulary or vocabulary
        if prompt_vocabulary is not None:
            _check_prompt_vocabulary(prompt_vocabulary, vocabulary, task)
        self.inference = inference or InferenceConfig()
        self.categories = [{"id": c.id, "name": c.name, "isthing": int(c.is_thing)} for c in vocabulary.categories]
        if protocol is not None and protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} (known: {sorted(PROTOCOLS)})")
        if protocol == "cityscapes_instances" and mask_format != "rle":
            raise ValueError("cityscapes' instance AP scores masks: the data set must have RLE masks")
        self.protocol = protocol
        self.void: dict[int, dict] = {}  # image id -> void region (cityscapes_instances)
        self.federated = category_frequency is not None
        if self.federated:
            if task != "det":
                raise ValueError(f"LVIS's federated protocol scores detection data, not {task!r} data")
            missing = [c["id"] for c in self.categories if c["id"] not in category_frequency]
            if missing:
                raise ValueError(f"category_frequency lacks categories {missing[:10]}")
            for category in self.categories:
                category["frequency"] = category_frequency[category["id"]]
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, not {task!r}")
        self.with_masks = mask_format in ("panoptic", "rle")
        self.panoptic = PanopticEvaluator(self.categories) if task == "seg" else None
        # void is one past the last class: a label map of 255 classes or more has a class 255
        self.ignore = len(vocabulary)
        self.semantic = SemanticEvaluator(len(vocabulary), ignore_label=self.ignore) if task in ("seg", "sem") \
            else None
        self.gt_images: list[dict] = []
        self.gt_annotations: list[dict] = []
        self.detections: list[dict] = []
        self.non_finite = 0  # detections with a NaN / infinite score or box, left out (see update)

    @classmethod
    def for_shards(cls, shards: ShardSet, inference: InferenceConfig | None = None,
                   prompt_vocabulary: Vocabulary | None = None) -> DatasetEvaluator:
        return cls(shards.vocabulary, shards.task, shards.mask_format, inference, shards.category_frequency,
                   prompt_vocabulary, shards.protocol)

    # ------------------------------------------------------------------------------------------------ update
    def score(self, model, batch: Batch, text: torch.Tensor | None = None) -> Outputs:
        """The one evaluation step (training validation, ``openseed.evaluate``, ``evaluate_batches``): the model's
        predictions for ``batch`` (``text``: the prompt vocabulary's embeddings, when computed once for the data
        set), added to the evaluation; returns them."""
        vocabulary = batch.vocabulary if self.prompt_vocabulary is self.vocabulary else self.prompt_vocabulary
        outputs = model.forward_images(batch.images, batch.padding_mask, vocabulary, text=text, masks="final")
        self.update(outputs, batch)
        return outputs

    def update(self, outputs: Outputs, batch: Batch) -> None:
        """Score one evaluation batch (it must carry ``annotations``: see ``collate(keep_annotations=True)``)."""
        if batch.annotations is None:
            raise ValueError("evaluation batches must carry their annotations (collate(..., keep_annotations=True))")
        padded = tuple(batch.images.shape[-2:])
        panoptic = semantic = instances = [None] * len(batch.annotations)
        if self.task != "sem":  # semantic data has whole classes, not instances: mIoU alone
            # as the reference on panoptic data: the top-k runs over every class and the stuff pairs are dropped
            # after it (only thing classes are scored; detection data has only things, where this changes nothing)
            instances = postprocess_batch(outputs, batch.targets, self.prompt_vocabulary, padded, "instance",
                                          self.inference, things_only=True)
        if self.task in ("seg", "sem"):
            semantic = postprocess_batch(outputs, batch.targets, self.vocabulary, padded, "semantic", self.inference)
        if self.task == "seg":
            panoptic = postprocess_batch(outputs, batch.targets, self.vocabulary, padded, "panoptic", self.inference)
        for annotation, *predictions in zip(batch.annotations, panoptic, semantic, instances):
            self.add(annotation, *predictions)

    def add(self, annotation: dict, panoptic: PanopticSegmentation | None = None,
            semantic: SemanticSegmentation | None = None, instances: Instances | None = None) -> None:
        """Score one image's predictions (at its original size) against its stored ground truth ``annotation``
        (``{"json", "panoptic_png", "semantic_png"}`` as ``collate(keep_annotations=True)`` carries it). Each
        prediction the data set's task scores must be given: panoptic, semantic and instances for panoptic data,
        instances for detection data, semantic for semantic data."""
        needed = {"seg": ("panoptic", "semantic", "instances"), "det": ("instances",), "sem": ("semantic",)}
        given = {"panoptic": panoptic, "semantic": semantic, "instances": instances}
        missing = [name for name in needed[self.task] if given[name] is None]
        if missing:
            raise ValueError(f"{self.task!r} data is scored on {', '.join(needed[self.task])}; missing: "
                             f"{', '.join(missing)}")
        meta = annotation["json"]
        image_id = int(meta["image_id"])
        if self.task == "sem":
            truth = decode_label_png(annotation["semantic_png"])
            self.semantic.update(semantic.sem_seg.cpu().numpy(),
                                 np.where(truth == meta["ignore_label"], self.ignore, truth))
            return
        gt_ids = None
        if self.task == "seg":
            gt_ids = decode_panoptic_png(annotation["panoptic_png"])
            segments = [{"id": o["segment_id"], "category_id": o["category_id"], "iscrowd": o["iscrowd"]}
                        for o in meta["objects"]]
            self.panoptic.update(gt_ids, segments, panoptic.panoptic_seg.cpu().numpy(), panoptic.segments_info,
                                 image_id=image_id)
            self.semantic.update(semantic.sem_seg.cpu().numpy(), self._semantic_truth(gt_ids, meta))
        self.add_instance_truth(meta, gt_ids)
        records = instances_to_coco(instances.cpu(), image_id, self.prompt_vocabulary.ids)
        if self.prompt_vocabulary is not self.vocabulary:  # prompted with more classes than the data set scores
            scored = set(self.vocabulary.ids)
            records = [r for r in records if r["category_id"] in scored]
        # a diverged model's NaN / infinite scores or boxes cannot be scored (the COCO evaluator refuses them):
        # they are left out, counted, and reported with a warning by compute()
        finite = [r for r in records if math.isfinite(r["score"]) and all(math.isfinite(v) for v in r["bbox"])]
        self.non_finite += len(records) - len(finite)
        self.detections.extend(r for r in finite if r["score"] > 0)

    def _semantic_truth(self, gt_ids: np.ndarray, meta: dict) -> np.ndarray:
        labels = np.full(gt_ids.shape, self.ignore, dtype=np.int64)
        for obj in meta["objects"]:
            labels[gt_ids == obj["segment_id"]] = obj["label"]
        return labels

    def add_instance_truth(self, meta: dict, gt_ids: np.ndarray | None) -> None:
        """Record one image's thing objects (stored JSON ``meta``) as COCO ground truth; masks from the panoptic id
        map ``gt_ids`` when given, else from the objects' stored ``rle``. A federated set's images keep their
        ``neg_category_ids`` / ``not_exhaustive_category_ids`` (from the stored ``extra``)."""
        image = {"id": int(meta["image_id"]), "height": meta["height"], "width": meta["width"]}
        if self.federated:
            extra = meta.get("extra") or {}
            missing = [k for k in FEDERATED_KEYS if not isinstance(extra.get(k), list)]
            if missing:
                raise ValueError(f"image {image['id']} ({meta.get('file_name')}) of a federated (LVIS) data set has "
                                 f"no {' / '.join(missing)} in its stored 'extra'; convert it with data_prep.lvis")
            image.update({k: extra[k] for k in FEDERATED_KEYS})
        if self.protocol == "cityscapes_instances":
            void = (meta.get("extra") or {}).get("void_rle")
            if not isinstance(void, dict):
                raise ValueError(f"image {image['id']} ({meta.get('file_name')}) has no void_rle in its stored "
                                 f"'extra' (cityscapes' instance AP needs it); convert it with data_prep.cityscapes")
            self.void[image["id"]] = void
        self.gt_images.append(image)
        for obj in meta["objects"]:
            if not obj["is_thing"]:
                continue
            record = {"image_id": int(meta["image_id"]), "category_id": obj["category_id"],
                      "bbox": stored_box_xywh(obj), "area": float(obj["area"]), "iscrowd": int(obj["iscrowd"])}
            if gt_ids is not None:
                record["segmentation"] = encode_rle(gt_ids[None] == obj["segment_id"])[0]
            elif "rle" in obj:
                record["segmentation"] = obj["rle"]
            self.gt_annotations.append(record)

    # ------------------------------------------------------------------------------------------------ compute
    def compute(self) -> dict:
        """Flat metrics (``PQ``, ``SQ``, ``RQ``, ``PQ_things``, ``PQ_stuff``, ``box_AP``, ``box_AP50``, ``mask_AP``,
        ``mask_AP50``, ``mIoU``) plus per-class details under ``per_class``."""
        metrics: dict = {}
        per_class: dict = {}
        if self.panoptic is not None:
            pq = self.panoptic.compute()
            metrics.update(PQ=pq["All"]["pq"], SQ=pq["All"]["sq"], RQ=pq["All"]["rq"], PQ_things=pq["Things"]["pq"],
                           PQ_stuff=pq["Stuff"]["pq"])
            per_class["PQ"] = {c["name"]: pq["per_class"][c["id"]]["pq"] for c in self.categories}
        if self.semantic is not None:
            semantic = self.semantic.compute()
            metrics["mIoU"] = semantic["miou"]
            if self.task == "sem":
                metrics.update(fwIoU=semantic["fwiou"], mACC=semantic["macc"], pACC=semantic["pacc"])
                per_class["IoU"] = {c["name"]: (None if np.isnan(v) else float(v))  # nan: no pixels of it
                                    for c, v in zip(self.categories, semantic["per_class_iou"])}
                metrics["per_class"] = per_class
                return metrics
        non_finite = sum(gather_to_all([self.non_finite]))
        if non_finite:
            warnings.warn(f"{non_finite} detections with a NaN or infinite score or box were left out of box / mask "
                          f"AP (is the model diverged?)", stacklevel=2)
        gt = self.coco_truth()
        detections = gather_to_all(self.detections)
        if gt["categories"] and gt["images"]:
            for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
                if iou_type == "segm" and not self.with_masks:
                    continue
                if self.federated:
                    stats = evaluate_lvis(gt, detections, iou_type)
                    metrics.update({f"{prefix}_{k}": stats[k] for k in ("APr", "APc", "APf")})
                else:
                    stats = evaluate_coco(gt, detections, iou_type)
                metrics[f"{prefix}_AP"], metrics[f"{prefix}_AP50"] = stats["AP"], stats["AP50"]
                per_class[f"{prefix}_AP"] = {c["name"]: c["AP"] for c in stats["per_category"]}
        if self.protocol == "cityscapes_instances" and gt["images"]:
            cityscapes = self._cityscapes_ap(gt, detections)
            metrics["mask_AP_cityscapes"], metrics["mask_AP50_cityscapes"] = cityscapes["AP"], cityscapes["AP50"]
            names = {c["id"]: c["name"] for c in self.categories}
            per_class["mask_AP_cityscapes"] = {names[k]: v["AP"] for k, v in cityscapes["per_category"].items()}
        metrics["per_class"] = per_class
        return metrics

    def _cityscapes_ap(self, gt: dict, detections: list[dict]) -> dict:
        void = {}
        for part in gather_to_all([self.void]):
            void.update(part)
        images = {image["id"]: {"gt": [], "void": void[image["id"]], "predictions": []} for image in gt["images"]}
        for ann in gt["annotations"]:
            images[ann["image_id"]]["gt"].append((ann["category_id"], bool(ann["iscrowd"]), int(ann["area"]),
                                                  ann["segmentation"]))
        for det in detections:
            if "segmentation" in det:
                images[det["image_id"]]["predictions"].append((det["category_id"], det["score"], det["segmentation"]))
        return evaluate_cityscapes_instances(list(images.values()), [c["id"] for c in gt["categories"]])

    def coco_truth(self) -> dict:
        """The instance ground truth gathered from every rank, as a COCO dict (thing categories only)."""
        images = {image["id"]: image for image in gather_to_all(self.gt_images)}
        annotations = gather_to_all(self.gt_annotations)
        return {"images": list(images.values()), "categories": [c for c in self.categories if c["isthing"]],
                "annotations": [{**a, "id": k + 1} for k, a in enumerate(annotations)]}


def _check_prompt_vocabulary(prompt: Vocabulary, vocabulary: Vocabulary, task: str) -> None:
    if task != "det":
        raise ValueError(f"a prompt vocabulary other than the data set's scores detection data, not {task!r} data")
    by_id = {c.id: c for c in prompt.categories}
    missing = [c.id for c in vocabulary.categories if c.id not in by_id]
    if missing:
        raise ValueError(f"the prompt vocabulary lacks categories {missing[:10]} of the data set")
    differ = [c.id for c in vocabulary.categories if by_id[c.id].is_thing != c.is_thing]
    if differ:
        raise ValueError(f"categories {differ[:10]} are things in one vocabulary and stuff in the other")


@torch.no_grad()
def evaluate_shards(model, shards_dir, image_size: int | None = None, batch_size: int = 4, device: str = "cpu",
                    num_workers: int = 0, inference: InferenceConfig | None = None, short_edge: int | None = None,
                    max_size: int | None = None, limit: int | None = None,
                    prompt_vocabulary: Vocabulary | None = None) -> dict:
    """Evaluate ``model`` on one converted data set (its own vocabulary, the prompt ensemble); on every rank of a
    process group each rank scores its share and all get the same metrics.

    Images: with ``short_edge``, the shortest edge to it and the longest at most ``max_size`` (a benchmark's
    protocol; padding to a multiple of 32); with ``image_size``, the longer side to it and square padding
    (LSJ-trained models); without either, the model's recorded evaluation resize (``OpenSeeDConfig.eval_short_edge``
    / ``eval_max_size``; converted released checkpoints: shortest edge 800, longest 1333), else 1024. ``inference``
    defaults to the model's recorded top-k and box clipping (``InferenceConfig.for_model``). ``limit``: only the
    first batches holding that many images (a smoke run). ``prompt_vocabulary``: see ``DatasetEvaluator``."""
    import itertools

    from torch.utils.data import DataLoader

    from openseed.data.datamodule import EvalDataset
    from openseed.data.transforms import EvalResize, eval_resize_for
    from openseed.evaluation.common import world

    if short_edge is not None and image_size is not None:
        raise ValueError("give short_edge (and max_size) or image_size, not both")
    shards = ShardSet.open(shards_dir)
    rank, world_size = world()
    config = model.config
    if short_edge is not None:
        resize, pad_to = EvalResize(short_edge, max_size), None
    else:
        resize, pad_to = eval_resize_for(config, image_size)
    dataset = EvalDataset(shards, batch_size, resize, rank, world_size, pad_to=pad_to)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    batches = loader if limit is None else itertools.islice(loader, math.ceil(limit / batch_size))
    evaluator = DatasetEvaluator.for_shards(shards, inference or InferenceConfig.for_model(config),
                                            prompt_vocabulary)
    return evaluate_batches(model.to(device).eval(), batches, evaluator, device)


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[Batch], evaluator: DatasetEvaluator, device: str | torch.device) -> dict:
    """The evaluation loop outside training (``evaluate_shards``, ``openseed.evaluate``): every batch of one data set
    scored (``DatasetEvaluator.score``) with its vocabulary embedded once; the metrics."""
    text = model.embed_vocabulary(evaluator.prompt_vocabulary)
    for batch in batches:
        evaluator.score(model, batch.to(device), text)
    return evaluator.compute()


CLI_OPTIONS = {
    "ckpt": Option("a model file or training checkpoint", required=True, check=path),
    "shards": Option("converted data sets, [DIR,...]", required=True,
                     check=lambda value, key: string_list(value, key)),
    "image_size": Option("longer side of the evaluation resize (null: the model's own)", None, integer(1)),
    "batch_size": Option("images per forward pass", 4, integer(1)),
    "device": Option("torch device", "cpu", path),
    "num_workers": Option("loader worker processes", 0, integer(0)),
    "json": Option("print one JSON object instead of the lines", False),
}


@command(CLI_OPTIONS, "python -m openseed.evaluation.runner",
         "Evaluate a model on converted data sets with the metrics each one's task calls for.")
def main(args) -> int:
    from openseed.modeling.openseed import load_model

    try:
        model = load_model(args.ckpt)
        results = {str(shards): evaluate_shards(model, shards, args.image_size, args.batch_size, args.device,
                                                args.num_workers) for shards in args.shards}
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results))
        return 0
    for shards, metrics in results.items():
        flat = ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items() if k != "per_class")
        print(f"{shards}: {flat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
