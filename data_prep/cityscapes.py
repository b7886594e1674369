"""Convert Cityscapes (fine annotations, ``leftImg8bit`` + ``gtFine``) to openseed shards: panoptic, instance or
semantic.

    python -m data_prep.cityscapes root=/data/cityscapes split=val kind=panoptic \
        out=data/benchmarks/cityscapes_panoptic_val
    python -m data_prep.cityscapes root=/data/cityscapes split=val kind=instance \
        out=data/benchmarks/cityscapes_instance_val
    python -m data_prep.cityscapes root=/data/cityscapes split=val kind=semantic \
        out=data/benchmarks/cityscapes_semantic_val

``root`` holds the published folders ``leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds}.png``. Kinds:

- ``panoptic`` (task "seg"): the 19 evaluated classes (8 things, 11 stuff), from ``*_gtFine_instanceIds.png`` (the
  label id for stuff and for thing pixels without an instance, ``label id * 1000 + index`` for thing instances). As
  cityscapesscripts' ``createPanopticImgs.py`` does, the segment id is the instanceIds value, thing pixels without an
  instance index are crowd (group) segments, and classes ignored in evaluation are void. With ``gt=auto`` (the
  default) the files that script writes, ``gtFine/cityscapes_panoptic_<split>.json`` and
  ``gtFine/cityscapes_panoptic_<split>/`` (category ids = label ids, not the ``_trainId`` variant), are read instead
  when present; ``gt=instance_ids`` or ``gt=panoptic_json`` choose.
- ``instance`` (task "det", RLE masks): the 8 evaluated thing classes, one object per instance (instanceIds value
  >= 1000), as cityscapes' instance evaluation counts them; each class's pixels without an instance index (groups)
  are kept as one crowd object (``iscrowd``: an ignore region, as that evaluation ignores predictions on groups).
  Each sample's ``extra["void_rle"]`` holds the pixels whose instanceIds value is an ignored label id, and the
  manifest asks for cityscapes' own instance AP beside COCO's (``protocol: cityscapes_instances``).
- ``semantic`` (task "sem"): ``*_gtFine_labelIds.png`` mapped to the 19 trainIds (the stored label map holds the
  trainId, the vocabulary index); every other label id is void.

Category ids are Cityscapes label ids (``road`` = 7, ..., ``bicycle`` = 33), listed in trainId order; names are the
plain Cityscapes names, which is how the reference OpenSeeD prompts Cityscapes (``utils/constants.py``
``CITYSCAPES`` / ``CITYSCAPES_THING``). Image ids: the index of the image in the sorted file order of
``leftImg8bit/<split>`` (the file name is stored with each sample); the same image has the same id in every kind.
The PNG images are re-encoded to JPEG (quality 95). ``name`` defaults to ``cityscapes_<kind>_<split>``.
``--help`` lists every key.
"""

from __future__ import annotations

import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_prep._cli import converter_options, run
from data_prep.layout import encode_instance_map, image_size, panoptic_annotations, read_array
from data_prep.shard_writer import (
    ConversionSummary,
    Encoded,
    IdMap,
    Unreadable,
    encode_panoptic,
    encode_semantic,
    read_coco_panoptic,
    write_shards,
)
from openseed.cli import Option, one_of, path
from openseed.core.codecs import encode_rle
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord, ReadReport, load_json
from openseed.data.shards import VOID


class Label(NamedTuple):
    """One row of cityscapesscripts' label table (``cityscapesscripts/helpers/labels.py``; colours left out)."""

    name: str
    id: int
    train_id: int
    category: str
    has_instances: bool
    ignore_in_eval: bool


#: cityscapesscripts' ``helpers/labels.py`` ``labels``: name, id, trainId, category, hasInstances, ignoreInEval.
LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", False, True),
    Label("ego vehicle", 1, 255, "void", False, True),
    Label("rectification border", 2, 255, "void", False, True),
    Label("out of roi", 3, 255, "void", False, True),
    Label("static", 4, 255, "void", False, True),
    Label("dynamic", 5, 255, "void", False, True),
    Label("ground", 6, 255, "void", False, True),
    Label("road", 7, 0, "flat", False, False),
    Label("sidewalk", 8, 1, "flat", False, False),
    Label("parking", 9, 255, "flat", False, True),
    Label("rail track", 10, 255, "flat", False, True),
    Label("building", 11, 2, "construction", False, False),
    Label("wall", 12, 3, "construction", False, False),
    Label("fence", 13, 4, "construction", False, False),
    Label("guard rail", 14, 255, "construction", False, True),
    Label("bridge", 15, 255, "construction", False, True),
    Label("tunnel", 16, 255, "construction", False, True),
    Label("pole", 17, 5, "object", False, False),
    Label("polegroup", 18, 255, "object", False, True),
    Label("traffic light", 19, 6, "object", False, False),
    Label("traffic sign", 20, 7, "object", False, False),
    Label("vegetation", 21, 8, "nature", False, False),
    Label("terrain", 22, 9, "nature", False, False),
    Label("sky", 23, 10, "sky", False, False),
    Label("person", 24, 11, "human", True, False),
    Label("rider", 25, 12, "human", True, False),
    Label("car", 26, 13, "vehicle", True, False),
    Label("truck", 27, 14, "vehicle", True, False),
    Label("bus", 28, 15, "vehicle", True, False),
    Label("caravan", 29, 255, "vehicle", True, True),
    Label("trailer", 30, 255, "vehicle", True, True),
    Label("train", 31, 16, "vehicle", True, False),
    Label("motorcycle", 32, 17, "vehicle", True, False),
    Label("bicycle", 33, 18, "vehicle", True, False),
    Label("license plate", -1, -1, "vehicle", False, True),
)

#: The class names the reference OpenSeeD prompts Cityscapes with (``utils/constants.py`` ``CITYSCAPES``, trainId
#: order; ``CITYSCAPES_THING`` is its last 8): the plain Cityscapes label names.
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")

#: The 19 evaluated labels in trainId order, and the 8 among them with instances.
EVAL_LABELS: tuple[Label, ...] = tuple(sorted((lab for lab in LABELS if not lab.ignore_in_eval),
                                              key=lambda lab: lab.train_id))
THING_LABELS: tuple[Label, ...] = tuple(lab for lab in EVAL_LABELS if lab.has_instances)
_BY_ID = {lab.id: lab for lab in LABELS if lab.id >= 0}
#: Label ids ignored in evaluation (cityscapes' instance evaluation calls pixels of these values void).
IGNORED_LABEL_IDS = tuple(lab.id for lab in LABELS if lab.ignore_in_eval and lab.id >= 0)
# label id -> itself when evaluated, VOID when ignored, -2 when not a Cityscapes label id (0..33)
_UNKNOWN = -2
_EVAL_ID = np.full(256, _UNKNOWN, dtype=np.int64)
for _lab in _BY_ID.values():
    _EVAL_ID[_lab.id] = VOID if _lab.ignore_in_eval else _lab.id

KINDS = {"panoptic": ("seg", "panoptic"), "instance": ("det", "rle"), "semantic": ("sem", "semantic")}
SPLITS = ("train", "val")
GT_SOURCES = ("auto", "instance_ids", "panoptic_json")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
# PIL modes a label / instance id PNG may decode to (8-bit grey or palette, 16-bit, 32-bit integer)
_ID_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")


def vocabulary(kind: str) -> Vocabulary:
    """The classes of a kind: the 19 evaluated classes (panoptic, semantic) or the 8 things (instance); ids are
    label ids, in trainId order, with the reference's prompt names."""
    labels = THING_LABELS if kind == "instance" else EVAL_LABELS
    names = CLASS_NAMES[-len(THING_LABELS):] if kind == "instance" else CLASS_NAMES
    return Vocabulary.from_coco_categories([{"id": lab.id, "name": name, "isthing": lab.has_instances}
                                            for lab, name in zip(labels, names)])


# ---------------------------------------------------------------------------------------------------- files
def annotation_path(image_path: Path, suffix: str) -> Path:
    """The gtFine file of an image: ``root/leftImg8bit/S/C/X_leftImg8bit.png`` -> ``root/gtFine/S/C/X<suffix>``."""
    city, split, root = image_path.parent, image_path.parents[1], image_path.parents[3]
    stem = image_path.name[: -len(IMAGE_SUFFIX)]
    return root / "gtFine" / split.name / city.name / f"{stem}{suffix}"


def image_files(root: Path, split: str) -> list[Path]:
    """Every ``leftImg8bit/<split>/<city>/*_leftImg8bit.png``, sorted by city, then file name."""
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        raise DataError(f"Cityscapes image folder not found: {folder}")
    files = sorted(folder.glob(f"*/*{IMAGE_SUFFIX}"), key=lambda p: (p.parent.name, p.name))
    if not files:
        raise DataError(f"{folder}: no <city>/*{IMAGE_SUFFIX} files")
    return files


def _read_ids(path: Path, what: str) -> np.ndarray:
    """An 8/16/32-bit grey id PNG as int64 [H, W]; ``Unreadable`` for a broken file or an RGB / float one."""
    return read_array(path, f"{what} PNG", _ID_MODES)


def _unknown(values: np.ndarray, path: Path) -> None:
    bad = sorted(set(values.tolist()))
    raise Unreadable("unknown Cityscapes label id", path, f"values {bad[:10]} are not label ids 0..33")


def _labels_of_instance_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    """The label id of each instanceIds value (itself below 1000, ``value // 1000`` above)."""
    labels = np.where(ids >= 1000, ids // 1000, ids)
    outside = (labels < 0) | (labels > 255)
    if outside.any():
        _unknown(ids[outside], path)
    unknown = _EVAL_ID[labels] == _UNKNOWN
    if unknown.any():
        _unknown(ids[unknown], path)
    return labels


def read_label_ids(record: ImageRecord) -> tuple[np.ndarray, Path]:
    """Semantic reader: ``*_gtFine_labelIds.png`` as label ids per pixel, ``VOID`` where ignored in evaluation."""
    path = annotation_path(record.image_path, LABEL_IDS_SUFFIX)
    ids = _read_ids(path, "labelIds")
    bad = (ids < 0) | (ids > 255) | (_EVAL_ID[np.clip(ids, 0, 255)] == _UNKNOWN)
    if bad.any():
        _unknown(ids[bad], path)
    return _EVAL_ID[ids], path


def read_instance_ids(record: ImageRecord) -> IdMap:
    """Panoptic reader: ``*_gtFine_instanceIds.png`` as an id map, as ``createPanopticImgs.py`` builds it: the
    segment id is the instanceIds value, pixels of classes ignored in evaluation are void (0), and thing pixels
    without an instance index (value < 1000) are a crowd segment of their class."""
    path = annotation_path(record.image_path, INSTANCE_IDS_SUFFIX)
    ids = _read_ids(path, "instanceIds")
    labels = _labels_of_instance_ids(ids, path)
    ids = np.where(_EVAL_ID[labels] == VOID, 0, ids)
    segments = []
    for value in np.unique(ids).tolist():
        if value == 0:
            continue
        label = _BY_ID[value // 1000 if value >= 1000 else value]
        segments.append({"id": value, "category_id": label.id,
                         "iscrowd": int(value < 1000 and label.has_instances)})
    return IdMap(ids, segments, path)


def encode_instances(record: ImageRecord, vocab: Vocabulary, dataset: str) -> Encoded:
    """Instance (detection) encoder: one object per thing instance of ``*_gtFine_instanceIds.png`` (RLE mask, tight
    box, pixel area), plus one crowd object per thing class for its pixels without an instance index."""
    path = annotation_path(record.image_path, INSTANCE_IDS_SUFFIX)

    def read():
        ids = _read_ids(path, "instanceIds")
        _labels_of_instance_ids(ids, path)  # refuses values that are not Cityscapes label ids
        instances = []
        for value in np.unique(ids).tolist():
            label = _BY_ID[value // 1000 if value >= 1000 else value]
            if label.id in vocab:  # not stuff, void, or a thing class ignored in evaluation (caravan, trailer)
                instances.append((value, label.id, int(value < 1000), ids == value))
        # cityscapes' instance evaluation ignores predicted pixels whose instanceIds value is the label id of a class
        # ignored in evaluation (its groups and stuff: a caravan *instance*, value >= 1000, is not void there)
        void = np.isin(ids, IGNORED_LABEL_IDS)
        return ids.shape, instances, {"void_rle": encode_rle(void[None])[0]}
    return encode_instance_map(record, vocab, dataset, path, read)


# ---------------------------------------------------------------------------------------------------- records
def _records_from_files(files: list[Path], suffix: str | None, skip_missing: bool,
                        report: ReadReport) -> list[ImageRecord]:
    """One record per image, its id the index in ``files``; an image without its gtFine file (``suffix``) is an
    error, or with ``skip_missing`` a counted skip."""
    records = []
    for index, image_path in enumerate(files):
        if suffix is not None:
            gt = annotation_path(image_path, suffix)
            if not gt.is_file():
                message = f"{gt}: annotation file not found (for {image_path})"
                if not skip_missing:
                    raise DataError(message + " (skip_missing=true counts and skips such images)")
                report.skip_image("missing annotation file", message)
                continue
        height, width = image_size(image_path)
        records.append(ImageRecord(index, image_path, height, width, []))
    return records


def _records_from_panoptic_json(files: list[Path], json_path: Path, png_dir: Path, vocab: Vocabulary,
                                skip_missing: bool, report: ReadReport) -> list[ImageRecord]:
    """Records of ``createPanopticImgs.py``'s output: its JSON (image ids ``<city>_<seq>_<frame>``, category ids =
    label ids) and PNG folder, paired with the images by that prefix."""
    if not png_dir.is_dir():
        raise DataError(f"Cityscapes panoptic PNG folder not found: {png_dir} (beside {json_path})")
    data = load_json(json_path)
    if "annotations" not in data or "categories" not in data:
        raise DataError(f"{json_path}: missing 'annotations' or 'categories'; is this createPanopticImgs.py output?")
    unknown = sorted({int(c["id"]) for c in data["categories"]} - set(vocab.ids))
    if unknown:
        raise DataError(f"{json_path}: category ids {unknown} are not the evaluated Cityscapes label ids "
                        f"{vocab.ids} (a --use-train-id file?)")
    by_stem = panoptic_annotations(data, json_path, vocab, lambda ann: str(ann["image_id"]),
                                   "the evaluated Cityscapes label ids")
    records = []
    for index, image_path in enumerate(files):
        stem = image_path.name[: -len(IMAGE_SUFFIX)]
        ann = by_stem.get(stem)
        problem = None
        if ann is None:
            problem = ("no panoptic annotation", f"{json_path}: no annotation for image {stem!r} ({image_path})")
        elif not (png_dir / ann["file_name"]).is_file():
            problem = ("missing panoptic PNG", f"{png_dir / ann['file_name']}: panoptic PNG not found "
                                               f"(image {stem!r} of {json_path})")
        if problem is not None:
            if not skip_missing:
                raise DataError(problem[1] + " (skip_missing=true counts and skips such images)")
            report.skip_image(*problem)
            continue
        height, width = image_size(image_path)
        records.append(ImageRecord(index, image_path, height, width, ann["segments"],
                                   panoptic_path=png_dir / ann["file_name"]))
    for stem in sorted(set(by_stem) - {p.name[: -len(IMAGE_SUFFIX)] for p in files}):
        message = f"{json_path}: image {stem!r} has no {stem}{IMAGE_SUFFIX} under {files[0].parents[1]}"
        if not skip_missing:
            raise DataError(message + " (skip_missing=true counts and skips such images)")
        report.skip_image("missing image file", message)
    return records


# ---------------------------------------------------------------------------------------------------- convert
def convert(root, split, kind, out, name=None, gt="auto", maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True) -> ConversionSummary:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Cityscapes root folder not found: {root}")
    name = name or f"cityscapes_{kind}_{split}"
    task, mask_format = KINDS[kind]
    vocab = vocabulary(kind)
    files = image_files(root, split)
    json_path = root / "gtFine" / f"cityscapes_panoptic_{split}.json"
    use_json = kind == "panoptic" and (gt == "panoptic_json" or (gt == "auto" and json_path.is_file()))
    if not use_json:
        gt_folder = root / "gtFine" / split
        if not gt_folder.is_dir():
            raise DataError(f"Cityscapes annotation folder not found: {gt_folder}")
    report = ReadReport()
    if use_json:
        if not json_path.is_file():
            raise DataError(f"Cityscapes panoptic JSON not found: {json_path} (written by cityscapesscripts' "
                            f"createPanopticImgs.py; gt=instance_ids reads the instanceIds files instead)")
        records = _records_from_panoptic_json(files, json_path, root / "gtFine" / f"cityscapes_panoptic_{split}",
                                               vocab, skip_missing, report)
        encode = partial(encode_panoptic, vocab=vocab, dataset=name, read=read_coco_panoptic)
    else:
        suffix = LABEL_IDS_SUFFIX if kind == "semantic" else INSTANCE_IDS_SUFFIX
        records = _records_from_files(files, suffix, skip_missing, report)
        if kind == "panoptic":
            encode = partial(encode_panoptic, vocab=vocab, dataset=name, read=read_instance_ids)
        elif kind == "semantic":
            encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read_label_ids)
        else:
            encode = partial(encode_instances, vocab=vocab, dataset=name)
    records = records[:limit] if limit is not None else records
    source = {"dataset": "cityscapes", "root": str(root), "split": split, "kind": kind,
              "gt": ("panoptic_json" if use_json else
                     "labelIds" if kind == "semantic" else "instanceIds")}
    return write_shards(records, encode, out, name, task, mask_format, vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(report.skipped_images, Counter()), source=source,
                        protocol="cityscapes_instances" if kind == "instance" else None)


OPTIONS = converter_options(
    root=Option("Cityscapes folder holding leftImg8bit/ and gtFine/", required=True, check=path),
    split=Option("split: train or val", "val", one_of(SPLITS)),
    kind=Option("panoptic (seg), instance (det, RLE masks) or semantic (sem)", "panoptic", one_of(tuple(KINDS))),
    gt=Option("panoptic ground truth: auto (the createPanopticImgs.py JSON when present, else instanceIds), "
              "instance_ids or panoptic_json", "auto", one_of(GT_SOURCES)),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default cityscapes_<kind>_<split>",
                         None, path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.root, a.split, a.kind, a.out, a.name, a.gt, a.maxcount, a.workers,
                                 a.skip_missing, a.limit, a.progress),
               argv, OPTIONS, "python -m data_prep.cityscapes", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
