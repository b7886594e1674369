"""A converted data set's ground truth handed back as predictions: the check that a conversion and its evaluation
agree (every metric of the data set's task is exactly 1.0), and the base of the perturbed predictions that tests
score against independent calculations (pycocotools, panopticapi, a plain confusion matrix).

``oracle_predictions(sample, vocabulary)`` turns one stored sample (``openseed.data.shards.read_shards``) into the
predictions ``DatasetEvaluator.add`` takes; ``score(shards_dir, predict)`` scores any such function over a data set.
Command line (a converted data set's self-check)::

    python -m openseed.evaluation.oracle shards=data/shards/ade20k_panoptic_val
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openseed.cli import Option, command, path
from openseed.core.codecs import decode_label_png, decode_panoptic_png
from openseed.core.predictions import Instances, PanopticSegmentation, SemanticSegmentation
from openseed.core.vocabulary import Vocabulary
from openseed.data.shards import Sample, ShardSet, read_shards
from openseed.evaluation.runner import DatasetEvaluator

Predictions = dict  # {"panoptic": PanopticSegmentation, "semantic": SemanticSegmentation, "instances": Instances}


def annotation_of(sample: Sample) -> dict:
    """The stored ground truth of a sample as evaluation batches carry it (``collate(keep_annotations=True)``)."""
    return {"json": sample.annotation, "panoptic_png": sample.panoptic_png, "semantic_png": sample.semantic_png}


def oracle_predictions(sample: Sample, vocabulary: Vocabulary) -> Predictions:
    """The ground truth of ``sample`` (read at its stored size, dense masks) as perfect predictions: every
    non-crowd object once with score 1, the panoptic map without its crowd segments and without the stored PNG's ids
    that no object lists (void in the ground truth), every labelled pixel's class, crowd regions included (void
    pixels get class 0: they are not scored)."""
    meta = sample.annotation
    kept = [o for o in meta["objects"] if not o["iscrowd"]]
    height, width = sample.orig_size
    predictions: Predictions = {}
    if meta["mask_format"] == "semantic":
        labels = decode_label_png(sample.semantic_png)
        predictions["semantic"] = SemanticSegmentation(torch.from_numpy(
            np.where(labels == meta["ignore_label"], 0, labels)), image_id=sample.image_id)
        return predictions
    if meta["mask_format"] == "panoptic":
        ids = decode_panoptic_png(sample.panoptic_png)
        ids = np.where(np.isin(ids, [o["segment_id"] for o in kept]), ids, 0).astype(np.int32)
        segments = [{"id": o["segment_id"], "category_id": o["category_id"], "isthing": bool(o["is_thing"]),
                     "score": 1.0, "area": int(o["area"]),
                     "bbox": [o["bbox"][0], o["bbox"][1], o["bbox"][2] - o["bbox"][0], o["bbox"][3] - o["bbox"][1]]}
                    for o in kept]
        predictions["panoptic"] = PanopticSegmentation(torch.from_numpy(ids), segments, sample.image_id)
        stored = decode_panoptic_png(sample.panoptic_png)
        semantic = np.zeros((height, width), dtype=np.int64)
        for obj in meta["objects"]:  # crowd regions are their class in the semantic ground truth
            semantic[stored == obj["segment_id"]] = obj["label"]
        predictions["semantic"] = SemanticSegmentation(torch.from_numpy(semantic), image_id=sample.image_id)
    things = [i for i, o in enumerate(kept) if o["is_thing"]]
    masks = sample.masks[things] if sample.masks is not None and meta["mask_format"] != "none" else None
    predictions["instances"] = Instances(
        scores=torch.ones(len(things)), labels=sample.labels[things], queries=torch.arange(len(things)),
        boxes=sample.boxes[things], masks=masks, image_id=sample.image_id)
    return predictions


def score(shards_dir: str | Path, predict: Callable[[Sample, Vocabulary], Predictions] = oracle_predictions) -> dict:
    """The metrics of ``predict``'s predictions (default: the oracle) over every sample of a converted data set."""
    shards = ShardSet.open(shards_dir)
    evaluator = DatasetEvaluator.for_shards(shards)
    for sample in read_shards(shards_dir):
        evaluator.add(annotation_of(sample), **predict(sample, shards.vocabulary))
    return evaluator.compute()


@command({"shards": Option("a converted data set folder", required=True, check=path)},
         "python -m openseed.evaluation.oracle",
         "Score a converted data set's ground truth against itself: every metric of its task should be 100.")
def main(args) -> int:
    try:
        metrics = score(args.shards)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flat = {k: v for k, v in metrics.items() if k != "per_class"}
    print(", ".join(f"{k} {100 * v:.2f}" for k, v in flat.items()))
    return 0 if all(abs(v - 1.0) < 1e-9 for v in flat.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
