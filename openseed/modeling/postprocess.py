"""Inference post-processing: model outputs -> panoptic / instance / semantic results at the original image size.

Pure torch / numpy. The results are the typed per-image predictions of ``openseed.core.predictions`` (as COCO
records: ``openseed.core.coco``). The rules are those of the authors' OpenSeeD
inference code, held to the recorded reference outputs (``tests/test_reference_postprocess.py``,
``../shared/reference``):

- Masks: logits bilinear (align_corners False) to the padded size, the valid region cropped, then bicubic with
  antialias (align_corners False) to the original size (``resize_masks_to_original``).
- Panoptic: a query is kept when its largest *sigmoid* class score is > ``object_mask_threshold``; a kept query's
  score is then the largest of ``softmax(sigmoid(logits) / temperature)`` over the K vocabulary entries and its label
  that entry. Every pixel goes to the kept query with the highest ``score x mask probability`` (first maximum on a
  tie). Overlap rule: with "own" = the query's pixels with mask probability >= ``mask_threshold`` and "won" = the
  pixels it won (whatever its own probability there), the query becomes a segment when own and won-and-own are
  non-empty and ``area(won) / area(own) >= overlap_threshold``; the segment then holds the pixels won-and-own. This
  is the reference code's rule; the paraphrase ``area(won and own) / area(own)`` does not reproduce the recorded
  results (it loses segments on two of the four recorded cases). Pixels won by a query that is not a segment, or
  where the winner's own probability is below ``mask_threshold``, are void (0). Stuff queries of one class merge
  into one segment; ids count from 1 in query order.
- Instance: ``sigmoid(logits)`` over (foreground query x class) pairs, top-k; optionally (``things_only``) pairs with a
  stuff label are dropped *after* the top-k, so fewer than k remain (the reference on panoptic data); mask = logit >
  0 at the original size (probability > ``mask_threshold``); score x= mean mask probability inside the mask
  (``sum / (area + 1e-6)``); boxes from the box head, cxcywh of the padded input scaled by ``padded x orig / resized``
  and, when ``clip_boxes``, clipped to the image (the reference does not clip).
- Semantic: per class, the sum over all queries of class probability x mask probability; class probability =
  ``softmax(sigmoid(logits) / temperature)`` (the reference's PANO_TRANSFORM_EVAL) or, as an option, ``sigmoid``.

Sizes: masks come at 1/4 of the *padded* batch size; ``image_size`` is the valid (unpadded) content in the padded frame,
``orig_size`` the stored image before resizing. ``resize_masks_to_original`` and ``model_boxes_to_original`` map back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from openseed.core.boxes import tight_box_xywh
from openseed.core.outputs import Outputs
from openseed.core.predictions import Instances, PanopticSegmentation, SemanticSegmentation

Size = tuple[int, int]
PostprocessTask = Literal["panoptic", "instance", "semantic"]
SemanticClassProbs = Literal["softmax", "sigmoid"]
#: Default bound (bytes) on the float32 mask intermediates at the original image size: masks are resized,
#: thresholded and reduced a chunk of queries at a time so that one chunk's float32 tensors stay under it.
MASK_MEMORY_BYTES = 256 * 2**20

__all__ = [
    "MASK_MEMORY_BYTES",
    "InferenceConfig",
    "instance_inference",
    "model_boxes_to_original",
    "panoptic_class_probs",
    "panoptic_inference",
    "panoptic_keep",
    "postprocess_batch",
    "queries_per_chunk",
    "resize_masks_to_original",
    "semantic_inference",
    "semantic_labels",
]


@dataclass(frozen=True)
class InferenceConfig:
    """Inference thresholds and options (defaults: the reference's test settings).

    Attributes:
        object_mask_threshold: panoptic: keep queries whose max *sigmoid* class score is above this.
        overlap_threshold: panoptic: a query needs won area / own area >= this to become a segment (see the module
            docstring for the exact rule).
        mask_threshold: mask probability threshold (panoptic own mask: prob >= it; instance mask: prob > it, i.e.
            logit > 0 at the default 0.5).
        temperature: class probabilities = softmax(sigmoid(logits) / temperature) (panoptic scores and labels;
            semantic with ``semantic_class_probs="softmax"``).
        top_k: instance: number of (query, class) pairs kept per image (capped at queries x classes); a model
            records its own (``OpenSeeDConfig.test_top_k``: 300 for the decoupled released models) and
            ``for_model`` reads it.
        instance_from_fg_only: instance: use only the foreground queries (the first ``num_fg``).
        semantic_class_probs: semantic: "softmax" = softmax(sigmoid(logits) / temperature) (the reference),
            "sigmoid" = sigmoid(logits).
        clip_boxes: instance: clip boxes to the original image (the reference does not: False reproduces it).
        chunk_size: at most this many queries are resized at a time in ``postprocess_batch`` /
            ``resize_masks_to_original``.
        mask_memory_bytes: bound on the float32 intermediates of one chunk of queries at the output size
            (``MASK_MEMORY_BYTES``, 256 MiB): large photos get smaller chunks (down to one query), so a 6000 x 4000
            photo never needs a queries x H x W float tensor. Panoptic and instance results do not depend on the
            chunking; semantic scores are sums over the chunks (equal to float rounding when the bound, not
            ``chunk_size``, sets the chunk).
    """

    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5
    temperature: float = 0.06
    top_k: int = 100
    instance_from_fg_only: bool = True
    semantic_class_probs: SemanticClassProbs = "softmax"
    clip_boxes: bool = True
    chunk_size: int = 32
    mask_memory_bytes: int = MASK_MEMORY_BYTES

    def __post_init__(self) -> None:
        if int(self.chunk_size) < 1 or int(self.mask_memory_bytes) < 1:
            raise ValueError(f"chunk_size and mask_memory_bytes must be positive, got {self.chunk_size} and "
                             f"{self.mask_memory_bytes}")
        if self.semantic_class_probs not in ("softmax", "sigmoid"):
            raise ValueError(f"semantic_class_probs must be 'softmax' or 'sigmoid', not {self.semantic_class_probs!r}")

    @classmethod
    def for_model(cls, model_config, **overrides) -> InferenceConfig:
        """The defaults a model records (its ``OpenSeeDConfig``'s ``test_top_k`` and ``clip_boxes``; None: the
        reference's), then ``overrides``."""
        recorded = {} if model_config is None else {"top_k": model_config.test_top_k,
                                                     "clip_boxes": model_config.clip_boxes}
        return cls(**{**recorded, **overrides})


# ---------------------------------------------------------------------------------------------------------- resizing
def resize_masks_to_original(mask_logits: Tensor, padded_size: Size, image_size: Size, orig_size: Size,
                             chunk_size: int = 32) -> Tensor:
    """Mask logits [Q, h, w] at (a fraction of) the padded size -> logits [Q, H0, W0] of the original image.

    Bilinear upsampling (align_corners False) to ``padded_size``, crop of the valid ``image_size`` region (top-left),
    bicubic resize with antialias (align_corners False) to ``orig_size`` (skipped when the sizes already agree: at
    scale 1 it is the identity). Works in float32, ``chunk_size`` queries at a time (each query is resized on its
    own, so the chunking does not change the result).
    """
    padded_size, image_size, orig_size = _size(padded_size), _size(image_size), _size(orig_size)
    if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
        raise ValueError(f"image_size {image_size} larger than the padded size {padded_size}")
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [Q, h, w], got shape {tuple(mask_logits.shape)}")
    num_queries = mask_logits.shape[0]
    out = mask_logits.new_empty((num_queries, *orig_size), dtype=torch.float32)
    step = max(1, chunk_size)
    for start in range(0, num_queries, step):
        out[start:start + step] = _resize_chunk(mask_logits[start:start + step], padded_size, image_size, orig_size)
    return out


def _resize_chunk(mask_logits: Tensor, padded_size: Size, image_size: Size, orig_size: Size) -> Tensor:
    """``resize_masks_to_original`` of a few queries, returned as a new float32 [q, H0, W0] tensor (never a view of
    ``mask_logits``: callers work on it in place)."""
    chunk = mask_logits.float()[None]  # [1, q, h, w]
    fresh = chunk.data_ptr() != mask_logits.data_ptr()
    if tuple(chunk.shape[-2:]) != padded_size:
        chunk, fresh = F.interpolate(chunk, size=padded_size, mode="bilinear", align_corners=False), True
    chunk = chunk[..., : image_size[0], : image_size[1]]
    if image_size != orig_size:
        return F.interpolate(chunk, size=orig_size, mode="bicubic", align_corners=False, antialias=True)[0]
    return chunk[0].contiguous() if fresh else chunk[0].clone(memory_format=torch.contiguous_format)


def queries_per_chunk(sizes: Sequence[Size], budget_bytes: int, floats_per_query: int = 1,
                      cap: int | None = None) -> int:
    """How many queries one chunk may hold so that ``floats_per_query`` float32 maps per query, at the largest of
    ``sizes`` (per axis), stay within ``budget_bytes``; at least 1, at most ``cap``."""
    height = max(int(size[0]) for size in sizes)
    width = max(int(size[1]) for size in sizes)
    count = max(1, int(budget_bytes) // max(1, 4 * height * width * floats_per_query))
    return count if cap is None else max(1, min(count, int(cap)))


def _prob_chunks(mask_logits: Tensor, index: Tensor, step: int,
                 to_original: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[int, Tensor]]:
    """(start, mask probabilities [q, H0, W0], a new float32 tensor) for ``index[start:start + q]``, ``step``
    queries at a time; ``to_original`` resizes a chunk of logits first (None: the logits are at the output size)."""
    for start in range(0, index.numel(), step):
        logits = mask_logits[index[start:start + step]]
        yield start, (to_original(logits).sigmoid_() if to_original is not None else logits.float().sigmoid())


def model_boxes_to_original(boxes_cxcywh: Tensor, padded_size: Size, image_size: Size, orig_size: Size,
                            clip: bool = True) -> Tensor:
    """Box-head boxes (cxcywh normalised to the padded input) -> pixel xyxy boxes of the original image.

    As the reference: xyxy times ``padded / image x orig`` per axis, in one float32 multiplication; with ``clip``
    the boxes are then clipped to ``[0, W0] x [0, H0]`` (the reference does not clip).
    """
    (hp, wp), (h, w), (h0, w0) = _size(padded_size), _size(image_size), _size(orig_size)
    scale_h, scale_w = hp / h * h0, wp / w * w0
    scale = torch.tensor([scale_w, scale_h, scale_w, scale_h], dtype=torch.float32, device=boxes_cxcywh.device)
    boxes = box_convert(boxes_cxcywh.float(), "cxcywh", "xyxy") * scale
    return _clip(boxes, (h0, w0)) if clip else boxes


def _clip(boxes: Tensor, size: Size) -> Tensor:
    height, width = size
    return torch.minimum(boxes.clamp(min=0), boxes.new_tensor([width, height, width, height]))


# ---------------------------------------------------------------------------------------------------------- panoptic
def panoptic_class_probs(logits: Tensor, temperature: float = 0.06) -> Tensor:
    """[Q, K] logits -> [Q, K] class probabilities ``softmax(sigmoid(logits) / temperature)`` over K."""
    return torch.softmax(logits.float().sigmoid() / temperature, dim=-1)


def panoptic_keep(logits: Tensor, threshold: float = 0.25) -> Tensor:
    """[Q, K] logits -> bool [Q]: the queries whose largest sigmoid class score is above ``threshold``."""
    return logits.float().sigmoid().max(dim=-1).values > threshold


def panoptic_inference(logits: Tensor, mask_logits: Tensor, is_thing: Sequence[bool] | Tensor,
                       category_ids: Sequence[int] | None = None, cfg: InferenceConfig | None = None,
                       ) -> tuple[Tensor, list[dict]]:
    """One image's panoptic segmentation.

    Args:
        logits: [Q, K] class logits.
        mask_logits: [Q, H0, W0] mask logits at the output size.
        is_thing: [K] thing flags of the vocabulary.
        category_ids: [K] the data set's category ids (``Vocabulary.ids``); None: contiguous labels are written.
        cfg: thresholds.

    The reference's rules (module docstring): keep by the max sigmoid score, score and label from the temperature
    softmax, pixels to the highest ``score x mask probability``, and the overlap rule ``area(won) / area(own)`` of
    the reference code (a query's won pixels count whatever its own probability there; only the won pixels with
    probability >= ``mask_threshold`` join its segment). The recorded reference outputs need this rule: the
    paraphrase ``area(won and own) / area(own)`` loses segments on them.

    Returns:
        panoptic_seg: int32 [H0, W0], segment ids 1..n in order of first query, 0 = void.
        segments_info: one dict per segment: id, category_id, isthing, score (max over its queries), area, bbox
            ([x, y, w, h] tight box of the segment in ``panoptic_seg``).
    """
    cfg = cfg or InferenceConfig()
    if logits.dim() != 2 or mask_logits.dim() != 3 or logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"expected logits [Q, K] and mask_logits [Q, H, W] with the same Q, got "
                         f"{tuple(logits.shape)} and {tuple(mask_logits.shape)}")
    size = _size(mask_logits.shape[-2:])
    step = queries_per_chunk([size], cfg.mask_memory_bytes, 2, cfg.chunk_size)
    return _panoptic(logits, mask_logits, size, is_thing, category_ids, cfg, step, None)


def _panoptic(logits: Tensor, mask_logits: Tensor, size: Size, is_thing: Sequence[bool] | Tensor,
              category_ids: Sequence[int] | None, cfg: InferenceConfig, step: int,
              to_original: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, list[dict]]:
    """``panoptic_inference`` with the kept queries' masks taken ``step`` at a time (resized by ``to_original`` when
    given): a first pass finds each pixel's winner (first maximum, as one argmax over all queries), a second applies
    the overlap rule query by query (the masks are resized again only when they took more than one chunk)."""
    num_classes = logits.shape[1]
    thing = _as_bool_list(is_thing, num_classes, "is_thing")
    ids = list(range(num_classes)) if category_ids is None else [int(c) for c in category_ids]
    if len(ids) != num_classes:
        raise ValueError(f"{len(ids)} category ids for {num_classes} classes")
    panoptic_seg = torch.zeros(size, dtype=torch.int32, device=mask_logits.device)

    keep = panoptic_keep(logits, cfg.object_mask_threshold)
    if not bool(keep.any()):
        return panoptic_seg, []
    kept = torch.nonzero(keep).flatten()
    scores, labels = panoptic_class_probs(logits[keep], cfg.temperature).max(dim=-1)

    def chunks() -> Iterator[tuple[int, Tensor]]:
        return _prob_chunks(mask_logits, kept, step, to_original)

    # Pass 1: the winner of every pixel, the highest score x mask probability; the first maximum wins ties (as
    # torch.argmax over all queries at once: a later chunk takes a pixel only with a strictly higher value).
    winner = best = None
    single = None
    for start, probs in chunks():
        weighted = scores[start:start + probs.shape[0], None, None] * probs
        index = weighted.argmax(dim=0)
        value = weighted.gather(0, index[None])[0]
        del weighted
        index += start
        if winner is None:
            winner, best = index, value
        else:
            better = (value > best) | (value.isnan() & ~best.isnan())
            winner, best = torch.where(better, index, winner), torch.where(better, value, best)
        single = probs if start == 0 and probs.shape[0] == kept.numel() else None
    del best

    # Pass 2: the overlap rule, query by query in order.
    segments: list[dict] = []
    stuff_segment: dict[int, dict] = {}
    for start, probs in ([(0, single)] if single is not None else chunks()):
        for offset in range(probs.shape[0]):
            k = start + offset
            label = int(labels[k])
            own = probs[offset] >= cfg.mask_threshold
            won = winner == k
            own_area, won_area = int(own.sum()), int(won.sum())
            kept_pixels = won & own
            if own_area == 0 or not bool(kept_pixels.any()) or won_area / own_area < cfg.overlap_threshold:
                continue
            score = float(scores[k])
            if not thing[label] and label in stuff_segment:
                segment = stuff_segment[label]
                segment["score"] = max(segment["score"], score)
            else:
                segment = {"id": len(segments) + 1, "category_id": ids[label], "isthing": thing[label],
                           "score": score}
                segments.append(segment)
                if not thing[label]:
                    stuff_segment[label] = segment
            panoptic_seg[kept_pixels] = segment["id"]

    for segment in segments:
        region = panoptic_seg == segment["id"]
        segment["area"] = int(region.sum())
        segment["bbox"] = tight_box_xywh(region)
    return panoptic_seg, segments


# ---------------------------------------------------------------------------------------------------------- instance
def _topk_pairs(logits: Tensor, num_fg: int | None, cfg: InferenceConfig,
                is_thing: Sequence[bool] | Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs by sigmoid score, ties broken by (query, class) order: (scores, query, label).
    With ``is_thing``, the pairs with a stuff label are dropped after the top-k (fewer than k remain)."""
    if cfg.instance_from_fg_only and num_fg is not None:
        logits = logits[:num_fg]
    num_classes = logits.shape[1]
    flat = logits.float().sigmoid().flatten()
    k = min(int(cfg.top_k), flat.numel())
    scores, order = torch.sort(flat, descending=True, stable=True)
    scores, order = scores[:k], order[:k]
    query, labels = order // num_classes, order % num_classes
    if is_thing is not None:
        thing = torch.tensor(_as_bool_list(is_thing, num_classes, "is_thing"), device=labels.device)
        keep = thing[labels]
        scores, query, labels = scores[keep], query[keep], labels[keep]
    return scores, query, labels


def _instance_masks(scores: Tensor, query: Tensor, mask_logits: Tensor, size: Size, step: int, threshold: float,
                    to_original: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """bool masks [N, H0, W0] (probability > ``threshold``) of the selected queries and the scores times the mean
    probability inside each mask (as the reference; 0 for an empty mask). Each query's mask is computed once,
    ``step`` queries at a time, so only one chunk of float32 maps exists at a time."""
    unique, inverse = torch.unique(query, return_inverse=True)
    masks = torch.empty((unique.numel(), *size), dtype=torch.bool, device=mask_logits.device)
    mean_prob = torch.empty(unique.numel(), dtype=torch.float32, device=mask_logits.device)
    for start, probs in _prob_chunks(mask_logits, unique, step, to_original):
        stop = start + probs.shape[0]
        mask = probs > threshold
        area = mask.flatten(1).sum(dim=1)
        mean_prob[start:stop] = _row_sums(probs.mul_(mask).flatten(1)) / (area + 1e-6)
        masks[start:stop] = mask
        del probs, mask
    return masks[inverse], scores * mean_prob[inverse]


def _row_sums(values: Tensor) -> Tensor:
    """Row sums of [q, n] values, the same whatever q: torch splits the sum of a lone row across threads (another
    rounding), so a single row is summed as one of two (a stride-0 view, no copy)."""
    if values.shape[0] == 1:
        return values.expand(2, -1).sum(dim=1)[:1]
    return values.sum(dim=1)


def instance_inference(logits: Tensor, mask_logits: Tensor | None, boxes_xyxy: Tensor,
                       cfg: InferenceConfig | None = None, num_fg: int | None = None,
                       is_thing: Sequence[bool] | Tensor | None = None) -> Instances:
    """One image's instance predictions.

    Args:
        logits: [Q, K] class logits (queries ordered [fg | bg]).
        mask_logits: [Q, H0, W0] mask logits at the output size, or None (boxes only).
        boxes_xyxy: [Q, 4] box-head boxes in pixels of the output image.
        cfg: thresholds; ``cfg.instance_from_fg_only`` uses only the first ``num_fg`` queries.
        num_fg: number of foreground queries (None: all queries are foreground).
        is_thing: [K] thing flags: when given, pairs with a stuff label are dropped *after* the top-k (the
            reference on panoptic data), so fewer than ``top_k`` remain.

    Returns:
        ``Instances`` (``openseed.core.predictions``; ``image_id`` None): scores [N] (in top-k order, i.e.
        descending before the mask rescoring; not re-sorted after it), labels long [N] (contiguous), queries long
        [N] (the query each came from), boxes [N, 4] xyxy, masks bool [N, H0, W0] or None.
        N = min(top_k, considered queries x K), less the stuff pairs when ``is_thing`` is given.
    """
    cfg = cfg or InferenceConfig()
    scores, query, labels = _topk_pairs(logits, num_fg, cfg, is_thing)
    masks = None
    if mask_logits is not None:
        size = _size(mask_logits.shape[-2:])
        step = queries_per_chunk([size], cfg.mask_memory_bytes, 1, cfg.chunk_size)
        masks, scores = _instance_masks(scores, query, mask_logits, size, step, cfg.mask_threshold)
    return Instances(scores, labels, query, boxes_xyxy[query].float(), masks)


# ---------------------------------------------------------------------------------------------------------- semantic
def semantic_inference(logits: Tensor, mask_logits: Tensor, class_probs: SemanticClassProbs = "softmax",
                       temperature: float = 0.06) -> Tensor:
    """[Q, K] logits and [Q, H0, W0] mask logits -> [K, H0, W0] scores: sum over queries of class probability x
    sigmoid(mask logit). Class probability: ``softmax(sigmoid(logits) / temperature)`` over K ("softmax", the
    reference) or ``sigmoid(logits)`` ("sigmoid"). Additive over queries, so it can be accumulated chunk by chunk."""
    return _semantic_sum(logits, mask_logits.float().sigmoid(), class_probs, temperature)


def _semantic_sum(logits: Tensor, mask_probs: Tensor, class_probs: SemanticClassProbs, temperature: float) -> Tensor:
    if class_probs == "softmax":
        probs = panoptic_class_probs(logits, temperature)
    elif class_probs == "sigmoid":
        probs = logits.float().sigmoid()
    else:
        raise ValueError(f"class_probs must be 'softmax' or 'sigmoid', not {class_probs!r}")
    return torch.einsum("qk,qhw->khw", probs, mask_probs)


def semantic_labels(semantic_scores: Tensor, category_ids: Sequence[int] | None = None) -> Tensor:
    """[K, H0, W0] semantic scores -> long [H0, W0] argmax (contiguous labels, or the data set's ids if given)."""
    labels = semantic_scores.argmax(dim=0)
    if category_ids is not None:
        labels = torch.as_tensor(list(category_ids), dtype=torch.long, device=labels.device)[labels]
    return labels


# ---------------------------------------------------------------------------------------------------------- batches
def postprocess_batch(outputs: Outputs, targets_or_sizes: Sequence[Any], vocabulary: Any,
                      padded_size: Size | None = None, task: PostprocessTask = "panoptic",
                      cfg: InferenceConfig | None = None, return_semantic_scores: bool = False,
                      things_only: bool = False) -> list[Instances | PanopticSegmentation | SemanticSegmentation]:
    """Per-image results at the original image size (``openseed.core.predictions``).

    Args:
        outputs: the model's ``Outputs`` (``final`` predictions are used).
        targets_or_sizes: per image, a ``Targets`` (its ``image_size``, ``orig_size``, ``image_id`` are read) or an
            ``(image_size, orig_size)`` pair.
        vocabulary: a ``Vocabulary`` (``is_thing``, ``ids``); the data set's ids are written for panoptic segments.
        padded_size: (H, W) of the padded batch; None: 4 x the mask size.
        task: "panoptic" -> ``PanopticSegmentation``; "instance" -> ``Instances`` (as ``instance_inference``);
            "semantic" -> ``SemanticSegmentation`` (long [H0, W0] contiguous labels, + the [K, H0, W0] scores on
            request). Each carries the image's ``image_id`` (None for explicit sizes).
        cfg: thresholds and options.
        return_semantic_scores: semantic: also return the [K, H0, W0] scores.
        things_only: instance: drop the pairs with a stuff label (``vocabulary.is_thing``) *after* the top-k, as the
            reference does on panoptic data (fewer than ``top_k`` results).

    Only what a task needs is resized: the queries kept by the panoptic threshold, the top-k queries for instances.
    Masks are resized ``queries_per_chunk`` at a time (``cfg.chunk_size``, fewer for large photos so that one chunk's
    float32 maps stay within ``cfg.mask_memory_bytes``); instance masks come back as bool. What remains at the full
    original size: the results themselves (bool instance masks, the panoptic id map and its per-pixel winner, and
    for semantic the [K, H0, W0] float32 class scores that the argmax needs).
    """
    cfg = cfg or InferenceConfig()
    final = outputs.final
    logits, masks = final.logits, final.masks
    if padded_size is None:
        if masks is None:
            raise ValueError("padded_size is needed when the outputs have no masks")
        padded_size = (4 * masks.shape[-2], 4 * masks.shape[-1])
    padded_size = _size(padded_size)
    if len(targets_or_sizes) != logits.shape[0]:
        raise ValueError(f"{len(targets_or_sizes)} targets/sizes for a batch of {logits.shape[0]}")
    if task != "instance" and masks is None:
        raise ValueError(f"task {task!r} needs mask predictions")

    results = []
    for i, item in enumerate(targets_or_sizes):
        image_size, orig_size, image_id = _sizes_of(item)

        def resize(m: Tensor, image_size=image_size, orig_size=orig_size) -> Tensor:
            return _resize_chunk(m, padded_size, image_size, orig_size)

        def step(floats_per_query: int, orig_size=orig_size) -> int:
            return queries_per_chunk([padded_size, orig_size], cfg.mask_memory_bytes, floats_per_query, cfg.chunk_size)

        if task == "panoptic":  # only the kept queries take part: only they are resized
            seg, info = _panoptic(logits[i], masks[i], orig_size, vocabulary.is_thing, vocabulary.ids, cfg, step(2),
                                  resize)
            result: Instances | PanopticSegmentation | SemanticSegmentation = PanopticSegmentation(seg, info, image_id)
        elif task == "instance":
            scores, query, labels = _topk_pairs(logits[i], outputs.num_fg, cfg,
                                                vocabulary.is_thing if things_only else None)
            boxes = model_boxes_to_original(final.boxes[i][query], padded_size, image_size, orig_size, cfg.clip_boxes)
            instance_masks = None
            if masks is not None:
                instance_masks, scores = _instance_masks(scores, query, masks[i], orig_size, step(1),
                                                         cfg.mask_threshold, resize)
            result = Instances(scores, labels, query, boxes.float(), instance_masks, image_id)
        elif task == "semantic":
            total = None
            chunk = step(1)
            for start in range(0, logits.shape[1], chunk):
                part = slice(start, start + chunk)
                piece = _semantic_sum(logits[i][part], resize(masks[i][part]).sigmoid_(), cfg.semantic_class_probs,
                                      cfg.temperature)
                total = piece if total is None else total.add_(piece)
                del piece
            result = SemanticSegmentation(semantic_labels(total), total if return_semantic_scores else None, image_id)
        else:
            raise ValueError(f"unknown task {task!r}; expected 'panoptic', 'instance' or 'semantic'")
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------- helpers
def _size(size: Sequence[int]) -> Size:
    height, width = (int(v) for v in size)
    return height, width


def _sizes_of(item: Any) -> tuple[Size, Size, int | None]:
    if hasattr(item, "image_size") and hasattr(item, "orig_size"):
        return _size(item.image_size), _size(item.orig_size), getattr(item, "image_id", None)
    if isinstance(item, dict):
        return _size(item["image_size"]), _size(item["orig_size"]), item.get("image_id")
    image_size, orig_size = item
    return _size(image_size), _size(orig_size), None


def _as_bool_list(flags: Sequence[bool] | Tensor, length: int, name: str) -> list[bool]:
    values = [bool(v) for v in (flags.tolist() if isinstance(flags, Tensor) else flags)]
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries for {length} classes")
    return values
