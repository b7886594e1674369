"""The shard kinds the benchmark converters write: semantic label maps (8- and 16-bit, with their ignore value) and
panoptic id maps read from a data set's own files (``IdMap``), read back pixel-exact and scored by the oracle."""

import io
import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.shard_writer import IdMap, Unreadable, encode_panoptic, encode_semantic, write_shards
from openseed.core.codecs import decode_label_png, decode_panoptic_png
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError, ImageRecord
from openseed.data.shards import VOID, ShardSet, read_shards
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.oracle import main as oracle_main
from openseed.evaluation.runner import DatasetEvaluator

H, W = 24, 32


def _image(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _label_maps(num_classes, count=3):
    """Per image: category ids (``100 + class``) in blocks, a void stripe; the last image uses the top class."""
    maps = []
    for k in range(count):
        ids = np.full((H, W), 100 + k, dtype=np.int64)
        ids[:, 10:20] = 100 + (k + 1) % num_classes
        ids[12:, :] = 100 + num_classes - 1
        ids[:, :3] = VOID
        maps.append(ids)
    return maps


def _read_npy(record):
    path = record.image_path.with_suffix(".npy")
    if not path.is_file():
        raise Unreadable("unreadable label map", path, "missing")
    return np.load(path), path


def _semantic_set(tmp_path, num_classes, name="sem"):
    vocab = Vocabulary.from_coco_categories([{"id": 100 + c, "name": f"class {c}", "isthing": c % 2 == 0}
                                             for c in range(num_classes)])
    records, maps = [], _label_maps(num_classes)
    for k, ids in enumerate(maps):
        image = _image(tmp_path / f"img{k}.png", k)
        np.save(image.with_suffix(".npy"), ids)
        records.append(ImageRecord(k + 1, image, H, W, []))
    out = tmp_path / name
    summary = write_shards(records, partial(encode_semantic, vocab=vocab, dataset=name, read=_read_npy), out, name,
                           "sem", "semantic", vocab, progress=False)
    return out, maps, summary


@pytest.mark.parametrize("num_classes,bits", [(5, 8), (300, 16)])
def test_semantic_label_maps_read_back_exactly(tmp_path, num_classes, bits):
    out, maps, summary = _semantic_set(tmp_path, num_classes)
    assert summary.written == 3 and ShardSet.open(out).task == "sem"
    ignore = 255 if bits == 8 else 65535
    samples = list(read_shards(out))
    for sample, ids in zip(samples, maps):
        meta = sample.annotation
        assert meta["mask_format"] == "semantic" and meta["ignore_label"] == ignore
        stored = decode_label_png(sample.semantic_png)
        with Image.open(io.BytesIO(sample.semantic_png)) as png:
            assert png.mode == ("L" if bits == 8 else "I;16")
        expected = np.where(ids == VOID, ignore, ids - 100)
        np.testing.assert_array_equal(stored, expected)
        # one target per class present, its mask the class's pixels, its box the tight box; void is no target
        assert sorted(sample.labels.tolist()) == sorted(set((ids[ids != VOID] - 100).tolist()))
        for label, mask, box in zip(sample.labels.tolist(), sample.masks, sample.boxes.tolist()):
            np.testing.assert_array_equal(mask.numpy(), ids == 100 + label)
            ys, xs = np.nonzero(ids == 100 + label)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert not sample.masks.any(0)[:, :3].any()
        assert sample.is_thing.tolist() == [label % 2 == 0 for label in sample.labels.tolist()]


def test_semantic_oracle_scores_one_and_a_perturbation_matches_a_plain_miou(tmp_path):
    out, maps, _ = _semantic_set(tmp_path, 300)  # 16-bit: class 255 is a class, not void
    assert any((ids == 100 + 255).any() for ids in maps) is False  # classes used: 0-3 and 299
    metrics = score(out)
    assert metrics["mIoU"] == 1.0 and metrics["pACC"] == 1.0 and metrics["fwIoU"] == 1.0

    def perturbed(sample, vocabulary):
        pred = oracle_predictions(sample, vocabulary)["semantic"].sem_seg.clone()
        pred[:6, 5:25] = 255  # a class no image has: counted against the classes it overwrote
        return {"semantic": type(oracle_predictions(sample, vocabulary)["semantic"])(pred)}

    got = score(out, perturbed)
    conf = np.zeros((300, 300), dtype=np.int64)
    for ids in maps:
        pred = np.where(ids == VOID, 0, ids - 100)
        pred[:6, 5:25] = 255
        valid = ids != VOID
        np.add.at(conf, ((ids - 100)[valid], pred[valid]), 1)
    tp, gt, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt > 0
    assert got["mIoU"] == pytest.approx(np.mean(tp[present] / (gt + predicted - tp)[present]), abs=1e-12)
    assert got["mIoU"] < 1.0
    assert got["per_class"]["IoU"]["class 255"] is None  # no ground truth of it: left out, as detectron2 does


def test_semantic_reader_errors_and_skips(tmp_path):
    vocab = Vocabulary.from_coco_categories([{"id": 1, "name": "a"}])
    image = _image(tmp_path / "x.png", 0)
    np.save(tmp_path / "x.npy", np.full((H, W), 7))
    record = ImageRecord(1, image, H, W, [])
    with pytest.raises(DataError, match=r"x\.npy: category id 7 is not in"):
        encode_semantic(record, vocab, "d", _read_npy)
    np.save(tmp_path / "x.npy", np.ones((H, W + 1), dtype=np.int64))
    skipped = encode_semantic(record, vocab, "d", _read_npy)
    assert skipped.sample is None and skipped.skip_reason == "label map size differs from the image"
    assert "x.npy" in skipped.skip_detail
    (tmp_path / "x.npy").unlink()
    missing = encode_semantic(record, vocab, "d", _read_npy)
    assert missing.skip_reason == "unreadable label map" and "x.npy" in missing.skip_detail


def _read_instance_map(record):
    """A data set whose id map stores class * 1000 + instance (Cityscapes-like), read from its own file."""
    raw = np.load(record.image_path.with_suffix(".npy"))
    segments = [{"id": int(v), "category_id": int(v) // 1000, "iscrowd": int(v == 26000)}  # a thing without instance
                for v in np.unique(raw) if v]
    return IdMap(raw, segments + [{"id": 99_000, "category_id": 99}], record.image_path.with_suffix(".npy"))


def test_panoptic_from_a_data_sets_own_id_map(tmp_path):
    vocab = Vocabulary.from_coco_categories([{"id": 7, "name": "road", "isthing": 0},
                                             {"id": 26, "name": "car", "isthing": 1},
                                             {"id": 99, "name": "absent", "isthing": 1}])
    raw = np.zeros((H, W), dtype=np.int64)
    raw[:8] = 7000
    raw[10:20, 2:9] = 26001
    raw[10:20, 12:30] = 26002
    raw[21:, 20:] = 26000  # a group region without an instance: crowd
    image = _image(tmp_path / "a.png", 3)
    np.save(tmp_path / "a.npy", raw)
    out = tmp_path / "pan"
    summary = write_shards([ImageRecord(5, image, H, W, [])],
                           partial(encode_panoptic, vocab=vocab, dataset="pan", read=_read_instance_map), out, "pan",
                           "seg", "panoptic", vocab, progress=False)
    assert summary.skipped_objects == {"segment absent from PNG": 1}  # the listed segment 99000 has no pixel
    sample = next(read_shards(out))
    np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), raw)  # encoded from the ids, exact
    objects = {o["segment_id"]: o for o in sample.annotation["objects"]}
    assert objects[26001]["bbox"] == [2, 10, 9, 20] and objects[26001]["area"] == 70
    assert objects[26000]["iscrowd"] == 1 and not objects[7000]["is_thing"]
    assert sample.ignore_mask.sum() == (raw == 26000).sum()  # the crowd region is ignored, not a target
    assert sorted(sample.labels.tolist()) == [0, 1, 1]
    metrics = score(out)
    assert {k: v for k, v in metrics.items() if k != "per_class"} == {
        "PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "PQ_things": 1.0, "PQ_stuff": 1.0, "mIoU": 1.0, "box_AP": 1.0,
        "box_AP50": 1.0, "mask_AP": 1.0, "mask_AP50": 1.0}


def test_evaluator_refuses_missing_predictions_for_the_task(tmp_path):
    out, _, _ = _semantic_set(tmp_path, 5)
    shards = ShardSet.open(out)
    sample = next(read_shards(out))
    evaluator = DatasetEvaluator.for_shards(shards)
    with pytest.raises(ValueError, match="'sem' data is scored on semantic; missing: semantic"):
        evaluator.add(annotation_of(sample), instances=oracle_predictions(sample, shards.vocabulary).get("instances"))
    with pytest.raises(ValueError, match="task must be one of"):
        DatasetEvaluator(shards.vocabulary, "semantic", "semantic")


def test_oracle_command_checks_a_converted_set(tmp_path, capsys):
    out, _, _ = _semantic_set(tmp_path, 5)
    assert oracle_main([f"shards={out}"]) == 0
    assert "mIoU 100.00" in capsys.readouterr().out
    assert oracle_main([f"shards={tmp_path / 'nothing'}"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "sem" and manifest["mask_format"] == "semantic"
    assert torch.is_tensor(next(read_shards(out)).labels)
