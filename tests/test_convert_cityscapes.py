"""data_prep.cityscapes: a tiny Cityscapes tree in the published layout (leftImg8bit / gtFine PNGs, and the files
cityscapesscripts' createPanopticImgs.py writes), converted to panoptic, instance and semantic shards, read back
pixel-exact, scored by the oracle (1.0), and perturbed predictions scored against panopticapi, pycocotools and a
plain confusion matrix computed from the arrays this test wrote."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_prep import cityscapes
from openseed.core.codecs import decode_label_png, decode_panoptic_png, decode_rle, id_to_rgb
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.runner import DatasetEvaluator

H, W = 32, 48
# the test's own facts for the label ids it paints (cityscapesscripts helpers/labels.py): label id -> trainId;
# 0 unlabeled, 1 ego vehicle, 9 parking, 29 caravan are ignored in evaluation
TRAIN_ID = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 25: 12, 26: 13, 33: 18}
IGNORED = {0, 1, 9, 29}
THINGS = {24, 25, 26, 33}
STEMS = ("aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313")  # sorted: image ids 0, 1, 2
# utils/constants.py of the reference OpenSeeD
REFERENCE_CITYSCAPES = ['road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                        'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
                        'motorcycle', 'bicycle']


def _instance_ids() -> list[np.ndarray]:
    """instanceIds of the three images: label id for stuff and thing groups, label * 1000 + index for instances."""
    maps = []
    a = np.full((H, W), 11, np.int32)  # image 0: street with things, void, a group and an ignored caravan
    a[:8], a[16:28], a[28:] = 23, 7, 1
    a[16:28, 40:] = 8
    a[:4, :6] = 0
    a[24:28, :6] = 9
    a[18:24, 8:18], a[18:24, 20:28] = 26000, 26001
    a[10:20, 30:33], a[10:20, 34:38] = 24000, 24
    a[9:13, 2:8] = 29000
    a[12:18, 38:40] = 25000
    maps.append(a)
    b = np.full((H, W), 7, np.int32)  # image 1: stuff only
    b[:12], b[12:20] = 23, 21
    b[20:, :10] = 8
    maps.append(b)
    c = np.full((H, W), 7, np.int32)  # image 2: a car, a bicycle group and instance, a person
    c[:10], c[10:18] = 23, 11
    c[20:30, 4:20] = 26000
    c[22:28, 24:30], c[22:28, 32:40] = 33, 33000
    c[14:26, 42:46] = 24000
    maps.append(c)
    return maps


def _label_ids(inst: np.ndarray) -> np.ndarray:
    return np.where(inst >= 1000, inst // 1000, inst).astype(np.uint8)


def _train_ids(inst: np.ndarray) -> np.ndarray:
    labels = _label_ids(inst)
    out = np.full(labels.shape, 255, np.int64)
    for label_id, train_id in TRAIN_ID.items():
        out[labels == label_id] = train_id
    return out


def _expected_segments(inst: np.ndarray) -> dict[int, tuple[int, int]]:
    """segment id -> (category id, iscrowd) of the panoptic ground truth, as createPanopticImgs.py builds it."""
    out = {}
    for value in np.unique(inst).tolist():
        label = value // 1000 if value >= 1000 else value
        if label in IGNORED:
            continue
        out[value] = (label, int(value < 1000 and label in THINGS))
    return out


def _panoptic_ids(inst: np.ndarray) -> np.ndarray:
    return np.where(np.isin(_label_ids(inst), list(IGNORED)), 0, inst)


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _write_panoptic_json(inst_maps, json_path: Path, png_dir: Path, categories=None) -> None:
    """What createPanopticImgs.py writes for these maps (string image ids, label-id categories)."""
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for stem, inst in zip(STEMS, inst_maps):
        pan = _panoptic_ids(inst)
        segments = []
        for value, (category, crowd) in _expected_segments(inst).items():
            x0, y0, x1, y1 = _box(inst == value)
            segments.append({"id": value, "category_id": category, "area": int((inst == value).sum()),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": crowd})
        Image.fromarray(id_to_rgb(pan)).save(png_dir / f"{stem}_gtFine_panoptic.png")
        images.append({"id": stem, "width": W, "height": H, "file_name": f"{stem}_gtFine_leftImg8bit.png"})
        annotations.append({"image_id": stem, "file_name": f"{stem}_gtFine_panoptic.png", "segments_info": segments})
    if categories is None:
        categories = [{"id": label, "name": str(label), "isthing": int(label in THINGS)}
                      for label in cityscapes_label_ids()]
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def cityscapes_label_ids() -> list[int]:
    # the 19 evaluated label ids (cityscapesscripts labels.py, trainId order), written out independently
    return [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture()
def tree(tmp_path):
    """root/leftImg8bit/val/<city>/..., root/gtFine/val/<city>/... as published; returns (root, instance maps)."""
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    maps = _instance_ids()
    for stem, inst in zip(STEMS, maps):
        city = stem.split("_")[0]
        img_dir, gt_dir = root / "leftImg8bit" / "val" / city, root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(_label_ids(inst)).save(gt_dir / f"{stem}_gtFine_labelIds.png")  # 8-bit grey
        Image.fromarray(inst.astype(np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")  # 16-bit grey
    return root, maps


def _convert(root, out, *words) -> int:
    return cityscapes.main([f"root={root}", "split=val", f"out={out}", "workers=0", "progress=false", *words])


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_class"}


# ------------------------------------------------------------------------------------------------ label table
def test_label_table_and_names():
    assert len(cityscapes.LABELS) == 35
    assert [lab.train_id for lab in cityscapes.EVAL_LABELS] == list(range(19))
    assert [lab.id for lab in cityscapes.EVAL_LABELS] == cityscapes_label_ids()
    assert [lab.name for lab in cityscapes.EVAL_LABELS] == REFERENCE_CITYSCAPES == list(cityscapes.CLASS_NAMES)
    assert [lab.id for lab in cityscapes.THING_LABELS] == [24, 25, 26, 27, 28, 31, 32, 33]
    by_name = {lab.name: lab for lab in cityscapes.LABELS}
    assert by_name["caravan"] == ("caravan", 29, 255, "vehicle", True, True)
    assert by_name["license plate"] == ("license plate", -1, -1, "vehicle", False, True)
    assert by_name["polegroup"] == ("polegroup", 18, 255, "object", False, True)
    assert by_name["bicycle"] == ("bicycle", 33, 18, "vehicle", True, False)
    vocab = cityscapes.vocabulary("instance")
    assert vocab.names == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert all(vocab.is_thing)
    sem = cityscapes.vocabulary("semantic")
    assert sem.num_things == 8 and sem.ids == cityscapes_label_ids()


# ------------------------------------------------------------------------------------------------ panoptic
@pytest.mark.parametrize("gt", ["instance_ids", "panoptic_json"])
def test_panoptic_read_back_and_oracle(tree, tmp_path, gt):
    root, maps = tree
    if gt == "panoptic_json":
        _write_panoptic_json(maps, root / "gtFine" / "cityscapes_panoptic_val.json",
                             root / "gtFine" / "cityscapes_panoptic_val")
    out = tmp_path / "out"
    assert _convert(root, out, "kind=panoptic", f"gt={gt}") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format) == ("seg", "panoptic")
    assert shards.vocabulary.names == REFERENCE_CITYSCAPES and shards.vocabulary.ids == cityscapes_label_ids()
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == [0, 1, 2]
    for sample, stem, inst in zip(samples, STEMS, maps):
        meta = sample.annotation
        assert meta["file_name"] == f"{stem}_leftImg8bit.png" and meta["dataset"] == "cityscapes_panoptic_val"
        assert (meta["height"], meta["width"]) == (H, W) and tuple(sample.image.shape[-2:]) == (H, W)
        ids = decode_panoptic_png(sample.panoptic_png)
        np.testing.assert_array_equal(ids, _panoptic_ids(inst))
        expected = _expected_segments(inst)
        got = {o["segment_id"]: o for o in meta["objects"]}
        assert set(got) == set(expected)
        for value, (category, crowd) in expected.items():
            obj = got[value]
            assert (obj["category_id"], obj["iscrowd"], obj["is_thing"]) == (category, crowd, category in THINGS)
            assert obj["label"] == TRAIN_ID[category]
            assert obj["bbox"] == _box(inst == value) and obj["area"] == int((inst == value).sum())
    # image 0 has two cars, a person and its group (crowd), a rider; the caravan is void
    assert sorted(o["segment_id"] for o in samples[0].annotation["objects"] if o["is_thing"]) == [
        24, 24000, 25000, 26000, 26001]
    metrics = _flat(score(out))
    assert set(metrics) == {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "box_AP", "box_AP50", "mask_AP",
                            "mask_AP50"}
    assert metrics == {k: 1.0 for k in metrics}


def test_panoptic_workers_and_sources_agree(tree, tmp_path):
    root, maps = tree
    assert _convert(root, tmp_path / "ids", "kind=panoptic", "workers=2", "name=city_pan") == 0
    assert (tmp_path / "ids" / "city_pan-000000.tar").is_file()
    _write_panoptic_json(maps, root / "gtFine" / "cityscapes_panoptic_val.json",
                         root / "gtFine" / "cityscapes_panoptic_val")
    assert _convert(root, tmp_path / "auto", "kind=panoptic") == 0  # auto: the JSON, now present
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["source"]["gt"] == "panoptic_json"
    a, b = list(read_shards(tmp_path / "ids")), list(read_shards(tmp_path / "auto"))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(decode_panoptic_png(x.panoptic_png), decode_panoptic_png(y.panoptic_png))
        assert x.annotation["objects"] == y.annotation["objects"]


# ------------------------------------------------------------------------------------------------ independent scores
def _coco_truth(maps) -> dict:
    """Thing instances (and groups as crowd) of the test's arrays as a COCO ground truth."""
    annotations = []
    for image_id, inst in enumerate(maps):
        for value in np.unique(inst).tolist():
            label = value // 1000 if value >= 1000 else value
            if label not in THINGS:
                continue
            mask = inst == value
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = _box(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                                "iscrowd": int(value < 1000), "segmentation": rle})
    return {"images": [{"id": i, "height": H, "width": W} for i in range(len(maps))],
            "categories": [{"id": c} for c in (24, 25, 26, 27, 28, 31, 32, 33)], "annotations": annotations}


def _coco_detections(instances_by_image: dict, vocab_ids: list[int]) -> list[dict]:
    dets = []
    for image_id, inst in instances_by_image.items():
        for k in range(len(inst)):
            x0, y0, x1, y1 = inst.boxes[k].tolist()
            mask = inst.masks[k].numpy().astype(np.uint8)
            dets.append({"image_id": image_id, "category_id": vocab_ids[int(inst.labels[k])],
                         "score": float(inst.scores[k]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "segmentation": mask_utils.encode(np.asfortranarray(mask))})
    return dets


def _cocoeval(gt: dict, dets: list[dict], iou_type: str) -> tuple[float, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def _miou(truths: list[np.ndarray], preds: list[np.ndarray], n: int = 19) -> float:
    conf = np.zeros((n, n), np.int64)
    for t, p in zip(truths, preds):
        keep = t != 255
        np.add.at(conf, (t[keep], p[keep]), 1)
    tp, gt, pr = np.diag(conf), conf.sum(1), conf.sum(0)
    valid = gt > 0
    return float((tp[valid] / (gt + pr - tp)[valid]).mean())


def _perturb_instances(inst):
    """Drop the first detection, shift the second one's box 3 px right; distinct scores."""
    if len(inst) == 0:
        return inst
    inst = inst[torch.arange(1, len(inst))]
    boxes = inst.boxes.clone()
    if len(boxes):
        boxes[0, [0, 2]] += 3
    return type(inst)(scores=torch.linspace(0.9, 0.5, len(inst)) if len(inst) else inst.scores,
                      labels=inst.labels, queries=inst.queries, boxes=boxes, masks=inst.masks,
                      image_id=inst.image_id)


def test_panoptic_perturbed_matches_panopticapi_pycocotools_numpy(tree, tmp_path, capsys):
    from panopticapi.evaluation import pq_compute

    root, maps = tree
    out = tmp_path / "out"
    assert _convert(root, out, "kind=panoptic", "gt=instance_ids") == 0
    shards = ShardSet.open(out)
    vocab = shards.vocabulary
    evaluator = DatasetEvaluator.for_shards(shards)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    pred_annotations, sem_preds, instances = [], [], {}
    for sample, stem in zip(read_shards(out), STEMS):
        pred = oracle_predictions(sample, vocab)
        pan = pred["panoptic"]
        ids = pan.panoptic_seg.numpy().copy()
        segments = list(pan.segments_info)
        sem = pred["semantic"].sem_seg.numpy().copy()
        if sample.image_id == 0:
            ids[ids == 26001] = 0  # a car missed
            segments = [s for s in segments if s["id"] != 26001]
            block = ids[20:28, 30:40]
            block[block == 7] = 8  # road pixels given to the sidewalk segment
            sem[0:6, 20:40] = 2  # sky pixels called building
        if sample.image_id == 2:
            sem[18:32, 0:10] = 1  # road pixels called sidewalk
        pan = type(pan)(torch.from_numpy(ids), segments, pan.image_id)
        inst = _perturb_instances(pred["instances"])
        instances[sample.image_id] = inst
        sem_preds.append(sem)
        evaluator.add(annotation_of(sample), panoptic=pan, semantic=type(pred["semantic"])(torch.from_numpy(sem)),
                      instances=inst)
        Image.fromarray(id_to_rgb(ids)).save(pred_dir / f"{stem}.png")
        pred_annotations.append({"image_id": stem, "file_name": f"{stem}.png",
                                 "segments_info": [{"id": s["id"], "category_id": s["category_id"]}
                                                   for s in segments]})
    ours = evaluator.compute()
    gt_json, gt_dir = tmp_path / "official" / "gt.json", tmp_path / "official" / "gt"
    _write_panoptic_json(maps, gt_json, gt_dir)
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": pred_annotations}))
    theirs = pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    for key, (group, metric) in {"PQ": ("All", "pq"), "SQ": ("All", "sq"), "RQ": ("All", "rq"),
                                 "PQ_things": ("Things", "pq"), "PQ_stuff": ("Stuff", "pq")}.items():
        assert ours[key] == pytest.approx(theirs[group][metric], abs=1e-9), key
    assert ours["PQ"] < 1.0 and ours["PQ_things"] < 1.0 and ours["PQ_stuff"] < 1.0
    assert ours["mIoU"] == pytest.approx(_miou([_train_ids(m) for m in maps], sem_preds), abs=1e-9)
    assert ours["mIoU"] < 1.0
    gt = _coco_truth(maps)
    dets = _coco_detections(instances, vocab.ids)
    assert (ours["box_AP"], ours["box_AP50"]) == pytest.approx(_cocoeval(gt, dets, "bbox"), abs=1e-9)
    assert (ours["mask_AP"], ours["mask_AP50"]) == pytest.approx(_cocoeval(gt, dets, "segm"), abs=1e-9)
    assert ours["mask_AP"] < 1.0


# ------------------------------------------------------------------------------------------------ instance
def test_instance_read_back_oracle_and_pycocotools(tree, tmp_path):
    root, maps = tree
    out = tmp_path / "out"
    assert _convert(root, out, "kind=instance") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format, shards.name) == ("det", "rle", "cityscapes_instance_val")
    assert shards.vocabulary.ids == [24, 25, 26, 27, 28, 31, 32, 33]
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == [0, 1, 2]
    for sample, inst in zip(samples, maps):
        objects = sample.annotation["objects"]
        expected = {v for v in np.unique(inst).tolist() if (v // 1000 if v >= 1000 else v) in THINGS}
        assert len(objects) == len(expected)
        for obj in objects:
            # each object's mask is exactly one instanceIds value of a thing class
            mask = decode_rle(obj["rle"]).numpy().astype(bool)
            values = np.unique(inst[mask]).tolist()
            assert len(values) == 1 and values[0] in expected and mask.sum() == (inst == values[0]).sum()
            value = values[0]
            expected.discard(value)
            label = value // 1000 if value >= 1000 else value
            assert (obj["category_id"], obj["iscrowd"], obj["is_thing"]) == (label, int(value < 1000), True)
            assert obj["bbox"] == _box(mask) and obj["area"] == mask.sum()
        assert not expected
    assert sum(not o["iscrowd"] for s in samples for o in s.annotation["objects"]) == 7  # 29000 (caravan) left out
    metrics = _flat(score(out))
    assert metrics == {"box_AP": 1.0, "box_AP50": 1.0, "mask_AP": 1.0, "mask_AP50": 1.0,
                       "mask_AP_cityscapes": 1.0, "mask_AP50_cityscapes": 1.0}  # and cityscapes' own AP

    evaluator = DatasetEvaluator.for_shards(shards)
    instances = {}
    for sample in samples:
        inst = _perturb_instances(oracle_predictions(sample, shards.vocabulary)["instances"])
        instances[sample.image_id] = inst
        evaluator.add(annotation_of(sample), instances=inst)
    ours = evaluator.compute()
    gt, dets = _coco_truth(maps), _coco_detections(instances, shards.vocabulary.ids)
    assert (ours["box_AP"], ours["box_AP50"]) == pytest.approx(_cocoeval(gt, dets, "bbox"), abs=1e-9)
    assert (ours["mask_AP"], ours["mask_AP50"]) == pytest.approx(_cocoeval(gt, dets, "segm"), abs=1e-9)
    assert ours["box_AP"] < 1.0 and ours["mask_AP"] < 1.0


# ------------------------------------------------------------------------------------------------ semantic
def test_semantic_read_back_oracle_and_numpy(tree, tmp_path):
    root, maps = tree
    out = tmp_path / "out"
    assert _convert(root, out, "kind=semantic", "name=cs_sem") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format) == ("sem", "semantic")
    samples = list(read_shards(out))
    for sample, inst in zip(samples, maps):
        assert sample.annotation["ignore_label"] == 255
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), _train_ids(inst))
        present = {TRAIN_ID[v] for v in np.unique(_label_ids(inst)).tolist() if v in TRAIN_ID}
        assert {o["label"] for o in sample.annotation["objects"]} == present
    metrics = _flat(score(out))
    assert metrics == {"mIoU": 1.0, "fwIoU": 1.0, "mACC": 1.0, "pACC": 1.0}

    evaluator = DatasetEvaluator.for_shards(shards)
    preds = []
    for sample in samples:
        sem = oracle_predictions(sample, shards.vocabulary)["semantic"]
        labels = sem.sem_seg.numpy().copy()
        labels[0:6, 20:40] = 2  # a block of sky called building
        labels[26:32, 0:12] = 0  # sidewalk / void called road
        preds.append(labels)
        evaluator.add(annotation_of(sample), semantic=type(sem)(torch.from_numpy(labels)))
    ours = evaluator.compute()
    assert ours["mIoU"] == pytest.approx(_miou([_train_ids(m) for m in maps], preds), abs=1e-9)
    assert ours["mIoU"] < 1.0


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_folders_and_files(tree, tmp_path, capsys):
    root, _ = tree
    assert _convert(tmp_path / "nowhere", tmp_path / "o1") == 2
    assert "nowhere" in capsys.readouterr().err
    assert cityscapes.main([f"root={root}", "split=train", f"out={tmp_path / 'o2'}", "progress=false"]) == 2
    assert str(root / "leftImg8bit" / "train") in capsys.readouterr().err
    missing = root / "gtFine" / "val" / "aachen" / "aachen_000001_000019_gtFine_labelIds.png"
    missing.unlink()
    assert _convert(root, tmp_path / "o3", "kind=semantic") == 2
    assert str(missing) in capsys.readouterr().err
    assert _convert(root, tmp_path / "o4", "kind=semantic", "skip_missing=true") == 0
    manifest = json.loads((tmp_path / "o4" / "manifest.json").read_text())
    assert manifest["summary"]["skipped_images"] == {"missing annotation file": 1}
    assert [s.image_id for s in read_shards(tmp_path / "o4")] == [0, 2]  # ids stay the sorted-file index
    assert _convert(root, tmp_path / "o5", "kind=panoptic", "gt=panoptic_json") == 2
    assert "cityscapes_panoptic_val.json" in capsys.readouterr().err


def test_malformed_panoptic_json(tree, tmp_path, capsys):
    root, maps = tree
    json_path = root / "gtFine" / "cityscapes_panoptic_val.json"
    (root / "gtFine" / "cityscapes_panoptic_val").mkdir()
    json_path.write_text("{not json")
    assert _convert(root, tmp_path / "o1", "kind=panoptic") == 2
    assert str(json_path) in capsys.readouterr().err
    trainid_categories = [{"id": i, "name": str(i), "isthing": int(i >= 11)} for i in range(19)]
    _write_panoptic_json(maps, json_path, root / "gtFine" / "cityscapes_panoptic_val", trainid_categories)
    assert _convert(root, tmp_path / "o2", "kind=panoptic") == 2
    err = capsys.readouterr().err
    assert str(json_path) in err and "label ids" in err


def test_unreadable_annotations_are_counted_skips(tree, tmp_path):
    root, maps = tree
    gt = root / "gtFine" / "val"
    (gt / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    bad = _label_ids(maps[2]).copy()
    bad[0, 0] = 200  # not a Cityscapes label id
    Image.fromarray(bad).save(gt / "bochum" / "bochum_000000_000313_gtFine_labelIds.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(gt / "aachen" / "aachen_000001_000019_gtFine_labelIds.png")
    assert _convert(root, tmp_path / "pan", "kind=panoptic") == 0
    summary = json.loads((tmp_path / "pan" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"unreadable instanceIds PNG": 1} and summary["written"] == 2
    assert _convert(root, tmp_path / "det", "kind=instance") == 0
    summary = json.loads((tmp_path / "det" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"unreadable instanceIds PNG": 1} and summary["written"] == 2
    assert _convert(root, tmp_path / "sem", "kind=semantic") == 0
    summary = json.loads((tmp_path / "sem" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"labelIds PNG of the wrong kind": 1, "unknown Cityscapes label id": 1}
    assert [s.image_id for s in read_shards(tmp_path / "sem")] == [0]


def test_size_mismatch_and_broken_image_are_counted_skips(tree, tmp_path):
    root, maps = tree
    small = maps[2][:, : W - 2].astype(np.uint16)
    Image.fromarray(small).save(root / "gtFine" / "val" / "bochum" / "bochum_000000_000313_gtFine_instanceIds.png")
    (root / "leftImg8bit" / "val" / "aachen" / "aachen_000001_000019_leftImg8bit.png").write_bytes(b"not a png")
    assert _convert(root, tmp_path / "pan", "kind=panoptic") == 0
    summary = json.loads((tmp_path / "pan" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"panoptic map size differs from the image": 1, "unreadable image": 1}
    assert _convert(root, tmp_path / "det", "kind=instance") == 0
    summary = json.loads((tmp_path / "det" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"instance map size differs from the image": 1, "unreadable image": 1}
    assert [s.image_id for s in read_shards(tmp_path / "det")] == [0]
