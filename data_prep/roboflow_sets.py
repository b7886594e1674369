"""Convert the Roboflow-exported benchmark suites SegInW (25 instance segmentation sets) and ODinW (35 detection
sets) to shards, one shard folder per set.

    python -m data_prep.roboflow_sets suite=seginw root=/data/seginw split=valid out=data/benchmarks
    python -m data_prep.roboflow_sets suite=odinw root=/data/odinw split=valid out=data/benchmarks

Every set found under ``root`` is converted into ``<out>/<suite>_<set>_<split>`` (the set's folder path with every
character outside ``A-Za-z0-9_-`` read as ``_``: ``odinw/Aquarium/Aquarium Combined.v2-raw-1024.coco`` ->
``odinw_Aquarium_Aquarium_Combined_v2-raw-1024_coco_valid``); the command prints the sets it found, what each
conversion wrote and skipped, and the sets of the paper's suite that are missing under ``root``.

Layouts (a Roboflow COCO export: a JSON with the images beside it):

- SegInW, as X-Decoder's ``register_seginw_instance.py`` reads it:
  ``<root>/<Set>/<split>/_annotations_min1cat.coco.json`` (else Roboflow's own ``_annotations.coco.json``) with the
  images in ``<root>/<Set>/<split>/``. Task "det" with the polygon masks as RLE (mask AP and box AP).
- ODinW, as GLIP's ``configs/odinw_35/*.yaml`` read it:
  ``<root>/<Set>[/<version>]/<split>/annotations_without_background.json`` (else ``_annotations.coco.json``), and
  for the four sets exported without split folders (``boggleBoards``, ``dice``, ``pistols``, ``selfdrivingCar``)
  ``<root>/<Set>/<version>/export/{train,val,test}_annotations_without_background.json`` with the images in
  ``export/``.
  Task "det", boxes only.

``split`` is ``train``, ``valid`` or ``test`` (``valid`` reads ``val_...`` in an ``export/`` folder). Roboflow numbers
categories from 0 and writes its project as category 0, the super-category of every class
(``{"id": 0, "name": "cells", "supercategory": "none"}``, the others ``"supercategory": "cells"``): such a category (its
``supercategory`` is ``"none"`` and other categories name it as theirs) is left out of the vocabulary, the summary
says so, and an annotation that uses it is an error naming the file. Category 0 of the benchmark JSONs above (where
GLIP and X-Decoder already removed it, e.g. SegInW Cows ``{"id": 0, "name": "cow", "supercategory": "cow"}``) is a
class and stays. Class names: SegInW's are the JSON's own (X-Decoder prompts with them); ODinW's are, with
``names=glip`` (the default), the ones GLIP prompts each set with (its configs' ``OVERRIDE_CATEGORY``,
``data_prep.odinw_names``), matched by category id; a class the table does not name, or names blank (Chess Pieces'
id 1), keeps the JSON's name. The manifest's ``source`` lists every renamed class. ``names=json`` keeps the JSON's
names. ``--help`` lists every key.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_prep._cli import CONVERTER_OPTIONS, run
from data_prep.coco_detection_to_shards import convert as convert_coco_detection
from data_prep.odinw_names import GLIP_ODINW_NAMES
from data_prep.shard_writer import ConversionSummary
from openseed.cli import Option, one_of, path, string_list
from openseed.data.coco import DataError, load_json

SUITES = ("seginw", "odinw")
SPLITS = ("train", "valid", "test")

#: The 25 SegInW sets (X-Decoder, ``datasets/registration/register_seginw_instance.py``, ``_CATEGORIES``): folder names
#: under the SegInW root.
SEGINW_SETS = (
    "Elephants", "Hand-Metal", "Watermelon", "House-Parts", "HouseHold-Items", "Strawberry", "Fruits",
    "Nutterfly-Squireel", "Hand", "Garbage", "Chicken", "Rail", "Airplane-Parts", "Brain-Tumor", "Poles",
    "Electric-Shaver", "Bottles", "Toolkits", "Trash", "Salmon-Fillet", "Puppies", "Tablets", "Phones", "Cows",
    "Ginger-Garlic",
)

#: The 35 ODinW sets (GLIP, ``configs/odinw_35/_all.json`` and each config's ``img_dir``): folder paths under the ODinW
#: root, the folder that holds the split folders (or the ``export/`` folder itself).
ODINW_SETS = (
    "AerialMaritimeDrone/large", "AerialMaritimeDrone/tiled",
    "AmericanSignLanguageLetters/American Sign Language Letters.v1-v1.coco",
    "Aquarium/Aquarium Combined.v2-raw-1024.coco", "BCCD/BCCD.v3-raw.coco", "ChessPieces/Chess Pieces.v23-raw.coco",
    "CottontailRabbits", "DroneControl/Drone Control.v3-raw.coco", "EgoHands/generic", "EgoHands/specific",
    "HardHatWorkers/raw", "MaskWearing/raw", "MountainDewCommercial",
    "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco", "OxfordPets/by-breed", "OxfordPets/by-species",
    "PKLot/640", "Packages/Raw", "PascalVOC", "Raccoon/Raccoon.v2-raw.coco", "ShellfishOpenImages/raw",
    "ThermalCheetah", "UnoCards/raw", "VehiclesOpenImages/416x416", "WildfireSmoke",
    "boggleBoards/416x416AutoOrient/export", "brackishUnderwater/960x540", "dice/mediumColor/export",
    "openPoetryVision/512x512", "pistols/export", "plantdoc/416x416", "pothole", "selfdrivingCar/fixedLarge/export",
    "thermalDogsAndPeople", "websiteScreenshots",
)

SUITE_SETS = {"seginw": SEGINW_SETS, "odinw": ODINW_SETS}
NAME_SOURCES = ("glip", "json")
#: Annotation files of a split folder, in the order they are preferred: the benchmark's own, then Roboflow's.
SPLIT_FOLDER_JSONS = {"seginw": ("_annotations_min1cat.coco.json", "_annotations.coco.json"),
                      "odinw": ("annotations_without_background.json", "_annotations.coco.json")}
#: ODinW sets exported without split folders: ``export/<prefix>_annotations_without_background.json``.
EXPORT_FOLDER = "export"
EXPORT_PREFIX = {"train": "train", "valid": "val", "test": "test"}
EXPORT_JSON = "{}_annotations_without_background.json"
#: Roboflow's super-category marks itself with this ``supercategory``.
NO_SUPERCATEGORY = "none"


@dataclass
class FoundSet:
    """One set of a suite found under the root: its name (folder path under the root), annotation file and image
    folder."""

    name: str
    json_path: Path
    image_dir: Path


@dataclass
class SuiteSummary:
    """What a suite conversion found, wrote, left out and missed; ``report`` is what the command prints."""

    suite: str
    root: Path
    split: str
    found: list[FoundSet]
    missing: list[str]
    outside: list[str]  # found sets that are not in the paper's suite
    results: list[tuple[FoundSet, Path, list[dict], ConversionSummary]] = field(default_factory=list)

    def report(self) -> str:
        in_suite = sum(1 for found in self.found if found.name in SUITE_SETS[self.suite])
        lines = [f"{self.suite} ({self.split}) under {self.root}: converting {in_suite} set(s) of the "
                 f"{len(SUITE_SETS[self.suite])} in the paper's suite"
                 + (f" and {len(self.found) - in_suite} other(s)" if len(self.found) > in_suite else "")]
        lines += [f"  {found.name}: {found.json_path}" for found in self.found]
        for found, out_dir, left_out, summary in self.results:
            lines.append(f"{found.name} -> {out_dir}")
            for category in left_out:
                lines.append(f"  left out of the vocabulary: category {category['id']} {category['name']!r} "
                             "(Roboflow super-category, used by no annotation)")
            lines.append(summary.report())
        if self.outside:
            lines.append(f"not in the paper's {self.suite} suite (converted too): {', '.join(self.outside)}")
        if self.missing:
            lines.append(f"missing under {self.root} ({len(self.missing)} of {len(SUITE_SETS[self.suite])} sets of "
                         f"the paper's {self.suite} suite): {', '.join(self.missing)}")
        else:
            lines.append(f"every set of the paper's {self.suite} suite was found")
        return "\n".join(lines)


def shard_name(suite: str, set_name: str, split: str) -> str:
    """``<suite>_<set>_<split>`` with every character outside ``A-Za-z0-9_-`` read as ``_`` (shard prefixes have no
    dots, slashes or spaces)."""
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{suite}_{set_name}_{split}")
    return re.sub(r"_+", "_", text).strip("_")


def find_sets(suite: str, root: str | Path, split: str) -> list[FoundSet]:
    """Every set of ``suite``'s layout under ``root`` that has ``split``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{suite} root not found: {root}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    found: dict[str, FoundSet] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        folder = Path(folder)
        names = set(files)
        if folder.name == split:
            for candidate in SPLIT_FOLDER_JSONS[suite]:
                if candidate in names:
                    found.setdefault(_set_name(root, folder.parent), FoundSet(
                        _set_name(root, folder.parent), folder / candidate, folder))
                    break
        export_json = EXPORT_JSON.format(EXPORT_PREFIX[split])
        if suite == "odinw" and folder.name == EXPORT_FOLDER and export_json in names:
            name = _set_name(root, folder)
            found.setdefault(name, FoundSet(name, folder / export_json, folder))
    return [found[name] for name in sorted(found)]


def _set_name(root: Path, folder: Path) -> str:
    relative = folder.relative_to(root).as_posix()
    return root.resolve().name if relative == "." else relative


def super_categories(data: dict, json_path: Path) -> list[dict]:
    """Roboflow's super-category entries of a COCO JSON: ``supercategory`` "none", named as the super-category of
    other categories. An annotation that uses one is an error naming the file."""
    categories = data.get("categories")
    if not isinstance(categories, list):
        return []  # the reader names what is missing
    entries = [c for c in categories if isinstance(c, dict)]
    supers = [c for c in entries if c.get("supercategory") == NO_SUPERCATEGORY
              and any(o is not c and o.get("supercategory") == c.get("name") for o in entries)]
    ids = {c.get("id") for c in supers}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and ann.get("category_id") in ids:
            category = next(c for c in supers if c.get("id") == ann.get("category_id"))
            raise DataError(f"{json_path}: annotation {ann.get('id')!r} (image {ann.get('image_id')!r}) uses category "
                            f"{category.get('id')} {category.get('name')!r}, the Roboflow super-category of the other "
                            "classes; a super-category labels no object")
    return supers


def glip_names(data: dict, set_name: str) -> tuple[dict, list[dict]]:
    """``data`` with its categories named as GLIP prompts ODinW set ``set_name`` (``GLIP_ODINW_NAMES``, by id), and
    the renamings ``[{"id", "from", "to"}]``. Categories the table does not name (or names blank) keep their name."""
    table = dict(GLIP_ODINW_NAMES.get(set_name, ()))
    renamed, categories = [], []
    for category in data.get("categories") or []:
        new = table.get(category.get("id")) if isinstance(category, dict) else None
        if new is not None and new.strip() and new != category.get("name"):
            renamed.append({"id": category["id"], "from": category.get("name"), "to": new})
            category = {**category, "name": new}
            category.pop("synonyms", None)
        categories.append(category)
    return ({**data, "categories": categories} if renamed else data), renamed


def convert_set(suite: str, found: FoundSet, split: str, out_dir: Path, name: str, maxcount=1000, workers=0,
                skip_missing=False, limit=None, progress=True, names: str = "glip"
                ) -> tuple[list[dict], ConversionSummary]:
    """One set: its JSON without the Roboflow super-category (ODinW: with GLIP's class names unless ``names`` is
    "json"), through the COCO detection converter."""
    data = load_json(found.json_path)  # a missing or malformed file is named here
    left_out = super_categories(data, found.json_path)
    if left_out:
        dropped = {id(c) for c in left_out}
        data = {**data, "categories": [c for c in data["categories"] if id(c) not in dropped]}
    source = {"suite": suite, "set": found.name, "split": split, "json": str(found.json_path),
              "left_out_categories": [{"id": c.get("id"), "name": c.get("name")} for c in left_out]}
    if suite == "odinw" and names == "glip":
        data, renamed = glip_names(data, found.name)
        source.update(names="glip" if found.name in GLIP_ODINW_NAMES else "json (no GLIP config for this set)",
                      renamed_categories=renamed)
    summary = convert_coco_detection(found.json_path, found.image_dir, out_dir, name, maxcount, workers, skip_missing,
                                     limit, progress, keep_masks=suite == "seginw", drop_empty=False, source=source,
                                     data=data)
    return [{"id": c.get("id"), "name": c.get("name")} for c in left_out], summary


def convert(suite, root, split, out, sets=None, maxcount=1000, workers=0, skip_missing=False, limit=None,
            progress=True, names="glip") -> SuiteSummary:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, not {suite!r}")
    root, out = Path(root), Path(out)
    found = everything = find_sets(suite, root, split)
    if not found:
        layout = ("<root>/<Set>/<split>/_annotations_min1cat.coco.json or _annotations.coco.json"
                  if suite == "seginw" else
                  "<root>/<Set>[/<version>]/<split>/annotations_without_background.json (or _annotations.coco.json), "
                  "or <root>/<Set>/<version>/export/val_annotations_without_background.json")
        raise DataError(f"{root}: no {suite} set with a {split!r} split found (expected {layout})")
    if sets:
        known = {f.name: f for f in found} | {shard_name(suite, f.name, split): f for f in found}
        unknown = [s for s in sets if s not in known]
        if unknown:
            raise DataError(f"{root}: set(s) {unknown} not found; found: {[f.name for f in found]}")
        found = list({id(known[s]): known[s] for s in sets}.values())
    found_names = {f.name for f in everything}
    expected = SUITE_SETS[suite]
    summary = SuiteSummary(suite, root, split, found, missing=[s for s in expected if s not in found_names],
                           outside=sorted(n for n in found_names if n not in expected))
    print(f"{suite} ({split}): found {len(found)} set(s) under {root}: {', '.join(f.name for f in found)}", flush=True)
    for one in found:
        name = shard_name(suite, one.name, split)
        left_out, result = convert_set(suite, one, split, out / name, name, maxcount, workers, skip_missing, limit,
                                       progress, names)
        summary.results.append((one, out / name, left_out, result))
    return summary


def _set_list(value, key):
    return None if value is None else string_list(value, key)


OPTIONS = {
    "suite": Option("seginw (25 instance segmentation sets) or odinw (35 detection sets)", required=True,
                    check=one_of(SUITES)),
    "root": Option("the suite's folder (holding the sets' folders)", required=True, check=path),
    "split": Option("train, valid or test", "valid", one_of(SPLITS)),
    "sets": Option("convert only these sets ([name,...]: folder path under root, or shard name); null: all", None,
                   _set_list),
    "names": Option("ODinW class names: glip (as GLIP prompts each set) or json (the JSON's own)", "glip",
                    one_of(NAME_SOURCES)),
    **{k: v for k, v in CONVERTER_OPTIONS.items() if k != "name"},
}
OPTIONS["out"] = Option("output folder; each set goes to <out>/<suite>_<set>_<split>", required=True, check=path)


def main(argv=None) -> int:
    return run(lambda a: convert(a.suite, a.root, a.split, a.out, a.sets, a.maxcount, a.workers, a.skip_missing,
                                 a.limit, a.progress, a.names),
               argv, OPTIONS, "python -m data_prep.roboflow_sets", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
