"""Convert a COCO panoptic data set (JSON + PNG folder + image folder) to openseed shards.

    python -m data_prep.coco_panoptic_to_shards json=panoptic_train2017.json png_dir=panoptic_train2017 \
        image_dir=train2017 out=shards/coco_panoptic_train name=coco_panoptic_train

Writes one sample per image (JPEG + raw panoptic PNG + JSON; schema in openseed/data/shards.py and docs/data.md),
``vocab.json`` and ``manifest.json``, then prints what it wrote and what it skipped. ``--help`` lists every key.
"""

from __future__ import annotations

import sys
from functools import partial

from data_prep._cli import converter_options, run
from data_prep.shard_writer import ConversionSummary, encode_panoptic, write_shards
from openseed.cli import Option, path
from openseed.data.coco import load_coco_panoptic


def convert(json_path, png_dir, image_dir, out, name, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True, source=None) -> ConversionSummary:
    vocab, records, report = load_coco_panoptic(json_path, png_dir, image_dir, skip_missing=skip_missing)
    records = records[:limit] if limit is not None else records
    encode = partial(encode_panoptic, vocab=vocab, dataset=name)
    return write_shards(records, encode, out, name, "seg", "panoptic", vocab, maxcount=maxcount, workers=workers,
                        progress=progress, reader_skips=(report.skipped_images, report.skipped_objects),
                        reader_adjusted=report.adjusted_objects, source=source)


OPTIONS = converter_options(
    json=Option("COCO panoptic JSON", required=True, check=path),
    png_dir=Option("folder of the panoptic PNG id maps", required=True, check=path),
    image_dir=Option("folder of the images", required=True, check=path),
)


def main(argv=None) -> int:
    return run(lambda a: convert(a.json, a.png_dir, a.image_dir, a.out, a.name, a.maxcount, a.workers, a.skip_missing,
                                 a.limit, a.progress),
               argv, OPTIONS, "python -m data_prep.coco_panoptic_to_shards", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
