"""Layouts of real detection data sets: Objects365 patch folders, LVIS coco_url names and synonyms, non-JPEG images."""

import json
import shutil

import numpy as np
from PIL import Image

from data_prep.coco_detection_to_shards import convert
from openseed.data.coco import resolve_image
from openseed.data.shards import ShardSet, read_shards
from tests.conftest import LABELME, read_tar


def _labelme_json() -> dict:
    return json.loads((LABELME / "annotations.json").read_text())


def test_objects365_v2_patch_paths(tmp_path):
    data = _labelme_json()
    root = tmp_path / "objects365" / "train"
    for i, image in enumerate(data["images"]):
        patch = root / f"patch{i}"
        patch.mkdir(parents=True)
        shutil.copy(LABELME / image["file_name"], patch)
        image["file_name"] = f"images/v2/patch{i}/{image['file_name'].split('/')[-1]}"
    (tmp_path / "zhiyuan_objv2_val.json").write_text(json.dumps(data))
    assert resolve_image(root, "images/v2/patch1/2011_000025.jpg") == root / "patch1" / "2011_000025.jpg"
    summary = convert(tmp_path / "zhiyuan_objv2_val.json", root, tmp_path / "out", "o365", progress=False,
                      keep_masks=False)
    assert summary.written == 3 and not summary.skipped_images


def test_lvis_coco_url_synonyms_and_negative_ids(tmp_path):
    data = _labelme_json()
    for image in data["images"]:
        image["coco_url"] = "http://images.example/val2017/" + image.pop("file_name").split("/")[-1]
        image["neg_category_ids"] = [3]
        image["not_exhaustive_category_ids"] = []
    data["categories"][15]["synonyms"] = ["person", "human"]
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    convert(tmp_path / "lvis.json", LABELME / "JPEGImages", tmp_path / "out", "lvis", progress=False)
    vocab = ShardSet.open(tmp_path / "out").vocabulary
    assert vocab.categories[15].synonyms == ("person", "human")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    raw = dict(read_tar(tmp_path / "out" / manifest["shards"][0]["file"]))
    meta = json.loads(next(v for k, v in raw.items() if k.endswith(".json")))
    assert meta["extra"] == {"neg_category_ids": [3], "not_exhaustive_category_ids": []}


def test_png_images_are_stored_as_jpeg(tmp_path):
    data = _labelme_json()
    (tmp_path / "img").mkdir()
    for image in data["images"]:
        name = image["file_name"].split("/")[-1].replace(".jpg", ".png")
        Image.open(LABELME / image["file_name"]).save(tmp_path / "img" / name)
        image["file_name"] = name
    (tmp_path / "ann.json").write_text(json.dumps(data))
    summary = convert(tmp_path / "ann.json", tmp_path / "img", tmp_path / "out", "pngs", progress=False)
    assert summary.written == 3 and summary.reencoded_images == 3
    for sample in read_shards(tmp_path / "out"):
        name = next(i["file_name"] for i in data["images"] if i["id"] == sample.image_id)
        original = np.asarray(Image.open(tmp_path / "img" / name))
        difference = np.abs(sample.image.permute(1, 2, 0).numpy().astype(int) - original.astype(int)).mean()
        assert difference < 3  # JPEG at quality 95, same picture


def test_image_without_annotations_keeps_the_data_sets_mask_format(tmp_path):
    data = _labelme_json()
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    summary = convert(tmp_path / "ann.json", LABELME, tmp_path / "out", "lm", progress=False)
    assert summary.written == 3  # kept: an evaluation set needs its empty images
    samples = {s.image_id: s for s in read_shards(tmp_path / "out")}
    assert samples[1].masks.shape == (0, 375, 500) and len(samples[1].labels) == 0
    assert samples[0].masks.shape[0] == len(samples[0].labels) > 0
    dropped = convert(tmp_path / "ann.json", LABELME, tmp_path / "out2", "lm", progress=False, drop_empty=True)
    assert dropped.written == 2 and dropped.skipped_images == {"no annotations": 1}
