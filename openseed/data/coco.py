"""Reading COCO-format annotation files (panoptic and detection) into per-image records.

Used by the shard converters in ``data_prep`` and by tests. Every problem names the file it comes from: a malformed
JSON, an annotation with an unknown category id, an image that cannot be found.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from openseed.core.vocabulary import Vocabulary

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file and what is wrong."""


@dataclass
class ImageRecord:
    """One image and its raw COCO annotations.

    Attributes:
        image_id: the JSON's image id (0 allowed).
        image_path: the resolved image file.
        height, width: as the JSON says.
        objects: COCO ``annotations`` (detection) or ``segments_info`` entries (panoptic) of this image.
        panoptic_path: the PNG id map (panoptic only).
        extra: per-image fields worth keeping (LVIS ``neg_category_ids`` / ``not_exhaustive_category_ids``).
    """

    image_id: int
    image_path: Path
    height: int
    width: int
    objects: list[dict]
    panoptic_path: Path | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ReadReport:
    """What a reader passed over, counted by reason (each also logged)."""

    skipped_images: Counter = field(default_factory=Counter)
    skipped_objects: Counter = field(default_factory=Counter)
    adjusted_objects: Counter = field(default_factory=Counter)  # kept, but changed (e.g. "box clipped to image")

    def skip_image(self, reason: str, detail: str) -> None:
        self.skipped_images[reason] += 1
        log.warning("skipping image: %s (%s)", detail, reason)

    def skip_object(self, reason: str, detail: str) -> None:
        self.skipped_objects[reason] += 1
        log.debug("skipping annotation: %s (%s)", detail, reason)

    def adjust_object(self, reason: str, detail: str) -> None:
        self.adjusted_objects[reason] += 1
        log.debug("adjusting annotation: %s (%s)", detail, reason)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}")
    return data


def _require(data: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(f"{path}: missing top-level key(s) {missing}; is this a COCO file of the right kind?")


def resolve_image(image_dir: Path, file_name: str) -> Path | None:
    """Find ``file_name`` under ``image_dir``: the path as written, else with leading folders dropped one by one.

    Objects365 v2 writes ``images/v2/patch16/x.jpg`` while the downloaded tree is ``train/patch16/x.jpg``; COCO writes
    bare names; labelme exports write ``JPEGImages/x.jpg`` relative to the JSON.
    """
    parts = Path(file_name).parts
    for start in range(len(parts)):
        candidate = image_dir.joinpath(*parts[start:])
        if candidate.is_file():
            return candidate
    return None


def _image_file_name(image: dict) -> str:
    if image.get("file_name"):
        return str(image["file_name"])
    if image.get("coco_url"):  # LVIS v1 gives only the COCO url: <split folder>/<file>, e.g. val2017/000000000139.jpg
        return "/".join(str(image["coco_url"]).rstrip("/").split("/")[-2:])
    raise KeyError("file_name")


def _load_coco(json_path: Path, data: dict | None = None) -> tuple[dict, Vocabulary, dict[int, dict]]:
    """The JSON (``data`` when the caller has read it already), its vocabulary and its images by id, with the checks
    both kinds of file share."""
    data = load_json(json_path) if data is None else data
    _require(data, ("images", "annotations", "categories"), json_path)
    try:
        vocab = Vocabulary.from_coco_categories(data["categories"], default_is_thing=True)
    except ValueError as err:
        raise DataError(f"{json_path}: bad categories ({err})") from err
    return data, vocab, _index_images(data, json_path)


def _index_images(data: dict, path: Path) -> dict[int, dict]:
    """Images by id; a repeated id is an error (a dict would keep one entry and pin both images' data on it)."""
    images = {}
    for image in data["images"]:
        try:
            image_id = int(image["id"])
            name = _image_file_name(image)
            int(image["height"]), int(image["width"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: image entry {image!r:.200} lacks a valid {err}") from err
        if image_id in images:
            first = _image_file_name(images[image_id])
            raise DataError(f"{path}: duplicate image id {image_id} in 'images' ({first!r} and {name!r}); "
                            "image ids must be unique")
        images[image_id] = image
    return images


def _locate(image: dict, image_dir: Path, json_path: Path, skip_missing: bool, report: ReadReport) -> Path | None:
    name = _image_file_name(image)
    found = resolve_image(image_dir, name)
    if found is None:
        message = f"{json_path}: image {name!r} (id {image['id']}) not found under {image_dir}"
        if not skip_missing:
            raise DataError(message + " (skip_missing=true counts and skips such images)")
        report.skip_image("missing image file", message)
    return found


def load_coco_detection(json_path: str | Path, image_dir: str | Path, skip_missing: bool = False,
                        drop_empty: bool = False, data: dict | None = None
                        ) -> tuple[Vocabulary, list[ImageRecord], ReadReport]:
    """Read a COCO detection/instances JSON (COCO, LVIS, Objects365 v1/v2, labelme exports).

    Crowd annotations are kept (flagged). Boxes with NaN/inf coordinates, degenerate boxes (w or h <= 0) and boxes
    entirely outside the image (the JSON's width x height) are dropped and counted (skipped objects); boxes partly
    outside are clipped to the image and counted (adjusted objects, "box clipped to image"). Images without
    annotations are kept unless ``drop_empty`` (evaluation needs them: they hold false positives). ``data``: the
    file's content when the caller has read (and adapted) it already; errors still name ``json_path``.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    data, vocab, images = _load_coco(json_path, data)
    report = ReadReport()
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for ann in data["annotations"]:
        try:
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{json_path}: annotation {ann.get('id')!r} lacks a valid {err}") from err
        if category_id not in vocab:
            raise DataError(f"{json_path}: annotation {ann.get('id')!r} has unknown category id {category_id}")
        if image_id not in per_image:
            raise DataError(f"{json_path}: annotation {ann.get('id')!r} refers to unknown image id {image_id}")
        where = f"{json_path}: annotation {ann.get('id')!r} bbox {ann['bbox']}"
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            report.skip_object("non-finite box", where)
            continue
        if w <= 0 or h <= 0:
            report.skip_object("degenerate box", where)
            continue
        width, height = int(images[image_id]["width"]), int(images[image_id]["height"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            report.skip_object("box outside the image", f"{where} vs image {width}x{height}")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            report.adjust_object("box clipped to image", f"{where} vs image {width}x{height}")
            ann = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0]}
        per_image[image_id].append(ann)
    records = []
    for image_id, image in images.items():
        objects = per_image[image_id]
        if drop_empty and not objects:
            report.skip_image("no annotations", f"{json_path}: image id {image_id}")
            continue
        path = _locate(image, image_dir, json_path, skip_missing, report)
        if path is None:
            continue
        extra = {k: image[k] for k in ("neg_category_ids", "not_exhaustive_category_ids") if k in image}
        records.append(ImageRecord(image_id, path, int(image["height"]), int(image["width"]), objects, extra=extra))
    return vocab, records, report


def load_coco_panoptic(json_path: str | Path, png_dir: str | Path, image_dir: str | Path,
                       skip_missing: bool = False) -> tuple[Vocabulary, list[ImageRecord], ReadReport]:
    """Read a COCO panoptic JSON with its PNG folder and image folder.

    Two ``annotations`` entries for one image id are an error; an image listed in ``images`` without an entry in
    ``annotations`` is counted and skipped ("no panoptic annotation").
    """
    json_path, png_dir, image_dir = Path(json_path), Path(png_dir), Path(image_dir)
    data, vocab, images = _load_coco(json_path)
    if not all("isthing" in c for c in data["categories"]):
        raise DataError(f"{json_path}: panoptic categories need an 'isthing' flag")
    report = ReadReport()
    records, png_of = [], {}
    for ann in data["annotations"]:
        try:
            image_id, png_name, segments = int(ann["image_id"]), str(ann["file_name"]), list(ann["segments_info"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{json_path}: panoptic annotation {ann!r:.120} lacks a valid {err}") from err
        if image_id not in images:
            raise DataError(f"{json_path}: annotation {png_name!r} refers to unknown image id {image_id}")
        if image_id in png_of:
            raise DataError(f"{json_path}: two panoptic annotations for image id {image_id} ({png_of[image_id]!r} and "
                            f"{png_name!r}); each image needs exactly one")
        png_of[image_id] = png_name
        for segment in segments:
            if int(segment.get("category_id", -1)) not in vocab:
                raise DataError(f"{json_path}: segment {segment.get('id')!r} of {png_name!r} has unknown category id "
                                f"{segment.get('category_id')!r}")
            if "id" not in segment:
                raise DataError(f"{json_path}: a segment of {png_name!r} has no id")
        png_path = png_dir / png_name
        if not png_path.is_file():
            message = f"{json_path}: panoptic PNG {png_name!r} not found in {png_dir}"
            if not skip_missing:
                raise DataError(message + " (skip_missing=true counts and skips such images)")
            report.skip_image("missing panoptic PNG", message)
            continue
        image = images[image_id]
        path = _locate(image, image_dir, json_path, skip_missing, report)
        if path is None:
            continue
        records.append(ImageRecord(image_id, path, int(image["height"]), int(image["width"]), segments,
                                   panoptic_path=png_path))
    for image_id, image in images.items():
        if image_id not in png_of:  # listed, but nothing says what is in it: cannot be a panoptic sample
            report.skip_image("no panoptic annotation", f"{json_path}: image {_image_file_name(image)!r} "
                                                        f"(id {image_id}) has no entry in 'annotations'")
    return vocab, records, report
