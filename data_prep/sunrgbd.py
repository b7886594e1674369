"""Convert SUN RGB-D 37-class semantic segmentation (the reorganised image / label37 layout) to openseed shards.

    python -m data_prep.sunrgbd root=/data/sun_rgbd split=val out=data/benchmarks/sunrgbd_val

``root`` holds the layout the reference registers (datasets/registration/register_sunrgbd_semseg.py), the
"SUN RGBD reorganized" tree of Ankur Handa's 37-class labels:

    image/{train,test}/img-000001.jpg     RGB images (depth is not used)
    label37/{train,test}/NAME.png         8-bit (or 16-bit) grey: 0 = unlabelled (void), 1..37 = the 37 classes

``split=val`` reads the ``test`` folders, as the reference does (SUN RGB-D has no separate validation set: its
5050 test images are the evaluation set). Images and labels are paired by the number in their file names
(``img-000001.jpg`` and ``00000001.png`` or ``img37labels-000001.png``: image id 1); that number is the image id.
Task "sem" (mIoU) over the 37 classes the reference prompts with (SUN_RGBD_37 in its utils/constants.py, its
spelling kept: "refridgerator"). ``--help`` lists every key.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from functools import partial
from pathlib import Path

from data_prep._cli import converter_options, run
from data_prep.layout import label_record, read_label_png, require_dir
from data_prep.shard_writer import ConversionSummary, encode_semantic, write_shards
from openseed.cli import Option, one_of, path
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError

# Label value k (1..37) is CLASSES[k - 1]; 0 is void (the reference: ignore_label=[0], class_offset=1).
CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag",
)
FOLDERS = {"train": "train", "val": "test", "test": "test"}
_NUMBER = re.compile(r"(\d+)$")


def vocabulary() -> Vocabulary:
    # ids are the label values 1..37; the reference registers no thing classes for this set
    return Vocabulary.from_coco_categories([{"id": k + 1, "name": n, "isthing": False} for k, n in enumerate(CLASSES)])


read_label37 = partial(read_label_png, void=(0,), modes=("L", "P", "I;16", "I"))


def number_of(file: Path) -> int:
    match = _NUMBER.search(file.stem)
    if match is None:
        raise DataError(f"{file}: no image number at the end of the file name (expected e.g. img-000001.jpg)")
    return int(match.group(1))


def records_of(root, split: str, skip_missing: bool = False):
    root = Path(root)
    folder = FOLDERS[split]
    image_dir = require_dir(root / "image" / folder, "SUN RGB-D image")
    label_dir = require_dir(root / "label37" / folder, "SUN RGB-D label37")
    labels = sorted(label_dir.glob("*.png"))
    if not labels:
        raise DataError(f"no .png files in {label_dir}")
    images: dict[int, Path] = {}
    for image in sorted(image_dir.glob("*.jpg")):
        number = number_of(image)
        if number in images:
            raise DataError(f"{image_dir}: two images numbered {number}: {images[number].name} and {image.name}")
        images[number] = image
    records, skipped, seen = [], Counter(), {}
    for label in labels:
        number = number_of(label)
        if number in seen:
            raise DataError(f"{label_dir}: two labels numbered {number}: {seen[number].name} and {label.name}")
        seen[number] = label
        image = images.pop(number, None)
        if image is None:
            if not skip_missing:
                raise FileNotFoundError(f"image file not found for {label}: no image numbered {number} in "
                                        f"{image_dir}")
            skipped["missing image file"] += 1
            continue
        records.append(label_record(number, image, label))
    if images:
        skipped["image without a label file"] += len(images)
    return sorted(records, key=lambda r: r.image_id), skipped


def convert(root, split, out, name=None, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True) -> ConversionSummary:
    name = name or f"sunrgbd_{split}"
    records, skipped = records_of(root, split, skip_missing)
    records = records[:limit] if limit is not None else records
    vocab = vocabulary()
    encode = partial(encode_semantic, vocab=vocab, dataset=name, read=read_label37)
    return write_shards(records, encode, out, name, "sem", "semantic", vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(skipped, Counter()),
                        source={"dataset": "sunrgbd", "root": str(root), "split": split})


OPTIONS = converter_options(
    root=Option("the SUN RGB-D folder (holds image/ and label37/)", required=True, check=path),
    split=Option("val (= the test folders, as the reference reads them), test or train", "val",
                 one_of(tuple(FOLDERS))),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default sunrgbd_{split}", None, path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.root, a.split, a.out, a.name, a.maxcount, a.workers, a.skip_missing, a.limit,
                                 a.progress),
               argv, OPTIONS, "python -m data_prep.sunrgbd", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
