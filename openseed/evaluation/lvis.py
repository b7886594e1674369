"""LVIS v1 box / mask AP with the official federated protocol (the lvis-api's ``LVISEval``), as our own code.

``evaluate_lvis(gt, detections, iou_type, max_dets=300)`` scores COCO-style result dicts against an LVIS-style
ground truth: a COCO dict whose images carry ``neg_category_ids`` and ``not_exhaustive_category_ids`` and whose
categories carry ``frequency`` ("r" / "c" / "f"). It returns fractions::

    {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR", "ARs", "ARm", "ARl",
     "per_category": [{"id", "name", "frequency", "AP"}, ...]}

(``AR*`` is the lvis-api's ``AR@300``: recall at ``max_dets`` detections per image; ``-1`` marks an undefined
value, as in the lvis-api and pycocotools.) The rules, as the lvis-api (``lvis/eval.py``, ``lvis/results.py``)
applies them:

- **300 detections per image**: before anything else, an image with more than ``max_dets`` detections keeps its
  ``max_dets`` highest-scored ones over all classes (a stable sort: ties keep their list order). Detections of
  classes that are later ignored on that image count towards the limit too (LVISResults limits first). COCO instead
  keeps 100 per image *and class*.
- **Federated images**: a class is evaluated on an image only when it is positive there (has a ground-truth
  annotation) or listed in the image's ``neg_category_ids``; its detections on any other image are dropped (neither
  true nor false positives).
- **Not exhaustive**: on an image listing the class in ``not_exhaustive_category_ids``, its detections that match no
  ground truth are ignored instead of being false positives (matched ones are true positives as usual).
- Otherwise COCO's rules: greedy matching by descending score at IoU 0.50:0.05:0.95 (each detection takes the
  best-IoU free ground truth, a non-ignored one before an ignored one, ties to the later one), area ranges all /
  small (< 32^2) / medium / large (> 96^2) with ground-truth areas from the annotations' ``area`` field and
  detection areas ``w * h`` (bbox) or the mask area (segm), 101-point interpolated precision, and AP the mean over
  IoU thresholds and over the categories with at least one (non-ignored, in-range) ground truth: a category without
  any is ``-1`` and left out of every mean, exactly as COCOeval does. APr / APc / APf average the categories of one
  ``frequency``; a group with no evaluated category is ``-1``.
- **No crowds**: LVIS has no crowd annotations and the lvis-api never reads ``iscrowd`` (every IoU is computed as
  non-crowd); an ``iscrowd`` flag here is likewise ignored, with a warning. A ground truth's ``ignore`` flag is
  honoured (not counted; detections matched to it ignored), as in the lvis-api.
- **Zero areas**: the lvis-api loads ground truth and detections through ``get_ann_ids(cat_ids=...)``, which keeps
  only those with ``0 < area``: a ground truth or a detection of area 0 (an empty mask, a box of zero width) takes
  no part at all (after the 300-per-image limit); such a ground truth does not make its class positive.

As in detectron2's ``LVISEvaluator`` (which drops ``bbox`` from segm results so that the lvis-api uses the mask
area), a segm evaluation uses only the detections' ``segmentation``. Input checks, 0-based ids and per-category
output under the original ids are those of :mod:`openseed.evaluation.instances` (``EvaluationInputError``).
Unlike the lvis-api, only (image, class) pairs that hold ground truth or detections are visited, and matching is
vectorised over area ranges and IoU thresholds.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from openseed.core.codecs import segmentation_to_rle
from openseed.core.vocabulary import FREQUENCIES
from openseed.evaluation.instances import (
    IOU_TYPES,
    EvaluationInputError,
    _check_gt,
    _load_json,
    _Remap,
)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR", "ARs", "ARm", "ARl")
#: The per-image lists of a federated ground truth.
FEDERATED_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")
MAX_DETS = 300
# as the lvis-api's Params (np.linspace, not arange: 0.5 and 0.75 must be exact for AP50 / AP75)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = (("all", 0.0, 1e5 ** 2), ("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2),
               ("large", 96.0 ** 2, 1e5 ** 2))
_LOW = np.array([lo for _, lo, _ in AREA_RANGES])
_HIGH = np.array([hi for _, _, hi in AREA_RANGES])
# a detection needs IoU >= threshold (capped just below 1, as COCOeval / LVISEval do)
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)


# ----------------------------------------------------------------------------------------------- inputs


def _id_set(image: dict, key: str, categories: dict) -> frozenset:
    values = image.get(key)
    if not isinstance(values, (list, tuple)):
        raise EvaluationInputError(f"ground-truth image {image.get('id')!r} has no '{key}' list (LVIS federated "
                                   f"evaluation needs 'neg_category_ids' and 'not_exhaustive_category_ids' on "
                                   f"every image)")
    try:  # ids of categories outside the ground truth's list can never matter: dropped
        return frozenset(categories[c] for c in values if c in categories)
    except TypeError:
        raise EvaluationInputError(f"ground-truth image {image.get('id')!r}: '{key}' holds unhashable ids") from None


def _frequencies(remap: _Remap) -> list[str | None]:
    """Each category's frequency in renumbered order (index = new id - 1); None where the field is absent."""
    by_new = {cat["id"]: cat.get("frequency") for cat in remap.gt["categories"]}
    out = []
    for new in range(1, len(by_new) + 1):
        freq = by_new[new]
        if freq is not None and freq not in FREQUENCIES:
            old = remap.categories_out[new - 1][0]
            raise EvaluationInputError(f"category {old!r}: 'frequency' must be one of {FREQUENCIES}, got {freq!r}")
        out.append(freq)
    return out


def _gt_region(ann: dict, iou_type: str, image: dict, k: int):
    if iou_type == "bbox":
        box = ann.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise EvaluationInputError(f"ground-truth annotation {k} has no 4-number 'bbox'")
        return [float(v) for v in box]
    seg = ann.get("segmentation")
    if seg is None:
        raise EvaluationInputError(f"ground-truth annotation {k} has no 'segmentation' (needed for iou_type 'segm')")
    try:
        return segmentation_to_rle(seg, image.get("height"), image.get("width"))
    except (ValueError, TypeError) as e:
        raise EvaluationInputError(f"ground-truth annotation {k}: {e}") from None


def _limit_per_image(images: np.ndarray, scores: np.ndarray, max_dets: int | None) -> np.ndarray:
    """Boolean mask: each image's ``max_dets`` highest-scored detections (stable: ties keep list order)."""
    keep = np.ones(len(images), dtype=bool)
    if max_dets is None or len(images) == 0:
        return keep
    order = np.lexsort((np.arange(len(images)), -scores, images))  # by image, then score desc, then list order
    sorted_images = images[order]
    starts = np.flatnonzero(np.r_[True, sorted_images[1:] != sorted_images[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep[order[rank >= max_dets]] = False
    return keep


def mask_areas(rles: list[dict]) -> np.ndarray:
    """Pixel areas of compressed RLEs. In chunks: pycocotools' ``area`` fails on a list of 256 or more under NumPy
    2 (OverflowError: ... out of bounds for uint8)."""
    areas = [np.asarray(mask_utils.area(rles[k:k + 255]), dtype=np.float64).reshape(-1)
             for k in range(0, len(rles), 255)]
    return np.concatenate(areas) if areas else np.zeros(0)


# ----------------------------------------------------------------------------------------------- matching


def _match(ious: np.ndarray, gt_ignore: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval / LVISEval greedy matching of score-sorted detections for every area range and IoU threshold.

    ``ious`` [D, G]; ``gt_ignore`` [A, G]. Returns ``matched`` and ``matched_ignored`` [D, A, T]: whether each
    detection matched a ground truth, and whether that ground truth is ignored (making the detection ignored)."""
    num_dets, num_gts = ious.shape
    shape = (num_dets, len(AREA_RANGES), len(IOU_THRESHOLDS))
    matched = np.zeros(shape, dtype=bool)
    matched_ignored = np.zeros(shape, dtype=bool)
    if num_dets == 0 or num_gts == 0:
        return matched, matched_ignored
    taken = np.zeros((len(AREA_RANGES), len(IOU_THRESHOLDS), num_gts), dtype=bool)
    regular = ~gt_ignore[:, None, :]  # [A, 1, G]
    thresholds = _MATCH_THRESHOLDS[None, :, None]
    area_index = np.arange(len(AREA_RANGES))[:, None]
    for d in range(num_dets):
        row = ious[d]
        if row.max() < _MATCH_THRESHOLDS[0]:
            continue
        free = ~taken & (row >= thresholds)  # [A, T, G]
        free_regular = free & regular
        # a free non-ignored ground truth wins over an ignored one; among the allowed, the best IoU, ties to the last
        allowed = np.where(free_regular.any(-1, keepdims=True), free_regular, free)
        found = allowed.any(-1)  # [A, T]
        if not found.any():
            continue
        best = num_gts - 1 - np.argmax(np.where(allowed, row, -1.0)[..., ::-1], axis=-1)  # [A, T]
        a_idx, t_idx = np.nonzero(found)
        taken[a_idx, t_idx, best[a_idx, t_idx]] = True
        matched[d] = found
        matched_ignored[d] = found & gt_ignore[area_index, best]
    return matched, matched_ignored


# ----------------------------------------------------------------------------------------------- accumulate


def _precision_recall(scores, images, order_ids, matched, ignored, num_gt):
    """Precision [T, R] and recall [T] of one category in one area range (COCOeval.accumulate's arithmetic)."""
    T, R = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    order = np.lexsort((order_ids, images, -scores))  # score desc; ties by image, then detection list order
    tps = (matched & ~ignored)[order].T  # [T, N]
    fps = (~matched & ~ignored)[order].T
    tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
    fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
    precision = np.zeros((T, R))
    recall = np.zeros(T)
    n = tp_sum.shape[1]
    for t in range(T):
        tp, fp = tp_sum[t], fp_sum[t]
        rc = tp / num_gt
        recall[t] = rc[-1] if n else 0
        pr = tp / (fp + tp + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1] if n else pr  # the max precision at any higher recall
        inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        inside = inds < n
        precision[t, inside] = pr[inds[inside]]
    return precision, recall


def _mean(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(np.mean(values)) if values.size else -1.0


# ----------------------------------------------------------------------------------------------- public API


def evaluate_lvis(gt: str | Path | dict, detections: str | Path | list, iou_type: str = "bbox",
                  max_dets: int | None = MAX_DETS) -> dict:
    """LVIS (federated) AP of ``detections`` against ``gt`` (paths or loaded JSON) for ``iou_type`` "bbox" / "segm".

    ``max_dets``: detections kept per image, over all classes (300 in the official protocol; None: no limit).
    Returns ``{"AP", ..., "APr", "APc", "APf", "AR", ..., "per_category": [{"id", "name", "frequency", "AP"}]}``
    (fractions, ``-1`` where undefined); ``gt`` and ``detections`` are not modified. See the module docstring."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if max_dets is not None and (isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer))
                                 or max_dets < 0):
        raise ValueError(f"max_dets must be a non-negative int or None, got {max_dets!r}")
    remap = _Remap(_check_gt(_load_json(gt, "ground truth")))
    dets = _load_json(detections, "detections")
    if not isinstance(dets, list):
        raise EvaluationInputError(f"detections must be a list of COCO result objects, got {type(dets).__name__}")
    source = f"detections file {detections}" if isinstance(detections, (str, Path)) else None
    dets = remap.detections(dets, iou_type, source)
    frequencies = _frequencies(remap)
    num_cats = len(frequencies)

    negative, not_exhaustive = {}, {}
    for new_id, image in remap.images_by_new.items():
        negative[new_id] = _id_set(image, "neg_category_ids", remap.category)
        not_exhaustive[new_id] = _id_set(image, "not_exhaustive_category_ids", remap.category)

    # ---- ground truth: (image, category) -> regions, areas, ignore flags; area 0 takes no part (lvis-api)
    gts: dict[tuple[int, int], list] = defaultdict(list)
    crowd = 0
    for k, ann in enumerate(remap.gt["annotations"]):
        area = ann.get("area")
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not np.isfinite(area):
            raise EvaluationInputError(f"ground-truth annotation {k} has no finite number 'area'")
        if not area > 0:  # the lvis-api's get_ann_ids keeps 0 < area < inf
            continue
        crowd += bool(ann.get("iscrowd", 0))
        image = remap.images_by_new[ann["image_id"]]
        gts[ann["image_id"], ann["category_id"]].append(
            (_gt_region(ann, iou_type, image, k), float(area), bool(ann.get("ignore", 0))))
    if crowd:
        warnings.warn(f"{crowd} ground-truth annotations are marked iscrowd: LVIS evaluation treats them as ordinary "
                      f"annotations (the lvis-api never reads iscrowd)", stacklevel=2)
    positive = defaultdict(set)
    for image_id, cat_id in gts:
        positive[image_id].add(cat_id)

    # ---- detections: the per-image limit, areas, the zero-area and federated filters
    n = len(dets)
    det_images = np.array([d["image_id"] for d in dets], dtype=np.int64)
    det_cats = np.array([d["category_id"] for d in dets], dtype=np.int64)
    det_scores = np.array([d["score"] for d in dets], dtype=np.float64)
    keep = _limit_per_image(det_images, det_scores, max_dets)
    if iou_type == "bbox":
        regions = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(n, 4)
        det_areas = regions[:, 2] * regions[:, 3]
    else:
        regions = [d["segmentation"] for d in dets]
        det_areas = mask_areas(regions)
    keep &= (det_areas > 0) & (det_areas < np.inf)
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in np.flatnonzero(keep).tolist():
        image_id, cat_id = int(det_images[i]), int(det_cats[i])
        if cat_id in positive[image_id] or cat_id in negative[image_id]:
            by_pair[image_id, cat_id].append(i)

    # ---- per (image, category): match; gather each category's scored detections
    per_cat: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    num_gt = np.zeros((num_cats + 1, len(AREA_RANGES)), dtype=np.int64)
    for image_id, cat_id in set(gts) | set(by_pair):
        gt_list = gts.get((image_id, cat_id), [])
        gt_areas = np.array([g[1] for g in gt_list], dtype=np.float64)
        gt_flag = np.array([g[2] for g in gt_list], dtype=bool)
        gt_ignore = gt_flag[None, :] | (gt_areas[None, :] < _LOW[:, None]) | (gt_areas[None, :] > _HIGH[:, None])
        num_gt[cat_id] += (~gt_ignore).sum(axis=1)
        idx = np.asarray(by_pair.get((image_id, cat_id), []), dtype=np.int64)
        if idx.size == 0:
            continue
        idx = idx[np.argsort(-det_scores[idx], kind="mergesort")]  # score desc, ties in list order
        if gt_list:
            dt_regions = regions[idx] if iou_type == "bbox" else [regions[i] for i in idx]
            gt_regions = [g[0] for g in gt_list]
            if iou_type == "bbox":
                gt_regions = np.array(gt_regions, dtype=np.float64)
            ious = np.asarray(mask_utils.iou(dt_regions, gt_regions, [0] * len(gt_list)), dtype=np.float64)
            ious = ious.reshape(len(idx), len(gt_list))
        else:
            ious = np.zeros((len(idx), 0))
        matched, matched_ignored = _match(ious, gt_ignore)
        areas = det_areas[idx]
        outside = (areas[:, None] < _LOW[None, :]) | (areas[:, None] > _HIGH[None, :])  # [D, A]
        unmatched_ignored = outside | (cat_id in not_exhaustive[image_id])
        ignored = matched_ignored | (~matched & unmatched_ignored[:, :, None])
        bucket = per_cat[cat_id]
        bucket["scores"].append(det_scores[idx])
        bucket["images"].append(np.full(len(idx), image_id, dtype=np.int64))
        bucket["order"].append(idx)
        bucket["matched"].append(matched)
        bucket["ignored"].append(ignored)

    T, R, A = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES)
    precision = -np.ones((T, R, num_cats, A))
    recall = -np.ones((T, num_cats, A))
    empty_flags = np.zeros((0, A, T), dtype=bool)
    for cat_id in range(1, num_cats + 1):
        if not num_gt[cat_id].any():
            continue
        bucket = per_cat.get(cat_id)
        if bucket:
            scores, images, order = (np.concatenate(bucket[k]) for k in ("scores", "images", "order"))
            matched, ignored = np.concatenate(bucket["matched"]), np.concatenate(bucket["ignored"])
        else:
            scores = images = order = np.zeros(0)
            matched = ignored = empty_flags
        for a in range(A):
            if num_gt[cat_id, a] == 0:
                continue
            precision[:, :, cat_id - 1, a], recall[:, cat_id - 1, a] = _precision_recall(
                scores, images, order, matched[:, a], ignored[:, a], num_gt[cat_id, a])

    result: dict[str, Any] = {
        "AP": _mean(precision[:, :, :, 0]),
        "AP50": _mean(precision[0, :, :, 0]),
        "AP75": _mean(precision[5, :, :, 0]),
        "APs": _mean(precision[:, :, :, 1]),
        "APm": _mean(precision[:, :, :, 2]),
        "APl": _mean(precision[:, :, :, 3]),
    }
    for freq in FREQUENCIES:
        group = [k for k, f in enumerate(frequencies) if f == freq]
        result[f"AP{freq}"] = _mean(precision[:, :, group, 0])
    for name, a in (("AR", 0), ("ARs", 1), ("ARm", 2), ("ARl", 3)):
        result[name] = _mean(recall[:, :, a])
    result["per_category"] = [
        {"id": old, "name": name, "frequency": frequencies[k], "AP": _mean(precision[:, :, k, 0])}
        for k, (old, name) in enumerate(remap.categories_out)]
    return result
