"""Writing COCO-format records to webdataset tar shards in the schema of ``openseed.data.shards`` (which reads
them): image bytes as JPEG (EXIF orientation handled), objects with their boxes and masks, a manifest with what was
written and skipped. Used by the converters of ``data_prep``.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openseed.core.codecs import decode_panoptic_png, encode_label_png, encode_panoptic_png, segmentation_to_rle
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord
from openseed.data.images import exif_orientation, rgb_array, upright_size
from openseed.data.shards import (
    JPEG_MAGIC,
    MANIFEST,
    PANOPTIC_KEY,
    PROTOCOLS,
    SCHEMA_VERSION,
    SEMANTIC_KEY,
    TASKS,
    VOCAB,
    VOID,
    check_category_frequency,
    sample_key,
    semantic_ignore_label,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """What a converter worker returns for one record: the sample to write (or None) and what it dropped."""

    sample: dict | None
    skip_reason: str | None = None  # short, used to count skips ("unreadable image")
    skip_detail: str | None = None  # the file and what exactly is wrong, logged
    skipped_objects: Counter = field(default_factory=Counter)
    reencoded: bool = False  # not a JPEG at the source: re-encoded
    exif: str | None = None  # "applied" (stored upright, re-encoded) or "ignored" (see _read_image_bytes)
    notes: list[str] = field(default_factory=list)  # warnings to log, each naming the file
    num_objects: int = 0


def _read_image_bytes(record: ImageRecord) -> tuple[bytes | None, Encoded]:
    """JPEG bytes of the record's image, and an ``Encoded`` carrying either the skip (when the bytes are None) or
    what was done to the image (re-encoded, EXIF orientation applied or ignored).

    The image is decoded once in full, so a truncated or corrupt file is reported here, with its path, rather
    than while training. A JPEG is stored untouched unless its EXIF orientation must be applied; other formats are
    re-encoded (quality 95) from ``openseed.data.images.rgb_array`` (16-bit data scaled, not clipped).

    EXIF orientation (2-8): when the upright picture has the JSON's size, the upright pixels are stored (re-encoded
    at quality 95, without EXIF), as the reference reader applies it; when only the stored pixels have the JSON's
    size (annotations made on the stored pixels), the stored pixels are kept and a warning names the file. Both
    are counted in the conversion summary. 180-degree turns and flips fit both sizes: they are applied.
    """
    data = record.image_path.read_bytes()
    jpeg, result = data, Encoded(None)
    json_size = (record.width, record.height)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            stored_size = tuple(image.size)
            orientation = exif_orientation(image)
            upright = upright_size(stored_size, orientation)
            apply = orientation != 1 and upright == json_size
            if orientation != 1 and not apply and stored_size == json_size:
                result.exif = "ignored"
                result.notes.append(f"{record.image_path}: EXIF orientation {orientation} ignored: the JSON size "
                                    f"{json_size[0]}x{json_size[1]} matches the stored pixels, not the upright picture")
            size = upright if apply else stored_size
            if apply or data[:3] != JPEG_MAGIC:
                buffer = io.BytesIO()
                Image.fromarray(rgb_array(image, orient=apply)).save(buffer, format="JPEG", quality=95)
                jpeg = buffer.getvalue()
                result.exif = "applied" if apply else result.exif
                result.reencoded = data[:3] != JPEG_MAGIC
    except Exception as err:  # PIL raises many types for broken files
        return None, _skip("unreadable image", record.image_path, f"{type(err).__name__}: {err}")
    if size != json_size:
        turned = f" (EXIF orientation {orientation}: upright {upright[0]}x{upright[1]})" if orientation != 1 else ""
        return None, _skip("image size differs from the JSON", record.image_path,
                           f"{stored_size[0]}x{stored_size[1]}{turned} vs {record.width}x{record.height}")
    return jpeg, result


def _skip(reason: str, path: Path, detail: str) -> Encoded:
    return Encoded(None, skip_reason=reason, skip_detail=f"{path}: {reason} ({detail})")


def _header(record: ImageRecord, dataset: str, mask_format: str) -> dict:
    return {"image_id": record.image_id, "dataset": dataset, "file_name": record.image_path.name,
            "height": record.height, "width": record.width, "mask_format": mask_format, "extra": record.extra}


class Unreadable(Exception):
    """Raised by a ground-truth reader (``read`` of ``encode_panoptic`` / ``encode_semantic``) for a file it cannot
    use: the image is counted under ``reason`` and skipped, and the log names ``path`` with ``detail``."""

    def __init__(self, reason: str, path: Path, detail: str):
        super().__init__(f"{path}: {reason} ({detail})")
        self.reason, self.path, self.detail = reason, Path(path), detail


@dataclass(frozen=True)
class IdMap:
    """One image's ground truth in panoptic form, as a converter reads it from its data set's own files.

    ``ids``: int [H, W], a segment id per pixel (0 = unlabelled: void, never a target). ``segments``: one dict per
    segment, ``{"id", "category_id", "iscrowd" (optional, 0)}``. ``png``: the COCO panoptic PNG bytes when the source
    is one (stored untouched), else None (encoded from ``ids``). ``source``: the file the map came from (errors name
    it).
    """

    ids: np.ndarray
    segments: list[dict]
    source: Path
    png: bytes | None = None


def read_coco_panoptic(record: ImageRecord) -> IdMap:
    """The ``IdMap`` of a COCO panoptic record: its PNG (``record.panoptic_path``) and its ``segments_info``."""
    png = record.panoptic_path.read_bytes()
    try:
        ids = decode_panoptic_png(png)
    except Exception as err:
        raise Unreadable("unreadable panoptic PNG", record.panoptic_path, f"{type(err).__name__}: {err}") from None
    return IdMap(ids, record.objects, record.panoptic_path, png)


def encode_panoptic(record: ImageRecord, vocab: Vocabulary, dataset: str,
                    read: Callable[[ImageRecord], IdMap] = read_coco_panoptic) -> Encoded:
    """One panoptic image -> one sample. ``read`` gives its id map and segments (default: a COCO panoptic PNG and
    JSON; the other converters read their data set's own files). Boxes and areas come from the map; segments absent
    from it are dropped and counted; an id in the map without a segment is void (as the official evaluator reads it).
    """
    image, result = _read_image_bytes(record)
    if image is None:
        return result
    try:
        truth = read(record)
    except Unreadable as err:
        return _skip(err.reason, err.path, err.detail)
    ids = np.asarray(truth.ids)
    if ids.shape != (record.height, record.width):
        return _skip("panoptic map size differs from the image", truth.source,
                     f"{ids.shape[1]}x{ids.shape[0]} vs {record.width}x{record.height}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 1 << 24):
        raise DataError(f"{truth.source}: segment ids must lie in [0, 2^24) to be stored as a panoptic PNG")
    present, counts = np.unique(ids, return_counts=True)
    area_of = dict(zip(present.tolist(), counts.tolist()))
    objects, listed = [], set()
    for segment in truth.segments:
        segment_id, category_id = int(segment["id"]), int(segment["category_id"])
        if segment_id in listed:
            raise DataError(f"{truth.source}: segment id {segment_id} listed twice")
        listed.add(segment_id)
        if segment_id not in area_of or segment_id == 0:
            result.skipped_objects["segment absent from PNG"] += 1
            continue
        ys, xs = np.nonzero(ids == segment_id)
        label = vocab.index_of_id(category_id)
        objects.append({"category_id": category_id, "label": label, "is_thing": vocab.categories[label].is_thing,
                        "iscrowd": int(segment.get("iscrowd", 0)), "segment_id": segment_id,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                        "area": int(area_of[segment_id]), "pseudo_mask": False})
    unlisted = set(area_of) - listed - {0}
    if unlisted:  # the official evaluator treats such pixels as void too
        result.skipped_objects["PNG id without segment (void)"] += len(unlisted)
    png = truth.png if truth.png is not None else encode_panoptic_png(ids)
    header = _header(record, dataset, "panoptic")
    result.sample = {"__key__": sample_key(record.image_id), "jpg": image, PANOPTIC_KEY: png,
                     "json": json.dumps({**header, "objects": objects}).encode()}
    result.num_objects = len(objects)
    return result


def encode_semantic(record: ImageRecord, vocab: Vocabulary, dataset: str,
                    read: Callable[[ImageRecord], tuple[np.ndarray, Path]]) -> Encoded:
    """One semantic-segmentation image -> one sample. ``read`` gives the data set's category id per pixel (int
    [H, W]; ``VOID`` = -1 where unlabelled or ignored) and the file it came from.

    Stored as ``KEY.semantic.png``: the vocabulary index per pixel, 8-bit when the vocabulary has fewer than 255
    classes, else 16-bit, with ``ignore_label`` (255 or 65535, in the sample's JSON) where the source is void. The
    JSON lists one object per class present (``segment_id`` = its label, its tight box and pixel area), so that the
    sample reads back like a panoptic one whose segments are whole classes. An id that is not in the vocabulary is an
    error naming the file.
    """
    image, result = _read_image_bytes(record)
    if image is None:
        return result
    try:
        ids, source = read(record)
    except Unreadable as err:
        return _skip(err.reason, err.path, err.detail)
    ids = np.asarray(ids)
    if ids.shape != (record.height, record.width):
        return _skip("label map size differs from the image", source,
                     f"{ids.shape[1]}x{ids.shape[0]} vs {record.width}x{record.height}")
    ignore = semantic_ignore_label(len(vocab))
    labels = np.full(ids.shape, ignore, dtype=np.uint8 if ignore == 255 else np.uint16)
    objects = []
    present, counts = np.unique(ids, return_counts=True)
    for category_id, area in zip(present.tolist(), counts.tolist()):
        if category_id == VOID:
            continue
        if category_id not in vocab:
            raise DataError(f"{source}: category id {category_id} is not in the data set's vocabulary")
        label = vocab.index_of_id(category_id)
        where = ids == category_id
        labels[where] = label
        ys, xs = np.nonzero(where)
        objects.append({"category_id": category_id, "label": label, "is_thing": vocab.categories[label].is_thing,
                        "iscrowd": 0, "segment_id": label,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                        "area": int(area), "pseudo_mask": False})
    header = {**_header(record, dataset, "semantic"), "ignore_label": ignore}
    result.sample = {"__key__": sample_key(record.image_id), "jpg": image, SEMANTIC_KEY: encode_label_png(labels),
                     "json": json.dumps({**header, "objects": objects}).encode()}
    result.num_objects = len(objects)
    return result


def encode_detection(record: ImageRecord, vocab: Vocabulary, dataset: str, mask_format: str = "rle") -> Encoded:
    """One COCO detection image -> one sample. With ``mask_format="rle"`` polygon and RLE masks are kept as
    compressed RLE (objects without one get ``has_mask`` False when read); with "none" only boxes are kept."""
    if mask_format not in ("rle", "none"):
        raise ValueError(f"mask_format must be 'rle' or 'none', not {mask_format!r}")
    image, result = _read_image_bytes(record)
    if image is None:
        return result
    objects = []
    for ann in record.objects:
        x, y, w, h = (float(v) for v in ann["bbox"])
        label = vocab.index_of_id(int(ann["category_id"]))
        entry = {"category_id": int(ann["category_id"]), "label": label, "is_thing": vocab.categories[label].is_thing,
                 "iscrowd": int(ann.get("iscrowd", 0)), "bbox": [x, y, x + w, y + h],
                 "area": float(ann.get("area", w * h)), "pseudo_mask": bool(ann.get("pseudo_mask", False))}
        if mask_format == "rle":
            try:
                rle = segmentation_to_rle(ann["segmentation"], record.height, record.width) \
                    if ann.get("segmentation") else None
            except Exception as err:
                raise DataError(f"annotation {ann.get('id')!r} of image {record.image_id}: bad segmentation "
                                f"({type(err).__name__}: {err})") from err
            if rle is not None:
                entry["rle"] = rle
        objects.append(entry)
    header = _header(record, dataset, mask_format)
    result.sample = {"__key__": sample_key(record.image_id), "jpg": image,
                     "json": json.dumps({**header, "objects": objects}).encode()}
    result.num_objects = len(objects)
    return result


# ---------------------------------------------------------------------------------------------------- writing
@dataclass
class ConversionSummary:
    """What a conversion wrote and passed over."""

    name: str
    written: int = 0
    shards: list[dict] = field(default_factory=list)
    skipped_images: Counter = field(default_factory=Counter)
    skipped_objects: Counter = field(default_factory=Counter)
    adjusted_objects: Counter = field(default_factory=Counter)  # kept, but changed (e.g. "box clipped to image")
    reencoded_images: int = 0
    exif_applied: int = 0  # stored upright (EXIF orientation applied, re-encoded)
    exif_ignored: int = 0  # EXIF orientation ignored: the JSON size matches the stored pixels
    objects: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "written": self.written, "shards": len(self.shards), "objects": self.objects,
                "skipped_images": dict(self.skipped_images), "skipped_objects": dict(self.skipped_objects),
                "adjusted_objects": dict(self.adjusted_objects), "reencoded_images": self.reencoded_images,
                "exif_applied": self.exif_applied, "exif_ignored": self.exif_ignored,
                "seconds": round(self.seconds, 3),
                "images_per_second": round(self.written / max(self.seconds, 1e-9), 1)}

    def report(self) -> str:
        d = self.as_dict()
        lines = [(f"{self.name}: wrote {d['written']} images ({d['objects']} objects) in {d['shards']} shards, "
                  f"{d['seconds']} s, {d['images_per_second']} images/s")]
        for kind in ("skipped_images", "skipped_objects", "adjusted_objects"):
            for reason, count in sorted(d[kind].items()):
                lines.append(f"  {kind.replace('_', ' ')}: {count} ({reason})")
        if self.reencoded_images:
            lines.append(f"  re-encoded to JPEG: {self.reencoded_images}")
        if self.exif_applied:
            lines.append(f"  EXIF orientation applied (stored upright, re-encoded): {self.exif_applied}")
        if self.exif_ignored:
            lines.append(f"  EXIF orientation ignored (the JSON size matches the stored pixels): {self.exif_ignored}")
        return "\n".join(lines)


def write_shards(records: list[ImageRecord], encode: Callable[[ImageRecord], Encoded], out_dir: str | Path,
                 name: str, task: str, mask_format: str, vocab: Vocabulary, maxcount: int = 1000, workers: int = 0,
                 progress: bool = True, reader_skips: tuple[Counter, Counter] | None = None,
                 source: dict | None = None, reader_adjusted: Counter | None = None,
                 category_frequency: dict[int, str] | None = None, protocol: str | None = None) -> ConversionSummary:
    """Encode ``records`` (in ``workers`` processes; 0 = in this process) and write them in order to shards.

    ``encode`` must be picklable when ``workers > 0`` (a module-level function or a ``functools.partial`` of one).
    ``source`` is stored in the manifest (what was converted), so that callers can tell a stale conversion.
    ``reader_skips`` (images, objects) and ``reader_adjusted`` (objects) are what the JSON reader counted
    (``ReadReport``); they are added to the summary. ``category_frequency`` (category id -> "r" / "c" / "f", every
    category of ``vocab``) marks a data set that is scored with LVIS's federated protocol; it goes into the manifest.
    """
    from tqdm import tqdm
    from webdataset import TarWriter

    if "." in name or "/" in name:
        raise ValueError(f"data set name {name!r} must not contain dots or slashes")
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, not {task!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{name}-*.tar"):
        stale.unlink()
    summary = ConversionSummary(name)
    if reader_skips:
        summary.skipped_images.update(reader_skips[0])
        summary.skipped_objects.update(reader_skips[1])
    if reader_adjusted:
        summary.adjusted_objects.update(reader_adjusted)
    start = time.perf_counter()
    writer, shard_index, keys = None, 0, set()

    def results() -> Iterator[Encoded]:
        if workers > 0:
            with mp.get_context("spawn" if torch.cuda.is_initialized() else "fork").Pool(workers) as pool:
                yield from pool.imap(encode, records, chunksize=8)
        else:
            yield from map(encode, records)

    try:
        for result in tqdm(results(), total=len(records), desc=f"{name} -> shards", disable=not progress,
                           unit="img"):
            summary.skipped_objects.update(result.skipped_objects)
            for note in result.notes:
                log.warning("%s", note)
            if result.sample is None:
                summary.skipped_images[result.skip_reason] += 1
                log.warning("skipping image: %s", result.skip_detail)
                continue
            key = result.sample["__key__"]
            if key in keys:
                raise DataError(f"{name}: duplicate image id {int(key)}")
            keys.add(key)
            if writer is None or summary.shards[-1]["count"] >= maxcount:
                if writer is not None:
                    writer.close()
                file_name = f"{name}-{shard_index:06d}.tar"
                writer = TarWriter(str(out_dir / file_name))
                summary.shards.append({"file": file_name, "count": 0})
                shard_index += 1
            writer.write(result.sample)
            summary.shards[-1]["count"] += 1
            summary.written += 1
            summary.reencoded_images += int(result.reencoded)
            summary.exif_applied += int(result.exif == "applied")
            summary.exif_ignored += int(result.exif == "ignored")
            summary.objects += result.num_objects
    finally:
        if writer is not None:
            writer.close()
    summary.seconds = time.perf_counter() - start
    if summary.written == 0:
        raise DataError(f"{name}: no image could be converted ({dict(summary.skipped_images)})")
    vocab.save(out_dir / VOCAB)
    manifest = {"schema_version": SCHEMA_VERSION, "name": name, "task": task, "mask_format": mask_format,
                "num_samples": summary.written, "shards": summary.shards, "summary": summary.as_dict(),
                "source": source or {}}
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
        manifest["protocol"] = protocol
    if category_frequency is not None:  # an LVIS-style federated data set (ShardSet.category_frequency)
        manifest["category_frequency"] = {str(k): v for k, v in check_category_frequency(category_frequency, vocab,
                                                                                          name).items()}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return summary
