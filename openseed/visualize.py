"""Overlay pictures: masks blended in, ignore regions greyed, boxes and class names drawn (data checks, predictions)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def colour(index: int) -> tuple[int, int, int]:
    """A stable, fairly bright colour for an index."""
    rng = np.random.default_rng(index)
    return tuple(int(v) for v in rng.integers(40, 256, 3))


def draw_overlay(image: np.ndarray, masks: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 labels: list[str] | None = None, ignore: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """The picture of one image with its objects (torchvision's ``draw_segmentation_masks`` and
    ``draw_bounding_boxes``).

    Args:
        image: uint8 [H, W, 3] RGB.
        masks: bool [N, H, W] or None, each blended in over the ones before it (overlaps keep the later colour
            mixed with the earlier, not blacked out). boxes: [N, 4] xyxy pixels (exclusive max) or None.
        labels: N texts drawn at the boxes' corners (or at the masks' first pixels without boxes).
        ignore: bool [H, W] regions drawn greyed out (crowd / void).
    """
    # a copy (np.array): arrays read from PIL images are read-only, which torch.from_numpy warns about
    canvas = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    if ignore is not None:
        canvas = draw_segmentation_masks(canvas, torch.from_numpy(np.asarray(ignore, dtype=bool)), alpha=0.7,
                                         colors=(128, 128, 128))
    if masks is not None:
        for i, mask in enumerate(torch.from_numpy(np.asarray(masks, dtype=bool))):
            if mask.any():
                canvas = draw_segmentation_masks(canvas, mask, alpha=alpha, colors=colour(i))
    canvas = (canvas * 255).round().clamp(0, 255).to(torch.uint8)
    if boxes is not None and len(boxes):
        corners = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
        # inclusive pixel corners for the outline (the boxes' max is exclusive)
        corners[:, 2:] = torch.maximum(corners[:, :2], corners[:, 2:] - 1)
        canvas = draw_bounding_boxes(canvas, corners, labels=list(labels) if labels is not None else None,
                                     colors=[colour(i) for i in range(len(corners))], label_colors="white")
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if boxes is None and masks is not None and labels is not None:  # labels without boxes: at each mask's corner
        draw = ImageDraw.Draw(picture)
        for i, mask in enumerate(masks):
            if mask.any():
                ys, xs = np.nonzero(mask)
                draw.text((float(xs[0]), float(ys[0])), labels[i], fill=(255, 255, 255))
    return picture


def grid(pictures: list[Image.Image], columns: int = 4) -> Image.Image:
    """Pictures side by side, ``columns`` per row."""
    columns = min(columns, len(pictures))
    width = max(p.width for p in pictures)
    height = max(p.height for p in pictures)
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (32, 32, 32))
    for k, picture in enumerate(pictures):
        sheet.paste(picture, ((k % columns) * width, (k // columns) * height))
    return sheet
