"""Generate "synthshapes": a small, deterministic, offline stand-in for COCO panoptic + Objects365.

Every image is a square RGB picture (160 x 160 by default) made of:

* **Stuff** background: 1-3 regions, each a different one of six textured classes drawn with numpy
  (``sky``: blue vertical gradient with soft white clouds; ``grass``: green noise with darker blade strokes;
  ``water``: blue with sinusoidal wave highlights; ``sand``: beige speckle; ``brick wall``: red-brown bricks
  in a staggered pattern with grey mortar; ``road``: dark asphalt noise, sometimes with a light dashed line).
  Region borders are irregular: each pixel goes to the argmax over the chosen classes of a random linear ramp
  plus smooth low-frequency noise.
* **Things**: 1-6 objects named ``"<colour> <shape>"`` with colours red, green, blue, yellow and shapes
  circle, square, triangle, ring, star, hexagon, heart, cross (32 classes), a solid fill with a slight shade
  jitter and a thin darker outline, random size (10%-35% of the image side), rotation and position. Later
  objects occlude earlier ones. An object whose visible part would be under 40% of its area (or under 16
  pixels) is neither painted nor annotated, so the annotations always match the pixels exactly (masks are
  rasterised without anti-aliasing at the output resolution).

Splits (default counts, multiplied by ``scale``):

* ``seg_train`` (2000) / ``seg_val`` (200): COCO panoptic (``images/*.jpg``, ``panoptic/*.png`` RGB id maps
  with no void pixel, ``panoptic.json``); things only from the 16 "seg" classes (circle, square, triangle,
  ring in the four colours) plus the 6 stuff classes.
* ``det_train`` (4000): COCO detection (``images/*.jpg``, ``instances.json``), all 32 thing classes, boxes only.
* ``det_val`` (200): like ``det_train`` plus a compressed-RLE ``segmentation`` of each visible mask.

Category ids are stable across splits: things ``1 + 8 * colour_index + shape_index`` (1..32), stuff 101..106.

Variants (``variant=``): ``standard`` (above, the default) and ``crowded``, a harder set for the study of the
paper's claims (experiments/paper_claims): 12 stuff classes (the six above plus ``snow``, ``dirt``, ``gravel``,
``wood floor``, ``tiles``, ``foliage``; ids 101..112), 2-5 stuff regions and 4-12 things per image, things 8%-30% of
the side, and an object kept while at least 25% of it is visible, so boxes overlap and many stuff regions compete
with the things. Detection images carry their stuff unlabelled in both variants, as Objects365 images do.
``DIR/synthshapes.json`` describes the set and is written last, so its presence marks a complete data set.
The output is byte-identical for the same seed / scale / image size whatever the number of workers: every
image has its own ``numpy.random.Generator`` seeded from (seed, split number, image index).

Usage::

    python -m data_prep.synthetic out=data/synthshapes [seed=0] [scale=1.0] [workers=N]
        [image_size=160] [variant=standard|crowded] [force=true]    (--help lists every key)
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from openseed.cli import Option, command, integer, number, one_of, path

VERSION = 1

THING_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "star", "hexagon", "heart", "cross")
SEG_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
DET_ONLY_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in SEG_SHAPES)
STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "sand", "brick wall", "road")
CROWDED_STUFF_CLASSES: tuple[str, ...] = STUFF_CLASSES + ("snow", "dirt", "gravel", "wood floor", "tiles", "foliage")

STUFF_ID_OFFSET = 101
JPEG_QUALITY = 92
PNG_COMPRESS_LEVEL = 6

# (split name, split number used in the per-image seed, default image count, kind)
SPLITS: tuple[tuple[str, int, int, str], ...] = (
    ("seg_train", 0, 2000, "seg"),
    ("seg_val", 1, 200, "seg"),
    ("det_train", 2, 4000, "det"),
    ("det_val", 3, 200, "det_rle"),
)

MIN_VISIBLE_PIXELS = 16


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a synthshapes image is made of (module docstring, "Variants")."""

    name: str
    stuff_classes: tuple[str, ...]
    stuff_per_image: tuple[int, int]  # min, max distinct stuff classes (fewer when one would cover < 3%)
    things_per_image: tuple[int, int]  # min, max sampled (occluded ones are dropped)
    size_range: tuple[float, float]  # object extent as a fraction of the image side
    min_visible_fraction: float  # an object less visible than this is neither painted nor annotated


VARIANTS: dict[str, Variant] = {
    "standard": Variant("standard", STUFF_CLASSES, (1, 3), (1, 6), (0.10, 0.35), 0.4),
    "crowded": Variant("crowded", CROWDED_STUFF_CLASSES, (2, 5), (4, 12), (0.08, 0.30), 0.25),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown synthshapes variant {name!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]


def folder_name(variant: str) -> str:
    """The folder of a variant under the data dir, as training prepares it: ``synthshapes`` (standard) or
    ``synthshapes_<variant>``."""
    return "synthshapes" if get_variant(variant).name == "standard" else f"synthshapes_{variant}"


# Nominal fill colour of each thing colour family (jittered per object).
_FAMILY_RGB = {
    "red": (214, 34, 34),
    "green": (36, 168, 48),
    "blue": (34, 72, 214),
    "yellow": (236, 206, 30),
}
_STUFF_DISPLAY_RGB = {
    "sky": (135, 190, 235),
    "grass": (90, 140, 40),
    "water": (20, 100, 160),
    "sand": (220, 200, 150),
    "brick wall": (150, 70, 50),
    "road": (70, 70, 75),
    "snow": (235, 240, 248),
    "dirt": (120, 85, 55),
    "gravel": (150, 145, 135),
    "wood floor": (175, 125, 75),
    "tiles": (200, 200, 195),
    "foliage": (40, 95, 45),
}


# ----------------------------------------------------------------------------------------------- categories


def thing_id(colour: str, shape: str) -> int:
    """Category id of ``"<colour> <shape>"`` (1..32)."""
    return 1 + 8 * THING_COLOURS.index(colour) + SHAPES.index(shape)


def stuff_id(name: str) -> int:
    """Category id of a stuff class (101..106; the crowded variant's further classes 107..112)."""
    return STUFF_ID_OFFSET + CROWDED_STUFF_CLASSES.index(name)


def _thing_display_colour(ci: int, si: int) -> list[int]:
    base = np.array(_FAMILY_RGB[THING_COLOURS[ci]], dtype=np.int64)
    # Step each shape's display colour along a family-specific direction: distinct within and across families.
    step = np.array([(-13, 9, 5), (7, -11, 9), (9, 7, -13), (-11, -9, 9)][ci], dtype=np.int64)
    return [int(v) for v in np.clip(base + step * si, 0, 255)]


def thing_categories(shapes: tuple[str, ...] | None = None) -> list[dict]:
    """COCO category dicts of the thing classes (all 32 by default, in id order)."""
    shapes = SHAPES if shapes is None else shapes
    cats = []
    for ci, colour in enumerate(THING_COLOURS):
        for si, shape in enumerate(SHAPES):
            if shape not in shapes:
                continue
            cats.append({
                "id": thing_id(colour, shape),
                "name": f"{colour} {shape}",
                "supercategory": "shape",
                "isthing": 1,
                "color": _thing_display_colour(ci, si),
            })
    return cats


def stuff_categories(classes: tuple[str, ...] = STUFF_CLASSES) -> list[dict]:
    """COCO category dicts of the stuff classes (the standard six by default: ids 101..106)."""
    return [
        {"id": stuff_id(name), "name": name, "supercategory": "stuff", "isthing": 0,
         "color": list(_STUFF_DISPLAY_RGB[name])}
        for name in classes
    ]


def seg_thing_classes() -> list[str]:
    return [c["name"] for c in thing_categories(SEG_SHAPES)]


def det_only_classes() -> list[str]:
    return [c["name"] for c in thing_categories(DET_ONLY_SHAPES)]


# ----------------------------------------------------------------------------------------------- noise


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random grid bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, size, endpoint=False) + 0.5 * cells / size
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    f = pos - i0
    # rows then columns
    rows = grid[i0] * (1.0 - f)[:, None] + grid[i0 + 1] * f[:, None]
    out = rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return out


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y, x


# ----------------------------------------------------------------------------------------------- textures
# Each texture returns a float array (H, W, 3) with values roughly in [0, 255].


def _tex_sky(rng: np.random.Generator, size: int) -> np.ndarray:
    y, _ = _coords(size)
    t = y / size
    top = np.array([40, 95, 200]) + rng.integers(-15, 16, 3)
    bottom = np.array([150, 200, 245]) + rng.integers(-15, 16, 3)
    img = top[None, None, :] * (1 - t[..., None]) + bottom[None, None, :] * t[..., None]
    cloud = 0.65 * _smooth_noise(rng, size, 4) + 0.35 * _smooth_noise(rng, size, 9)
    thr = rng.uniform(0.5, 0.62)
    alpha = np.clip((cloud - thr) * 5.0, 0.0, 0.9)[..., None]
    img = img * (1 - alpha) + 250.0 * alpha
    return img


def _tex_grass(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([60, 150, 45]) + rng.integers(-15, 16, 3)
    shade = 0.8 + 0.4 * _smooth_noise(rng, size, 5)
    noise = rng.normal(0.0, 14.0, (size, size, 1))
    img = base[None, None, :] * shade[..., None] + noise
    # short darker blade strokes
    blades = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(blades)
    n = int(size * size / 40)
    xs = rng.integers(0, size, n)
    ys = rng.integers(0, size, n)
    lens = rng.integers(3, 8, n)
    tilts = rng.integers(-2, 3, n)
    for x0, y0, ln, tl in zip(xs.tolist(), ys.tolist(), lens.tolist(), tilts.tolist()):
        draw.line([(x0, y0), (x0 + tl, y0 - ln)], fill=1)
    dark = np.asarray(blades, dtype=bool)
    img[dark] *= 0.6
    return img


def _tex_water(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _coords(size)
    base = np.array([25, 85, 170]) + rng.integers(-15, 16, 3)
    depth = 0.85 + 0.3 * _smooth_noise(rng, size, 3)
    img = base[None, None, :] * depth[..., None]
    angle = rng.uniform(-0.4, 0.4)
    freq = rng.uniform(0.35, 0.6)
    phase = rng.uniform(0, 2 * np.pi)
    u = y * math.cos(angle) + x * math.sin(angle)
    v = -y * math.sin(angle) + x * math.cos(angle)
    wave = np.sin(freq * u + 1.5 * np.sin(0.08 * v + phase) + phase)
    hi = np.clip((wave - 0.75) * 4.0, 0.0, 1.0)[..., None]
    img = img * (1 - 0.7 * hi) + np.array([200, 225, 250])[None, None, :] * 0.7 * hi
    img += rng.normal(0.0, 4.0, (size, size, 1))
    return img


def _tex_sand(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([222, 198, 145]) + rng.integers(-12, 13, 3)
    shade = 0.9 + 0.15 * _smooth_noise(rng, size, 4)
    img = base[None, None, :] * shade[..., None] + rng.normal(0.0, 10.0, (size, size, 1))
    speck = rng.random((size, size))
    img[speck < 0.06] *= 0.7
    img[speck > 0.97] = img[speck > 0.97] * 0.5 + 127.0
    return img


def _tex_brick(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _coords(size)
    bh = int(rng.integers(8, 13))
    bw = round(bh * float(rng.uniform(1.8, 2.4)))
    mortar_w = 2 if bh >= 10 else 1
    oy, ox = int(rng.integers(0, bh)), int(rng.integers(0, bw))
    yy = y.astype(np.int64) + oy
    row = yy // bh
    xx = x.astype(np.int64) + ox + (row % 2) * (bw // 2)
    col = xx // bw
    mortar = ((yy % bh) < mortar_w) | ((xx % bw) < mortar_w)
    base = np.array([160, 65, 45]) + rng.integers(-15, 16, 3)
    # per-brick shade from a small table indexed by (row, col)
    table = rng.uniform(0.8, 1.15, (size // bh + 3, size // bw + 4))
    shade = table[row % table.shape[0], col % table.shape[1]]
    img = base[None, None, :] * shade[..., None] + rng.normal(0.0, 7.0, (size, size, 1))
    mortar_rgb = np.array([165, 165, 160]) + rng.integers(-10, 11, 1)
    img[mortar] = mortar_rgb + rng.normal(0.0, 6.0, (int(mortar.sum()), 1))
    return img


def _tex_road(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _coords(size)
    g = float(rng.integers(55, 80))
    shade = 0.9 + 0.2 * _smooth_noise(rng, size, 6)
    img = np.repeat((g * shade)[..., None], 3, axis=2) + rng.normal(0.0, 9.0, (size, size, 1))
    img[..., 2] += 3.0
    if rng.random() < 0.6:  # dashed lane marking
        slope = rng.uniform(-0.25, 0.25)
        y0 = rng.uniform(0.25, 0.75) * size
        width = rng.uniform(1.5, 3.0)
        dash = float(rng.integers(10, 18))
        gap = float(rng.integers(6, 12))
        offset = rng.uniform(0, dash + gap)
        on_line = np.abs(y - (y0 + slope * (x - size / 2))) < width
        on_dash = ((x + offset) % (dash + gap)) < dash
        mark = on_line & on_dash
        img[mark] = np.array([230, 225, 205]) + rng.normal(0.0, 6.0, (int(mark.sum()), 1))
    return img


def _tex_snow(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([232, 238, 247]) + rng.integers(-8, 9, 3)
    drift = 0.88 + 0.14 * _smooth_noise(rng, size, 4)  # soft blue-grey shadows of drifts
    img = base[None, None, :] * drift[..., None] + rng.normal(0.0, 3.0, (size, size, 1))
    img[..., 2] += 6.0 * (1.0 - drift)
    return img


def _tex_dirt(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([118, 84, 56]) + rng.integers(-12, 13, 3)
    shade = 0.75 + 0.45 * (0.6 * _smooth_noise(rng, size, 6) + 0.4 * _smooth_noise(rng, size, 16))
    img = base[None, None, :] * shade[..., None] + rng.normal(0.0, 8.0, (size, size, 1))
    clods = rng.random((size, size)) < 0.03
    img[clods] *= 0.55
    return img


def _tex_gravel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey pebbles: a Voronoi-like cell pattern (nearest of random seed points), each cell its own shade."""
    y, x = _coords(size)
    n = max(8, size * size // 30)
    py, px = rng.uniform(0, size, n), rng.uniform(0, size, n)
    grey = rng.uniform(105, 190, n)
    warm = rng.uniform(-8, 8, n)
    cell = np.zeros((size, size), dtype=np.int64)
    best = np.full((size, size), np.inf)
    for i in range(n):
        d = (y - py[i]) ** 2 + (x - px[i]) ** 2
        closer = d < best
        best[closer], cell[closer] = d[closer], i
    edge = np.clip(np.sqrt(best) / 3.5, 0.0, 1.0)  # darker away from a pebble's centre
    g = grey[cell] * (1.05 - 0.35 * edge)
    img = np.stack([g + warm[cell], g, g - warm[cell]], axis=-1) + rng.normal(0.0, 5.0, (size, size, 1))
    return img


def _tex_wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Floor boards: long planks with staggered joints and a wavy grain."""
    y, x = _coords(size)
    plank = int(rng.integers(9, 15))
    vertical = bool(rng.random() < 0.5)
    u, v = (x, y) if vertical else (y, x)  # u across the planks, v along them
    row = (u.astype(np.int64) + int(rng.integers(0, plank))) // plank
    length = float(rng.integers(40, 80))
    offsets = rng.uniform(0, length, size // plank + 3)
    joint = ((v + offsets[row % len(offsets)]) % length) < 1.0
    seam = (u.astype(np.int64) % plank) == 0
    tone = rng.uniform(0.85, 1.12, size // plank + 3)[row % (size // plank + 3)]
    grain = 0.93 + 0.07 * np.sin(0.9 * u + 0.15 * v + 2.0 * _smooth_noise(rng, size, 5) * np.pi)
    base = np.array([178, 126, 76]) + rng.integers(-14, 15, 3)
    img = base[None, None, :] * (tone * grain)[..., None] + rng.normal(0.0, 4.0, (size, size, 1))
    img[seam | joint] *= 0.55
    return img


def _tex_tiles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Square floor tiles with grout lines, each tile slightly its own shade."""
    y, x = _coords(size)
    tile = int(rng.integers(10, 17))
    oy, ox = int(rng.integers(0, tile)), int(rng.integers(0, tile))
    yy, xx = y.astype(np.int64) + oy, x.astype(np.int64) + ox
    grout = ((yy % tile) < 1) | ((xx % tile) < 1)
    base = np.array([205, 203, 196]) + rng.integers(-20, 21, 3)
    table = rng.uniform(0.92, 1.06, (size // tile + 3, size // tile + 3))
    img = base[None, None, :] * table[yy // tile, xx // tile][..., None] + rng.normal(0.0, 3.0, (size, size, 1))
    img[grout] = np.array([120, 115, 108]) + rng.normal(0.0, 5.0, (int(grout.sum()), 1))
    return img


def _tex_foliage(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dense leaves: overlapping dark and light green blobs."""
    base = np.array([38, 92, 42]) + rng.integers(-10, 11, 3)
    img = base[None, None, :] * (0.8 + 0.3 * _smooth_noise(rng, size, 5))[..., None]
    leaves = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(leaves)
    n = int(size * size / 60)
    for cx, cy, r, level in zip(rng.uniform(0, size, n).tolist(), rng.uniform(0, size, n).tolist(),
                                rng.uniform(1.5, 4.0, n).tolist(), rng.integers(1, 4, n).tolist()):
        draw.ellipse([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=int(level))
    level = np.asarray(leaves, dtype=np.float64)
    img *= (0.7 + 0.2 * level)[..., None]
    return img + rng.normal(0.0, 5.0, (size, size, 1))


_TEXTURES = {
    "sky": _tex_sky,
    "grass": _tex_grass,
    "water": _tex_water,
    "sand": _tex_sand,
    "brick wall": _tex_brick,
    "road": _tex_road,
    "snow": _tex_snow,
    "dirt": _tex_dirt,
    "gravel": _tex_gravel,
    "wood floor": _tex_wood,
    "tiles": _tex_tiles,
    "foliage": _tex_foliage,
}


def _stuff_layout(rng: np.random.Generator, size: int, variant: Variant) -> tuple[list[int], np.ndarray]:
    """Pick distinct stuff classes (1-3 in the standard variant) and an irregular partition of the image among them.

    Returns (indices into ``variant.stuff_classes``, label map (H, W) of positions into that list). Classes that
    would get a tiny share (< 3% of the image) are dropped and the partition recomputed, so every listed class is
    present.
    """
    low, high = variant.stuff_per_image
    k = int(rng.integers(low, high + 1))
    classes = [int(c) for c in rng.choice(len(variant.stuff_classes), size=k, replace=False)]
    y, x = _coords(size)
    fields = []
    for _ in range(k):
        theta = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(theta) * (x - size / 2) + np.sin(theta) * (y - size / 2)) / size
        noise = 0.9 * _smooth_noise(rng, size, 3) + 0.25 * _smooth_noise(rng, size, 12)
        fields.append(ramp * rng.uniform(1.0, 2.0) + noise + rng.uniform(-0.2, 0.2))
    stack = np.stack(fields)
    keep = list(range(k))
    while True:
        label = np.argmax(stack[keep], axis=0)
        counts = np.bincount(label.ravel(), minlength=len(keep))
        small = [i for i, c in enumerate(counts) if c < 0.03 * size * size]
        if not small or len(keep) == 1:
            break
        del keep[small[0]]
    label = np.argmax(stack[keep], axis=0)
    return [classes[i] for i in keep], label


# ----------------------------------------------------------------------------------------------- shapes


def _polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> list[tuple[float, float]]:
    return list(zip((cx + radii * np.cos(angles)).tolist(), (cy + radii * np.sin(angles)).tolist()))


def _regular(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    ang = rot + 2 * np.pi * np.arange(n) / n
    return _polygon(cx, cy, np.full(n, r), ang)


def _shape_outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape inscribed in the circle (cx, cy, r)."""
    if shape == "square":
        return _regular(cx, cy, r, 4, rot)
    if shape == "triangle":
        return _regular(cx, cy, r, 3, rot)
    if shape == "hexagon":
        return _regular(cx, cy, r, 6, rot)
    if shape == "star":
        n = 5
        radii = np.tile([r, 0.45 * r], n)
        ang = rot + np.pi * np.arange(2 * n) / n
        return _polygon(cx, cy, radii, ang)
    if shape == "cross":
        a = 0.32  # half arm width relative to r (the arm tips touch the circle)
        b = math.sqrt(1 - a * a)
        pts = np.array([(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b),
                        (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]) * r
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([hx, hy], axis=1)
        pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
        pts *= r / np.sqrt((pts ** 2).sum(axis=1)).max()
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    xs = cx + pts[:, 0] * c - pts[:, 1] * s
    ys = cy + pts[:, 0] * s + pts[:, 1] * c
    return list(zip(xs.tolist(), ys.tolist()))


def _rasterise(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> np.ndarray:
    """uint8 (H, W): 0 outside, 1 fill, 2 outline. No anti-aliasing."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=2)
        if shape == "ring":
            ri = 0.5 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0, outline=2)
    else:
        draw.polygon(_shape_outline(shape, cx, cy, r, rot), fill=1, outline=2)
    return np.asarray(canvas)


def _thing_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    base = np.array(_FAMILY_RGB[colour], dtype=np.float64)
    jitter = rng.integers(-16, 17, 3) + rng.integers(-12, 13)  # per channel + overall brightness
    return np.clip(base + jitter, 0, 255)


# ----------------------------------------------------------------------------------------------- one image


def _tight_box(ys: np.ndarray, xs: np.ndarray) -> list[int]:
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def render_image(rng: np.random.Generator, size: int, shapes: tuple[str, ...],
                 variant: Variant = VARIANTS["standard"]) -> dict:
    """Draw one synthshapes image.

    Returns ``{"image": uint8 (H, W, 3), "stuff": [(stuff index, bool mask)], "things": [(category id, bool
    visible mask)]}``; a stuff index points into ``variant.stuff_classes``; stuff masks are the visible stuff
    pixels (may be dropped if fully covered), things are in painting order and every visible mask is non-empty.
    The masks partition the image.
    """
    stuff_classes, label = _stuff_layout(rng, size, variant)
    img = np.zeros((size, size, 3), dtype=np.float64)
    for pos, cls in enumerate(stuff_classes):
        sel = label == pos
        tex = _TEXTURES[variant.stuff_classes[cls]](rng, size)
        img[sel] = tex[sel]

    # sample things (painting order = list order)
    low, high = variant.things_per_image
    n = int(rng.integers(low, high + 1))
    candidates = []
    for _ in range(n):
        ci = int(rng.integers(len(THING_COLOURS)))
        shape = shapes[int(rng.integers(len(shapes)))]
        extent = max(rng.uniform(*variant.size_range) * size, 12.0)  # tiny images: keep shapes >= 16 px
        r = extent / 2
        cx = rng.uniform(r, size - 1 - r)
        cy = rng.uniform(r, size - 1 - r)
        rot = rng.uniform(0, 2 * np.pi)
        fill = _thing_colour(rng, THING_COLOURS[ci])
        raster = _rasterise(shape, cx, cy, r, rot, size)
        candidates.append((thing_id(THING_COLOURS[ci], shape), raster, fill))

    # visibility, from the top down: a thing is occluded only by kept things above it
    covered = np.zeros((size, size), dtype=bool)
    kept = [False] * n
    visible: list[np.ndarray | None] = [None] * n
    for i in range(n - 1, -1, -1):
        full = candidates[i][1] > 0
        full_area = int(full.sum())
        vis = full & ~covered
        area = int(vis.sum())
        if full_area > 0 and area >= MIN_VISIBLE_PIXELS and area >= variant.min_visible_fraction * full_area:
            kept[i] = True
            visible[i] = vis
            covered |= full

    # paint kept things bottom to top
    for i in range(n):
        if not kept[i]:
            continue
        _, raster, fill = candidates[i]
        img[raster == 1] = fill
        img[raster == 2] = fill * 0.62

    stuff = []
    for pos, cls in enumerate(stuff_classes):
        m = (label == pos) & ~covered
        if m.any():
            stuff.append((cls, m))
    things = [(candidates[i][0], visible[i]) for i in range(n) if kept[i]]
    return {"image": np.clip(np.rint(img), 0, 255).astype(np.uint8), "stuff": stuff, "things": things}


def _make_one(index: int, *, split_dir: str, split_no: int, kind: str, seed: int, size: int, variant: str) -> dict:
    """Render, write and annotate image ``index`` (0-based) of a split; returns its JSON pieces."""
    rng = np.random.default_rng([seed, split_no, index])
    image_id = index + 1
    stem = f"{image_id:012d}"
    shapes = SEG_SHAPES if kind == "seg" else SHAPES
    layout = VARIANTS[variant]
    out = render_image(rng, size, shapes, layout)
    Image.fromarray(out["image"], "RGB").save(
        os.path.join(split_dir, "images", stem + ".jpg"), format="JPEG", quality=JPEG_QUALITY,
        subsampling=0, optimize=False, progressive=False)
    image_entry = {"id": image_id, "file_name": stem + ".jpg", "height": size, "width": size}

    if kind == "seg":
        ids = np.zeros((size, size), dtype=np.uint32)
        segments = []
        pieces = [(stuff_id(layout.stuff_classes[cls]), m) for cls, m in out["stuff"]] + out["things"]
        for seg_id, (cat, m) in enumerate(pieces, start=1):
            ids[m] = seg_id
            ys, xs = np.nonzero(m)
            segments.append({"id": seg_id, "category_id": int(cat), "iscrowd": 0,
                             "bbox": _tight_box(ys, xs), "area": len(ys)})
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(os.path.join(split_dir, "panoptic", stem + ".png"), format="PNG",
                                         compress_level=PNG_COMPRESS_LEVEL, optimize=False)
        return {"image": image_entry,
                "annotation": {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments}}

    anns = []
    for cat, m in out["things"]:
        ys, xs = np.nonzero(m)
        ann = {"image_id": image_id, "category_id": int(cat), "bbox": _tight_box(ys, xs),
               "area": len(ys), "iscrowd": 0}
        if kind == "det_rle":
            from pycocotools import mask as mask_utils

            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        anns.append(ann)
    return {"image": image_entry, "annotations": anns}


# ----------------------------------------------------------------------------------------------- driver


def split_counts(scale: float) -> dict[str, int]:
    return {name: max(1, round(default * scale)) for name, _, default, _ in SPLITS}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def _info(split: str, seed: int, variant: str) -> dict:
    kind = "" if variant == "standard" else f", {variant} variant"
    return {"description": f"synthshapes {split} (synthetic shapes on textured stuff{kind})", "version": str(VERSION),
            "year": 2024, "contributor": "openseed data_prep.synthetic", "seed": seed}


def _run_split(pool, name: str, split_no: int, kind: str, count: int, out: Path, seed: int, size: int,
               workers: int, progress: bool, variant: str) -> list[dict]:
    from tqdm import tqdm

    split_dir = out / name
    if split_dir.exists():
        shutil.rmtree(split_dir)
    (split_dir / "images").mkdir(parents=True)
    if kind == "seg":
        (split_dir / "panoptic").mkdir()
    fn = partial(_make_one, split_dir=str(split_dir), split_no=split_no, kind=kind, seed=seed, size=size,
                 variant=variant)
    results = []
    with tqdm(total=count, desc=name, unit="img", disable=not progress, leave=False) as bar:
        if pool is None:
            it = map(fn, range(count))
        else:
            chunk = max(1, min(32, count // (workers * 8)))
            it = pool.imap(fn, range(count), chunksize=chunk)
        for res in it:
            results.append(res)
            bar.update(1)
    return results


def read_manifest(out_dir: str | Path) -> dict | None:
    """The ``synthshapes.json`` of a directory, or None when absent or unreadable."""
    path = Path(out_dir) / "synthshapes.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_cached(out_dir: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 160,
              variant: str = "standard") -> dict | None:
    """The manifest when ``out_dir`` already holds a complete set made with these settings, else None (a manifest
    without ``variant`` predates the variants: standard)."""
    m = read_manifest(out_dir)
    if m and m.get("version") == VERSION and m.get("seed") == seed and m.get("scale") == scale \
            and m.get("image_size") == image_size and m.get("variant", "standard") == variant:
        return m
    return None


def generate(out_dir: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 160,
             workers: int | None = None, progress: bool = True, variant: str = "standard") -> dict:
    """Write the whole synthshapes data set under ``out_dir``; returns the ``synthshapes.json`` content.

    Any previous split directories of the same names are replaced. The output does not depend on ``workers``.
    """
    layout = get_variant(variant)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "synthshapes.json"
    if manifest_path.exists():
        manifest_path.unlink()  # the set is incomplete until we write it again
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    counts = split_counts(scale)

    seg_cats = thing_categories(SEG_SHAPES) + stuff_categories(layout.stuff_classes)
    det_cats = thing_categories()
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        for name, split_no, _, kind in SPLITS:
            results = _run_split(pool, name, split_no, kind, counts[name], out, seed, image_size, workers, progress,
                                 variant)
            images = [r["image"] for r in results]
            if kind == "seg":
                data = {"info": _info(name, seed, variant), "licenses": [], "images": images,
                        "annotations": [r["annotation"] for r in results], "categories": seg_cats}
                _write_json(out / name / "panoptic.json", data)
            else:
                anns = []
                for r in results:
                    for a in r["annotations"]:
                        anns.append({"id": len(anns) + 1, **a})
                data = {"info": _info(name, seed, variant), "licenses": [], "images": images, "annotations": anns,
                        "categories": det_cats}
                _write_json(out / name / "instances.json", data)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    manifest = {
        "seed": seed,
        "scale": scale,
        "image_size": image_size,
        "version": VERSION,
        "variant": variant,
        "counts": counts,
        "seg_thing_classes": seg_thing_classes(),
        "det_only_classes": det_only_classes(),
        "stuff_classes": list(layout.stuff_classes),
    }
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


OPTIONS = {
    "out": Option("output directory", required=True, check=path),
    "seed": Option("random seed", 0, integer(0)),
    "scale": Option("multiply the default split sizes (2000/200/4000/200) by this", 1.0,
                    lambda value, key: number(value, key, above=0)),
    "workers": Option("worker processes (null: all CPUs); does not change the output", None, integer(1)),
    "image_size": Option("image side in pixels (>= 64)", 160, integer(64)),
    "variant": Option("standard, or crowded: more stuff classes, more and overlapping things", "standard",
                      one_of(sorted(VARIANTS))),
    "force": Option("regenerate even if a matching set exists", False),
    "progress": Option("show the progress bars", True),
}


@command(OPTIONS, "python -m data_prep.synthetic",
         "Generate the synthshapes data set (COCO panoptic + detection, offline).")
def main(args) -> int:
    cached = None if args.force else is_cached(args.out, args.seed, args.scale, args.image_size, args.variant)
    if cached is not None:
        print(f"synthshapes: {args.out} already holds seed={args.seed} scale={args.scale} "
              f"image_size={args.image_size} variant={args.variant} (cached; force=true regenerates)")
        return 0
    t0 = time.perf_counter()
    manifest = generate(args.out, seed=args.seed, scale=args.scale, image_size=args.image_size,
                        workers=args.workers, progress=args.progress, variant=args.variant)
    seconds = time.perf_counter() - t0
    counts = ", ".join(f"{k}={v}" for k, v in manifest["counts"].items())
    print(f"synthshapes: wrote {sum(manifest['counts'].values())} images to {args.out} ({counts}) "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
