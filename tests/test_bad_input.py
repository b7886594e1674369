"""Bad input gets a clear error naming the file, or a counted, logged skip; never silent loss."""

import json
import shutil

import pytest

from data_prep import coco_detection_to_shards, coco_panoptic_to_shards
from openseed.data.coco import DataError
from openseed.data.shards import ShardSet
from tests.conftest import LABELME, PANOPTIC


@pytest.fixture()
def labelme_copy(tmp_path):
    root = tmp_path / "labelme"
    shutil.copytree(LABELME, root)
    return root


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_missing_image_is_an_error_naming_the_file(labelme_copy, tmp_path):
    (labelme_copy / "JPEGImages" / "2011_000025.jpg").unlink()
    with pytest.raises(DataError, match=r"annotations\.json.*2011_000025\.jpg.*not found"):
        coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy, tmp_path / "out", "lm",
                                         progress=False)
    summary = coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy, tmp_path / "out",
                                               "lm", skip_missing=True, progress=False)
    assert summary.written == 2 and summary.skipped_images == {"missing image file": 1}


def test_unknown_category_is_an_error_naming_the_file(labelme_copy, tmp_path):
    _edit(labelme_copy / "annotations.json", lambda d: d["annotations"][3].update(category_id=999))
    with pytest.raises(DataError, match=r"annotations\.json.*unknown category id 999"):
        coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy, tmp_path / "o", "lm",
                                         progress=False)


def test_unknown_panoptic_category_is_an_error(tmp_path):
    gt = tmp_path / "panoptic.json"
    shutil.copy(PANOPTIC / "panoptic_examples.json", gt)
    _edit(gt, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=4242))
    with pytest.raises(DataError, match=r"panoptic\.json.*unknown category id 4242"):
        coco_panoptic_to_shards.convert(gt, PANOPTIC / "panoptic_examples", PANOPTIC / "input_images",
                                        tmp_path / "o", "pan", progress=False)


@pytest.mark.parametrize("content, message", [
    ("{\"images\": [", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"images\": []}", "missing top-level key"),
])
def test_malformed_annotation_file(tmp_path, content, message):
    bad = tmp_path / "broken.json"
    bad.write_text(content)
    with pytest.raises(DataError, match=rf"broken\.json.*{message}"):
        coco_detection_to_shards.convert(bad, tmp_path, tmp_path / "o", "x", progress=False)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"annotation file not found: .*nothing\.json"):
        coco_detection_to_shards.convert(tmp_path / "nothing.json", tmp_path, tmp_path / "o", "x", progress=False)


def test_cli_reports_errors_in_one_line(labelme_copy, tmp_path, capsys):
    _edit(labelme_copy / "annotations.json", lambda d: d["annotations"][0].update(category_id=77))
    code = coco_detection_to_shards.main([f"json={labelme_copy / 'annotations.json'}", f"image_dir={labelme_copy}",
                                          f"out={tmp_path / 'o'}", "name=lm", "workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "unknown category id 77" in err and "Traceback" not in err


def test_corrupt_image_at_conversion_is_counted_and_skipped(labelme_copy, tmp_path, caplog):
    path = labelme_copy / "JPEGImages" / "2011_000003.jpg"
    path.write_bytes(path.read_bytes()[:6000])  # header intact, scan data cut: only a full decode notices
    with caplog.at_level("WARNING"):
        summary = coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy,
                                                   tmp_path / "o", "lm", progress=False)
    assert summary.written == 2
    assert sum(summary.skipped_images.values()) == 1
    assert summary.skipped_images == {"unreadable image": 1}
    assert any("2011_000003.jpg" in r.getMessage() for r in caplog.records)
    assert "skipped images: 1" in summary.report()


def test_degenerate_boxes_are_counted(labelme_copy, tmp_path):
    _edit(labelme_copy / "annotations.json", lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 5]))
    summary = coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy, tmp_path / "o",
                                               "lm", progress=False)
    assert summary.objects == 11 and summary.skipped_objects == {"degenerate box": 1}


def test_panoptic_segment_absent_from_png_is_counted(tmp_path):
    gt = tmp_path / "panoptic.json"
    shutil.copy(PANOPTIC / "panoptic_examples.json", gt)
    _edit(gt, lambda d: d["annotations"][0]["segments_info"].append(
        {"id": 123456, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}))
    summary = coco_panoptic_to_shards.convert(gt, PANOPTIC / "panoptic_examples", PANOPTIC / "input_images",
                                              tmp_path / "o", "pan", progress=False)
    assert summary.objects == 50 and summary.skipped_objects == {"segment absent from PNG": 1}


def test_image_size_mismatch_is_skipped(labelme_copy, tmp_path):
    _edit(labelme_copy / "annotations.json", lambda d: d["images"][0].update(height=100))
    summary = coco_detection_to_shards.convert(labelme_copy / "annotations.json", labelme_copy, tmp_path / "o",
                                               "lm", progress=False)
    assert summary.written == 2 and summary.skipped_images == {"image size differs from the JSON": 1}


def test_opening_unconverted_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardSet.open(tmp_path)


def test_missing_shard_file(labelme_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(labelme_shards, copy)
    next(copy.glob("*.tar")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardSet.open(copy)
