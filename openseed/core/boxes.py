"""The box conventions and the conversions between them, each written once.

- **Pixel boxes** (the data, ``Targets.boxes``, predictions handed to users and evaluators): ``xyxy`` in pixels of the
  (transformed, unpadded) image, continuous coordinates where pixel ``i`` covers ``[i, i + 1)``; the tight box of a
  mask is ``[xmin, ymin, xmax + 1, ymax + 1]``.
- **COCO boxes** (JSON files): ``[x, y, w, h]`` with ``w = x1 - x0``: the same rectangle (``xyxy_to_xywh``).
- **Model boxes** (inside the model, ``Prediction.boxes``, ``Conditions.boxes``): ``cxcywh`` normalised to [0, 1] by
  the *padded* batch size (the ``H, W`` of ``Batch.images``), so that a reference box maps directly onto the feature
  maps (``targets_to_model_boxes`` / ``model_boxes_to_pixels``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, masks_to_boxes


def _scale(padded_size: tuple[int, int], like: Tensor) -> Tensor:
    height, width = padded_size
    return torch.tensor([width, height, width, height], dtype=like.dtype, device=like.device)


def targets_to_model_boxes(boxes_xyxy: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Pixel xyxy boxes [..., 4] (exclusive max) -> cxcywh normalised by the padded size (H, W)."""
    return box_convert(boxes_xyxy / _scale(padded_size, boxes_xyxy), "xyxy", "cxcywh")


def model_boxes_to_pixels(boxes_cxcywh: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Inverse of ``targets_to_model_boxes``."""
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * _scale(padded_size, boxes_cxcywh)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Pixel xyxy [..., 4] -> COCO ``[x, y, w, h]`` (same dtype)."""
    return box_convert(boxes, "xyxy", "xywh")


def stored_box_xywh(obj: dict) -> list[float]:
    """The COCO box of a stored object (a shard's JSON ``bbox``: pixel xyxy at the original size), in float64."""
    return xyxy_to_xywh(torch.tensor(obj["bbox"], dtype=torch.float64)).tolist()


def tight_boxes(masks: Tensor) -> Tensor:
    """Masks [N, H, W] bool -> their tight pixel boxes [N, 4] xyxy (exclusive max: ``[xmin, ymin, xmax + 1,
    ymax + 1]``), float32; every mask must be non-empty."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    return masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)


def tight_box_xywh(mask: Tensor) -> list[int]:
    """One mask [H, W] -> its COCO box ``[x, y, w, h]`` in whole pixels (``[0, 0, 0, 0]`` for an empty mask)."""
    if not mask.any():
        return [0, 0, 0, 0]
    return [int(v) for v in xyxy_to_xywh(tight_boxes(mask[None].bool()))[0].tolist()]
