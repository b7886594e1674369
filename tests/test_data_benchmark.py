"""data_prep.benchmark's GPU-feeding figures: the images/s a GPU consumes (a gpu-check report or the reference's
floor), the workers that feed it, and the joint loader of the paper's setting on real COCO photos."""

import json
from pathlib import Path

import pytest

from data_prep import benchmark, coco_detection_to_shards, coco_panoptic_to_shards
from openseed.data.shards import ShardSet

PANOPTIC = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coco_panoptic_sample"


def test_workers_needed_rounds_up_and_refuses_a_stalled_worker():
    assert benchmark.workers_needed(2.85, 5.0) == 1
    assert benchmark.workers_needed(10.0, 5.0) == 2  # exactly two, not three
    assert benchmark.workers_needed(10.01, 5.0) == 3
    with pytest.raises(ValueError, match="positive"):
        benchmark.workers_needed(1.0, 0.0)


def test_gpu_rate_without_a_report_is_the_reference_floor(tmp_path):
    assert benchmark.gpu_images_per_second(None) == (2.85, "the reference's training speed per V100, as the floor")
    broken = tmp_path / "gpu_check.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="gpu_check.json: not a gpu_check.json"):
        benchmark.gpu_images_per_second(broken)
    nothing_ran = tmp_path / "oom.json"
    nothing_ran.write_text(json.dumps({"sections": {"train_step": {"status": "ok", "figures": {
        "tried": [{"seg": 4, "det": 8, "fits": False}]}}}}))
    with pytest.raises(ValueError, match="oom.json: its train_step section has no step that ran"):
        benchmark.gpu_images_per_second(nothing_ran)
    fitted = tmp_path / "fitted.json"
    fitted.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "sections": {"train_step": {
        "status": "ok", "figures": {"tried": [{"seg": 4, "det": 8, "fits": False},
                                              {"seg": 2, "det": 4, "fits": True, "images_per_s": 9.5}]}}}}))
    assert benchmark.gpu_images_per_second(fitted) == (9.5, f"{fitted}: NVIDIA H200, 2 + 4 images per step")


def test_joint_loader_on_coco_photos(tmp_path):
    seg, det = tmp_path / "seg", tmp_path / "det"
    coco_panoptic_to_shards.convert(PANOPTIC / "panoptic_examples.json", PANOPTIC / "panoptic_examples",
                                    PANOPTIC / "input_images", seg, "coco_sample", progress=False)
    coco_detection_to_shards.convert(PANOPTIC / "panoptic_coco_detection_format.json", PANOPTIC / "input_images",
                                     det, "coco_det_sample", progress=False, keep_masks=False)
    assert ShardSet.open(det).num_samples == 2 and ShardSet.open(det).task == "det"
    rate = benchmark.joint_images_per_second(seg, det, workers=0, batches=2, batch_sizes={"seg": 2, "det": 3},
                                             image_size=256)
    assert 0 < rate < 10_000
