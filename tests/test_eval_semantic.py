"""Semantic segmentation mIoU: hand-computed label maps, ignore label, distributed summing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openseed.evaluation import semantic
from openseed.evaluation.semantic import SemanticEvaluator, metrics_from_confusion


def test_two_classes_by_hand():
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    ev = SemanticEvaluator(2)
    ev.update(pred, gt)
    # class 0: tp 1, fn 1, fp 0 -> 1/2 ; class 1: tp 2, fn 0, fp 1 -> 2/3
    r = ev.compute()
    assert r["per_class_iou"] == pytest.approx([1 / 2, 2 / 3])
    assert r["miou"] == pytest.approx(7 / 12)
    assert r["pacc"] == pytest.approx(3 / 4)
    assert r["macc"] == pytest.approx((1 / 2 + 1) / 2)
    assert r["fwiou"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 3)
    assert ev.conf_matrix.tolist() == [[1, 1], [0, 2]]  # rows: ground truth, columns: prediction


def test_three_classes_with_ignore_and_unseen_class():
    gt = np.array([[0, 0, 0, 255], [1, 1, 255, 255]], dtype=np.uint8)
    # wrong predictions under the ignore label (incl. class 2, which has no gt pixel) must not count
    pred = np.array([[0, 0, 1, 2], [1, 2, 2, 0]], dtype=np.uint8)
    ev = SemanticEvaluator(3, ignore_label=255)
    ev.update(pred, gt)
    r = ev.compute()
    # class 0: tp 2, fn 1, fp 0 -> 2/3 ; class 1: tp 1, fn 1 (pred 2), fp 1 -> 1/3 ; class 2: no gt -> nan
    assert r["per_class_iou"][:2] == pytest.approx([2 / 3, 1 / 3])
    assert math.isnan(r["per_class_iou"][2])  # predicted once, but no gt pixels: left out (detectron2)
    assert r["miou"] == pytest.approx(0.5)
    assert r["pacc"] == pytest.approx(3 / 5)
    assert r["macc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["fwiou"] == pytest.approx(3 / 5 * 2 / 3 + 2 / 5 * 1 / 3)
    assert ev.conf_matrix.sum() == 5


def test_ignore_label_never_counts():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(32, 48))
    pred = gt.copy()
    ignore = rng.random(gt.shape) < 0.3
    gt[ignore] = 255
    pred[ignore] = rng.integers(0, 4, size=int(ignore.sum()))  # garbage where gt is ignored
    ev = SemanticEvaluator(4)
    ev.update(pred, gt)
    r = ev.compute()
    assert r["miou"] == 1.0 and r["pacc"] == 1.0
    assert ev.conf_matrix.sum() == int((~ignore).sum())


def test_custom_ignore_label_inside_class_range():
    ev = SemanticEvaluator(3, ignore_label=0)
    ev.update(np.array([1, 2, 2, 1]), np.array([0, 2, 2, 1]))
    r = ev.compute()
    assert math.isnan(r["per_class_iou"][0]) and r["miou"] == 1.0


@pytest.mark.parametrize("as_torch", [False, True])
def test_perfect_prediction(as_torch):
    gt = np.random.default_rng(1).integers(0, 5, size=(2, 20, 30))
    ev = SemanticEvaluator(5)
    ev.update(torch.from_numpy(gt) if as_torch else gt, torch.from_numpy(gt) if as_torch else gt)
    r = ev.compute()
    assert r["miou"] == r["fwiou"] == r["pacc"] == r["macc"] == 1.0
    assert r["per_class_iou"] == [1.0] * 5


def test_matches_naive_definition_numpy_and_torch():
    rng = np.random.default_rng(2)
    n = 6
    gt = rng.integers(0, n, size=(64, 64))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, n - 1, size=gt.shape)  # class n-1 never predicted
    a, b = SemanticEvaluator(n), SemanticEvaluator(n)
    a.update(pred, gt)
    b.update(torch.from_numpy(pred).int(), torch.from_numpy(gt).to(torch.int16))
    assert np.array_equal(a.conf_matrix, b.conf_matrix)
    valid = gt != 255
    ious = []
    for c in range(n):
        tp = np.sum((pred == c) & (gt == c) & valid)
        fp = np.sum((pred == c) & (gt != c) & valid)
        fn = np.sum((pred != c) & (gt == c) & valid)
        ious.append(tp / (tp + fp + fn))
    r = a.compute()
    assert r["per_class_iou"] == pytest.approx(ious)
    assert r["miou"] == pytest.approx(np.mean(ious))
    assert r["pacc"] == pytest.approx(np.mean(pred[valid] == gt[valid]))


@pytest.mark.parametrize("bad", [2, -1, 255])
def test_out_of_range_prediction_raises(bad):
    ev = SemanticEvaluator(2)
    pred = np.array([[0, bad]])
    with pytest.raises(ValueError, match="prediction label"):
        ev.update(pred, np.array([[0, 1]]))
    with pytest.raises(ValueError, match="prediction label"):
        ev.update(torch.tensor(pred), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="prediction label"):  # also where the gt is ignored
        ev.update(pred, np.array([[0, 255]]))
    assert ev.conf_matrix.sum() == 0


def test_other_bad_inputs_raise():
    ev = SemanticEvaluator(2)
    with pytest.raises(ValueError, match="ground-truth label 7"):
        ev.update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="shapes differ"):
        ev.update(np.zeros((2, 3), dtype=int), np.zeros((3, 2), dtype=int))
    with pytest.raises(ValueError, match="integer"):
        ev.update(np.zeros((2, 2)), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError):
        SemanticEvaluator(0)


def test_no_pixels_gives_nan():
    ev = SemanticEvaluator(3)
    ev.update(np.array([1, 2]), np.array([255, 255]))
    r = ev.compute()
    assert all(math.isnan(r[k]) for k in ("miou", "fwiou", "pacc", "macc"))


def test_two_ranks_sum_equals_one(monkeypatch):
    rng = np.random.default_rng(3)
    maps = [(rng.integers(0, 4, size=(16, 16)), rng.integers(0, 4, size=(16, 16))) for _ in range(6)]
    for _, gt in maps:
        gt[rng.random(gt.shape) < 0.2] = 255
    single = SemanticEvaluator(4)
    for pred, gt in maps:
        single.update(pred, gt)
    ranks = [SemanticEvaluator(4), SemanticEvaluator(4)]
    for k, (pred, gt) in enumerate(maps):
        ranks[k % 2].update(pred, gt)

    monkeypatch.setattr(semantic, "gather_to_all", lambda items: [r.conf_matrix for r in ranks])
    two = ranks[0].compute()
    one = single.compute()
    assert two == one
    assert ranks[0].conf_matrix.sum() < single.conf_matrix.sum()  # compute() leaves the local state alone


def test_metrics_from_confusion_and_reset():
    r = metrics_from_confusion(np.array([[3, 1], [0, 0]]))
    assert r["per_class_iou"][0] == pytest.approx(3 / 4) and math.isnan(r["per_class_iou"][1])
    ev = SemanticEvaluator(2)
    ev.update(np.array([0]), np.array([1]))
    ev.reset()
    assert ev.conf_matrix.sum() == 0
