"""Convert LVIS v1 (minival or val) to detection shards with RLE masks.

    python -m data_prep.lvis split=minival json=/data/lvis/lvis_v1_minival_inserted_image_name.json \
        coco_root=/data/coco out=data/benchmarks/lvis_v1_minival
    python -m data_prep.lvis split=val json=/data/lvis/lvis_v1_val.json coco_root=/data/coco \
        out=data/benchmarks/lvis_v1_val

``coco_root`` is the COCO 2017 image root holding ``train2017/`` and ``val2017/``: LVIS v1 val images come from both,
and an LVIS image names its file only through ``coco_url`` (``http://images.cocodataset.org/val2017/000000000139.jpg``
is looked up as ``<coco_root>/val2017/000000000139.jpg``, as the reference's ``register_lvis_eval.py`` does). The JSON
is read by the COCO detection reader of ``data_prep.coco_detection_to_shards`` (``openseed.data.coco``): polygons
become compressed RLE, each category's LVIS ``synonyms`` become the vocabulary's synonyms, and each image's
``neg_category_ids`` / ``not_exhaustive_category_ids`` are kept in the sample's ``extra`` and each category's
``frequency`` ("r" / "c" / "f") in the manifest's ``category_frequency``: the set is then scored with LVIS's federated
protocol (``openseed.evaluation.lvis``: APr / APc / APf beside AP). Images without annotations are kept (evaluation
needs them). ``name`` defaults to ``lvis_v1_<split>``. ``--help`` lists every key.

Class names: the vocabulary keeps LVIS's raw ``name`` (``aerosol_can``, ``bow_(weapon)``); the reference OpenSeeD code
prompts LVIS with ``utils/constants.py`` ``LVIS_CATEGORIES``, which is each category's first LVIS synonym as written
(underscores and parenthesised qualifiers kept): the same words as the raw name for every LVIS v1 class but id 162,
named ``bull`` with first synonym ``horned_cow``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from data_prep._cli import converter_options, run
from data_prep.coco_detection_to_shards import convert as convert_coco_detection
from data_prep.shard_writer import ConversionSummary
from openseed.cli import Option, one_of, path
from openseed.core.vocabulary import FREQUENCIES
from openseed.data.coco import DataError, load_json
from openseed.evaluation.lvis import FEDERATED_KEYS

log = logging.getLogger(__name__)

SPLITS = ("minival", "val")
#: The two folders of the COCO 2017 image root that LVIS v1 images come from.
COCO_IMAGE_FOLDERS = ("train2017", "val2017")


def convert(json_path, coco_root, split, out, name=None, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True) -> ConversionSummary:
    json_path, coco_root = Path(json_path), Path(coco_root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if not coco_root.is_dir():
        raise DataError(f"COCO image root not found: {coco_root} (it should hold {' and '.join(COCO_IMAGE_FOLDERS)})")
    present = [f for f in COCO_IMAGE_FOLDERS if (coco_root / f).is_dir()]
    if not present:
        raise DataError(f"{coco_root}: neither {COCO_IMAGE_FOLDERS[0]}/ nor {COCO_IMAGE_FOLDERS[1]}/ found; "
                        "coco_root is the COCO 2017 image root holding both")
    name = name or f"lvis_v1_{split}"
    source = {"json": str(json_path), "coco_root": str(coco_root), "split": split}
    data = load_json(json_path)
    frequency = category_frequency(data, json_path)
    # the COCO reader finds an LVIS image as <coco_root>/<folder>/<file> from its coco_url (openseed.data.coco)
    return convert_coco_detection(json_path, coco_root, out, name, maxcount, workers, skip_missing, limit, progress,
                                  keep_masks=True, drop_empty=False, source=source, data=data,
                                  category_frequency=frequency)


def category_frequency(data: dict, json_path: Path) -> dict[int, str]:
    """Each category's LVIS ``frequency`` ("r" / "c" / "f"); a category without one is an error naming it (the
    federated protocol reports AP per frequency group, and an LVIS v1 JSON gives every category one)."""
    out = {}
    if not isinstance(data.get("categories"), list):
        raise DataError(f"{json_path}: no 'categories' list; is this an LVIS v1 JSON?")
    for category in data["categories"]:
        if not isinstance(category, dict) or category.get("frequency") not in FREQUENCIES:
            what = category.get("id") if isinstance(category, dict) else category
            raise DataError(f"{json_path}: category {what!r:.80} has no LVIS 'frequency' ('r', 'c' or 'f'); is this "
                            f"an LVIS v1 JSON?")
        out[int(category["id"])] = category["frequency"]
    for image in data.get("images") or ():
        missing = [k for k in FEDERATED_KEYS if not isinstance(image.get(k), list)]
        if missing:
            raise DataError(f"{json_path}: image {image.get('id')!r} has no {' / '.join(missing)} list (LVIS's "
                            f"federated evaluation needs both on every image); is this an LVIS v1 JSON?")
    return out


OPTIONS = converter_options(
    split=Option("LVIS v1 split: minival or val (the default name is lvis_v1_<split>)", required=True,
                 check=one_of(SPLITS)),
    json=Option("the LVIS v1 JSON of that split (lvis_v1_val.json, lvis_v1_minival*.json)", required=True,
                check=path),
    coco_root=Option("COCO 2017 image root holding train2017/ and val2017/", required=True, check=path),
)
OPTIONS["name"] = Option("data set name; prefix of the shard files (no dots); default lvis_v1_<split>", None, path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.json, a.coco_root, a.split, a.out, a.name, a.maxcount, a.workers, a.skip_missing,
                                 a.limit, a.progress),
               argv, OPTIONS, "python -m data_prep.lvis", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
