"""Semantic segmentation metrics (mIoU, fwIoU, pixel / mean accuracy) with detectron2's SemSegEvaluator definitions.

A confusion matrix ``conf[gt, pred]`` (``num_classes x num_classes``, int64, rows = ground truth) is accumulated
with one ``bincount`` per ``update``; pixels whose ground truth is ``ignore_label`` never count, whatever was
predicted there. ``compute()`` sums the matrices of all ranks (:func:`openseed.evaluation.common.gather_to_all`)
and derives, with ``tp = diag(conf)``, ``gt_c = conf.sum(1)`` (ground-truth pixels of class c) and
``pred_c = conf.sum(0)`` (pixels predicted as c, at non-ignored positions):

- ``per_class_iou[c] = tp_c / (gt_c + pred_c - tp_c)`` (= tp / (tp + fp + fn)) for every class with ``gt_c > 0``;
  ``nan`` for classes without ground-truth pixels, *even if they were predicted* (detectron2's rule: such a
  class has IoU 0 but is left out, not averaged).
- ``per_class_acc[c] = tp_c / gt_c`` for classes with ``gt_c > 0``, else ``nan``.
- ``miou`` = mean of ``per_class_iou`` over the classes with ground-truth pixels (the non-nan entries);
  ``macc`` = mean of ``per_class_acc`` over the same classes.
- ``fwiou`` = sum over those classes of ``gt_c / sum(gt) * iou_c`` (frequency weighted IoU).
- ``pacc`` = ``sum(tp) / sum(gt)`` (pixel accuracy over non-ignored pixels).

Values are fractions in [0, 1] (detectron2 reports percentages). With no non-ignored pixels at all every metric
is ``nan``. Predictions outside ``[0, num_classes)`` (anywhere, ignored pixels included) and ground-truth labels outside
``[0, num_classes)`` other than ``ignore_label`` raise ``ValueError``; nothing is accumulated then.
"""

from __future__ import annotations

import numpy as np
import torch

from openseed.evaluation.common import gather_to_all


class SemanticEvaluator:
    def __init__(self, num_classes: int, ignore_label: int = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.reset()

    def reset(self) -> None:
        self.conf_matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, gt) -> None:
        """Add one label map (or a batch of them): ``pred`` and ``gt`` integer arrays / tensors of equal shape."""
        n = self.num_classes
        if isinstance(pred, torch.Tensor) or isinstance(gt, torch.Tensor):
            pred_t = torch.as_tensor(pred)
            gt_t = torch.as_tensor(gt, device=pred_t.device)
            self._check(pred_t.shape, gt_t.shape, pred_t.dtype.is_floating_point or gt_t.dtype.is_floating_point)
            pred_t, gt_t = pred_t.reshape(-1).long(), gt_t.reshape(-1).long()
            self._check_range(pred_t, "prediction")
            valid = gt_t != self.ignore_label
            pred_t, gt_t = pred_t[valid], gt_t[valid]
            self._check_range(gt_t, "ground-truth")
            counts = torch.bincount(gt_t * n + pred_t, minlength=n * n).cpu().numpy()
        else:
            pred_a, gt_a = np.asarray(pred), np.asarray(gt)
            floating = any(np.issubdtype(a.dtype, np.inexact) for a in (pred_a, gt_a))
            self._check(pred_a.shape, gt_a.shape, floating)
            pred_a, gt_a = pred_a.reshape(-1).astype(np.int64), gt_a.reshape(-1).astype(np.int64)
            self._check_range(pred_a, "prediction")
            valid = gt_a != self.ignore_label
            pred_a, gt_a = pred_a[valid], gt_a[valid]
            self._check_range(gt_a, "ground-truth")
            counts = np.bincount(gt_a * n + pred_a, minlength=n * n)
        self.conf_matrix += counts.reshape(n, n).astype(np.int64)

    @staticmethod
    def _check(pred_shape, gt_shape, floating: bool) -> None:
        if tuple(pred_shape) != tuple(gt_shape):
            raise ValueError(f"pred and gt shapes differ: {tuple(pred_shape)} vs {tuple(gt_shape)}")
        if floating:
            raise ValueError("pred and gt must be integer label maps")

    def _check_range(self, labels, what: str) -> None:
        """Every (non-ignored) label must lie in [0, num_classes)."""
        if (labels.numel() if isinstance(labels, torch.Tensor) else labels.size) == 0:
            return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            extra = f" (and is not the ignore label {self.ignore_label})" if what == "ground-truth" else ""
            raise ValueError(f"{what} label {lo if lo < 0 else hi} outside [0, {self.num_classes}){extra}")

    def compute(self) -> dict:
        """Metrics over the summed confusion matrices of all ranks (see the module docstring)."""
        conf = np.zeros_like(self.conf_matrix)
        for part in gather_to_all([self.conf_matrix]):
            conf += np.asarray(part, dtype=np.int64)
        return metrics_from_confusion(conf)


def metrics_from_confusion(conf: np.ndarray) -> dict:
    """detectron2 SemSegEvaluator metrics from ``conf[gt, pred]`` (fractions, nan where undefined)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    pos_gt = conf.sum(axis=1)
    pos_pred = conf.sum(axis=0)
    valid = pos_gt > 0
    iou = np.full(len(tp), np.nan)
    acc = np.full(len(tp), np.nan)
    acc[valid] = tp[valid] / pos_gt[valid]
    iou[valid] = tp[valid] / (pos_gt + pos_pred - tp)[valid]
    total = pos_gt.sum()
    if valid.any():
        miou, macc = float(iou[valid].mean()), float(acc[valid].mean())
        fwiou = float(np.sum(pos_gt[valid] / total * iou[valid]))
        pacc = float(tp.sum() / total)
    else:
        miou = macc = fwiou = pacc = float("nan")
    return {"miou": miou, "fwiou": fwiou, "pacc": pacc, "macc": macc,
            "per_class_iou": [float(v) for v in iou], "per_class_acc": [float(v) for v in acc]}
