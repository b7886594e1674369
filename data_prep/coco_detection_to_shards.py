"""Convert a COCO-style detection data set (COCO instances, Objects365 v1/v2, LVIS, labelme exports) to shards.

    python -m data_prep.coco_detection_to_shards json=zhiyuan_objv2_train.json image_dir=objects365/train \
        out=shards/o365v2_train name=o365v2_train masks=false

Image paths are resolved under ``image_dir`` as written in the JSON, or with leading folders dropped (Objects365 v2's
``images/v2/patchN/...`` finds ``patchN/...``); LVIS images are found by the name in their ``coco_url``.
Polygon and RLE masks are kept as compressed RLE unless ``masks=false``.
``--help`` lists every key.
"""

from __future__ import annotations

import sys
from functools import partial

from data_prep._cli import converter_options, run
from data_prep.shard_writer import ConversionSummary, encode_detection, write_shards
from openseed.cli import Option, path
from openseed.data.coco import load_coco_detection


def convert(json_path, image_dir, out, name, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True, keep_masks=True, drop_empty=False, source=None, data=None,
            category_frequency=None) -> ConversionSummary:
    """``data``: the JSON's content when the caller has read (and adapted) it; errors still name ``json_path``.
    ``category_frequency``: LVIS's per-category frequency, for a set scored with the federated protocol."""
    vocab, records, report = load_coco_detection(json_path, image_dir, skip_missing=skip_missing,
                                                 drop_empty=drop_empty, data=data)
    records = records[:limit] if limit is not None else records
    has_masks = keep_masks and any(ann.get("segmentation") for r in records for ann in r.objects)
    mask_format = "rle" if has_masks else "none"
    encode = partial(encode_detection, vocab=vocab, dataset=name, mask_format=mask_format)
    return write_shards(records, encode, out, name, "det", mask_format, vocab,
                        maxcount=maxcount, workers=workers, progress=progress,
                        reader_skips=(report.skipped_images, report.skipped_objects),
                        reader_adjusted=report.adjusted_objects, source=source,
                        category_frequency=category_frequency)


OPTIONS = converter_options(
    json=Option("COCO-style detection JSON", required=True, check=path),
    image_dir=Option("root folder of the images", required=True, check=path),
    masks=Option("keep the segmentation masks (false: boxes only)", True),
    drop_empty=Option("skip images without annotations (keep them for evaluation sets)", False),
)


def main(argv=None) -> int:
    return run(lambda a: convert(a.json, a.image_dir, a.out, a.name, a.maxcount, a.workers, a.skip_missing, a.limit,
                                 a.progress, a.masks, a.drop_empty),
               argv, OPTIONS, "python -m data_prep.coco_detection_to_shards", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
