"""Cityscapes' own instance-level AP (cityscapesscripts' ``evalInstanceLevelSemanticLabeling``), as our own code.

``evaluate_cityscapes_instances(images, category_ids)`` scores mask predictions against Cityscapes instance ground
truth, one entry per image::

    {"gt": [(category_id, is_group, pixel_count, rle), ...],   # the image's instances and groups of those classes
     "void": rle,                                              # pixels whose instanceIds value is an ignored label id
     "predictions": [(category_id, score, rle), ...]}

and returns fractions ``{"AP", "AP50", "per_category": {category_id: {"AP", "AP50"}}}`` (``AP`` the mean over the
classes and the ten overlap thresholds, classes with neither ground truth nor predictions left out; ``nan`` where
nothing is defined). The rules, as the cityscapes script applies them (distance-based figures are not computed:
the script skips them too without depth):

- overlap thresholds ``numpy.arange(0.5, 1.0, 0.05)`` (with their float error), and a match needs IoU strictly
  greater than the threshold;
- ground-truth instances count when they are instances (not groups) of at least 100 pixels; each takes every
  prediction of its class with IoU above the threshold: the best-scored one is a true positive, every other one a
  false positive; an instance with none is a missed one;
- a prediction that matches no instance or group of its class (counted or not) is a false positive unless more
  than the threshold of its pixels are "ignore" pixels: void pixels, pixels of groups, and pixels of instances under
  100 pixels (an intersection with a group under 100 pixels counts twice, as in the script);
- per class and threshold, precision and recall at each distinct score (a prediction scores at least the threshold),
  an artificial point (recall 0, precision 1), and the step-wise integral of precision over recall; a class with
  ground truth but no prediction has AP 0, one with no ground truth ``nan`` (left out of the means).

Intersections come from compressed RLEs (pycocotools), so nothing is decoded to full-size masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from openseed.evaluation.lvis import mask_areas

#: The script's overlap thresholds, float error included (0.6000000000000001, ...): a match needs IoU > threshold.
OVERLAPS = np.arange(0.5, 1.0, 0.05)
MIN_REGION_SIZE = 100


def _intersections(predictions: list[dict], areas: np.ndarray, regions: list[dict]) -> np.ndarray:
    """Pixel counts [P, R] of each prediction's intersection with each region (compressed RLEs; ``areas``: the
    predictions' pixel counts)."""
    if not predictions or not regions:
        return np.zeros((len(predictions), len(regions)), dtype=np.int64)
    # with the crowd flag, pycocotools' iou is intersection / prediction area: times that area it is the count
    ratio = np.asarray(mask_utils.iou(predictions, regions, [1] * len(regions)), dtype=np.float64)
    return np.rint(ratio.reshape(len(predictions), len(regions)) * areas[:, None]).astype(np.int64)


def _match_image(image: dict, category_id: int):
    """One image and class: (the class's instances and groups, the non-empty predictions' scores and pixel counts,
    their overlap with the void region [P], and their intersections with each instance / group [P, G])."""
    gts = [g for g in image["gt"] if g[0] == category_id]
    preds = [p for p in image["predictions"] if p[0] == category_id]
    pred_areas = mask_areas([p[2] for p in preds]).astype(np.int64)
    keep = pred_areas > 0  # the script skips an empty predicted mask
    preds = [p for p, k in zip(preds, keep) if k]
    pred_areas = pred_areas[keep]
    regions = [g[3] for g in gts] + ([image["void"]] if image.get("void") is not None else [])
    inter = _intersections([p[2] for p in preds], pred_areas, regions)
    void = inter[:, len(gts)] if len(regions) > len(gts) else np.zeros(len(preds), dtype=np.int64)
    return gts, np.array([p[1] for p in preds], dtype=np.float64), pred_areas, void, inter[:, :len(gts)]


def _average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_fns: int) -> float:
    if len(y_true) == 0:  # every instance missed and every prediction ignored (the script would fail here)
        return 0.0
    order = np.argsort(y_score, kind="stable")
    true_sorted = y_true[order]
    cumsum = np.append(np.cumsum(true_sorted), 0)  # index -1 reads the appended 0
    _, first = np.unique(y_score[order], return_index=True)
    total, count = cumsum[-2], len(true_sorted)
    precision, recall = np.zeros(len(first) + 1), np.zeros(len(first) + 1)
    for k, index in enumerate(first):
        below = cumsum[index - 1]
        tp = total - below
        fp = count - index - tp
        fn = below + hard_fns
        precision[k] = tp / (tp + fp)
        recall[k] = tp / (tp + fn)
    precision[-1], recall[-1] = 1.0, 0.0
    widths = np.convolve(np.concatenate([[recall[0]], recall, [0.0]]), [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, widths))


def evaluate_cityscapes_instances(images: Sequence[dict], category_ids: Sequence[int]) -> dict:
    """Cityscapes instance AP of ``images`` (see the module docstring) for the classes ``category_ids``."""
    ap = np.full((len(category_ids), len(OVERLAPS)), np.nan)
    for c, category_id in enumerate(category_ids):
        matched = [_match_image(image, category_id) for image in images]
        have_gt = any(not g[1] and g[2] >= MIN_REGION_SIZE for m in matched for g in m[0])
        have_pred = any(len(m[1]) for m in matched)
        for o, threshold in enumerate(OVERLAPS):
            y_true, y_score, hard_fns = [], [], 0
            for gts, scores, areas, void, inter in matched:
                counted = [k for k, g in enumerate(gts) if not g[1] and g[2] >= MIN_REGION_SIZE]
                gt_areas = np.array([g[2] for g in gts], dtype=np.int64)
                iou = inter / np.maximum(areas[:, None] + gt_areas[None, :] - inter, 1) if len(gts) else inter
                for k in counted:
                    hits = np.flatnonzero((inter[:, k] > 0) & (iou[:, k] > threshold))
                    if len(hits) == 0:
                        hard_fns += 1
                        continue
                    # in prediction order the script keeps the best score for the instance; each other hit is a
                    # false positive at its score
                    best = scores[hits].max()
                    y_true.append(1.0)
                    y_score.append(best)
                    hits_scores = sorted(scores[hits].tolist())
                    hits_scores.remove(best)
                    y_true += [0.0] * len(hits_scores)
                    y_score += hits_scores
                for p in range(len(scores)):
                    # matching any instance or group of its class (counted or not) keeps it from being a false
                    # positive, as in the script
                    if any(inter[p, k] > 0 and iou[p, k] > threshold for k in range(len(gts))):
                        continue
                    ignore = int(void[p])
                    for k, g in enumerate(gts):
                        if inter[p, k] == 0:
                            continue
                        if g[1]:  # a group
                            ignore += int(inter[p, k])
                        if g[2] < MIN_REGION_SIZE:  # a small instance (or group)
                            ignore += int(inter[p, k])
                    if ignore / areas[p] <= threshold:
                        y_true.append(0.0)
                        y_score.append(float(scores[p]))
            if have_gt and have_pred:
                ap[c, o] = _average_precision(np.asarray(y_true), np.asarray(y_score), hard_fns)
            elif have_gt:
                ap[c, o] = 0.0
    half = int(np.flatnonzero(np.isclose(OVERLAPS, 0.5))[0])
    return {"AP": _nanmean(ap), "AP50": _nanmean(ap[:, half]),
            "per_category": {int(cid): {"AP": float(np.mean(ap[c])), "AP50": float(ap[c, half])}
                             for c, cid in enumerate(category_ids)}}


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan
