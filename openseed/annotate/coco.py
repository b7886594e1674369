"""COCO instances out of an ``AnnotationStore`` and into one, and masks as COCO polygons.

Export: images and categories numbered from 1 (images in the order given, categories in the order given and then
new names alphabetically), one annotation per object with ``bbox`` ``[x, y, w, h]`` and ``area`` of its mask (of its
box when it has none), ``iscrowd`` 0 and the mask as compressed RLE (exact) or as polygons. Polygons are the outer
boundaries of the mask's 4-connected parts, traced along pixel edges: pycocotools rasterises them back to the same
pixels, except that a hole inside a part is filled (a COCO polygon cannot carry holes; use RLE to keep them).

Import: a COCO instances file whose images are matched to the folder's by file name (others are counted and
skipped), each annotation's segmentation (polygons, RLE or uncompressed RLE) read with pycocotools and its box taken
from ``bbox``. A malformed file is a ``ValueError`` that names the file and the offending key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils

from openseed.annotate.store import AnnotationStore
from openseed.core.codecs import decode_rle, segmentation_to_rle

SEGMENTATION_FORMATS = ("rle", "polygons")


# ---------------------------------------------------------------------------------------------------- polygons
def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer boundaries of a bool [H, W] mask's 4-connected parts as COCO polygons ``[x0, y0, x1, y1, ...]`` with
    vertices on pixel corners (holes are not traced: pycocotools fills the polygons)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    rows, cols = np.nonzero(inner & ~padded[:-2, 1:-1])  # top sides: (c, r) -> (c + 1, r)
    edges = [((c, r), (c + 1, r)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inner & ~padded[1:-1, 2:])  # right sides: (c + 1, r) -> (c + 1, r + 1)
    edges += [((c + 1, r), (c + 1, r + 1)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inner & ~padded[2:, 1:-1])  # bottom sides: (c + 1, r + 1) -> (c, r + 1)
    edges += [((c + 1, r + 1), (c, r + 1)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(inner & ~padded[1:-1, :-2])  # left sides: (c, r + 1) -> (c, r)
    edges += [((c, r + 1), (c, r)) for r, c in zip(rows.tolist(), cols.tolist())]
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for start, end in edges:
        outgoing.setdefault(start, []).append(end)
    polygons = []
    while outgoing:
        start = min(outgoing)  # deterministic order
        loop, previous, vertex = [start], None, start
        while True:
            ends = outgoing[vertex]
            end = ends[0] if len(ends) == 1 or previous is None else _right_turn(previous, vertex, ends)
            ends.remove(end)
            if not ends:
                del outgoing[vertex]
            previous, vertex = vertex, end
            if vertex == start:
                break
            loop.append(vertex)
        if _signed_area(loop) > 0:  # outer boundary (holes run the other way)
            polygons.append([float(v) for point in _corners(loop) for v in point])
    return polygons


def _right_turn(previous: tuple[int, int], vertex: tuple[int, int], ends: list[tuple[int, int]]) -> tuple[int, int]:
    """At a vertex two parts touch diagonally: the edge that turns towards the foreground (keeps parts apart)."""
    dx, dy = vertex[0] - previous[0], vertex[1] - previous[1]
    right = (vertex[0] - dy, vertex[1] + dx)  # with y down, (-dy, dx) is a right turn
    return right if right in ends else ends[0]


def _signed_area(loop: list[tuple[int, int]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(loop, loop[1:] + loop[:1]))


def _corners(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The loop without the vertices that lie on a straight run."""
    out = []
    for i, point in enumerate(loop):
        before, after = loop[i - 1], loop[(i + 1) % len(loop)]
        if (point[0] - before[0]) * (after[1] - point[1]) != (point[1] - before[1]) * (after[0] - point[0]):
            out.append(point)
    return out


# ---------------------------------------------------------------------------------------------------- export
def export_coco(store: AnnotationStore, images: Sequence[tuple[str, int, int]], categories: Sequence[str] = (),
                segmentation: str = "rle") -> dict:
    """COCO instances of the store's accepted objects on ``images`` (``(file name, height, width)``, in this order;
    proposals awaiting review are left out).

    ``categories``: names numbered first (a vocabulary), in this order; other names the objects use follow in
    alphabetical order. ``segmentation``: ``"rle"`` (exact) or ``"polygons"``. Objects without a mask get their box
    as a rectangle polygon (both formats) and the box's area.
    """
    if segmentation not in SEGMENTATION_FORMATS:
        raise ValueError(f"segmentation must be one of {SEGMENTATION_FORMATS}, got {segmentation!r}")
    image_ids = {name: i for i, (name, _, _) in enumerate(images, 1)}
    accepted = [obj for obj in store.objects() if obj.image in image_ids and obj.status == "accepted"]
    used = sorted({obj.category for obj in accepted} - set(categories))
    names = list(dict.fromkeys(categories)) + used
    category_ids = {name: i for i, name in enumerate(names, 1)}
    out = {"info": {"description": "openseed.annotate export"},
           "images": [{"id": image_ids[name], "file_name": name, "height": int(h), "width": int(w)}
                      for name, h, w in images],
           "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in category_ids.items()],
           "annotations": []}
    sizes = {name: (int(h), int(w)) for name, h, w in images}
    for name, _, _ in images:
        for obj in store.objects(name):
            if obj.status != "accepted":
                continue
            entry = {"id": len(out["annotations"]) + 1, "image_id": image_ids[name],
                     "category_id": category_ids[obj.category], "iscrowd": 0}
            if obj.rle is not None:
                if [int(v) for v in obj.rle["size"]] != list(sizes[name]):
                    raise ValueError(f"object {obj.id} on {name}: its mask is {obj.rle['size']}, the image "
                                     f"{list(sizes[name])}")
                rle = {"size": obj.rle["size"], "counts": obj.rle["counts"]}
                entry["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
                entry["area"] = float(mask_utils.area(rle))
                entry["segmentation"] = rle if segmentation == "rle" else mask_to_polygons(decode_rle(rle).numpy())
            else:
                x0, y0, x1, y1 = obj.box
                entry["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                entry["area"] = (x1 - x0) * (y1 - y0)
                entry["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            out["annotations"].append(entry)
    return out


# ---------------------------------------------------------------------------------------------------- import
def read_coco(path: str | Path, sizes: dict[str, tuple[int, int]]) -> tuple[list[tuple], int]:
    """The objects of a COCO instances file on the folder's images (``sizes``: file name -> (height, width)):
    ``(file name, class name, xyxy box, RLE or None)`` each, and how many of the file's images are not in the folder
    (or not of its size) and were skipped. A malformed file is a ValueError naming the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO file is a JSON object, not {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: '{key}' must be a list")
    categories, images = {}, {}
    for i, category in enumerate(data["categories"]):
        try:
            categories[category["id"]] = str(category["name"])
        except (KeyError, TypeError):
            raise ValueError(f"{path}: categories[{i}] needs 'id' and 'name'") from None
    skipped = set()
    for i, image in enumerate(data["images"]):
        try:
            name, height, width = str(image["file_name"]), int(image["height"]), int(image["width"])
            images[image["id"]] = name
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: images[{i}] needs 'id', 'file_name', 'height' and 'width'") from None
        if sizes.get(name) != (height, width):
            skipped.add(image["id"])
    objects = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            raise ValueError(f"{where}: 'image_id' names no image of the file")
        if ann.get("category_id") not in categories:
            raise ValueError(f"{where}: 'category_id' names no category of the file")
        if ann["image_id"] in skipped:
            continue
        name = images[ann["image_id"]]
        height, width = sizes[name]
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: 'bbox' must be [x, y, width, height]") from None
        rle = None
        if ann.get("segmentation"):
            try:
                rle = segmentation_to_rle(ann["segmentation"], height, width)
            except ValueError as err:
                raise ValueError(f"{where}: 'segmentation' {err}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: 'bbox' has no area ({[x, y, w, h]})")
        objects.append((name, categories[ann["category_id"]], (x, y, x + w, y + h), rle))
    return objects, len(skipped)


def import_coco(store: AnnotationStore, path: str | Path, sizes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Add the objects of the COCO instances file ``path`` on the folder's images (``sizes``: file name ->
    (height, width)); returns counts: ``imported``, ``skipped_images`` (not in the folder, or of another size)."""
    objects, skipped = read_coco(path, sizes)
    store.add_many([(name, category, box, rle, "import") for name, category, box, rle in objects])
    return {"imported": len(objects), "skipped_images": skipped}


def detection_boxes(path: str | Path, sizes: dict[str, tuple[int, int]]) -> dict[str, list[tuple[list[float], str]]]:
    """The boxes of a COCO detection file per image of the folder: ``{file name: [(xyxy box, class name), ...]}``
    (the masks the file may carry are not used: the model decodes its own for review)."""
    out: dict[str, list[tuple[list[float], str]]] = {}
    for name, category, box, _ in read_coco(path, sizes)[0]:
        out.setdefault(name, []).append((list(box), category))
    return out
