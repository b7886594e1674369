"""Cityscapes' own instance AP (openseed.evaluation.cityscapes) through the converted instance set, against
cityscapesscripts' evalInstanceLevelSemanticLabeling run on the same ground-truth files and predicted masks."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import cityscapes
from openseed.core.predictions import Instances
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.cityscapes import evaluate_cityscapes_instances
from openseed.evaluation.oracle import annotation_of, score
from openseed.evaluation.runner import DatasetEvaluator

H, W = 64, 96
STEMS = ("aachen_000000_000019", "bochum_000000_000313")


def _maps():
    """instanceIds maps (label id for stuff, groups and void; label * 1000 + index for instances)."""
    a = np.full((H, W), 7, np.int32)  # road
    a[:16] = 23  # sky
    a[:6, :8] = 0  # unlabeled: void
    a[50:, 60:90] = 9  # parking: void
    a[20:32, 4:16] = 26000  # a car (144 px)
    a[20:30, 20:35] = 26001  # a car (150 px)
    a[36:44, 4:14] = 26  # a car group
    a[18:38, 40:46] = 24000  # a person (120 px)
    a[40:45, 40:45] = 24001  # a small person (25 px): not counted
    a[20:30, 50:62] = 25000  # a rider (120 px)
    a[20:32, 70:82] = 29000  # a caravan instance: neither evaluated nor void
    a[36:40, 70:90] = 29  # caravan pixels without instance: void
    b = np.full((H, W), 7, np.int32)
    b[:20] = 23
    b[24:44, 4:24] = 26000  # a car (400 px)
    b[24:36, 30:40] = 33000  # a bicycle (120 px)
    b[40:46, 30:36] = 33  # a bicycle group
    b[24:39, 50:65] = 27000  # a truck (225 px)
    b[22:34, 70:80] = 24000  # a person (120 px)
    return [a, b]


def _box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _rect(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _predictions(maps):
    """(label id, score, mask) per image: exact, shifted, grown and duplicated matches, false positives on void, on a
    group, on the caravan instance and on sky, a missed rider and truck, a class without ground truth (bus)."""
    a, b = maps
    shifted = np.roll(a == 26001, 3, axis=1)
    grown = (a == 24000) | _rect(38, 41, 40, 46)
    duplicate = (a == 26000) & ~_rect(20, 23, 4, 16)
    partial = (b == 33000) & ~_rect(24, 28, 30, 40)
    return [
        [(26, 0.9, a == 26000), (26, 0.8, shifted), (26, 0.6, duplicate), (24, 0.7, grown),
         (26, 0.95, _rect(52, 62, 62, 88)), (26, 0.5, _rect(36, 44, 4, 15)), (24, 0.4, _rect(2, 12, 60, 70)),
         (24, 0.3, a == 24001), (26, 0.55, a == 29000)],
        [(26, 0.85, b == 26000), (33, 0.75, partial), (28, 0.65, b == 27000), (24, 0.45, b == 24000),
         (33, 0.35, b == 33)],
    ]


@pytest.fixture()
def converted(tmp_path):
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    for stem, inst in zip(STEMS, _maps()):
        city = stem.split("_")[0]
        img_dir, gt_dir = root / "leftImg8bit" / "val" / city, root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(inst.astype(np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    out = tmp_path / "cityscapes_instance_val"
    assert cityscapes.main([f"root={root}", "split=val", "kind=instance", f"out={out}", "workers=0",
                            "progress=false"]) == 0
    return root, out


def _ours(out):
    shards = ShardSet.open(out)
    evaluator = DatasetEvaluator.for_shards(shards)
    vocab = shards.vocabulary
    for sample, predictions in zip(read_shards(out), _predictions(_maps())):
        masks = torch.from_numpy(np.stack([m for _, _, m in predictions]))
        evaluator.add(annotation_of(sample), instances=Instances(
            scores=torch.tensor([s for _, s, _ in predictions]),
            labels=torch.tensor([vocab.index_of_id(label) for label, _, _ in predictions]),
            queries=torch.arange(len(predictions)), boxes=torch.tensor([_box(m) for _, _, m in predictions],
                                                                       dtype=torch.float32),
            masks=masks, image_id=sample.image_id))
    return evaluator.compute()


def _cityscapesscripts(root, tmp_path, monkeypatch):
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")
    results = tmp_path / "results"
    results.mkdir()
    gt_files, pred_files = [], []
    for stem, predictions in zip(STEMS, _predictions(_maps())):
        city = stem.split("_")[0]
        gt_files.append(str(root / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png"))
        lines = []
        for k, (label, confidence, mask) in enumerate(predictions):
            name = f"{stem}_{k}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(results / name)
            lines.append(f"{name} {label} {confidence}\n")
        (results / f"{stem}.txt").write_text("".join(lines))
        pred_files.append(str(results / f"{stem}.txt"))
    args = evaluation.args
    monkeypatch.setattr(args, "predictionPath", str(results.resolve()))
    monkeypatch.setattr(args, "gtInstancesFile", str(tmp_path / "gtInstances.json"))
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    monkeypatch.chdir(tmp_path)  # the script writes matches.json into the working folder
    # the script calls numpy's in1d, which NumPy 2.4 removed: the same function under its new name
    monkeypatch.setattr(np, "in1d", lambda values, test: np.isin(np.ravel(values), test), raising=False)
    # and its JSON dumps of intermediate results fail on NumPy integers under NumPy 2: not needed here
    monkeypatch.setattr(evaluation, "writeDict2JSON", lambda data, path: None)
    return evaluation.evaluateImgLists(pred_files, gt_files, args)


def test_instance_set_keeps_the_void_region_and_asks_for_the_protocol(converted):
    _, out = converted
    assert ShardSet.open(out).protocol == "cityscapes_instances"
    from openseed.core.codecs import decode_rle

    for sample, inst in zip(read_shards(out), _maps()):
        void = decode_rle(sample.annotation["extra"]["void_rle"]).numpy()
        # void as the cityscapes script reads it: values that are ignored label ids (a caravan instance is not)
        np.testing.assert_array_equal(void, np.isin(inst, [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]))
    metrics = score(out)
    assert metrics["mask_AP_cityscapes"] == pytest.approx(1.0) and metrics["mask_AP50_cityscapes"] == 1.0


def test_cityscapes_ap_equals_cityscapesscripts(converted, tmp_path, monkeypatch):
    root, out = converted
    ours = _ours(out)
    theirs = _cityscapesscripts(root, tmp_path, monkeypatch)
    averages = theirs["averages"]
    assert 0.2 < averages["allAp"] < 0.9  # the perturbations show
    assert ours["mask_AP_cityscapes"] == pytest.approx(averages["allAp"], abs=1e-12)
    assert ours["mask_AP50_cityscapes"] == pytest.approx(averages["allAp50%"], abs=1e-12)
    names = {"person": "person", "rider": "rider", "car": "car", "bicycle": "bicycle", "truck": "truck"}
    for name in names:
        expected = averages["classes"][name]["ap"]
        got = ours["per_class"]["mask_AP_cityscapes"][name]
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected, abs=1e-12), name
    assert abs(ours["mask_AP_cityscapes"] - ours["mask_AP"]) > 0.01  # not COCO's AP


def test_nothing_defined_and_nothing_found():
    rle = {"size": [4, 4], "counts": "0@"}  # empty
    result = evaluate_cityscapes_instances([{"gt": [], "void": rle, "predictions": []}], [24, 26])
    assert np.isnan(result["AP"]) and np.isnan(result["per_category"][24]["AP"])
