"""The predictor end to end on a tiny model and a real photo: files, sizes, COCO validity, box prompts, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from openseed import Predictor
from openseed.core.predictions import Instances
from openseed.modeling.postprocess import InferenceConfig
from openseed.predict import InstanceResult, load_image, main
from tests._reference import load_npz
from tests.conftest import PANOPTIC

PHOTO = PANOPTIC / "input_images" / "000000142238.jpg"  # 640 x 427


@pytest.fixture(scope="module")
def checkpoint(tiny_model_file):
    return tiny_model_file


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor(checkpoint, device="cpu", image_size=256)


def test_panoptic_files_and_formats(checkpoint, tmp_path):
    # an untrained model scores every class near its prior: with the thresholds open every query is a candidate, so
    # the file checks below run over real segments
    keep_all = InferenceConfig(object_mask_threshold=0.0, overlap_threshold=0.0)
    predictor = Predictor(checkpoint, device="cpu", image_size=256, inference=keep_all)
    result = predictor(PHOTO, ["person", "horse", "grass"], task="panoptic", stuff=["grass"])
    assert result.panoptic_seg.shape == (427, 640)
    assert len(result.segments_info) >= 2
    paths = result.save(tmp_path)
    assert {p.name for p in paths} == {"000000142238_panoptic.png", "000000142238_panoptic.json",
                                       "000000142238_panoptic_ids.png"}
    assert Image.open(tmp_path / "000000142238_panoptic.png").size == (640, 427)
    payload = json.loads((tmp_path / "000000142238_panoptic.json").read_text())
    rgb = np.asarray(Image.open(tmp_path / "000000142238_panoptic_ids.png")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    assert set(np.unique(ids)) - {0} == {s["id"] for s in payload["segments_info"]}
    for segment in payload["segments_info"]:
        assert segment["area"] == int((ids == segment["id"]).sum())
        assert segment["category_name"] in {"person", "horse", "grass"}
        assert segment["isthing"] == (segment["category_name"] != "grass")


def test_instance_json_is_valid_coco(predictor, tmp_path):
    result = predictor(PHOTO, ["person", "horse"], task="instance")
    result.save(tmp_path, score_threshold=0.0)
    payload = json.loads((tmp_path / "000000142238_instance.json").read_text())
    assert payload["height"] == 427 and payload["width"] == 640 and payload["annotations"]
    for record in payload["annotations"]:
        assert set(record) >= {"image_id", "category_id", "bbox", "score", "segmentation", "category_name"}
        assert mask_utils.decode(record["segmentation"]).shape == (427, 640)
        x, y, w, h = record["bbox"]
        assert 0 <= x <= x + w <= 640 and 0 <= y <= y + h <= 427


def test_instance_results_are_typed_and_select_together(predictor, tmp_path):
    result = predictor(PHOTO, ["person", "horse"], task="instance")
    assert isinstance(result, InstanceResult) and isinstance(result, Instances) and result.task == "instance"
    assert result.image == str(PHOTO) and result.array.shape == (427, 640, 3)
    n = len(result)
    assert n > 2 and result.labels.shape == result.queries.shape == (n,) and result.boxes.shape == (n, 4)
    assert result.masks.shape == (n, 427, 640) and result.masks.dtype == torch.bool
    # a selection keeps each detection's fields together, and the image and vocabulary with them
    keep = torch.zeros(n, dtype=torch.bool)
    keep[[0, 2]] = True
    chosen = result[keep]
    assert isinstance(chosen, InstanceResult) and len(chosen) == 2 and chosen.vocabulary is result.vocabulary
    for field in ("scores", "labels", "queries", "boxes", "masks"):
        assert torch.equal(getattr(chosen, field), getattr(result, field)[[0, 2]]), field
    # the JSON holds every detection whatever the drawing threshold
    threshold = float(result.scores.median())
    result.save(tmp_path, score_threshold=threshold)
    records = json.loads((tmp_path / "000000142238_instance.json").read_text())["annotations"]
    assert len(records) == n
    assert [r["score"] for r in records] == pytest.approx(result.scores.tolist())
    assert [r["category_name"] for r in records] == [["person", "horse"][int(i)] for i in result.labels]


def test_semantic(predictor, tmp_path):
    result = predictor(PHOTO, ["person", "grass", "sky"], task="semantic")
    result.save(tmp_path)
    labels = np.asarray(Image.open(tmp_path / "000000142238_semantic_labels.png"))
    payload = json.loads((tmp_path / "000000142238_semantic.json").read_text())
    assert labels.shape == (427, 640) and np.array_equal(labels, result.sem_seg.numpy())
    assert [c["name"] for c in payload["classes"]] == ["person", "grass", "sky"]
    for entry in payload["classes"]:  # each count is its label's pixels in the PNG
        assert entry["pixels"] == int((labels == entry["label"]).sum())


def test_box_prompts_give_one_mask_per_box(predictor, tmp_path):
    boxes = [[100, 100, 300, 400], [10, 10, 50, 60], [0, 0, 640, 427]]
    result = predictor.segment_boxes(PHOTO, boxes, ["person", "horse", "grass"])
    assert result.masks.shape == (3, 427, 640)
    again = predictor.segment_boxes(PHOTO, boxes, ["person", "horse", "grass"])
    assert torch.equal(result.masks, again.masks)
    result.save(tmp_path)
    records = json.loads((tmp_path / "000000142238_boxes.json").read_text())["annotations"]
    assert [r["category_name"] for r in records] == ["person", "horse", "grass"]
    assert [r["bbox"] for r in records] == [[100, 100, 200, 300], [10, 10, 40, 50], [0, 0, 640, 427]]


def test_an_encoded_image_is_not_encoded_again(predictor, monkeypatch):
    """``encode`` once, then box prompts on it: the same masks as from the file, and the backbone never runs again
    (what an annotation tool relies on: a box costs the decoder only)."""
    boxes = [[100, 100, 300, 400], [10, 10, 50, 60]]
    expected = predictor.segment_boxes(PHOTO, boxes, ["person", "horse"])
    encoded = predictor.encode(PHOTO)
    assert encoded.orig == (427, 640) and encoded.path == str(PHOTO)
    calls = []
    backbone = predictor.model.backbone
    monkeypatch.setattr(backbone, "forward", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("the backbone ran again")))
    for _ in range(2):
        result = predictor.segment_boxes(encoded, boxes, ["person", "horse"])
        assert torch.equal(result.masks, expected.masks) and result.image == str(PHOTO)
    assert calls == []


def test_default_preprocessing_is_longer_side_and_square_padding(predictor):
    images, padding, size, orig = predictor._prepare(load_image(PHOTO)[0])
    assert images.shape == (1, 3, 256, 256) and size == (171, 256) and orig == (427, 640)
    assert not padding[0, :171, :256].any() and padding[0, 171:].all() and images[0, :, 171:].sum() == 0


def test_reference_preprocessing(checkpoint):
    """short_edge / max_size: the reference's evaluation input (PIL bilinear, int(x * s + 0.5), zero padding at the
    bottom and right to a multiple of 32), bit for bit against the recorded input."""
    expected = load_npz("swint_decouple")["input_image_uint8"]
    predictor = Predictor(checkpoint, device="cpu", short_edge=800, max_size=1333)
    images, padding, size, orig = predictor._prepare(load_image(PHOTO)[0])
    assert images.shape == (1, 3, 800, 1216) and size == (800, 1199) and orig == (427, 640)
    assert np.array_equal(images[0, :, :800, :1199].numpy(), expected)
    assert images[0, :, :, 1199:].sum() == 0
    assert not padding[0, :, :1199].any() and padding[0, :, 1199:].all()
    small = Predictor(predictor.model, device="cpu", short_edge=100)
    result = small(PHOTO, ["person", "grass"], task="semantic")
    assert small._prepare(load_image(PHOTO)[0])[0].shape == (1, 3, 128, 160)  # 100 x 150 padded to 32s
    assert result.sem_seg.shape == (427, 640)
    with pytest.raises(ValueError, match="max_size caps short_edge"):
        Predictor(predictor.model, device="cpu", max_size=1333)


def test_bad_input_is_a_clear_error(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        predictor(tmp_path / "nothing.jpg", ["dog"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        predictor(tmp_path / "broken.jpg", ["dog"])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        predictor(PHOTO, [])
    with pytest.raises(ValueError, match="one class name per box"):
        predictor.segment_boxes(PHOTO, [[0, 0, 10, 10]], ["a", "b"])


def test_command_line(checkpoint, tmp_path, capsys):
    code = main([f"ckpt={checkpoint}", f"images=[{PHOTO}]", "vocabulary=[person,horse]", "task=instance",
                 f"out={tmp_path}", "image_size=256", "device=cpu"])
    assert code == 0 and (tmp_path / "000000142238_instance.json").is_file()
    code = main([f"ckpt={checkpoint}", f"images=[{PHOTO}]", "vocabulary=[person]", "boxes=[[10,10,100,100]]",
                 f"out={tmp_path}", "image_size=256", "device=cpu"])
    assert code == 0 and len(json.loads((tmp_path / "000000142238_boxes.json").read_text())["annotations"]) == 1
    assert main([f"ckpt={checkpoint}", "images=[missing.jpg]", "vocabulary=[a]", "device=cpu"]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["images=[x.jpg]", "vocabulary=[a]", "colour=red"]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err
