"""Convert the BDD100K 10K segmentation set (its own published layout) to openseed shards.

    python -m data_prep.bdd100k root=/data/bdd100k split=val kind=panoptic out=data/benchmarks/bdd100k_panoptic_val
    python -m data_prep.bdd100k root=/data/bdd100k split=val kind=semantic out=data/benchmarks/bdd100k_semantic_val

``root`` is the folder that holds ``images/`` and ``labels/`` (the official zips unpack into ``bdd100k/``):

    images/10k/{train,val}/NAME.jpg
    labels/sem_seg/masks/{train,val}/NAME.png      kind=semantic: 8-bit, 0..18 the 19 train classes, 255 unknown
    labels/pan_seg/bitmasks/{train,val}/NAME.png   kind=panoptic: RGBA bitmasks (below)
    labels/pan_seg/meta/coco_{train,val}.json      kind=panoptic, the toolkit's COCO-panoptic export (below), with
    labels/pan_seg/coco_pano/{train,val}/NAME.png  its PNGs: where the reference reads BDD100K panoptic from

A panoptic bitmask stores, per pixel, R = the category id (1..40; 0 "unlabeled"), G = the attribute bits
``(truncated << 3) | (occluded << 2) | (crowd << 1) | ignore``, and the annotation id ``(B << 8) + A``. Each
annotation id is one segment (as the toolkit's own evaluator, ``bdd100k.eval.pan_seg``, reads them, stuff included);
pixels of category 0, of annotation id 0 or with the ignore bit are void; the crowd bit makes a crowd segment.
Labels are paired with images by file name; image ids are positions in the sorted list of label files (BDD100K has
no numeric ids), the file name is stored with each sample. Task "seg" (PQ, mIoU, thing AP) or "sem" (mIoU).

The COCO-panoptic export is what the toolkit's ``python -m bdd100k.label.to_coco_panseg -i <bitmasks> -o <json>
-pb <png folder>`` writes from the bitmasks: PNG id = the annotation id (R = A, G = B), categories 1..40 as above,
images named like their bitmask (``NAME.png``; the image is ``NAME.jpg``), and its own reading of the attributes:
an ignored annotation becomes a crowd segment, and all annotations of one stuff category are listed as one segment
under the first one's id (the others' pixels keep their ids in the PNG, which makes them void, as the evaluator
reads ids it has no segment for). ``gt=auto`` (the default) reads the export where its JSON is there, else the
bitmasks; ``gt=bitmasks`` or ``gt=coco_panoptic`` choose (``json=`` and ``png_dir=`` point at an export elsewhere).
``--help`` lists every key.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep._cli import converter_options, run
from data_prep.layout import label_record, pair_by_name, panoptic_annotations, read_label_png, require_dir
from data_prep.shard_writer import (
    ConversionSummary,
    IdMap,
    Unreadable,
    encode_panoptic,
    encode_semantic,
    read_coco_panoptic,
    write_shards,
)
from openseed.cli import Option, one_of, path
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord, load_json

# The 40 panoptic categories (id, name, thing) of BDD100K's label table (bdd100k/label/label.py, doc/source/format.rst:
# "classes 1-30 are stuffs, 31-40 are things"), the names the reference prompts with (register_bdd100k_panoseg.py,
# BDD_PANO in utils/constants.py). Category 0, "unlabeled", is void.
PANOPTIC_CATEGORIES = (
    (1, "dynamic"), (2, "ego vehicle"), (3, "ground"), (4, "static"), (5, "parking"), (6, "rail track"),
    (7, "road"), (8, "sidewalk"), (9, "bridge"), (10, "building"), (11, "fence"), (12, "garage"),
    (13, "guard rail"), (14, "tunnel"), (15, "wall"), (16, "banner"), (17, "billboard"), (18, "lane divider"),
    (19, "parking sign"), (20, "pole"), (21, "polegroup"), (22, "street light"), (23, "traffic cone"),
    (24, "traffic device"), (25, "traffic light"), (26, "traffic sign"), (27, "traffic sign frame"),
    (28, "terrain"), (29, "vegetation"), (30, "sky"), (31, "person"), (32, "rider"), (33, "bicycle"), (34, "bus"),
    (35, "car"), (36, "caravan"), (37, "motorcycle"), (38, "trailer"), (39, "train"), (40, "truck"),
)
FIRST_THING_ID = 31
# The 19 semantic train classes, ids 0..18 as the masks store them (BDD_SEM in the reference's utils/constants.py;
# doc/source/format.rst of the toolkit); 255 is "unknown", void.
SEMANTIC_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
SEMANTIC_IGNORE = 255
IGNORE_BIT, CROWD_BIT = 1, 2
GT_SOURCES = ("auto", "bitmasks", "coco_panoptic")
KINDS = {"panoptic": ("labels/pan_seg/bitmasks", "seg", "panoptic"),
         "semantic": ("labels/sem_seg/masks", "sem", "semantic")}


def panoptic_vocabulary() -> Vocabulary:
    return Vocabulary.from_coco_categories([{"id": i, "name": n, "isthing": i >= FIRST_THING_ID}
                                            for i, n in PANOPTIC_CATEGORIES])


def semantic_vocabulary() -> Vocabulary:
    # the reference registers the semantic set with no thing classes (thing_dataset_id_to_contiguous_id={})
    return Vocabulary.from_coco_categories([{"id": i, "name": n, "isthing": False}
                                            for i, n in enumerate(SEMANTIC_CLASSES)])


# ------------------------------------------------------------------------------------- panoptic bitmasks
def read_bitmask(record: ImageRecord, first_thing_id: int = FIRST_THING_ID) -> IdMap:
    """A BDD100K RGBA bitmask -> segment ids (the annotation id ``(B << 8) + A``; 0 = void) and their segments."""
    source = record.panoptic_path
    try:
        with Image.open(source) as image:
            mode = image.mode
            pixels = np.asarray(image) if mode == "RGBA" else None
    except Exception as err:
        raise Unreadable("unreadable bitmask PNG", source, f"{type(err).__name__}: {err}") from None
    if pixels is None:
        raise Unreadable("bitmask PNG of the wrong kind", source, f"mode {mode}, expected RGBA")
    pixels = pixels.astype(np.int64)
    category, attributes = pixels[..., 0], pixels[..., 1]
    ids = (pixels[..., 2] << 8) + pixels[..., 3]
    ids[(category == 0) | (attributes & IGNORE_BIT).astype(bool)] = 0
    labelled = ids > 0
    # one (id, category, crowd) triple per segment: an annotation id that spans two categories is a broken file
    keys = np.unique((ids[labelled] << 9) | (category[labelled] << 1) | ((attributes[labelled] & CROWD_BIT) > 0))
    segments, seen = [], {}
    for key in keys.tolist():
        segment_id, category_id, crowd = key >> 9, (key >> 1) & 0xFF, key & 1
        if segment_id in seen:
            if seen[segment_id]["category_id"] != category_id:
                raise Unreadable("bitmask annotation with several categories", source,
                                 f"annotation id {segment_id}: categories {seen[segment_id]['category_id']} and "
                                 f"{category_id}")
            seen[segment_id]["iscrowd"] = 1  # crowd and not crowd pixels in one annotation: crowd
            continue
        seen[segment_id] = {"id": segment_id, "category_id": category_id, "iscrowd": crowd}
        segments.append(seen[segment_id])
    unknown = sorted({s["category_id"] for s in segments if not 1 <= s["category_id"] <= len(PANOPTIC_CATEGORIES)})
    if unknown:
        raise DataError(f"{source}: category id(s) {unknown} are not BDD100K panoptic categories (1..40)")
    return IdMap(ids, segments, source)


read_semantic_mask = partial(read_label_png, void=(SEMANTIC_IGNORE,))


# ------------------------------------------------------------------------------------- the COCO-panoptic export
def export_paths(root: Path, split: str) -> tuple[Path, Path]:
    """Where the reference reads the toolkit's export: (JSON, PNG folder)."""
    pan_seg = root / "labels" / "pan_seg"
    return pan_seg / "meta" / f"coco_{split}.json", pan_seg / "coco_pano" / split


def records_of_export(root: Path, split: str, json_path: Path, png_dir: Path,
                      skip_missing: bool = False) -> tuple[list[ImageRecord], Counter]:
    """Records of the toolkit's COCO-panoptic export, in sorted image-name order (the bitmasks' image ids)."""
    image_dir = require_dir(root / "images" / "10k" / split, "BDD100K image")
    require_dir(png_dir, "BDD100K COCO-panoptic PNG")
    by_stem = panoptic_annotations(load_json(json_path), json_path, panoptic_vocabulary(),
                                   lambda ann: Path(str(ann["file_name"])).stem, "BDD100K's 1..40")
    records, skipped = [], Counter()
    images = {p.stem for p in image_dir.glob("*.jpg")}
    for index, stem in enumerate(sorted(by_stem)):
        image, png = image_dir / f"{stem}.jpg", png_dir / by_stem[stem]["file_name"]
        missing = None if image.is_file() else ("missing image file", image)
        missing = missing or (None if png.is_file() else ("missing panoptic PNG", png))
        if missing is not None:
            if not skip_missing:
                raise FileNotFoundError(f"{missing[1]} not found (listed in {json_path}; skip_missing=true counts "
                                        f"and skips such images)")
            skipped[missing[0]] += 1
            continue
        record = label_record(index, image, png)
        records.append(replace(record, objects=by_stem[stem]["segments"]))
    unlabelled = len(images - set(by_stem))
    if unlabelled:
        skipped["image without a label file"] += unlabelled
    return records, skipped


# ------------------------------------------------------------------------------------- conversion
def records_of(root, split: str, kind: str, skip_missing: bool = False) -> tuple[list[ImageRecord], Counter]:
    root = Path(root)
    image_dir = require_dir(root / "images" / "10k" / split, "BDD100K image")
    label_dir = require_dir(root / KINDS[kind][0] / split, f"BDD100K {kind} label")
    pairs, skipped = pair_by_name(image_dir, label_dir, ".jpg", ".png", skip_missing)
    return [label_record(k, image, label) for k, (image, label) in enumerate(pairs)], skipped


def convert(root, split, kind, out, name=None, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True, gt="auto", json_path=None, png_dir=None) -> ConversionSummary:
    root = Path(root)
    name = name or f"bdd100k_{kind}_{split}"
    default_json, default_png_dir = export_paths(root, split)
    json_path, png_dir = Path(json_path or default_json), Path(png_dir or default_png_dir)
    if gt not in GT_SOURCES:
        raise ValueError(f"gt must be one of {GT_SOURCES}, not {gt!r}")
    use_export = kind == "panoptic" and (gt == "coco_panoptic" or (gt == "auto" and json_path.is_file()))
    if use_export:
        records, skipped = records_of_export(root, split, json_path, png_dir, skip_missing)
    else:
        records, skipped = records_of(root, split, kind, skip_missing)
    records = records[:limit] if limit is not None else records
    _, task, mask_format = KINDS[kind]
    source = {"dataset": "bdd100k", "root": str(root), "split": split, "kind": kind}
    if kind == "panoptic":
        vocab = panoptic_vocabulary()
        read = read_coco_panoptic if use_export else read_bitmask
        encode = partial(encode_panoptic, vocab=vocab, dataset=name, read=read)
        source["gt"] = f"coco_panoptic {json_path}" if use_export else "bitmasks"
    else:
        vocab = semantic_vocabulary()
        encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read_semantic_mask)
    return write_shards(records, encode, out, name, task, mask_format, vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(skipped, Counter()), source=source)


OPTIONS = converter_options(
    root=Option("the BDD100K folder (holds images/10k and labels/)", required=True, check=path),
    split=Option("train or val", "val", one_of(("train", "val"))),
    kind=Option("panoptic (labels/pan_seg/bitmasks or the COCO-panoptic export) or semantic (labels/sem_seg/masks)",
                "panoptic", one_of(tuple(KINDS))),
    gt=Option("panoptic source: auto (the export where its JSON is), bitmasks or coco_panoptic", "auto",
              one_of(GT_SOURCES)),
    json=Option("the export's JSON (default labels/pan_seg/meta/coco_<split>.json)", None, path),
    png_dir=Option("the export's PNG folder (default labels/pan_seg/coco_pano/<split>)", None, path),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default bdd100k_{kind}_{split}", None,
                         path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.root, a.split, a.kind, a.out, a.name, a.maxcount, a.workers, a.skip_missing,
                                 a.limit, a.progress, a.gt, a.json, a.png_dir),
               argv, OPTIONS, "python -m data_prep.bdd100k", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
