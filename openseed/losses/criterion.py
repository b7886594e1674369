"""Set criterion: matched class / box / mask losses with deep supervision, proposals and conditioned queries.

Loss keys (all UNWEIGHTED; ``SetCriterion.weight_dict`` maps each to its weight, ``total_loss`` sums them)::

    loss_class, loss_bbox, loss_giou, loss_mask, loss_dice        final decoder output
    <key>_aux{i}                                                  outputs.aux[i] (i = 0 before the first layer)
    <key>_proposals                                               encoder proposals (fg queries; + bg rows, see below)
    <key>_cond{l}                                                 conditioned predictions, layer l

The key set depends only on the task, the criterion's configuration and the structure of ``Outputs`` (number of aux
layers, whether ``conditioned`` is given and its number of layers), never on the batch contents: terms with nothing to
supervise are zeros still connected to the graph (through an empty slice of the predictions, so every prediction
gets a (zero) gradient and a NaN prediction cannot leak into a zero term). The mask keys are present on detection
data too: they are non-zero only when the detection targets carry masks (offline pseudo masks / annotated masks).

Rules (SPEC section 3):
- matching: seg + decoupled: fg queries x thing targets and bg queries x stuff targets; seg, not decoupled: all
  matching queries x all targets; det: fg queries x all targets. Proposals are the fg queries and follow the same
  rule (things on decoupled seg data, all targets otherwise); with the model's ``bg_training="reference"`` they
  also carry the bg queries' rows in training (read from their shape), matched as the reference does: bg rows x
  stuff on segmentation data, every row x every target on detection data. Whether the model is decoupled is read
  from its outputs (``Outputs.num_bg > 0``): the criterion has no switch of its own.
- the matching costs are the loss weights: the criterion builds its matcher from ``class_weight`` ... ``dice_weight``
  (and ``num_points``, ``focal_alpha``, ``focal_gamma``), and refuses a given matcher whose settings differ.
- class loss: sigmoid focal loss over every supervised query and class (seg: all queries; det: fg queries only, bg
  queries get no loss at all), one-hot at the matched label, 0 elsewhere.
- box losses: L1 + GIoU on matched pairs (cxcywh normalised by the padded size).
- mask losses: on matched pairs whose target ``has_mask``, when the targets carry masks and the predictions have
  masks; BCE + dice on PointRend uncertainty-sampled points. Points inside crowd regions (``Targets.ignore_mask``)
  do not count (weight 1 - bilinear crowd value), so a mask that spills into a crowd is not penalised there.
- conditioned queries: supervised by ``target_index`` directly; normalised by ``num_boxes * noisy groups``
  (``cond_class_loss="reference"`` scales the class term as the reference: x slots x groups / classes).
- online mask assistance (det data): the last conditioned layer's masks of the noise-free, unsupervised first group
  (decoded from the clean boxes; detached, binarised at logit 0) enter the fg matching's mask cost terms only.
- everything else is normalised by ``num_boxes``: the batch's number of targets averaged over distributed ranks,
  clamped to >= 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from openseed.core.batch import Batch, Targets
from openseed.core.outputs import ConditionedOutputs, Outputs, Prediction
from openseed.losses.matcher import SPEC_WEIGHTS, HungarianMatcher, MatchTarget, build_match_groups
from openseed.losses.point_sampling import (
    StackedMasks,
    point_sample,
    uncertain_points_with_randomness,
    uniform_points,
)

BASE_KEYS = ("loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")
_KEY_RE = re.compile(r"^(loss_[a-z]+)(?:_aux\d+|_proposals|_cond\d+)?$")

MaskAssistance = Literal["none", "online"]
#: base loss key -> the HungarianMatcher cost (``cost_<name>``) and the constructor argument that sets both
_COST_NAMES = {"loss_class": "class", "loss_bbox": "box", "loss_giou": "giou", "loss_mask": "mask",
               "loss_dice": "dice"}
_WEIGHT_ARGS = {"loss_class": "class_weight", "loss_bbox": "bbox_weight", "loss_giou": "giou_weight",
                "loss_mask": "mask_weight", "loss_dice": "dice_weight"}


def _zero(*tensors: Tensor | None) -> Tensor:
    """A float32 zero connected to the graph of every given tensor (empty-slice sum: zero gradient, NaN-proof)."""
    present = [t for t in tensors if t is not None]
    out = present[0].reshape(-1)[:0].float().sum()
    for t in present[1:]:
        out = out + t.reshape(-1)[:0].float().sum()
    return out


def dice_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-row dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` of [N, P] logits against [N, P] targets -> [N].
    ``weights`` [N, P] in [0, 1] scale each point's contribution (0: the point does not count)."""
    prob = logits.sigmoid()
    if weights is not None:
        prob, targets = prob * weights, targets * weights
    numerator = 2.0 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per-row mean sigmoid BCE of [N, P] logits -> [N]; with ``weights`` [N, P], the weighted mean over points
    (a row whose weights are all 0 gives 0)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weights is None:
        return bce.mean(-1)
    return (bce * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


@dataclass
class _TargetSamples:
    """A batch's target masks and crowd regions, sampled for all its images at once (built once per forward,
    shared by every layer's mask losses)."""

    masks: StackedMasks
    crowd: StackedMasks | None  # per image its ignore region [1, H, W]; None when no image has one
    has_crowd: Tensor | None  # bool [B]

    @classmethod
    def of(cls, targets: list[Targets]) -> _TargetSamples:
        masks = StackedMasks([p.masks for p in targets])
        regions = [p.ignore_mask[None] if p.ignore_mask is not None and bool(p.ignore_mask.any()) else None
                   for p in targets]
        if all(r is None for r in regions):
            return cls(masks, None, None)
        has_crowd = torch.tensor([r is not None for r in regions], device=targets[0].labels.device)
        return cls(masks, StackedMasks(regions), has_crowd)

    def labels_and_weights(self, coords: Tensor, images: Tensor, index: Tensor) -> tuple[Tensor, Tensor | None]:
        """Target values [M, P] of mask ``index[m]`` of image ``images[m]`` at ``coords[m]``, and the points'
        weights (1 - the crowd region there; None when no image has a crowd region)."""
        labels = self.masks.sample(coords, images, index)
        if self.crowd is None:
            return labels, None
        weights = torch.ones_like(labels)
        rows = self.has_crowd[images]
        if bool(rows.any()):
            crowd_images = images[rows]
            weights[rows] = 1.0 - self.crowd.sample(coords[rows], crowd_images, torch.zeros_like(crowd_images))
        return labels, weights


class SetCriterion(nn.Module):
    """OpenSeeD losses. ``forward`` returns unweighted terms; ``total_loss`` applies ``weight_dict``."""

    def __init__(self, matcher: HungarianMatcher | None = None, weight_dict: Mapping[str, float] | None = None, *,
                 class_weight: float = SPEC_WEIGHTS["class"], bbox_weight: float = SPEC_WEIGHTS["bbox"],
                 giou_weight: float = SPEC_WEIGHTS["giou"], mask_weight: float = SPEC_WEIGHTS["mask"],
                 dice_weight: float = SPEC_WEIGHTS["dice"],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 mask_assistance: MaskAssistance = "none", cond_class_loss: str = "per_box") -> None:
        """
        Args:
            matcher: None (the default): a ``HungarianMatcher`` built from this criterion's settings. A given matcher
                (e.g. a subclass that records its calls) must have exactly these settings: costs = the five weights,
                and the same ``num_points``, ``focal_alpha`` and ``focal_gamma``; else ``ValueError``.
            weight_dict: optional per-layer weights by full key ("loss_class_aux3", "loss_dice_proposals", ...); the
                base weights are the five ``*_weight`` arguments only (a base key here is a ``ValueError``).
            class_weight, bbox_weight, giou_weight, mask_weight, dice_weight: weights of the five terms, in the
                losses and in the matching cost alike (SPEC section 3: 4, 5, 2, 5, 5).
            focal_alpha, focal_gamma: sigmoid focal loss (and focal matching cost) parameters.
            num_points, oversample_ratio, importance_sample_ratio: PointRend point selection for the mask losses
                (``num_points`` uniform points for the matching's mask costs too).
            mask_assistance: "none" or "online" (conditioned masks enter the detection matching cost).
            cond_class_loss: the conditioned queries' class loss: "per_box" (focal loss summed over their slots and
                classes, divided by boxes x groups, as the matched queries') or "reference" (the reference's scale:
                the same times slots x groups / classes, i.e. a mean over the classes times the padded group size).

        Decoupled matching (fg x things, bg x stuff) is not a setting here: it follows the model's outputs
        (``Outputs.num_bg > 0``).
        """
        super().__init__()
        if mask_assistance not in ("none", "online"):
            raise ValueError(f"mask_assistance must be 'none' or 'online', got {mask_assistance!r}")
        if cond_class_loss not in ("per_box", "reference"):
            raise ValueError(f"cond_class_loss must be 'per_box' or 'reference', got {cond_class_loss!r}")
        self.cond_class_loss = cond_class_loss
        self._base_weights = {"loss_class": float(class_weight), "loss_bbox": float(bbox_weight),
                              "loss_giou": float(giou_weight), "loss_mask": float(mask_weight),
                              "loss_dice": float(dice_weight)}
        self.weight_dict: dict[str, float] = dict(self.base_weights)
        for key, value in (weight_dict or {}).items():
            if _KEY_RE.match(key) is None or _KEY_RE.match(key).group(1) not in self.base_weights:
                raise KeyError(f"unknown loss key in weight_dict: {key}")
            if key in self.base_weights:
                raise ValueError(f"weight_dict sets the base weight {key}; pass {_WEIGHT_ARGS[key]}= instead (it is "
                                 "the matching cost too)")
            self.weight_dict[key] = float(value)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_assistance: MaskAssistance = mask_assistance
        self.matcher = self._checked_matcher(matcher)

    def _checked_matcher(self, matcher: HungarianMatcher | None) -> HungarianMatcher:
        """The matcher with this criterion's settings: built, or a given one checked against them."""
        settings = {f"cost_{_COST_NAMES[key]}": weight for key, weight in self.base_weights.items()}
        settings |= {"num_points": self.num_points, "focal_alpha": self.focal_alpha, "focal_gamma": self.focal_gamma}
        if matcher is None:
            return HungarianMatcher(**settings)
        wrong = [f"{name}={getattr(matcher, name)!r} (criterion: {value!r})" for name, value in settings.items()
                 if getattr(matcher, name) != value]
        if wrong:
            raise ValueError("the matcher's settings contradict the criterion's (the matching costs are the loss "
                             "weights; pass matcher=None to build it from them): " + ", ".join(wrong))
        return matcher

    @property
    def base_weights(self) -> Mapping[str, float]:
        """The five base weights (read-only: they are the matcher's costs too; set them when building)."""
        return MappingProxyType(self._base_weights)

    def extra_repr(self) -> str:
        return (f"weights={dict(self.base_weights)}, mask_assistance={self.mask_assistance}, "
                f"num_points={self.num_points}")

    # ------------------------------------------------------------------ weights
    def weight_for(self, key: str) -> float:
        """Weight of a loss key: an explicit entry of ``weight_dict``, else its base term's weight."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        match = _KEY_RE.match(key)
        if match is None or match.group(1) not in self.base_weights:
            raise KeyError(f"not a loss key: {key}")
        return self.base_weights[match.group(1)]

    def expected_keys(self, num_aux: int, with_proposals: bool = True, num_cond_layers: int = 0) -> list[str]:
        """The keys ``forward`` returns for Outputs with ``num_aux`` aux layers, proposals, and conditioned layers."""
        suffixes = [""] + [f"_aux{i}" for i in range(num_aux)]
        suffixes += ["_proposals"] if with_proposals else []
        suffixes += [f"_cond{layer}" for layer in range(num_cond_layers)]
        return [key + suffix for suffix in suffixes for key in BASE_KEYS]

    def total_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of the loss terms."""
        terms = [self.weight_for(key) * value for key, value in losses.items()]
        if not terms:
            raise ValueError("no loss terms")
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        """Unweighted loss terms (see the module docstring for keys and rules).

        Args:
            outputs: the model's outputs for ``batch``.
            batch: the data batch: its ``targets`` (one ``Targets`` per image: labels, masks at the padded size or
                None), its ``task`` ("seg" or "det") and its boxes in the model's convention (``model_boxes``).
        """
        if batch.task not in ("seg", "det"):
            raise ValueError(f"task must be 'seg' or 'det', got {batch.task!r}")
        # Losses in float32 even under mixed precision (the predictions are cast where they are used).
        with torch.autocast(device_type=outputs.final.logits.device.type, enabled=False), \
                torch.profiler.record_function("criterion"):
            losses = self._forward(outputs, batch)
        for key in losses:
            self.weight_dict.setdefault(key, self.weight_for(key))
        return losses

    def _forward(self, outputs: Outputs, batch: Batch) -> dict[str, Tensor]:
        size, task = outputs.final.logits.shape[0], batch.task
        if len(batch.targets) != size:
            raise ValueError(f"{len(batch.targets)} targets for a batch of {size}")
        device = outputs.final.logits.device
        if batch.images.device != device:  # the losses live where the predictions are (the model's batch is there)
            batch = batch.to(device)
        targets, boxes = batch.targets, batch.model_boxes()
        num_boxes = self._num_boxes(targets, device)

        assistance = None
        if task == "det" and self.mask_assistance == "online" and outputs.conditioned is not None:
            assistance = self._assistance_masks(outputs.conditioned, targets)

        num_fg, num_bg = outputs.num_fg, outputs.num_bg
        decoupled = num_bg > 0  # the model's switch, as its outputs show it: no bg queries, not decoupled
        match_targets = self._match_targets(targets, boxes, task, assistance)
        samples = _TargetSamples.of(targets)
        losses: dict[str, Tensor] = {}
        losses.update(self._matched_losses(outputs.final, targets, boxes, match_targets, task, num_fg, num_bg,
                                           decoupled, num_boxes, "", samples))
        for i, aux in enumerate(outputs.aux):
            losses.update(self._matched_losses(aux, targets, boxes, match_targets, task, num_fg, num_bg, decoupled,
                                               num_boxes, f"_aux{i}", samples))
        if outputs.proposals is not None:
            # rows past num_fg: the bg queries (bg_training="reference", in training), matched as the reference
            # matches its "interm" outputs: seg fg x things + bg x stuff, det every row x every target
            prop_bg = outputs.proposals.logits.shape[1] - num_fg
            prop_fg, prop_bg = (num_fg, prop_bg) if task == "seg" else (num_fg + prop_bg, 0)
            losses.update(self._matched_losses(outputs.proposals, targets, boxes, match_targets, task, prop_fg, prop_bg,
                                               decoupled, num_boxes, "_proposals", samples))
        if outputs.conditioned is not None:
            losses.update(self._conditioned_losses(outputs.conditioned, targets, boxes, num_boxes, samples))
        return losses

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _num_boxes(targets: list[Targets], device: torch.device) -> float:
        count = torch.tensor(float(sum(len(t) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count.item()), 1.0)

    def wants_clean_group(self, task: str) -> bool:
        """Whether the model should add a noise-free conditioned group for this task's batch (online mask
        assistance on detection data matches with the masks that group decodes from the clean boxes)."""
        return task == "det" and self.mask_assistance == "online"

    @staticmethod
    def _assistance_masks(conditioned: ConditionedOutputs, targets: list[Targets]) -> list[Tensor] | None:
        """Per image [N, h, w] float masks decoded by the last conditioned layer from the clean ground-truth boxes
        (the noise-free first group; detached, binary). None without a clean group: masks of jittered boxes would
        steer the matching towards the wrong extents."""
        masks = conditioned.predictions[-1].masks if conditioned.predictions else None
        if masks is None or not conditioned.clean_group:
            return None
        slots_per_group = conditioned.slots_per_group
        out = []
        for b, p in enumerate(targets):
            index = conditioned.target_index[b, :slots_per_group].to(masks.device)
            valid = (index >= 0) & (index < len(p))
            image = masks.new_zeros((len(p), *masks.shape[-2:]), dtype=torch.float32)
            image[index[valid]] = (masks[b, :slots_per_group][valid].detach() > 0).float()
            out.append(image)
        return out

    @torch.no_grad()
    def _match_targets(self, targets: list[Targets], boxes: list[Tensor], task: str,
                       assistance: list[Tensor] | None) -> list[MatchTarget]:
        """The matcher's view of the targets, with the mask cost points drawn (one set per image, in image order)
        and the target masks sampled there once for all the matcher calls of this forward (final, aux layers,
        proposals)."""
        match_targets: list[MatchTarget] = []
        sampled: list[int] = []
        for b, p in enumerate(targets):
            if task == "seg":
                target: MatchTarget = {"labels": p.labels, "boxes": boxes[b], "masks": p.masks,
                                       "mask_valid": p.has_mask}
            else:  # detection: mask cost terms only against assistance masks
                target = {"labels": p.labels, "boxes": boxes[b],
                          "masks": None if assistance is None else assistance[b], "mask_valid": None}
            if target["masks"] is not None and len(p) > 0:
                target["point_coords"] = uniform_points(self.matcher.num_points, target["masks"].device)
                sampled.append(b)
            match_targets.append(target)
        if sampled:  # every image's masks at its own points, in one sampling call
            counts = [len(targets[b]) for b in sampled]
            device = match_targets[sampled[0]]["point_coords"].device
            coords = torch.cat([match_targets[b]["point_coords"].expand(len(targets[b]), -1, -1) for b in sampled])
            images = torch.repeat_interleave(torch.tensor(sampled, device=device),
                                             torch.tensor(counts, device=device))
            index = torch.cat([torch.arange(n, device=device) for n in counts])
            stack = StackedMasks([target["masks"] for target in match_targets])
            for b, values in zip(sampled, stack.sample(coords, images, index).split(counts), strict=True):
                match_targets[b]["point_values"] = values
        return match_targets

    def _matched_losses(self, pred: Prediction, targets: list[Targets], boxes: list[Tensor],
                        match_targets: list[MatchTarget], task: str, num_fg: int, num_bg: int, decoupled: bool,
                        num_boxes: float, suffix: str, samples: _TargetSamples) -> dict[str, Tensor]:
        groups = build_match_groups([t.is_thing for t in targets], task, num_fg, num_bg, decoupled)
        indices = self.matcher(pred, match_targets, groups)

        # Class: focal over every supervised query (det: fg only) and class.
        supervised = pred.logits.shape[1] if task == "seg" else min(num_fg, pred.logits.shape[1])
        logits = pred.logits[:, :supervised].float()
        onehot = torch.zeros_like(logits)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        labels = torch.cat([p.labels[t] for p, (_, t) in zip(targets, indices, strict=True)])
        onehot[batch_idx, query_idx, labels] = 1.0
        loss_class = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                        reduction="sum") / num_boxes
        loss_class = loss_class + _zero(pred.logits, pred.boxes, pred.masks)

        boxes_src = pred.boxes[batch_idx, query_idx]
        boxes_tgt = torch.cat([image_boxes[t] for image_boxes, (_, t) in zip(boxes, indices, strict=True)])
        loss_bbox, loss_giou = self._box_losses(boxes_src, boxes_tgt, pred.boxes, num_boxes)

        mask_items = [(b, q, t) for b, (q, t) in enumerate(indices)]
        loss_mask, loss_dice = self._mask_losses(pred, targets, mask_items, num_boxes, samples)
        return {"loss_class" + suffix: loss_class, "loss_bbox" + suffix: loss_bbox, "loss_giou" + suffix: loss_giou,
                "loss_mask" + suffix: loss_mask, "loss_dice" + suffix: loss_dice}

    @staticmethod
    def _box_losses(src: Tensor, tgt: Tensor, anchor: Tensor, normaliser: float) -> tuple[Tensor, Tensor]:
        zero = _zero(anchor)
        if src.shape[0] == 0:
            return zero, zero.clone()
        src = src.float()
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / normaliser
        loss_giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                             reduction="sum") / normaliser
        return loss_bbox + zero, loss_giou + zero

    def _mask_losses(self, pred: Prediction, targets: list[Targets], items: list[tuple[int, Tensor, Tensor]],
                     normaliser: float, samples: _TargetSamples) -> tuple[Tensor, Tensor]:
        """BCE + dice on uncertainty-sampled points. ``items``: (image, query indices, target indices) per image."""
        zero = _zero(pred.masks if pred.masks is not None else pred.logits)
        if pred.masks is None:
            return zero, zero.clone()
        src_list, tgt_image, tgt_index = [], [], []
        for b, q, t in items:
            p = targets[b]
            if p.masks is None or q.numel() == 0:
                continue
            keep = p.has_mask[t]
            src_list.append(pred.masks[b, q[keep]])
            tgt_image.append(torch.full_like(t[keep], b))
            tgt_index.append(t[keep])
        if not src_list:
            return zero, zero.clone()
        src = torch.cat(src_list).float().unsqueeze(1)  # [P, 1, h, w]
        if src.shape[0] == 0:  # no matched target has a mask
            return zero, zero.clone()
        coords = uncertain_points_with_randomness(src, self.num_points, self.oversample_ratio,
                                                  self.importance_sample_ratio)
        point_logits = point_sample(src, coords)[:, 0]  # [P, S]
        with torch.no_grad():  # crowd regions: points there do not count
            point_labels, weights = samples.labels_and_weights(coords, torch.cat(tgt_image), torch.cat(tgt_index))
        loss_mask = sigmoid_bce_loss(point_logits, point_labels, weights).sum() / normaliser
        loss_dice = dice_loss(point_logits, point_labels, weights).sum() / normaliser
        return loss_mask + zero, loss_dice + zero

    def _conditioned_losses(self, conditioned: ConditionedOutputs, targets: list[Targets], boxes: list[Tensor],
                            num_boxes: float, samples: _TargetSamples) -> dict[str, Tensor]:
        target_index, slots = conditioned.target_index, conditioned.slots_per_group
        if conditioned.clean_group:  # the noise-free group only assists the matching: not supervised
            target_index = target_index.clone()
            target_index[:, :slots] = -1
        noisy_groups = max(conditioned.num_groups - int(conditioned.clean_group), 1)
        normaliser = num_boxes * noisy_groups
        class_scale = 1.0
        if self.cond_class_loss == "reference" and conditioned.predictions:
            class_scale = slots * noisy_groups / conditioned.predictions[0].logits.shape[-1]
        slot_b, slot_q = torch.nonzero(target_index >= 0, as_tuple=True)
        gt = target_index[slot_b, slot_q]
        # Per-image (slots, GT indices), shared by every layer.
        items = []
        labels_list, boxes_list = [], []
        for b, p in enumerate(targets):
            sel = slot_b == b
            q, t = slot_q[sel], gt[sel]
            if t.numel() and int(t.max()) >= len(p):
                raise ValueError(f"conditioned target_index {int(t.max())} out of range for {len(p)} targets")
            items.append((b, q, t))
            labels_list.append(p.labels[t])
            boxes_list.append(boxes[b][t])
        batch_idx = torch.cat([torch.full_like(q, b) for b, q, _ in items])
        query_idx = torch.cat([q for _, q, _ in items])
        labels = torch.cat(labels_list)
        boxes_tgt = torch.cat(boxes_list)

        losses: dict[str, Tensor] = {}
        for layer, pred in enumerate(conditioned.predictions):
            suffix = f"_cond{layer}"
            logits = pred.logits[batch_idx, query_idx].float()  # only the non-padding slots
            onehot = torch.zeros_like(logits)
            onehot[torch.arange(labels.shape[0], device=labels.device), labels] = 1.0
            loss_class = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                            reduction="sum") / normaliser * class_scale
            losses["loss_class" + suffix] = loss_class + _zero(pred.logits, pred.boxes, pred.masks)
            loss_bbox, loss_giou = self._box_losses(pred.boxes[batch_idx, query_idx], boxes_tgt, pred.boxes,
                                                    normaliser)
            losses["loss_bbox" + suffix] = loss_bbox
            losses["loss_giou" + suffix] = loss_giou
            loss_mask, loss_dice = self._mask_losses(pred, targets, items, normaliser, samples)
            losses["loss_mask" + suffix] = loss_mask
            losses["loss_dice" + suffix] = loss_dice
        return losses
