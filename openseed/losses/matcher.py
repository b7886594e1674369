"""Hungarian matching between matching queries and ground truth (SPEC section 3).

Cost per (query, target) pair::

    cost_class * focal class cost + cost_box * L1(cxcywh) + cost_giou * (-GIoU)
    + cost_mask * sigmoid-BCE + cost_dice * dice          (mask terms on ``num_points`` uniform random points)

Which queries may match which targets is given per call as *groups*: per image a list of
``(query selection, target index subset)`` pairs, each solved independently with ``linear_sum_assignment``
(decoupled segmentation: fg queries x things and bg queries x stuff; detection: fg queries x all targets).

The costs of a whole batch are computed at once (targets padded to the largest count: a few batched tensor ops
instead of a few dozen per image and group) and moved to the CPU in one transfer; only the assignments themselves
run per image and group. ``cost_matrix`` is the same cost for one image, pair by pair.

The cost weights are the loss weights (SPEC section 3, as in every reference config): ``SetCriterion`` builds its
matcher from its own weights and refuses a matcher whose costs differ; ``SPEC_WEIGHTS`` holds the defaults of both.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import MappingProxyType
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from openseed.core.outputs import Prediction
from openseed.losses.point_sampling import point_sample_shared, sample_masks, uniform_points

#: SPEC section 3's weight of each term, in the matching cost and in the matched losses alike (the defaults of
#: ``HungarianMatcher``'s costs and ``SetCriterion``'s weights; conf/criterion/default.yaml spells them out).
SPEC_WEIGHTS = MappingProxyType({"class": 4.0, "bbox": 5.0, "giou": 2.0, "mask": 5.0, "dice": 5.0})

#: Replacement for non-finite cost entries (large enough never to be preferred, small enough for float64 sums).
LARGE_COST = 1e8


class MatchTarget(TypedDict, total=False):
    """Ground truth of one image as the matcher sees it.

    Keys:
        labels: long [N] (required).
        boxes: float [N, 4] cxcywh normalised by the padded size (required).
        masks: [N, H', W'] bool or float masks over the padded image at any resolution (GT masks, or mask-assistance
            masks on detection data), or None: no mask cost terms.
        mask_valid: bool [N]: targets whose mask may be used (``has_mask``); the mask terms are 0 for the others.
        point_coords, point_values: optional precomputed mask samples: [P, 2] points (x, y) in [0, 1] and the
            targets' mask values there [N, P] (``sample_masks(masks, point_coords)``). With them the matcher samples
            the predictions at these points instead of drawing its own, so several matcher calls on the same targets
            (decoder layers, proposals) sample the targets once.
    """

    labels: Tensor
    boxes: Tensor
    masks: Tensor | None
    mask_valid: Tensor | None
    point_coords: Tensor
    point_values: Tensor


#: ``(queries, targets)``: a query slice (or long index) over the prediction's Q, and a long index of targets
#: (None = all targets of the image).
MatchGroup = tuple[slice | Tensor, Tensor | None]


def build_match_groups(is_thing: Sequence[Tensor], task: str, num_fg: int, num_bg: int,
                       decoupled: bool | None = None) -> list[list[MatchGroup]]:
    """Which queries may match which targets, per image (queries ordered ``[fg (num_fg) | bg (num_bg)]``).

    - segmentation, decoupled: fg queries x thing targets, bg queries x stuff targets (two groups);
    - segmentation, not decoupled: all ``num_fg + num_bg`` queries x all targets;
    - detection: fg queries x all targets (bg queries are never matched).

    ``decoupled`` defaults to what the query split says: a model is decoupled when it has bg queries
    (``num_bg > 0``). For the encoder proposals (fg queries only) pass ``num_bg=0`` and the model's ``decoupled``;
    proposals that carry the bg queries too (``bg_training="reference"``) pass ``num_bg`` on segmentation data and,
    on detection data, ``num_fg + num_bg`` as ``num_fg`` (the reference matches every such row to every target).
    """
    if decoupled is None:
        decoupled = num_bg > 0
    if task not in ("seg", "det"):
        raise ValueError(f"task must be 'seg' or 'det', got {task!r}")
    fg = slice(0, num_fg)
    groups: list[list[MatchGroup]] = []
    for thing in is_thing:
        thing = thing.bool()
        if task == "det":
            groups.append([(fg, None)])
        elif decoupled:
            image_groups: list[MatchGroup] = [(fg, torch.nonzero(thing).flatten())]
            if num_bg > 0:
                image_groups.append((slice(num_fg, num_fg + num_bg), torch.nonzero(~thing).flatten()))
            groups.append(image_groups)
        else:
            groups.append([(slice(0, num_fg + num_bg), None)])
    return groups


def solve_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of one [R, C] cost matrix; non-finite entries are replaced by ``LARGE_COST``.

    Returns long (row indices, column indices) on the cost's device, ``min(R, C)`` pairs sorted by row.
    """
    device = cost.device
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    rows, cols = _assign(cost.detach().double().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device))


def _assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``linear_sum_assignment`` of a float64 cost with non-finite entries replaced by ``LARGE_COST`` (warned)."""
    if not np.isfinite(cost).all():
        _warn_nonfinite()
        cost = np.nan_to_num(cost, nan=LARGE_COST, posinf=LARGE_COST, neginf=-LARGE_COST)
    return linear_sum_assignment(cost)


_WARNED_NONFINITE = False


def _warn_nonfinite() -> None:
    global _WARNED_NONFINITE
    if not _WARNED_NONFINITE:
        _WARNED_NONFINITE = True
        warnings.warn(f"matching cost matrix has inf/nan entries; replaced by {LARGE_COST:g} (warned once)",
                      RuntimeWarning, stacklevel=3)


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """DINO-style focal classification cost [Q, N] = pos_cost - neg_cost at each target's label."""
    return _focal_cost_of_logits(logits.float()[:, labels], alpha, gamma)


def _focal_cost_of_logits(logits: Tensor, alpha: float, gamma: float) -> Tensor:
    """The focal cost of logits already gathered at each pair's target label (any shape)."""
    prob = logits.sigmoid()
    neg = (1.0 - alpha) * prob.pow(gamma) * F.softplus(logits)  # -log(1 - p)
    pos = alpha * (1.0 - prob).pow(gamma) * F.softplus(-logits)  # -log(p)
    return pos - neg


def mask_bce_cost(pred_points: Tensor, tgt_points: Tensor) -> Tensor:
    """Mean sigmoid BCE over points for every pair: pred logits [..., Q, P], targets in [0, 1] [..., N, P] ->
    [..., Q, N] (leading dimensions are batch dimensions)."""
    num_points = max(pred_points.shape[-1], 1)
    # BCE(x, t) = softplus(x) - x * t: one softplus and one product for every pair
    return (F.softplus(pred_points).sum(-1, keepdim=True) - pred_points @ tgt_points.transpose(-1, -2)) / num_points


def mask_dice_cost(pred_points: Tensor, tgt_points: Tensor) -> Tensor:
    """Dice cost ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` for every pair: [..., Q, P], [..., N, P] -> [..., Q, N]."""
    prob = pred_points.sigmoid()
    numerator = 2.0 * prob @ tgt_points.transpose(-1, -2)
    denominator = prob.sum(-1)[..., :, None] + tgt_points.sum(-1)[..., None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher(nn.Module):
    """Per-image, per-group Hungarian matching. Stateless apart from the cost weights; runs under ``no_grad``."""

    def __init__(self, cost_class: float = SPEC_WEIGHTS["class"], cost_box: float = SPEC_WEIGHTS["bbox"],
                 cost_giou: float = SPEC_WEIGHTS["giou"], cost_mask: float = SPEC_WEIGHTS["mask"],
                 cost_dice: float = SPEC_WEIGHTS["dice"], num_points: int = 12544,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_box={self.cost_box}, cost_giou={self.cost_giou}, "
                f"cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, num_points={self.num_points}")

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
                    pred_points: Tensor | None = None, tgt_points: Tensor | None = None,
                    mask_valid: Tensor | None = None) -> Tensor:
        """Weighted matching cost [Q, N].

        Args:
            logits: [Q, K] class logits; boxes: [Q, 4] cxcywh.
            labels: long [N]; tgt_boxes: [N, 4] cxcywh (both normalised the same way).
            pred_points: [Q, P] mask logits at P points, and tgt_points: [N, P] target mask values at the same points;
                both None for no mask terms.
            mask_valid: bool [N]: columns whose mask terms count (others get 0 mask cost).
        """
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        cost = self.cost_class * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_box * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = cost - self.cost_giou * giou
        if pred_points is not None and tgt_points is not None:
            pred_points = pred_points.float()
            tgt_points = tgt_points.float()
            mask_cost = (self.cost_mask * mask_bce_cost(pred_points, tgt_points)
                         + self.cost_dice * mask_dice_cost(pred_points, tgt_points))
            if mask_valid is not None:
                mask_cost = mask_cost * mask_valid.to(mask_cost.dtype)[None, :]
            cost = cost + mask_cost
        return cost

    @torch.no_grad()
    def forward(self, pred: Prediction, targets: Sequence[MatchTarget],
                groups: Sequence[Sequence[MatchGroup]] | None = None,
                use_masks: bool = True) -> list[tuple[Tensor, Tensor]]:
        """Match the queries of ``pred`` to ``targets``.

        Args:
            pred: predictions [B, Q, ...]; ``pred.masks`` may be None.
            targets: B ``MatchTarget`` dicts; a target's ``masks`` (GT masks, or assistance masks on detection data)
                enable the mask terms, None or absent disables them for that image.
            groups: per image, the ``(queries, targets)`` groups matched independently; None = one group of all
                queries x all targets. Groups should not share queries or targets.
            use_masks: False skips the mask terms altogether.

        Returns:
            Per image ``(query_indices, target_indices)``, long, on the predictions' device, over the full query and
            target index spaces, concatenated over groups and sorted by query index.
        """
        # Costs are computed in float32 even under mixed precision (point sums overflow float16).
        with torch.autocast(device_type=pred.logits.device.type, enabled=False), \
                torch.profiler.record_function("matcher"):
            return self._match(pred, targets, groups, use_masks)

    def _match(self, pred: Prediction, targets: Sequence[MatchTarget], groups: Sequence[Sequence[MatchGroup]] | None,
               use_masks: bool) -> list[tuple[Tensor, Tensor]]:
        """All images' costs in one batched computation (targets padded to the batch's largest count), moved to the
        CPU once; then one ``linear_sum_assignment`` per image and group on its block of the cost."""
        batch, num_queries = pred.logits.shape[:2]
        device = pred.logits.device
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch}")
        counts = [int(t["labels"].shape[0]) for t in targets]
        cost = self._batched_cost(pred, targets, counts, use_masks)  # [B, Q, max N] or None
        cost_np = None if cost is None else cost.double().cpu().numpy()
        queries_np = np.arange(num_queries)
        pairs: list[np.ndarray] = []
        for b in range(batch):
            image_groups = groups[b] if groups is not None else [(slice(0, num_queries), None)]
            rows_out, cols_out = [], []
            for query_sel, target_sel in image_groups:
                q_idx = queries_np[query_sel] if isinstance(query_sel, slice) else _as_index(query_sel)
                t_idx = np.arange(counts[b]) if target_sel is None else _as_index(target_sel)
                if q_idx.size == 0 or t_idx.size == 0:
                    continue
                rows, cols = _assign(cost_np[b][np.ix_(q_idx, t_idx)])
                rows_out.append(q_idx[rows])
                cols_out.append(t_idx[cols])
            if rows_out:
                q_all, t_all = np.concatenate(rows_out), np.concatenate(cols_out)
                order = np.argsort(q_all, kind="stable")
                pairs.append(np.stack([q_all[order], t_all[order]]))
            else:
                pairs.append(np.zeros((2, 0), dtype=np.int64))
        # one transfer to the predictions' device for the whole batch
        flat = torch.from_numpy(np.concatenate(pairs, axis=1).astype(np.int64)).to(device)
        return [(block[0], block[1]) for block in torch.split(flat, [p.shape[1] for p in pairs], dim=1)]

    def _batched_cost(self, pred: Prediction, targets: Sequence[MatchTarget], counts: list[int],
                      use_masks: bool) -> Tensor | None:
        """The weighted cost [B, Q, max N] of every image's queries against its targets (the columns past an
        image's count are padding, never read). Each entry equals ``cost_matrix``'s for that pair."""
        batch = len(counts)
        width = max(counts, default=0)
        if width == 0:
            return None
        device = pred.logits.device
        labels = torch.zeros(batch, width, dtype=torch.long, device=device)
        tgt_boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(batch, width, 1)  # finite padding
        for b, (tgt, n) in enumerate(zip(targets, counts, strict=True)):
            if n:
                labels[b, :n] = tgt["labels"].to(device)
                tgt_boxes[b, :n] = tgt["boxes"].to(device).float()
        logits = torch.gather(pred.logits.float(), 2, labels[:, None, :].expand(-1, pred.logits.shape[1], -1))
        cost = self.cost_class * _focal_cost_of_logits(logits, self.focal_alpha, self.focal_gamma)
        boxes = pred.boxes.float()
        cost = cost + self.cost_box * torch.cdist(boxes, tgt_boxes, p=1)
        cost = cost - self.cost_giou * batched_generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                                                   box_convert(tgt_boxes, "cxcywh", "xyxy"))
        mask_cost = self._batched_mask_cost(pred, targets, counts, width) if use_masks else None
        return cost if mask_cost is None else cost + mask_cost

    def _batched_mask_cost(self, pred: Prediction, targets: Sequence[MatchTarget], counts: list[int],
                           width: int) -> Tensor | None:
        """Weighted BCE + dice cost [B, Q, width] at each image's points (zero for images without masks and for
        targets whose ``mask_valid`` is False); None when no image has mask terms."""
        if pred.masks is None or (self.cost_mask == 0 and self.cost_dice == 0):
            return None
        device = pred.logits.device
        with_masks = [b for b, (t, n) in enumerate(zip(targets, counts, strict=True))
                      if n > 0 and t.get("masks") is not None]
        if not with_masks:
            return None
        pred_points, tgt_points = [], []
        for b in with_masks:  # one set of points per image, drawn in image order when not given
            tgt = targets[b]
            if tgt.get("point_coords") is not None:  # precomputed by the caller (shared across calls)
                points = tgt["point_coords"].to(device)
                values = tgt["point_values"].to(device).float()
            else:
                points = uniform_points(self.num_points, device)
                values = sample_masks(tgt["masks"].to(device), points)  # [N, P]
            pred_points.append(point_sample_shared(pred.masks[b].float(), points))  # [Q, P]
            tgt_points.append(values)
        cost = pred.logits.new_zeros(len(counts), pred.logits.shape[1], width, dtype=torch.float32)
        if len({p.shape[-1] for p in pred_points}) == 1:  # the usual case: one batched product
            padded = pred_points[0].new_zeros(len(with_masks), width, pred_points[0].shape[-1])
            for i, values in enumerate(tgt_points):
                padded[i, : values.shape[0]] = values
            block = self._mask_terms(torch.stack(pred_points), padded)
            cost[with_masks] = block
        else:
            for i, b in enumerate(with_masks):
                cost[b, :, : counts[b]] = self._mask_terms(pred_points[i][None], tgt_points[i][None])[0]
        for b in with_masks:  # targets whose mask may not be used: no mask cost
            valid = targets[b].get("mask_valid")
            if valid is not None:
                cost[b, :, : counts[b]] *= valid.to(device).to(cost.dtype)[None, :]
        return cost

    def _mask_terms(self, pred_points: Tensor, tgt_points: Tensor) -> Tensor:
        """``cost_mask * BCE + cost_dice * dice`` of [B, Q, P] logits against [B, N, P] values -> [B, Q, N]."""
        return (self.cost_mask * mask_bce_cost(pred_points, tgt_points)
                + self.cost_dice * mask_dice_cost(pred_points, tgt_points))


def _as_index(selection: Tensor) -> np.ndarray:
    return selection.detach().cpu().long().numpy()


def batched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair of xyxy boxes per batch entry: [B, Q, 4] x [B, N, 4] -> [B, Q, N] (the same arithmetic
    as ``torchvision.ops.generalized_box_iou``, elementwise)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    iou = inter / union
    lti = torch.min(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rbi = torch.max(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    whi = (rbi - lti).clamp(min=0)
    hull = whi[..., 0] * whi[..., 1]
    return iou - (hull - union) / hull
