"""The two encodings of masks that cross the seams, each written once: COCO panoptic id maps (a segment id per pixel,
stored as PNG colours ``id = R + 256 G + 256^2 B``) and COCO run-length encoding (RLE: ``{"size": [H, W], "counts":
str}``, compressed as pycocotools writes it, JSON-ready)."""

from __future__ import annotations

import io

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torch import Tensor


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic colours [H, W, 3] -> segment ids int64 [H, W]."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] (< 2^24) -> COCO panoptic colours uint8 [H, W, 3]."""
    ids = np.asarray(ids).astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def decode_panoptic_png(data: bytes) -> np.ndarray:
    """The segment ids int64 [H, W] of a panoptic PNG's bytes (any PIL mode, read as RGB)."""
    with Image.open(io.BytesIO(data)) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def decode_label_png(data: bytes) -> np.ndarray:
    """A label map PNG's bytes (8- or 16-bit grey: a class index per pixel) -> int64 [H, W]. Refuses colour PNGs."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "I;16", "I"):
            raise ValueError(f"a label map PNG must be 8- or 16-bit grey, not mode {image.mode}")
        return np.asarray(image).astype(np.int64)


def encode_label_png(labels: np.ndarray) -> bytes:
    """A label map (uint8 or uint16 [H, W]: a class index per pixel) -> the bytes of an 8- or 16-bit grey PNG, which
    ``decode_label_png`` reads back exactly."""
    labels = np.asarray(labels)
    if labels.dtype not in (np.uint8, np.uint16) or labels.ndim != 2:
        raise ValueError(f"a label map must be uint8 or uint16 [H, W], not {labels.dtype} {labels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_panoptic_png(ids: np.ndarray) -> bytes:
    """Segment ids [H, W] (< 2^24) -> the bytes of a COCO panoptic PNG."""
    buffer = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_rle(masks: Tensor | np.ndarray) -> list[dict]:
    """bool [N, H, W] -> N compressed RLEs."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(array.astype(np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rle: dict) -> Tensor:
    """A compressed RLE -> bool [H, W]."""
    return torch.from_numpy(mask_utils.decode(rle).astype(bool))


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A COCO annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE; the
    image size places polygons and uncompressed RLE. Raises ValueError when pycocotools cannot read it."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = segmentation
    else:
        try:
            rles = mask_utils.frPyObjects(segmentation, int(height), int(width))
        except Exception as err:  # pycocotools raises bare Exceptions for malformed input
            raise ValueError(f"unreadable segmentation ({err})") from None
        rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
