"""LVIS federated AP (openseed.evaluation.lvis) against pycocotools and hand-worked cases."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from openseed.evaluation.instances import EvaluationInputError
from openseed.evaluation.lvis import evaluate_lvis

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------------- helpers


def _image(image_id, neg=(), not_exhaustive=(), size=400):
    return {"id": image_id, "height": size, "width": size, "neg_category_ids": list(neg),
            "not_exhaustive_category_ids": list(not_exhaustive)}


def _categories(*frequencies):
    return [{"id": k + 1, "name": f"c{k + 1}", "frequency": f} for k, f in enumerate(frequencies)]


def _box_gt(images, categories, boxes):
    """``boxes``: (image_id, category_id, [x, y, w, h]) ground truth, area w * h."""
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": float(b[2] * b[3]),
             "iscrowd": 0} for k, (i, c, b) in enumerate(boxes)]
    return {"images": images, "categories": categories, "annotations": anns}


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


def _per_cat(result):
    return {c["id"]: c["AP"] for c in result["per_category"]}


def _cocoeval(gt, dets, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, iou_type)  # default maxDets [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_cat = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_cat[cat_id] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return dict(zip(AP_KEYS + ("AR1", "AR10", "AR"), ev.stats[[0, 1, 2, 3, 4, 5, 6, 7, 8]])), per_cat, ev.stats


# ----------------------------------------------------------------------------------------------- 1. = COCOeval


def _random_exhaustive_set(seed=0, num_images=8, size=160):
    """Random masks of every size class, 5 categories: category 4 has ground truth but no detections, category 5
    no ground truth but detections; every image lists every non-positive category as negative. Scores are
    rounded to one decimal, so there are many ties (their order must agree with COCOeval's)."""
    rng = np.random.RandomState(seed)
    categories = _categories("r", "c", "f", "c", "r")
    images, anns, dets = [], [], []

    def blob(min_side, max_side):
        mask = np.zeros((size, size), dtype=np.uint8)
        h, w = rng.randint(min_side, max_side, size=2)
        y, x = rng.randint(0, size - h), rng.randint(0, size - w)
        if rng.rand() < 0.5:
            mask[y:y + h, x:x + w] = 1
        else:  # an ellipse
            yy, xx = np.mgrid[:size, :size]
            mask[((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1] = 1
            if not mask.any():
                mask[y, x] = 1
        return mask

    def rle(mask):
        r = mask_utils.encode(np.asfortranarray(mask))
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    for image_id in range(1, num_images + 1):
        positive = set()
        for _ in range(rng.randint(2, 7)):
            cat = int(rng.randint(1, 5))
            positive.add(cat)
            mask = blob(*[(4, 30), (20, 90), (60, 150)][rng.randint(3)])
            r = rle(mask)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": r,
                         "area": float(mask_utils.area(r)), "bbox": mask_utils.toBbox(r).tolist(), "iscrowd": 0})
            if cat != 4 and rng.rand() < 0.8:  # a detection near it: shifted by a few pixels
                shifted = np.roll(mask, tuple(rng.randint(-4, 5, size=2)), axis=(0, 1))
                if shifted.any():
                    dets.append((image_id, cat, shifted))
        for _ in range(rng.randint(3, 15)):  # false positives of any category but 4
            dets.append((image_id, int(rng.choice([1, 2, 3, 5])), blob(4, 120)))
        images.append(_image(image_id, neg=[c for c in range(1, 6) if c not in positive], size=size))
    box_dets, mask_dets = [], []
    for image_id, cat, mask in dets:
        r = rle(mask)
        score = round(float(rng.rand()), 1) or 0.05
        box = mask_utils.toBbox(r).tolist()
        box_dets.append(_det(image_id, cat, box, score))
        mask_dets.append({"image_id": image_id, "category_id": cat, "segmentation": r, "score": score})
    gt = {"images": images, "categories": categories, "annotations": anns}
    return gt, {"bbox": box_dets, "segm": mask_dets}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_exhaustive_data_equals_cocoeval(iou_type):
    gt, dets = _random_exhaustive_set()
    per_image = np.bincount([d["image_id"] for d in dets[iou_type]])
    assert per_image.max() <= 100  # COCO's 100 per image and class never bites, nor LVIS's 300 per image
    coco, coco_per_cat, stats = _cocoeval(gt, dets[iou_type], iou_type)
    assert all(s > 0 for s in stats[:6]), stats  # every area range is exercised
    lvis = evaluate_lvis(gt, dets[iou_type], iou_type)
    for key in AP_KEYS + ("AR",):
        assert lvis[key] == pytest.approx(coco[key], abs=1e-9), key
    assert _per_cat(lvis) == pytest.approx(coco_per_cat, abs=1e-9)
    assert coco_per_cat[5] == -1 and coco_per_cat[4] == 0  # no GT: left out; GT without detections: 0
    # APr averages categories 1 and 5 (5 has no GT and is left out), APc 2 and 4, APf 3
    assert lvis["APr"] == pytest.approx(coco_per_cat[1], abs=1e-9)
    assert lvis["APc"] == pytest.approx((coco_per_cat[2] + coco_per_cat[4]) / 2, abs=1e-9)
    assert lvis["APf"] == pytest.approx(coco_per_cat[3], abs=1e-9)


# ----------------------------------------------------------------------------------------------- 2. federated


def _two_image_set(neg_on_1=()):
    """Category 1 positive on image 1, category 2 positive on image 2 (one large box each)."""
    gt = _box_gt([_image(1, neg=neg_on_1), _image(2)], _categories("f", "f"),
                 [(1, 1, [0, 0, 100, 100]), (2, 2, [0, 0, 100, 100])])
    dets = [_det(1, 1, [0, 0, 100, 100], 0.9), _det(2, 2, [0, 0, 100, 100], 0.5)]
    return gt, dets


def test_unlisted_category_is_ignored_negative_one_is_penalised():
    gt, dets = _two_image_set()
    base = evaluate_lvis(gt, dets, "bbox")
    assert base["AP"] == pytest.approx(1.0)
    # category 2 is neither positive nor negative on image 1: its detections there (scored above the true positive
    # on image 2, one even on category 1's object) change nothing
    extra = [_det(1, 2, [200, 200, 100, 100], 0.95), _det(1, 2, [0, 0, 100, 100], 0.8)]
    unlisted = evaluate_lvis(gt, dets + extra, "bbox")
    assert {k: unlisted[k] for k in base if k != "per_category"} == {k: base[k] for k in base if k != "per_category"}
    assert unlisted["per_category"] == base["per_category"]
    # negative on image 1: they become false positives ranked above category 2's true positive
    gt_neg, _ = _two_image_set(neg_on_1=[2])
    negative = evaluate_lvis(gt_neg, dets + extra, "bbox")
    assert _per_cat(negative)[2] == pytest.approx(1 / 3)  # precision 1/3 at recall 1 (both FPs first)
    assert _per_cat(negative)[1] == pytest.approx(1.0)
    assert negative["AP"] < base["AP"] and negative["APf"] < base["APf"]
    # listing the category negative without detections of it changes nothing
    assert evaluate_lvis(gt_neg, dets, "bbox")["AP"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- 3. not exhaustive


def test_not_exhaustive_category_forgives_unmatched_detections():
    def gt_for(not_exhaustive):
        return _box_gt([_image(1, not_exhaustive=not_exhaustive)], _categories("c"),
                       [(1, 1, [0, 0, 100, 100])])

    tp = _det(1, 1, [0, 0, 100, 100], 0.5)
    unmatched = [_det(1, 1, [200, 200, 100, 100], 0.9), _det(1, 1, [0, 0, 40, 100], 0.8)]  # IoU 0 and 0.4
    listed = evaluate_lvis(gt_for([1]), [tp] + unmatched, "bbox")
    assert listed["AP"] == evaluate_lvis(gt_for([1]), [tp], "bbox")["AP"] == pytest.approx(1.0)
    # and a matched detection on a not-exhaustive category is still a true positive (a second TP is still a FP
    # only if unmatched: here a duplicate is unmatched, so ignored)
    assert evaluate_lvis(gt_for([1]), [tp, _det(1, 1, [0, 0, 100, 100], 0.95)], "bbox")["AP"] == pytest.approx(1.0)
    plain = evaluate_lvis(gt_for([]), [tp] + unmatched, "bbox")
    assert plain["AP"] == pytest.approx(1 / 3)  # two false positives above the true positive
    assert plain["AP"] < listed["AP"]


# ----------------------------------------------------------------------------------------------- 4. 300 per image


def test_300_detections_per_image_over_all_classes():
    gt = _box_gt([_image(1, neg=[2])], _categories("f", "f"), [(1, 1, [0, 0, 100, 100])])
    # 300 false positives of category 2 (away from the object), all scored above the true positive of category 1
    fps = [_det(1, 2, [200 + k % 100, 200, 50, 50], 0.5 + k / 1000) for k in range(300)]
    tp = _det(1, 1, [0, 0, 100, 100], 0.1)
    assert _per_cat(evaluate_lvis(gt, fps[:-1] + [tp], "bbox"))[1] == pytest.approx(1.0)  # 300 detections: all kept
    cut = evaluate_lvis(gt, fps + [tp], "bbox")  # 301: the lowest-scored, the true positive, is dropped
    assert _per_cat(cut)[1] == 0.0
    assert _per_cat(evaluate_lvis(gt, fps + [tp], "bbox", max_dets=None))[1] == pytest.approx(1.0)
    # the limit applies before the federated filter: category 2 ignored on the image still uses up the budget
    gt_unlisted = _box_gt([_image(1)], _categories("f", "f"), [(1, 1, [0, 0, 100, 100])])
    assert _per_cat(evaluate_lvis(gt_unlisted, fps + [tp], "bbox"))[1] == 0.0
    # and it is per image: the same 300 on another image leave image 1's true positive alone
    gt_two = _box_gt([_image(1, neg=[2]), _image(2, neg=[2])], _categories("f", "f"), [(1, 1, [0, 0, 100, 100])])
    moved = [dict(d, image_id=2) for d in fps]
    assert _per_cat(evaluate_lvis(gt_two, moved + [tp], "bbox"))[1] == pytest.approx(1.0)


def test_300_per_image_segm():
    """The same limit for masks (and mask areas of 256 or more detections: pycocotools' ``area`` cannot take them
    in one list under NumPy 2)."""
    def rle(y, x, side):
        m = np.zeros((64, 64), dtype=np.uint8)
        m[y:y + side, x:x + side] = 1
        r = mask_utils.encode(np.asfortranarray(m))
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    obj = rle(0, 0, 20)
    gt = {"images": [_image(1, neg=[2], size=64)], "categories": _categories("f", "f"),
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": obj, "area": 400.0}]}
    fps = [{"image_id": 1, "category_id": 2, "segmentation": rle(30, 30, 1 + k % 30), "score": 0.5 + k / 1000}
           for k in range(300)]
    tp = {"image_id": 1, "category_id": 1, "segmentation": obj, "score": 0.1}
    assert _per_cat(evaluate_lvis(gt, fps[:-1] + [tp], "segm"))[1] == pytest.approx(1.0)
    assert _per_cat(evaluate_lvis(gt, fps + [tp], "segm"))[1] == 0.0


# ----------------------------------------------------------------------------------------------- 5. APr / APc / APf


def test_frequency_groups():
    # category 1 (rare): found -> AP 1. Category 2 (common): two objects, one found with IoU 1 at score 0.9 ->
    # precision 1 up to recall 0.5, nothing beyond: 51 of the 101 recall points (0.00 .. 0.50) -> AP 51/101.
    # Category 3 (frequent): one object, only a false positive -> AP 0.
    gt = _box_gt([_image(1)], _categories("r", "c", "f"),
                 [(1, 1, [0, 0, 100, 100]), (1, 2, [200, 0, 100, 100]), (1, 2, [0, 200, 100, 100]),
                  (1, 3, [200, 200, 100, 100])])
    dets = [_det(1, 1, [0, 0, 100, 100], 0.9), _det(1, 2, [200, 0, 100, 100], 0.9),
            _det(1, 3, [0, 0, 100, 100], 0.9)]
    result = evaluate_lvis(gt, dets, "bbox")
    assert result["APr"] == pytest.approx(1.0)
    assert result["APc"] == pytest.approx(51 / 101, abs=1e-12)
    assert result["APf"] == 0.0
    assert result["AP"] == pytest.approx((1 + 51 / 101 + 0) / 3, abs=1e-12)
    assert [c["frequency"] for c in result["per_category"]] == ["r", "c", "f"]
    # a group without any evaluated category is -1 (undefined), like COCO's empty area ranges
    gt["categories"][2]["frequency"] = "c"
    assert evaluate_lvis(gt, dets, "bbox")["APf"] == -1


# ----------------------------------------------------------------------------------------------- 6. by hand


def test_hand_worked_precision_recall():
    """One category, three large objects A, B, C on one 400x400 image; detections by score:

        0.9  = A                        IoU 1     TP at every threshold
        0.8  away from everything       IoU 0     FP
        0.7  [200, 0, 72, 100] vs B     IoU 0.72  TP at 0.50 .. 0.70 (5 thresholds), FP at 0.75 .. 0.95 (5)
        0.6  = C                        IoU 1     TP at every threshold

    IoU 0.50 .. 0.70: TP FP TP TP -> recall 1/3 1/3 2/3 1, precision 1 1/2 2/3 3/4, interpolated (the best
    precision at this or any higher recall) 1 3/4 3/4 3/4: recall points 0.00 .. 0.33 (34) at 1 and 0.34 .. 1.00
    (67) at 3/4 -> (34 + 67 * 3/4) / 101 = 337/404.
    IoU 0.75 .. 0.95: TP FP FP TP -> recall 1/3 1/3 1/3 2/3, precision 1 1/2 1/3 1/2, interpolated 1 1/2 1/2 1/2:
    34 points at 1, 0.34 .. 0.66 (33) at 1/2, the rest 0 -> (34 + 16.5) / 101 = 1/2.
    AP = (5 * 337/404 + 5 * 1/2) / 10 = 539/808; AP50 = 337/404; AP75 = 1/2. The one category is frequent:
    APf = AP, APr = APc = -1.
    Area ranges: all objects are large (> 96^2 px), so APs = APm = -1. For APl, the 0.7 detection (72 x 100 = 7200
    px, medium) is ignored where it matches nothing (0.75 .. 0.95): TP FP - TP -> recall 1/3 1/3 - 2/3, precision
    1 1/2 - 2/3, interpolated 1 2/3 - 2/3: 34 points at 1, 33 at 2/3 -> 56/101; APl = (337/404 + 224/404) / 2 =
    561/808.
    Recall (AR@300): (5 * 1 + 5 * 2/3) / 10 = 5/6.
    """
    gt = _box_gt([_image(1)], _categories("f"),
                 [(1, 1, [0, 0, 100, 100]), (1, 1, [200, 0, 100, 100]), (1, 1, [0, 200, 100, 100])])
    dets = [_det(1, 1, [0, 0, 100, 100], 0.9), _det(1, 1, [250, 250, 100, 100], 0.8),
            _det(1, 1, [200, 0, 72, 100], 0.7), _det(1, 1, [0, 200, 100, 100], 0.6)]
    result = evaluate_lvis(gt, dets, "bbox")
    assert result["AP"] == pytest.approx(539 / 808, abs=1e-12)
    assert result["AP50"] == pytest.approx(337 / 404, abs=1e-12)
    assert result["AP75"] == pytest.approx(1 / 2, abs=1e-12)
    assert result["APl"] == pytest.approx(561 / 808, abs=1e-12)
    assert result["APs"] == result["APm"] == -1
    assert result["APf"] == pytest.approx(539 / 808, abs=1e-12)
    assert result["APr"] == result["APc"] == -1
    assert result["AR"] == pytest.approx(5 / 6, abs=1e-12)
    # the detection list order and the ids do not matter: reversed list, ids from 0, same numbers
    shifted_gt = copy.deepcopy(gt)
    shifted_gt["images"][0]["id"] = 0
    shifted_gt["categories"][0]["id"] = 0
    for ann in shifted_gt["annotations"]:
        ann.update(image_id=0, category_id=0, id=ann["id"] - 1)
    shifted = evaluate_lvis(shifted_gt, [dict(d, image_id=0, category_id=0) for d in dets[::-1]], "bbox")
    assert shifted["AP"] == pytest.approx(539 / 808, abs=1e-12)
    assert shifted["per_category"][0]["id"] == 0


def test_matching_rules():
    """COCO's greedy matching, which LVIS keeps: a non-ignored ground truth before an ignored one, and of equal IoUs
    the later ground truth."""
    # GT 1 [0, 0, 100, 100] regular, GT 2 [10, 0, 100, 100] flagged ignore; the detection [10, 0, 95, 100] has IoU
    # 0.857 with GT 1 and 0.95 with GT 2: up to IoU 0.85 it takes GT 1 (a true positive: AP50 1); at 0.90 / 0.95
    # only GT 2 is good enough, so it is ignored and GT 1 is missed (AP 0 there): AP = 8/10
    gt = _box_gt([_image(1)], _categories("f"), [(1, 1, [0, 0, 100, 100]), (1, 1, [10, 0, 100, 100])])
    gt["annotations"][1]["ignore"] = 1
    result = evaluate_lvis(gt, [_det(1, 1, [10, 0, 95, 100], 0.9)], "bbox")
    assert result["AP50"] == pytest.approx(1.0)
    assert result["AP"] == pytest.approx(0.8)
    # ties: GT 1 [0, 0, 100, 100], GT 2 [20, 0, 100, 100]; detection 1 [10, 0, 100, 100] (score 0.9) has IoU 9/11
    # with both and takes GT 2 (the later); detection 2 = GT 1 (0.8) then takes GT 1 (IoU 1).
    # IoU 0.50 .. 0.80 (7 thresholds): TP TP -> AP 1. IoU 0.85 .. 0.95 (3): detection 1 matches nothing: FP TP ->
    # recall 0 1/2, precision 0 1/2, interpolated 1/2 1/2: 51 recall points (0 .. 0.50) at 1/2 -> 25.5/101.
    # (Had the tie gone to GT 1, detection 2 would be a FP at 0.70 .. 0.80, where its IoU with GT 2 is 2/3.)
    gt = _box_gt([_image(1)], _categories("f"), [(1, 1, [0, 0, 100, 100]), (1, 1, [20, 0, 100, 100])])
    dets = [_det(1, 1, [10, 0, 100, 100], 0.9), _det(1, 1, [0, 0, 100, 100], 0.8)]
    result = evaluate_lvis(gt, dets, "bbox")
    assert result["AP"] == pytest.approx((7 + 3 * 25.5 / 101) / 10, abs=1e-12)
    assert result["AP"] == pytest.approx(_cocoeval(gt, dets, "bbox")[0]["AP"], abs=1e-12)


def test_input_errors():
    gt = _box_gt([_image(1)], _categories("f"), [(1, 1, [0, 0, 100, 100])])
    del gt["images"][0]["neg_category_ids"]
    with pytest.raises(EvaluationInputError, match="neg_category_ids"):
        evaluate_lvis(gt, [], "bbox")
    gt = _box_gt([_image(1)], _categories("often"), [(1, 1, [0, 0, 100, 100])])
    with pytest.raises(EvaluationInputError, match="frequency"):
        evaluate_lvis(gt, [], "bbox")
    gt = _box_gt([_image(1)], _categories("f"), [(1, 1, [0, 0, 100, 100])])
    with pytest.raises(EvaluationInputError, match="unknown category_id"):
        evaluate_lvis(gt, [_det(1, 7, [0, 0, 1, 1], 0.5)], "bbox")
    assert evaluate_lvis(gt, [], "bbox")["AP"] == 0.0  # no detections at all
