"""Reading a data set's own folder tree: the pieces several converters share (BDD100K, SUN RGB-D, ScanNet,
Cityscapes): a required folder, an image's size from its header, an image paired with its label file, a
single-channel label PNG as category ids, images and labels paired by file name."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.shard_writer import Unreadable
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


def read_label_png(record: ImageRecord, void: tuple[int, ...] = (), offset: int = 0,
                   modes: tuple[str, ...] = ("L", "P")) -> tuple[np.ndarray, Path]:
    """A single-channel label PNG (``record.panoptic_path``) -> category ids per pixel: the stored value minus
    ``offset``, ``VOID`` where the stored value is one of ``void``. Values outside the vocabulary reach
    ``encode_semantic``, which stops with an error naming the file."""
    source = record.panoptic_path
    try:
        with Image.open(source) as image:
            mode = image.mode
            values = np.asarray(image).astype(np.int64) if mode in modes else None
    except Exception as err:
        raise Unreadable("unreadable label PNG", source, f"{type(err).__name__}: {err}") from None
    if values is None:
        raise Unreadable("label PNG of the wrong kind", source, f"mode {mode}, expected one of {list(modes)}")
    ids = values - offset
    ids[np.isin(values, void)] = VOID
    return ids, source


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
