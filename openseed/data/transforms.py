"""Geometric transforms on an image with its boxes and masks (torchvision.transforms.v2), and batching.

Training uses large-scale jitter (LSJ, SPEC.md section 4): random flip, resize by a random factor in [0.1, 2.0] of
the target size, crop to at most the target size; the batch is padded to the target size. Evaluation resizes without
cropping, as the reference (detectron2's shortest-edge resize: sizes ``int(x * scale + 0.5)``, the image resampled
with PIL bilinear on uint8). Boxes of segmentation targets are re-derived from the transformed masks, so they stay
tight; detection boxes are transformed, clipped, and dropped when less than a pixel remains.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors

from openseed.core.batch import Batch, Targets
from openseed.core.boxes import tight_boxes
from openseed.core.vocabulary import Vocabulary
from openseed.data.shards import CROWD_INDEX, Sample

MIN_BOX_SIDE = 1.0  # pixels; a detection box thinner than this after cropping is dropped


def segment_map_boxes(segment_map: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes (as ``tight_boxes``) of labels 1..count in a uint8 map, in one pass; also which are present."""
    height, width = segment_map.shape
    index = segment_map.flatten().long()
    xs = torch.arange(width).repeat(height)
    ys = torch.arange(height).repeat_interleave(width)
    bins = 256
    low_x = torch.full((bins,), width).scatter_reduce(0, index, xs, "amin")
    high_x = torch.full((bins,), -1).scatter_reduce(0, index, xs, "amax")
    low_y = torch.full((bins,), height).scatter_reduce(0, index, ys, "amin")
    high_y = torch.full((bins,), -1).scatter_reduce(0, index, ys, "amax")
    boxes = torch.stack([low_x, low_y, high_x + 1, high_y + 1], 1)[1: count + 1].float()
    return boxes, high_x[1: count + 1] >= 0


def _wrapped(sample: Sample) -> dict:
    height, width = sample.image.shape[-2:]
    items = {"image": tv_tensors.Image(sample.image),
             "boxes": tv_tensors.BoundingBoxes(sample.boxes, format="XYXY", canvas_size=(height, width))}
    if sample.masks is not None:
        items["masks"] = tv_tensors.Mask(sample.masks.to(torch.uint8))
    if sample.ignore_mask is not None:
        items["ignore"] = tv_tensors.Mask(sample.ignore_mask[None].to(torch.uint8))
    if sample.segment_map is not None:
        items["segment_map"] = tv_tensors.Mask(sample.segment_map[None])
    return items


def _finish(sample: Sample, items: dict) -> Sample:
    """Unwrap transformed tensors; re-derive or clip boxes and drop objects with nothing left."""
    image = items["image"].as_subclass(torch.Tensor)
    height, width = image.shape[-2:]
    boxes = items["boxes"].as_subclass(torch.Tensor).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    if "segment_map" in items:  # panoptic: boxes and masks of the objects still present, from the moved map
        segment_map = items["segment_map"].as_subclass(torch.Tensor)[0]
        boxes, keep = segment_map_boxes(segment_map, len(sample.labels))
        boxes = boxes[keep]
        present = torch.nonzero(keep).flatten().to(torch.uint8) + 1
        masks = segment_map[None] == present[:, None, None]
        ignore = segment_map == CROWD_INDEX
    else:
        masks = items["masks"].as_subclass(torch.Tensor).bool() if "masks" in items else None
        ignore = items["ignore"].as_subclass(torch.Tensor)[0].bool() if "ignore" in items else None
        if sample.boxes_from_masks:
            keep = masks.flatten(1).any(1)
            boxes = tight_boxes(masks[keep])
        else:
            keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
            boxes = boxes[keep]
        masks = None if masks is None else masks[keep]
    return replace(sample, image=image, boxes=boxes, labels=sample.labels[keep], is_thing=sample.is_thing[keep],
                   mask_is_pseudo=sample.mask_is_pseudo[keep], has_mask=sample.has_mask[keep], masks=masks,
                   ignore_mask=ignore, segment_map=None)


def _apply(items: dict, fn) -> dict:
    return {name: fn(value) for name, value in items.items()}


class LargeScaleJitter:
    """LSJ: flip, scale by r * min(size / h, size / w) with r ~ U(scale_range), random crop to at most size x size.

    The crop window is chosen in the input's coordinates and cropped *before* resizing (``resized_crop``), so a
    2x zoom never materialises full-size masks: memory stays at the output size.
    """

    def __init__(self, size: int = 1024, scale_range: tuple[float, float] = (0.1, 2.0), flip_prob: float = 0.5):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"bad scale_range {scale_range}")
        self.size, self.scale_range, self.flip_prob = int(size), tuple(scale_range), float(flip_prob)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        height, width = sample.image.shape[-2:]
        low, high = self.scale_range
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        scale = ratio * min(self.size / height, self.size / width)
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
        crop_h, crop_w = min(out_h, self.size), min(out_w, self.size)
        top = int(torch.randint(0, out_h - crop_h + 1, (), generator=generator)) if out_h > crop_h else 0
        left = int(torch.randint(0, out_w - crop_w + 1, (), generator=generator)) if out_w > crop_w else 0
        in_top, in_left = min(int(top / scale), height - 1), min(int(left / scale), width - 1)
        in_h = max(1, min(height - in_top, round(crop_h / scale)))
        in_w = max(1, min(width - in_left, round(crop_w / scale)))
        flip = torch.rand((), generator=generator).item() < self.flip_prob
        items = _apply(_wrapped(sample), lambda x: F.resized_crop(x, in_top, in_left, in_h, in_w, [crop_h, crop_w]))
        if flip:
            items = _apply(items, F.horizontal_flip)
        return _finish(sample, items)


class EvalResize:
    """Resize without cropping: shorter side to ``short_edge`` unless the longer side would pass ``max_size`` (then
    the longer side to ``max_size``); ``short_edge=None`` scales the longer side to ``max_size`` (the evaluation size
    of an LSJ-trained model).

    As the reference's evaluation resize (detectron2 ``ResizeShortestEdge``): the sizes are ``int(x * scale + 0.5)``
    and a uint8 image is resampled with PIL bilinear (``resize_image``); masks (nearest) and boxes as the other
    transforms.
    """

    def __init__(self, short_edge: int | None = 800, max_size: int | None = 1333):
        if short_edge is None and max_size is None:
            raise ValueError("give short_edge, max_size or both")
        self.short_edge, self.max_size = short_edge, max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.short_edge is not None:
            scale = self.short_edge / min(height, width)
            new_h, new_w = (self.short_edge, scale * width) if height < width else (scale * height, self.short_edge)
            if self.max_size is not None and max(new_h, new_w) > self.max_size:
                shrink = self.max_size / max(new_h, new_w)
                new_h, new_w = new_h * shrink, new_w * shrink
        else:
            scale = self.max_size / max(height, width)
            new_h, new_w = height * scale, width * scale
        return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))

    @staticmethod
    def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[3, H, W] image -> [3, h, w] at ``size`` = (h, w): PIL bilinear for uint8 (the reference), torchvision's
        antialiased bilinear for other dtypes."""
        if image.dtype != torch.uint8:
            return F.resize(image, list(size), antialias=True)
        height, width = (int(v) for v in size)
        if tuple(image.shape[-2:]) == (height, width):
            return image.clone()
        array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
        resized = Image.fromarray(array).resize((width, height), Image.BILINEAR)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().to(image.device)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        size = self.output_size(*sample.image.shape[-2:])
        items = _wrapped(sample)
        image = items.pop("image").as_subclass(torch.Tensor)
        items = _apply(items, lambda x: F.resize(x, list(size)))
        items["image"] = tv_tensors.Image(self.resize_image(image, size))
        return _finish(sample, items)


def eval_resize_for(model_config, image_size: int | None = None) -> tuple[EvalResize, tuple[int, int] | None]:
    """(resize, pad_to) for evaluating a model: with ``image_size``, the longer side to it and a square of that size
    (LSJ-trained models); else the resize the model records (``OpenSeeDConfig.eval_short_edge`` / ``eval_max_size``:
    shortest edge, padding to a multiple of 32, i.e. ``pad_to=None`` for ``collate``), else its ``eval_max_size``
    (or 1024) as a square."""
    short_edge = getattr(model_config, "eval_short_edge", None)  # model_config: an OpenSeeDConfig or None
    max_size = getattr(model_config, "eval_max_size", None)
    if image_size is None and short_edge is not None:
        return EvalResize(short_edge, max_size), None
    image_size = image_size or max_size or 1024
    return EvalResize(None, image_size), (image_size, image_size)


def collate(samples: list[Sample], vocabulary: Vocabulary, task: str, size_divisibility: int = 32,
            pad_to: tuple[int, int] | None = None, keep_annotations: bool = False) -> Batch:
    """Pad images (and masks) at the bottom/right to a common size and gather the targets.

    The size is ``pad_to`` when given (LSJ: the fixed crop size), else the largest image rounded up to a multiple
    of ``size_divisibility``. ``keep_annotations`` carries the stored ground truth along (evaluation).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    max_h = max(s.image.shape[-2] for s in samples)
    max_w = max(s.image.shape[-1] for s in samples)
    if pad_to is not None:
        if max_h > pad_to[0] or max_w > pad_to[1]:
            raise ValueError(f"an image of {max_h}x{max_w} does not fit pad_to={pad_to}")
        height, width = pad_to
    else:
        height = math.ceil(max_h / size_divisibility) * size_divisibility
        width = math.ceil(max_w / size_divisibility) * size_divisibility
    images = torch.zeros((len(samples), 3, height, width), dtype=torch.uint8)
    padding = torch.ones((len(samples), height, width), dtype=torch.bool)
    targets = []
    for i, sample in enumerate(samples):
        sample = sample.materialised()
        h, w = sample.image.shape[-2:]
        images[i, :, :h, :w] = sample.image
        padding[i, :h, :w] = False
        targets.append(Targets(
            labels=sample.labels, boxes=sample.boxes, masks=_pad(sample.masks, height, width),
            is_thing=sample.is_thing, mask_is_pseudo=sample.mask_is_pseudo, has_mask=sample.has_mask,
            ignore_mask=None if sample.ignore_mask is None else _pad(sample.ignore_mask[None], height, width)[0],
            image_id=sample.image_id, orig_size=sample.orig_size, image_size=(int(h), int(w))))
    annotations = None
    if keep_annotations:
        annotations = [{"json": s.annotation, "panoptic_png": s.panoptic_png, "semantic_png": s.semantic_png}
                       for s in samples]
    return Batch(images=images, padding_mask=padding, targets=targets, vocabulary=vocabulary, task=task,
                 dataset=samples[0].dataset, annotations=annotations)


def _pad(masks: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    if masks is None or masks.shape[-2:] == (height, width):
        return masks
    out = torch.zeros((masks.shape[0], height, width), dtype=torch.bool)
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out
