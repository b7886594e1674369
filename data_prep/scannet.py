"""Convert the ScanNet 2D frames (scannet_frames_25k, the layout the reference reads) to openseed shards.

    python -m data_prep.scannet root=/data/scannet_frames_25k kind=panoptic out=data/benchmarks/scannet_panoptic_val
    python -m data_prep.scannet root=/data/scannet_frames_25k kind=semantic20 out=data/benchmarks/scannet_semantic20_val
    python -m data_prep.scannet root=/data/scannet_frames_25k kind=semantic41 out=data/benchmarks/scannet_semantic41_val

``root`` is the ``scannet_frames_25k`` folder as the reference registers it (register_scannet_semseg.py,
register_scannet_panoptic.py):

    images/SCENE/color/FRAME.jpg            the frames (SCENE e.g. scene0011_00, FRAME e.g. 000100)
    images/SCENE/label21/FRAME.png          kind=semantic20: 0 = unlabelled (void), 1..20 the 20 benchmark classes
    images/SCENE/label38/FRAME.png          kind=semantic38: 0 = void, 1..37 the 37 classes
    images/SCENE/label41/FRAME.png          kind=semantic41: 0 = void, 1..40 the 40 NYU classes ("41" counts void)
    meta/{split}.txt                        semantic kinds: one frame a line, its first column the image path under
                                            images/ (SCENE/color/FRAME.jpg); the label is the same path with the
                                            color folder replaced by labelNN and .png for .jpg
    scannet_panoptic.json                   kind=panoptic: COCO panoptic JSON; each annotation's file_name is
    scannet_panoptic/SCENE__FRAME.png       SCENE__FRAME.png, its image images/SCENE/color/FRAME.jpg

Image ids: the JSON's ``image_id`` (panoptic) when it is an integer; otherwise, and for the semantic kinds, the
scene and frame numbers read as one number (scene0011_00 frame 000100 -> 1100000100, the digits of the
reference's own id "scene0011_00000100"). Tasks: "seg" for the panoptic kind (PQ, mIoU, thing AP; 20 categories
with the NYU40 ids and the thing flags of register_scannet_panoptic.py), "sem" (mIoU) for the others.
``--help`` lists every key.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from functools import partial
from pathlib import Path

from data_prep._cli import converter_options, run
from data_prep.layout import image_size, label_record, read_label_png, require_dir
from data_prep.shard_writer import ConversionSummary, encode_panoptic, encode_semantic, write_shards
from openseed.cli import Option, one_of, path
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord, load_json

# The 20-class panoptic categories: (NYU40 id, name, thing), as register_scannet_panoptic.py lists them (its
# "window " loses the trailing space).
PANOPTIC_CATEGORIES = (
    (1, "wall", False), (2, "floor", False), (3, "cabinet", True), (4, "bed", True), (5, "chair", True),
    (6, "sofa", True), (7, "table", True), (8, "door", True), (9, "window", True), (10, "bookshelf", True),
    (11, "picture", True), (12, "counter", True), (14, "desk", True), (16, "curtain", True),
    (24, "refrigerator", True), (28, "shower curtain", True), (33, "toilet", True), (34, "sink", True),
    (36, "bathtub", True), (39, "otherfurniture", True),
)
# Semantic label value k (1..K) is NAMES[k - 1]; 0 is void (the reference: ignore_label=[0], class_offset=1).
SCAN_20 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)
SCAN_37 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag",
)
SCAN_40 = SCAN_37 + ("otherstructure", "otherfurniture", "otherprop")
SEMANTIC_KINDS = {"semantic20": ("label21", SCAN_20), "semantic38": ("label38", SCAN_37),
                  "semantic41": ("label41", SCAN_40)}
KINDS = ("panoptic", *SEMANTIC_KINDS)
PANOPTIC_JSON, PANOPTIC_DIR = "scannet_panoptic.json", "scannet_panoptic"
_SCENE = re.compile(r"scene(\d{4})_(\d{2})")


def panoptic_vocabulary() -> Vocabulary:
    return Vocabulary.from_coco_categories([{"id": i, "name": n, "isthing": t} for i, n, t in PANOPTIC_CATEGORIES])


def semantic_vocabulary(kind: str) -> Vocabulary:
    # the reference registers the semantic sets with no thing classes
    return Vocabulary.from_coco_categories([{"id": k + 1, "name": n, "isthing": False}
                                            for k, n in enumerate(SEMANTIC_KINDS[kind][1])])


read_label = partial(read_label_png, void=(0,), modes=("L", "P", "I;16", "I"))


def frame_id(scene: str, frame: str) -> int | None:
    """scene0011_00, 000100 -> 1100000100 (None when the names are not ScanNet's)."""
    match = _SCENE.fullmatch(scene)
    if match is None or not frame.isdigit() or len(frame) > 6:
        return None
    return int(match.group(1) + match.group(2) + frame.zfill(6))


def _with_ids(entries: list[tuple[int | None, ImageRecord]]) -> list[ImageRecord]:
    """Records with their parsed ids, or, when any name could not be parsed, their positions."""
    if all(parsed is not None for parsed, _ in entries):
        for parsed, record in entries:
            record.image_id = parsed
    else:
        for index, (_, record) in enumerate(entries):
            record.image_id = index
    return [record for _, record in entries]


def _missing(path: Path, what: str, skip_missing: bool, skipped: Counter) -> bool:
    if path.is_file():
        return False
    if not skip_missing:
        raise FileNotFoundError(f"{what} not found: {path}")
    skipped[f"missing {what}"] += 1
    return True


def semantic_records(root: Path, split: str, kind: str, skip_missing: bool) -> tuple[list[ImageRecord], Counter]:
    image_root = require_dir(root / "images", "ScanNet images")
    list_file = root / "meta" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"ScanNet frame list not found: {list_file}")
    folder = SEMANTIC_KINDS[kind][0]
    entries, skipped = [], Counter()
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        relative = Path(line.split()[0])
        if len(relative.parts) < 3 or relative.parts[-2] != "color":
            raise DataError(f"{list_file}, line {number}: expected SCENE/color/FRAME.jpg, got {str(relative)!r}")
        image = image_root / relative
        label = (image.parent.parent / folder / image.name).with_suffix(".png")
        if _missing(image, "image file", skip_missing, skipped) or _missing(label, "label file", skip_missing,
                                                                            skipped):
            continue
        entries.append((frame_id(relative.parts[-3], image.stem), label_record(0, image, label)))
    if not entries and not skipped:
        raise DataError(f"{list_file}: no frames listed")
    return _with_ids(entries), skipped


def panoptic_records(root: Path, skip_missing: bool) -> tuple[list[ImageRecord], Counter]:
    json_path, png_dir = root / PANOPTIC_JSON, root / PANOPTIC_DIR
    image_root = require_dir(root / "images", "ScanNet images")
    data = load_json(json_path)
    require_dir(png_dir, "ScanNet panoptic PNG")
    if not isinstance(data.get("annotations"), list):
        raise DataError(f"{json_path}: no 'annotations' list; is this a COCO panoptic file?")
    known = {i for i, _, _ in PANOPTIC_CATEGORIES}
    entries, skipped = [], Counter()
    for ann in data["annotations"]:
        try:
            file_name, segments = str(ann["file_name"]), list(ann["segments_info"])
            scene, frame = Path(file_name).stem.split("__")
            unknown = sorted({int(s["category_id"]) for s in segments} - known)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{json_path}: an annotation is not SCENE__FRAME.png with segments_info "
                            f"({type(err).__name__}: {err})") from None
        if unknown:
            raise DataError(f"{json_path}: {file_name} has category id(s) {unknown}, not among the 20 ScanNet "
                            f"panoptic categories")
        image, png = image_root / scene / "color" / f"{frame}.jpg", png_dir / file_name
        if _missing(image, "image file", skip_missing, skipped) or _missing(png, "panoptic PNG", skip_missing,
                                                                            skipped):
            continue
        height, width = image_size(image)
        record = ImageRecord(0, image, height, width, segments, panoptic_path=png)
        entries.append((ann.get("image_id"), frame_id(scene, frame), record))
    if not entries and not skipped:
        raise DataError(f"{json_path}: no annotations")
    own = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i, _, _ in entries)
    return _with_ids([(i if own else parsed, record) for i, parsed, record in entries]), skipped


def convert(root, kind, out, split="val", name=None, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True) -> ConversionSummary:
    root = Path(root)
    name = name or f"scannet_{kind}_{split}"
    if kind == "panoptic":
        records, skipped = panoptic_records(root, skip_missing)
        vocab = panoptic_vocabulary()
        encode = partial(encode_panoptic, vocab=vocab, dataset=name)  # the COCO panoptic PNG and segments_info
        task, mask_format = "seg", "panoptic"
    else:
        records, skipped = semantic_records(root, split, kind, skip_missing)
        vocab = semantic_vocabulary(kind)
        encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read_label)
        task, mask_format = "sem", "semantic"
    records = records[:limit] if limit is not None else records
    return write_shards(records, encode, out, name, task, mask_format, vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(skipped, Counter()),
                        source={"dataset": "scannet", "root": str(root), "kind": kind, "split": split})


OPTIONS = converter_options(
    root=Option("the scannet_frames_25k folder (holds images/, meta/, scannet_panoptic.json)", required=True,
                check=path),
    kind=Option("panoptic, semantic20 (label21), semantic38 (label38) or semantic41 (label41)", required=True,
                check=one_of(KINDS)),
    split=Option("the frame list meta/{split}.txt of the semantic kinds (the reference evaluates val)", "val", path),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default scannet_{kind}_{split}", None,
                         path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.root, a.kind, a.out, a.split, a.name, a.maxcount, a.workers, a.skip_missing,
                                 a.limit, a.progress),
               argv, OPTIONS, "python -m data_prep.scannet", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
