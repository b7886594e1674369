"""Overlay pictures: masks blended in, ignore regions greyed, boxes and class names drawn (data checks, predictions)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def colour(index: int) -> tuple[int, int, int]:
    """A stable, fairly bright colour for an index."""
    rng = np.random.default_rng(index)
    return tuple(int(v) for v in rng.integers(40, 256, 3))


def draw_overlay(image: np.ndarray, masks: np.ndarray | None = None, boxes: np.ndarray | None = None,
                 labels: list[str] | None = None, ignore: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """The picture of one image with its objects.

    Args:
        image: uint8 [H, W, 3] RGB.
        masks: bool [N, H, W] or None. boxes: [N, 4] xyxy pixels (exclusive max) or None.
        labels: N texts drawn at the boxes' corners (or at the masks' first pixels without boxes).
        ignore: bool [H, W] regions drawn greyed out (crowd / void).
    """
    canvas = image.astype(np.float32)
    if ignore is not None:
        canvas[ignore] = canvas[ignore] * 0.3 + 128 * 0.7
    count = len(masks) if masks is not None else len(boxes) if boxes is not None else 0
    if masks is not None:
        for i, mask in enumerate(masks):
            canvas[mask] = canvas[mask] * (1 - alpha) + np.array(colour(i)) * alpha
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for i in range(count):
        anchor = None
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour(i))
            anchor = (x0 + 2, y0 + 1)
        elif masks is not None and masks[i].any():
            ys, xs = np.nonzero(masks[i])
            anchor = (float(xs[0]), float(ys[0]))
        if labels is not None and anchor is not None:
            draw.text(anchor, labels[i], fill=(255, 255, 255))
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
