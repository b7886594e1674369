"""The one shard schema: writing COCO-format records to webdataset tar shards, and reading samples back.

Layout of a converted data set (a folder)::

    DIR/manifest.json    {"schema_version", "name", "task": "seg"|"det", "mask_format", "num_samples",
                          "shards": [{"file": "NAME-000000.tar", "count": N}, ...], "summary": {...}}
    DIR/vocab.json       the ``Vocabulary`` (ids, raw names, isthing, synonyms)
    DIR/NAME-000000.tar  ...

One sample per image; its key is the zero-padded image id (no dots: webdataset splits names at the first dot):

    KEY.jpg           JPEG bytes, as in the source when it is a JPEG (re-encoded at quality 95 otherwise, or when
                      its EXIF orientation is applied: stored pixels are upright, see _read_image_bytes)
    KEY.panoptic.png  panoptic data: the raw COCO panoptic PNG (id = R + 256 G + 256^2 B), never decoded as an image
    KEY.json          {"image_id", "dataset", "file_name", "height", "width", "mask_format": "panoptic"|"rle"|"none",
                       "objects": [{"category_id", "label", "is_thing", "iscrowd", "bbox": [x0, y0, x1, y1],
                                    "area", "segment_id" (panoptic), "rle": {"size", "counts"} (rle, optional),
                                    "pseudo_mask": bool}], "extra": {...}}

``label`` indexes the vocabulary; ``bbox`` is xyxy in pixels of the stored image with exclusive max (see
``openseed.core.batch``); panoptic boxes and areas are recomputed from the PNG, not copied from the JSON.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openseed.core.codecs import decode_panoptic_png, decode_rle, segmentation_to_rle
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord
from openseed.data.images import exif_orientation, rgb_array, upright_size

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
PANOPTIC_KEY = "panoptic.png"
JPEG_MAGIC = b"\xff\xd8\xff"
CROWD_INDEX = 255  # crowd pixels in a Sample.segment_map


def sample_key(image_id: int) -> str:
    if image_id < 0:
        raise DataError(f"negative image id {image_id}")
    return f"{image_id:012d}"


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


def encode_panoptic(record: ImageRecord, vocab: Vocabulary, dataset: str) -> Encoded:
    """One COCO panoptic image -> one sample. Boxes and areas come from the PNG; segments absent from it are dropped."""
    image, result = _read_image_bytes(record)
    if image is None:
        return result
    png = record.panoptic_path.read_bytes()
    try:
        ids = decode_panoptic_png(png)
    except Exception as err:
        return _skip("unreadable panoptic PNG", record.panoptic_path, f"{type(err).__name__}: {err}")
    if ids.shape != (record.height, record.width):
        return _skip("panoptic PNG size differs from the image", record.panoptic_path,
                     f"{ids.shape[1]}x{ids.shape[0]} vs {record.width}x{record.height}")
    present, counts = np.unique(ids, return_counts=True)
    area_of = dict(zip(present.tolist(), counts.tolist()))
    objects, listed = [], set()
    for segment in record.objects:
        segment_id, category_id = int(segment["id"]), int(segment["category_id"])
        listed.add(segment_id)
        if segment_id not in area_of:
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
    header = _header(record, dataset, "panoptic")
    result.sample = {"__key__": sample_key(record.image_id), "jpg": image, PANOPTIC_KEY: png,
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
                 source: dict | None = None, reader_adjusted: Counter | None = None) -> ConversionSummary:
    """Encode ``records`` (in ``workers`` processes; 0 = in this process) and write them in order to shards.

    ``encode`` must be picklable when ``workers > 0`` (a module-level function or a ``functools.partial`` of one).
    ``source`` is stored in the manifest (what was converted), so that callers can tell a stale conversion.
    ``reader_skips`` (images, objects) and ``reader_adjusted`` (objects) are what the JSON reader counted
    (``ReadReport``); they are added to the summary.
    """
    from tqdm import tqdm
    from webdataset import TarWriter

    if "." in name or "/" in name:
        raise ValueError(f"data set name {name!r} must not contain dots or slashes")
    if task not in ("seg", "det"):
        raise ValueError(f"task must be 'seg' or 'det', not {task!r}")
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
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ShardSet:
    """A converted data set on disk: its manifest, vocabulary and shard paths."""

    root: Path
    name: str
    task: str
    mask_format: str
    vocabulary: Vocabulary
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {root}: convert the data set first "
                                    "(python -m data_prep.coco_panoptic_to_shards / coco_detection_to_shards)")
        try:
            manifest = json.loads(manifest_path.read_text())
            version = manifest["schema_version"]
            shards = manifest["shards"]
        except (json.JSONDecodeError, KeyError) as err:
            raise DataError(f"{manifest_path}: not a valid manifest ({err})") from err
        if version != SCHEMA_VERSION:
            raise DataError(f"{manifest_path}: shard schema {version}, this openseed reads {SCHEMA_VERSION}; "
                            "convert the data set again")
        missing = [s["file"] for s in shards if not (root / s["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} shard(s) listed in {MANIFEST} are missing, "
                                    f"e.g. {missing[0]}")
        return cls(root, manifest["name"], manifest["task"], manifest["mask_format"], Vocabulary.load(root / VOCAB),
                   tuple(str(root / s["file"]) for s in shards), tuple(int(s["count"]) for s in shards))


@dataclass
class Sample:
    """One decoded image with its targets at the image's own resolution (before batching).

    ``masks`` is bool [N, H, W] or None (boxes-only data). ``has_mask`` [N] is False for an object of an "rle" data
    set that came without a mask (its row in ``masks`` is all False). Crowd objects are not targets: their union is
    ``ignore_mask`` (bool [H, W]) when the data has masks.

    Panoptic samples may instead carry ``segment_map`` (uint8 [H, W]: 0 = no target, i + 1 = object i,
    ``CROWD_INDEX`` = crowd) with ``masks`` and ``ignore_mask`` None: geometric transforms then move one map
    instead of N masks, and ``materialised()`` builds the masks at the output size.
    """

    image: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    is_thing: torch.Tensor
    mask_is_pseudo: torch.Tensor
    has_mask: torch.Tensor
    masks: torch.Tensor | None
    ignore_mask: torch.Tensor | None
    image_id: int
    dataset: str
    key: str
    orig_size: tuple[int, int]
    boxes_from_masks: bool  # segmentation data: boxes are re-derived from the masks after geometric transforms
    segment_map: torch.Tensor | None = None
    annotation: dict | None = None  # the stored JSON, as written (original size): ground truth for evaluation
    panoptic_png: bytes | None = None  # the stored panoptic PNG (panoptic data)

    def materialised(self) -> Sample:
        """The same sample with ``masks`` / ``ignore_mask`` built from ``segment_map`` (no-op without one)."""
        if self.segment_map is None:
            return self
        indices = torch.arange(1, len(self.labels) + 1, dtype=torch.uint8)
        return replace(self, masks=self.segment_map[None] == indices[:, None, None],
                       ignore_mask=self.segment_map == CROWD_INDEX, segment_map=None)


class SkipCounter:
    """Counts (per process) and logs samples passed over while streaming.

    The log is rate-limited, so that a broken data set cannot fill the disk however long a stream re-reads it: the
    first ``first`` occurrences of a reason in each ``source`` (shard file) are logged, then only the 10th, 100th,
    1000th, ... occurrence of the reason, with the running count. ``counts`` holds every occurrence by reason;
    ``last`` the latest one in full (for error messages)."""

    def __init__(self, first: int = 3) -> None:
        self.counts: Counter = Counter()
        self.first = first
        self.last: str | None = None
        self._per_source: Counter = Counter()  # (reason, source) -> occurrences, up to first + 1

    def __call__(self, reason: str, where: str, detail: str = "", source: str | None = None) -> None:
        self.counts[reason] += 1
        count = self.counts[reason]
        described = f"{reason} ({detail})" if detail else reason
        self.last = f"{where}: {described}"
        in_source = self._per_source[reason, source]
        if in_source <= self.first:
            self._per_source[reason, source] = in_source + 1
        if in_source < self.first or _is_power_of_ten(count):
            later = "; more of these only at every power of ten" if in_source + 1 == self.first else ""
            log.warning("skipping %s: %s (%d so far in this process%s)", where, described, count, later)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


STREAM_SKIPS = SkipCounter()


def _decode_image(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert(mode))


def decode_sample(raw: dict, vocabulary: Vocabulary | None = None, dense_masks: bool = True) -> Sample | None:
    """Decode one raw webdataset sample; a sample that cannot be decoded is logged, counted and gives None.

    Only the ``jpg`` member is decoded as an image (and must be a JPEG); the panoptic PNG is read as an id map.
    With ``dense_masks=False`` a panoptic sample keeps a compact ``segment_map`` for the transforms to move.
    """
    url = raw.get("__url__")
    where = f"sample {raw.get('__key__')!r} in {url}"
    try:
        meta = json.loads(raw["json"])
        if bytes(raw["jpg"][:3]) != JPEG_MAGIC:
            raise ValueError("the jpg member is not a JPEG")
        image = torch.from_numpy(_decode_image(raw["jpg"], "RGB").copy()).permute(2, 0, 1)
    except KeyError as err:
        STREAM_SKIPS("missing member", where, str(err), url)
        return None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        STREAM_SKIPS("corrupt data", where, f"{type(err).__name__}: {str(err)[:80]}", url)
        return None
    height, width = int(meta["height"]), int(meta["width"])
    if tuple(image.shape[1:]) != (height, width):
        STREAM_SKIPS("decoded image size differs from the JSON", where,
                     f"{tuple(image.shape[1:])} vs {(height, width)}", url)
        return None
    objects = meta["objects"]
    if vocabulary is not None:
        for obj in objects:
            if obj["label"] >= len(vocabulary) or vocabulary.categories[obj["label"]].id != obj["category_id"]:
                raise DataError(f"{where}: label {obj['label']} / category {obj['category_id']} does not match the "
                                "data set's vocab.json")
    crowd = [o for o in objects if o["iscrowd"]]
    kept = [o for o in objects if not o["iscrowd"]]
    masks = ignore = segment_map = None
    if meta["mask_format"] == "panoptic":
        try:
            ids = torch.from_numpy(decode_panoptic_png(raw[PANOPTIC_KEY]).astype(np.int32))
        except Exception as err:
            STREAM_SKIPS("bad panoptic PNG", where, f"{type(err).__name__}: {str(err)[:80]}", url)
            return None
        if len(kept) < CROWD_INDEX:
            segment_map = _segment_map(ids, [o["segment_id"] for o in kept], [o["segment_id"] for o in crowd])
        else:  # too many segments for a uint8 map: dense masks straight away
            masks = ids[None] == torch.tensor([o["segment_id"] for o in kept], dtype=torch.int32)[:, None, None]
            ignore = torch.isin(ids, torch.tensor([o["segment_id"] for o in crowd], dtype=torch.int32))
    elif meta["mask_format"] == "rle":
        masks = torch.stack([decode_object_mask(o, height, width) for o in kept]) if kept else \
            torch.zeros((0, height, width), dtype=torch.bool)
        ignore = torch.zeros((height, width), dtype=torch.bool)
        for o in crowd:
            ignore |= decode_object_mask(o, height, width)
    boxes = torch.tensor([o["bbox"] for o in kept], dtype=torch.float32).reshape(-1, 4)
    sample = Sample(
        image=image,
        labels=torch.tensor([o["label"] for o in kept], dtype=torch.int64),
        boxes=boxes,
        is_thing=torch.tensor([bool(o["is_thing"]) for o in kept], dtype=torch.bool),
        mask_is_pseudo=torch.tensor([bool(o.get("pseudo_mask", False)) for o in kept], dtype=torch.bool),
        has_mask=torch.tensor([meta["mask_format"] == "panoptic" or "rle" in o for o in kept], dtype=torch.bool),
        masks=masks, ignore_mask=ignore, image_id=int(meta["image_id"]), dataset=str(meta["dataset"]),
        key=str(raw.get("__key__")), orig_size=(height, width), boxes_from_masks=meta["mask_format"] == "panoptic",
        segment_map=segment_map, annotation=meta, panoptic_png=raw.get(PANOPTIC_KEY))
    return sample if not dense_masks else sample.materialised()


def _segment_map(ids: torch.Tensor, targets: list[int], crowd: list[int]) -> torch.Tensor:
    """Panoptic id map -> uint8 map (0 none, i + 1 = targets[i], CROWD_INDEX = crowd) in one sorted look-up."""
    segment_ids = torch.tensor(targets + crowd, dtype=torch.int32)
    values = torch.tensor(list(range(1, len(targets) + 1)) + [CROWD_INDEX] * len(crowd), dtype=torch.uint8)
    if len(segment_ids) == 0:
        return torch.zeros(ids.shape, dtype=torch.uint8)
    order = torch.argsort(segment_ids)
    segment_ids, values = segment_ids[order], values[order]
    position = torch.searchsorted(segment_ids, ids).clamp_(max=len(segment_ids) - 1)
    return torch.where(segment_ids[position] == ids, values[position], torch.zeros((), dtype=torch.uint8))


def decode_object_mask(obj: dict, height: int, width: int) -> torch.Tensor:
    """A stored object's mask (its ``rle``) as bool [height, width]; all False when it has none."""
    if "rle" not in obj:
        return torch.zeros((height, width), dtype=torch.bool)
    return decode_rle(obj["rle"])


def iter_raw_samples(urls: Iterable[str], on_error: Callable[[Exception], bool] | None = None) -> Iterator[dict]:
    """Raw samples (dicts of bytes) from tar shards, in order. A broken shard is logged and counted, then skipped."""
    from webdataset.tariterators import tarfile_samples

    def handler(err: Exception) -> bool:  # webdataset appends the shard's url to the exception's args
        args = getattr(err, "args", ())
        url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else None
        detail = str(args[0] if url is not None else err)[:160]
        STREAM_SKIPS("unreadable shard data", f"shard {url}" if url else "shard", f"{type(err).__name__}: {detail}",
                     url)
        return True

    return tarfile_samples(({"url": url} for url in urls), handler=on_error or handler)


def read_shards(root: str | Path) -> Iterator[Sample]:
    """All samples of a converted data set, decoded, in shard order (for tests, tools and inspection)."""
    shard_set = ShardSet.open(root)
    decode = partial(decode_sample, vocabulary=shard_set.vocabulary)
    for raw in iter_raw_samples(shard_set.urls):
        sample = decode(raw)
        if sample is not None:
            yield sample
