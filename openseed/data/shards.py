"""The one shard schema, and reading samples back (``data_prep.shard_writer`` writes them).

Layout of a converted data set (a folder)::

    DIR/manifest.json    {"schema_version", "name", "task": "seg"|"det"|"sem", "mask_format", "num_samples",
                          "shards": [{"file": "NAME-000000.tar", "count": N}, ...], "summary": {...},
                          "category_frequency": {"<id>": "r"|"c"|"f", ...} (LVIS-style federated sets only),
                          "protocol": "cityscapes_instances" (a data set's own metric beside the standard ones)}
    DIR/vocab.json       the ``Vocabulary`` (ids, raw names, isthing, synonyms)
    DIR/NAME-000000.tar  ...

One sample per image; its key is the zero-padded image id (no dots: webdataset splits names at the first dot):

    KEY.jpg           JPEG bytes, as in the source when it is a JPEG (re-encoded at quality 95 otherwise, or when
                      its EXIF orientation is applied: stored pixels are upright; data_prep.shard_writer)
    KEY.panoptic.png  panoptic data: the raw COCO panoptic PNG (id = R + 256 G + 256^2 B), never decoded as an image
    KEY.semantic.png  semantic data ("sem"): the vocabulary index per pixel, 8-bit (16-bit for 255 classes or more),
                      ``ignore_label`` where void
    KEY.json          {"image_id", "dataset", "file_name", "height", "width",
                       "mask_format": "panoptic"|"rle"|"none"|"semantic", "ignore_label" (semantic),
                       "objects": [{"category_id", "label", "is_thing", "iscrowd", "bbox": [x0, y0, x1, y1],
                                    "area", "segment_id" (panoptic), "rle": {"size", "counts"} (rle, optional),
                                    "pseudo_mask": bool}], "extra": {...}}

``extra`` keeps per-image fields of the source worth keeping: LVIS's ``neg_category_ids`` (classes verified absent)
and ``not_exhaustive_category_ids`` (classes not annotated exhaustively). A set whose manifest has
``category_frequency`` is scored with LVIS's federated protocol (``openseed.evaluation.lvis``), which needs both
lists on every image. A set whose manifest has ``protocol: cityscapes_instances`` (``data_prep.cityscapes``
``kind=instance``) keeps each image's void region in ``extra["void_rle"]`` and is also scored with cityscapes' own
instance AP (``openseed.evaluation.cityscapes``).

``label`` indexes the vocabulary; ``bbox`` is xyxy in pixels of the stored image with exclusive max (see
``openseed.core.batch``); panoptic boxes and areas are recomputed from the PNG, not copied from the JSON. A semantic
sample lists one object per class present, its ``segment_id`` the class's label, so it reads back like a panoptic
sample whose segments are whole classes (for scoring mIoU; its things are not instances).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openseed.core.codecs import decode_label_png, decode_panoptic_png, decode_rle
from openseed.core.vocabulary import FREQUENCIES, Vocabulary
from openseed.data.coco import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
PANOPTIC_KEY = "panoptic.png"
SEMANTIC_KEY = "semantic.png"
#: Data sets' own metrics a manifest can ask for, beside the standard ones (``ShardSet.protocol``).
PROTOCOLS = {"cityscapes_instances": "cityscapes' instance-level AP (needs extra['void_rle'] on every image)"}
TASKS = {"seg": "panoptic", "det": "detection (boxes, with or without masks)", "sem": "semantic"}
VOID = -1  # the category id a semantic reader gives unlabelled / ignored pixels (data_prep.shard_writer)
JPEG_MAGIC = b"\xff\xd8\xff"
CROWD_INDEX = 255  # crowd pixels in a Sample.segment_map


def check_category_frequency(frequency: dict, vocab: Vocabulary, where: str) -> dict[int, str]:
    """``frequency`` (category id -> "r" / "c" / "f", ids as ints or strings) checked against ``vocab``: every
    category has one, no other id appears. Returns it with int keys; a bad one is a DataError naming ``where``."""
    try:
        out = {int(k): v for k, v in frequency.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise DataError(f"{where}: category_frequency must map category ids to 'r' / 'c' / 'f' ({err})") from None
    bad = {k: v for k, v in out.items() if v not in FREQUENCIES}
    if bad:
        raise DataError(f"{where}: category_frequency values must be one of {FREQUENCIES}; got {bad!r:.200}")
    missing, unknown = sorted(set(vocab.ids) - set(out)), sorted(set(out) - set(vocab.ids))
    if missing or unknown:
        raise DataError(f"{where}: category_frequency must cover exactly the vocabulary's ids; missing "
                        f"{missing[:10]}, unknown {unknown[:10]}")
    return out


def semantic_ignore_label(num_classes: int) -> int:
    """The value of void pixels in a stored semantic label map: 255 (8-bit PNG) below 255 classes, else 65535."""
    return 255 if num_classes < 255 else 65535


def sample_key(image_id: int) -> str:
    if image_id < 0:
        raise DataError(f"negative image id {image_id}")
    return f"{image_id:012d}"


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
    #: category id -> LVIS frequency ("r" / "c" / "f") for a federated set (scored with LVIS's protocol), else None
    category_frequency: dict[int, str] | None = None
    #: a data set's own metric computed beside the standard ones (``PROTOCOLS``), else None
    protocol: str | None = None

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
        vocabulary = Vocabulary.load(root / VOCAB)
        frequency = manifest.get("category_frequency")
        if frequency is not None:
            frequency = check_category_frequency(frequency, vocabulary, str(manifest_path))
        protocol = manifest.get("protocol")
        if protocol is not None and protocol not in PROTOCOLS:
            raise DataError(f"{manifest_path}: unknown protocol {protocol!r} (known: {sorted(PROTOCOLS)})")
        return cls(root, manifest["name"], manifest["task"], manifest["mask_format"], vocabulary,
                   tuple(str(root / s["file"]) for s in shards), tuple(int(s["count"]) for s in shards), frequency,
                   protocol)


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
    semantic_png: bytes | None = None  # the stored label map PNG (semantic data)

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
    if meta["mask_format"] in ("panoptic", "semantic"):  # an id per pixel: a segment's, or a class's label
        member, decode = (PANOPTIC_KEY, decode_panoptic_png) if meta["mask_format"] == "panoptic" else \
            (SEMANTIC_KEY, decode_label_png)
        try:
            ids = torch.from_numpy(decode(raw[member]).astype(np.int32))
        except Exception as err:
            STREAM_SKIPS(f"bad {meta['mask_format']} PNG", where, f"{type(err).__name__}: {str(err)[:80]}", url)
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
        has_mask=torch.tensor([meta["mask_format"] in ("panoptic", "semantic") or "rle" in o for o in kept],
                              dtype=torch.bool),
        masks=masks, ignore_mask=ignore, image_id=int(meta["image_id"]), dataset=str(meta["dataset"]),
        key=str(raw.get("__key__")), orig_size=(height, width),
        boxes_from_masks=meta["mask_format"] in ("panoptic", "semantic"), segment_map=segment_map, annotation=meta,
        panoptic_png=raw.get(PANOPTIC_KEY), semantic_png=raw.get(SEMANTIC_KEY))
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
