"""Converters -> shards -> samples, on the real COCO panoptic sample and the labelme COCO export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from openseed.data.shards import STREAM_SKIPS, ShardSet, read_shards
from tests.conftest import LABELME, PANOPTIC, read_tar


def _png_ids(name: str) -> np.ndarray:
    rgb = np.asarray(Image.open(PANOPTIC / "panoptic_examples" / name).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_panoptic_sample_reads_back_pixel_for_pixel(panoptic_shards):
    gt = json.loads((PANOPTIC / "panoptic_examples.json").read_text())
    categories = {c["id"]: c for c in json.loads((PANOPTIC / "panoptic_coco_categories.json").read_text())}
    shard_set = ShardSet.open(panoptic_shards)
    assert shard_set.task == "seg" and shard_set.num_samples == 2 and len(shard_set.vocabulary) == 133
    samples = {s.image_id: s for s in read_shards(panoptic_shards)}
    assert set(samples) == {a["id"] for a in gt["images"]}
    checked = crowds = 0
    for ann in gt["annotations"]:
        sample = samples[ann["image_id"]]
        ids = _png_ids(ann["file_name"])
        image = np.asarray(Image.open(PANOPTIC / "input_images" / ann["file_name"].replace(".png", ".jpg")))
        assert torch.equal(sample.image.permute(1, 2, 0), torch.from_numpy(image.copy()))  # JPEG decoded as PIL does
        non_crowd = [s for s in ann["segments_info"] if not s["iscrowd"]]
        assert len(sample.labels) == len(non_crowd)
        for i, segment in enumerate(non_crowd):
            truth = ids == segment["id"]
            assert np.array_equal(sample.masks[i].numpy(), truth)
            x, y, w, h = segment["bbox"]
            assert sample.boxes[i].tolist() == [x, y, x + w, y + h]  # the JSON's boxes are the masks' tight boxes
            category = shard_set.vocabulary.categories[int(sample.labels[i])]
            assert category.id == segment["category_id"]
            assert bool(sample.is_thing[i]) == bool(categories[segment["category_id"]]["isthing"])
            checked += 1
        crowd = [s["id"] for s in ann["segments_info"] if s["iscrowd"]]
        crowds += len(crowd)
        assert np.array_equal(sample.ignore_mask.numpy(), np.isin(ids, crowd))
    assert checked == 47 and crowds == 3  # 50 segments, 3 of them crowd (realdata/README.md)


def test_panoptic_shard_members_and_keys(panoptic_shards):
    manifest = json.loads((panoptic_shards / "manifest.json").read_text())
    names = [n for s in manifest["shards"] for n, _ in read_tar(panoptic_shards / s["file"])]
    assert sorted(names) == sorted(f"{i:012d}.{ext}" for i in (142238, 439180)
                                   for ext in ("jpg", "json", "panoptic.png"))
    raw = dict(read_tar(panoptic_shards / manifest["shards"][0]["file"]))
    original = (PANOPTIC / "input_images" / "000000142238.jpg").read_bytes()
    assert raw["000000142238.jpg"] == original  # JPEGs are stored untouched
    assert raw["000000142238.panoptic.png"] == (PANOPTIC / "panoptic_examples" / "000000142238.png").read_bytes()


def test_labelme_export_with_ids_from_zero(labelme_shards):
    gt = json.loads((LABELME / "annotations.json").read_text())
    shard_set = ShardSet.open(labelme_shards)
    assert shard_set.task == "det" and shard_set.mask_format == "rle"
    assert shard_set.vocabulary.ids == [c["id"] for c in gt["categories"]] and shard_set.vocabulary.ids[0] == 0
    samples = {s.image_id: s for s in read_shards(labelme_shards)}
    assert sorted(samples) == [0, 1, 2]  # image id 0 survives
    for image in gt["images"]:
        sample = samples[image["id"]]
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        assert len(sample.labels) == len(anns) > 0
        for i, ann in enumerate(anns):
            assert shard_set.vocabulary.categories[int(sample.labels[i])].id == ann["category_id"]
            x, y, w, h = ann["bbox"]
            assert sample.boxes[i].tolist() == pytest.approx([x, y, x + w, y + h])
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
            assert np.array_equal(sample.masks[i].numpy(), mask_utils.decode(rle).astype(bool))
        assert sample.masks.shape == (len(anns), image["height"], image["width"])


def test_boxes_only_detection_has_no_masks(tmp_path):
    from data_prep.coco_detection_to_shards import convert

    summary = convert(LABELME / "annotations.json", LABELME, tmp_path, "labelme_boxes", keep_masks=False,
                      progress=False)
    assert summary.written == 3 and summary.objects == 12
    shard_set = ShardSet.open(tmp_path)
    assert shard_set.mask_format == "none"
    assert all(s.masks is None and s.ignore_mask is None for s in read_shards(tmp_path))


def test_shard_rotation_and_workers(tmp_path):
    from data_prep.coco_detection_to_shards import convert

    summary = convert(LABELME / "annotations.json", LABELME, tmp_path, "labelme", maxcount=2, workers=2,
                      progress=False)
    shard_set = ShardSet.open(tmp_path)
    assert shard_set.counts == (2, 1) and [s["count"] for s in summary.shards] == [2, 1]
    assert [s.image_id for s in read_shards(tmp_path)] == [0, 1, 2]  # written in input order by any worker count


def test_stream_skip_counter_counts_each_skip(caplog, panoptic_shards, tmp_path):
    from tests.conftest import clone_shard_set

    def corrupt(index, sample):
        if index == 1:
            sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 3]  # truncated JPEG

    broken = clone_shard_set(panoptic_shards, tmp_path / "broken", [3], mutate=corrupt)
    before = sum(STREAM_SKIPS.counts.values())
    with caplog.at_level("WARNING"):
        ids = [s.image_id for s in read_shards(broken)]
    assert ids == [1, 3]  # the stream goes on after the broken sample
    assert sum(STREAM_SKIPS.counts.values()) == before + 1
    assert any("000000000002" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


def test_inspect_tool_draws_the_targets(panoptic_shards, tmp_path, capsys):
    from data_prep.inspect_shards import main

    assert main([f"root={panoptic_shards}", f"out={tmp_path / 'grid.png'}", "count=2"]) == 0
    out = capsys.readouterr().out
    assert "coco_panoptic_sample: task seg, masks panoptic, 2 images" in out and "47 targets" in out
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert grid.shape == (427, 2 * 640, 3)
    photo = np.asarray(Image.open(PANOPTIC / "input_images" / "000000142238.jpg").convert("RGB")).astype(int)
    assert np.abs(grid[:, :640] - photo).mean() > 10  # masks were blended in
    assert main([f"root={tmp_path / 'nothing'}"]) == 2
    assert main([str(panoptic_shards)]) == 2  # a bare path is not a key=value word
    assert "is not a key=value word" in capsys.readouterr().err
