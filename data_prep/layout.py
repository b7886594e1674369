"""Reading a data set's own folder tree: the pieces several converters share (ADE20K, BDD100K, Cityscapes, SUN RGB-D,
ScanNet): a required folder, an image's size from its header, an image paired with its label file, a label image as
an array, a single-channel label PNG as category ids, images and labels paired by file name, and an instance map
turned into a detection sample."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.shard_writer import Encoded, Unreadable, encode_detection
from openseed.core.codecs import encode_rle
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord
from openseed.data.shards import VOID


def require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    return folder


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header; (0, 0) when it cannot be read (the encoder then counts the image as
    unreadable, naming it)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return height, width
    except Exception:  # PIL raises many types for broken files
        return 0, 0


def label_record(image_id: int, image: Path, label: Path) -> ImageRecord:
    """An image and its ground-truth file (kept in ``panoptic_path``: the file the reader opens)."""
    height, width = image_size(image)
    return ImageRecord(image_id, image, height, width, [], panoptic_path=label)


def read_array(path: Path, what: str, modes: tuple[str, ...]) -> np.ndarray:
    """A label image (``what``: "label PNG", "instanceIds PNG", ...) as an int64 array; ``Unreadable`` ("missing
    <what>", "unreadable <what>", "<what> of the wrong kind") for a missing or broken file or a mode not in
    ``modes``."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in modes:
                raise Unreadable(f"{what} of the wrong kind", path, f"mode {image.mode}, expected one of "
                                                                    f"{', '.join(modes)}")
            return np.asarray(image).astype(np.int64)
    except Unreadable:
        raise
    except FileNotFoundError:
        raise Unreadable(f"missing {what}", path, "not found") from None
    except Exception as err:  # PIL raises many types for broken files
        raise Unreadable(f"unreadable {what}", path, f"{type(err).__name__}: {err}") from None


def read_label_png(record: ImageRecord, void: tuple[int, ...] = (), offset: int = 0,
                   modes: tuple[str, ...] = ("L", "P")) -> tuple[np.ndarray, Path]:
    """A single-channel label PNG (``record.panoptic_path``) -> category ids per pixel: the stored value minus
    ``offset``, ``VOID`` where the stored value is one of ``void``. Values outside the vocabulary reach
    ``encode_semantic``, which stops with an error naming the file."""
    source = record.panoptic_path
    values = read_array(source, "label PNG", modes)
    ids = values - offset
    ids[np.isin(values, void)] = VOID
    return ids, source


def panoptic_annotations(data: dict, json_path: Path, vocab: Vocabulary, key: Callable[[dict], str],
                         categories: str = "the vocabulary") -> dict[str, dict]:
    """A COCO panoptic JSON's ``annotations`` by ``key(annotation)`` (an image id, a file stem):
    ``{"file_name": PNG name, "segments": segments_info}``. An annotation without ``file_name`` / ``segments_info``,
    two annotations under one key, or a segment without an id or with a category outside ``vocab`` (``categories``
    names what it should be in) is a ``DataError`` naming ``json_path``."""
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{json_path}: no 'annotations' list; is this a COCO panoptic JSON?")
    out: dict[str, dict] = {}
    for ann in data["annotations"]:
        try:
            name, segments, where = str(ann["file_name"]), list(ann["segments_info"]), key(ann)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{json_path}: annotation {ann!r:.120} lacks a valid {err}") from None
        if where in out:
            raise DataError(f"{json_path}: two annotations for image {where!r}")
        for segment in segments:
            try:
                known = "id" in segment and int(segment.get("category_id", -1)) in vocab
            except (TypeError, ValueError):
                known = False
            if not known:
                raise DataError(f"{json_path}: segment {segment!r:.120} of {name!r} has no id or a category id "
                                f"outside {categories}")
        out[where] = {"file_name": name, "segments": segments}
    return out


#: One instance of an instance map: (its id in the map, category id, iscrowd, bool mask [H, W]).
Instance = tuple[int, int, int, np.ndarray]


def encode_instance_map(record: ImageRecord, vocab: Vocabulary, dataset: str, path: Path,
                        read: Callable[[], tuple[tuple[int, int], list[Instance], dict]]) -> Encoded:
    """A detection sample (RLE masks) from an instance map: ``read()`` gives the map's (height, width), its
    instances and what to add to the sample's ``extra``, or raises ``Unreadable`` (a counted skip naming ``path``, as
    is a map whose size differs from the image's). Each instance becomes one object with its tight box, pixel area
    and RLE mask."""
    try:
        shape, instances, extra = read()
    except Unreadable as err:
        return Encoded(None, skip_reason=err.reason, skip_detail=str(err))
    if record.width and tuple(shape) != (record.height, record.width):  # width 0: unreadable image, counted later
        return Encoded(None, skip_reason="instance map size differs from the image",
                       skip_detail=f"{path}: {shape[1]}x{shape[0]} vs {record.width}x{record.height}")
    objects = []
    for instance_id, category_id, iscrowd, mask in instances:
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({"id": instance_id, "category_id": category_id, "iscrowd": iscrowd,
                        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                        "area": int(mask.sum()), "segmentation": encode_rle(mask[None])[0]})
    return encode_detection(replace(record, objects=objects, extra={**record.extra, **extra}), vocab, dataset, "rle")


def pair_by_name(image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str,
                 skip_missing: bool) -> tuple[list[tuple[Path, Path]], Counter]:
    """(image, label) pairs by file stem, in sorted label order. A label whose image is missing is an error (or,
    with ``skip_missing``, a counted skip); images without a label are counted."""
    labels = sorted(label_dir.glob(f"*{label_suffix}"))
    if not labels:
        raise DataError(f"no {label_suffix} files in {label_dir}")
    images = {p.name[: -len(image_suffix)]: p for p in image_dir.glob(f"*{image_suffix}")}
    pairs, skipped = [], Counter()
    for label in labels:
        stem = label.name[: -len(label_suffix)]
        image = images.pop(stem, None)
        if image is None:
            if not skip_missing:
                raise FileNotFoundError(f"image file not found for {label}: {image_dir / (stem + image_suffix)}")
            skipped["missing image file"] += 1
            continue
        pairs.append((image, label))
    if images:
        skipped["image without a label file"] += len(images)
    return pairs, skipped
