"""COCO box / mask AP against pycocotools on real data (COCO API fake results, labelme export with 0-based ids)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
import time

import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from openseed.evaluation import instances
from openseed.evaluation.instances import (
    DEFAULT_ENGINE,
    ENGINES,
    STAT_NAMES,
    EvaluationInputError,
    InstanceEvaluator,
    evaluate_coco,
)
from tests.conftest import LABELME, REALDATA, ROOT

VAL = REALDATA / "coco_instances_val2014_100"
GT_PATH = VAL / "instances_val2014_100.json"
DT_PATHS = {t: VAL / f"instances_val2014_fake{t}100_results.json" for t in ("bbox", "segm")}


def _read(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def expected() -> dict:
    data = _read(VAL / "expected_stats_pycocotools.json")
    assert tuple(data["_keys"]) == STAT_NAMES
    return {t: dict(zip(STAT_NAMES, data[t])) for t in ("bbox", "segm")}


@pytest.fixture(scope="module")
def val_gt() -> dict:
    return _read(GT_PATH)


@pytest.fixture(scope="module")
def val_dets() -> dict:
    return {t: _read(p) for t, p in DT_PATHS.items()}


@pytest.fixture(scope="module")
def labelme() -> tuple[dict, dict]:
    """labelme GT (ids from 0) and itself as detections (score 1; segm: polygons -> compressed RLE)."""
    gt = _read(LABELME / "annotations.json")
    images = {img["id"]: img for img in gt["images"]}
    dets = {"bbox": [], "segm": []}
    for ann in gt["annotations"]:
        img = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        rle["counts"] = rle["counts"].decode("ascii")
        base = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        dets["bbox"].append(dict(base, bbox=list(ann["bbox"])))
        dets["segm"].append(dict(base, segmentation=rle))
    return gt, dets


def _plain_pycocotools(gt: dict, dets: list, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


# ------------------------------------------------------------------------------------ official fake results


# pycocotools' own mask evaluation of these 100 images takes about a minute on 2 cores: that case runs with the slow
# tests; the default engine and the bbox case of pycocotools stay in the fast suite
@pytest.mark.parametrize(("iou_type", "engine"), [
    pytest.param(iou_type, engine, marks=[pytest.mark.slow] if (iou_type, engine) == ("segm", "pycocotools") else [])
    for iou_type in ("bbox", "segm") for engine in (*ENGINES, None)])
def test_fake_results_match_pycocotools(engine, iou_type, expected):
    result = evaluate_coco(GT_PATH, DT_PATHS[iou_type], iou_type, engine=engine)
    for name in STAT_NAMES:
        assert result[name] == pytest.approx(expected[iou_type][name], abs=1e-9, rel=0), name
    assert len(result["per_category"]) == 80
    assert all(-1 <= c["AP"] <= 1 for c in result["per_category"])


def test_default_engine_is_faster_coco_eval():
    # faster-coco-eval is installed and agrees with pycocotools on bbox and segm (test above)
    assert DEFAULT_ENGINE == "faster_coco_eval"


def test_inputs_not_modified(val_gt, val_dets):
    gt, dets = copy.deepcopy(val_gt), copy.deepcopy(val_dets["segm"])
    evaluate_coco(gt, dets, "segm")
    evaluate_coco(gt, dets, "segm", engine="pycocotools")
    assert gt == val_gt and dets == val_dets["segm"]


# ------------------------------------------------------------------------------------ ids starting at 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_labelme_self_evaluation_is_perfect(engine, iou_type, labelme):
    gt, dets = labelme
    assert min(a["id"] for a in gt["annotations"]) == 0 and min(i["id"] for i in gt["images"]) == 0
    result = evaluate_coco(gt, dets[iou_type], iou_type, engine=engine)
    assert result["AP"] == 1.0  # exactly
    # pycocotools divides by (tp + fp + eps), so some stats can be 1 - 2e-16 instead of 1.0 (mirrored)
    for name in ("AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert result[name] == pytest.approx(1.0, abs=1e-12, rel=0), name
    # 12 instances in 3 images, several per category and image: one detection per image cannot find them all
    assert result["AR1"] < 1.0
    by_id = {c["id"]: c["AP"] for c in result["per_category"]}
    assert by_id[15] == 1.0  # person
    assert by_id[0] == -1.0  # _background_: no ground truth


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_plain_pycocotools_pitfall_with_zero_ids(iou_type, labelme):
    """Documents the pitfall: annotation id 0 is COCOeval's 'unmatched' marker, so its match is lost."""
    gt, dets = labelme
    plain = _plain_pycocotools(gt, dets[iou_type], iou_type)
    assert plain[0] < 1.0
    assert plain[0] == pytest.approx(0.9488, abs=1e-4)
    shifted = copy.deepcopy(gt)
    for ann in shifted["annotations"]:
        ann["id"] += 1
    assert _plain_pycocotools(shifted, dets[iou_type], iou_type)[0] == 1.0


def test_undefined_stats_are_minus_one_like_pycocotools():
    """Only a large object: small / medium stats are undefined (-1) exactly as pycocotools reports them."""
    gt = {"images": [{"id": 1, "height": 200, "width": 200}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 150, 150],
                           "area": 22500.0, "iscrowd": 0,
                           "segmentation": [[10, 10, 160, 10, 160, 160, 10, 160]]}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 150, 150], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.5}]
    reference = _plain_pycocotools(gt, dets, "bbox")
    for engine in ENGINES:
        result = evaluate_coco(gt, dets, "bbox", engine=engine)
        assert [result[n] for n in STAT_NAMES] == pytest.approx(reference, abs=1e-12)
        assert result["APs"] == -1.0 and result["APm"] == -1.0 and result["AP"] == pytest.approx(1.0, abs=1e-12)
        assert [c["AP"] for c in result["per_category"]] == pytest.approx([1.0, -1.0], abs=1e-12)
        # no detections at all: pycocotools' loadRes would crash; defined stats are 0, undefined stay -1
        empty = evaluate_coco(gt, [], "bbox", engine=engine)
        assert [empty[n] for n in STAT_NAMES] == [0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0]


# ------------------------------------------------------------------------------------ evaluator + ranks


@pytest.mark.parametrize("engine", ENGINES)
def test_evaluator_empty_gives_zero(engine, val_gt):
    result = InstanceEvaluator(val_gt, engine=engine).compute()
    assert set(result) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert [result[iou_type][n] for n in STAT_NAMES] == [0.0] * 12  # every area range has GT in this set


@pytest.mark.parametrize("split", ["halves", "by_image"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluator_two_ranks_equal_one(split, iou_type, val_gt, val_dets, expected, monkeypatch):
    dets = val_dets[iou_type]
    single = InstanceEvaluator(val_gt, iou_types=(iou_type,))
    for k in range(0, len(dets), 100):  # several update calls
        single.update(dets[k:k + 100])
    one = single.compute()[iou_type]

    ranks = [InstanceEvaluator(val_gt, iou_types=(iou_type,)) for _ in range(2)]
    if split == "halves":
        ranks[0].update(dets[: len(dets) // 2])
        ranks[1].update(dets[len(dets) // 2:])
    else:  # a distributed sampler: whole images alternate between ranks
        image_ids = sorted({d["image_id"] for d in dets})
        for d in dets:
            ranks[image_ids.index(d["image_id"]) % 2].update([d])
    calls = []

    def fake_gather(items):
        calls.append(len(items))
        return [d for r in ranks for d in r._detections]

    monkeypatch.setattr(instances, "gather_to_all", fake_gather)
    two = ranks[0].compute()[iou_type]
    assert calls == [len(ranks[0]._detections)]
    assert two == one
    for name in STAT_NAMES:
        assert two[name] == pytest.approx(expected[iou_type][name], abs=1e-9, rel=0)


def test_evaluator_errors(val_gt, val_dets):
    with pytest.raises(ValueError):
        InstanceEvaluator(val_gt, iou_types=("keypoints",))
    ev = InstanceEvaluator(val_gt, iou_types=("segm",))
    ev.update(val_dets["bbox"][:3])  # no segmentation
    with pytest.raises(EvaluationInputError, match="segmentation"):
        ev.compute()
    with pytest.raises(EvaluationInputError, match="unknown image_id"):
        evaluate_coco(val_gt, [dict(val_dets["bbox"][0], image_id=-5)], "bbox")
    with pytest.raises(EvaluationInputError, match="unknown category_id"):
        evaluate_coco(val_gt, [dict(val_dets["bbox"][0], category_id=12345)], "bbox")
    with pytest.raises(ValueError, match="engine"):
        evaluate_coco(val_gt, val_dets["bbox"], "bbox", engine="nope")


# ------------------------------------------------------------------------------------ CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "openseed.evaluation.instances", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_json_prints_one_object(engine, expected):
    proc = _cli(f"gt={GT_PATH}", f"dt={DT_PATHS['segm']}", "iou_type=segm", f"engine={engine}", "json=true")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout is exactly one JSON object
    assert isinstance(result, dict) and proc.stdout.strip().count("\n") == 0
    assert result["engine"] == engine and result["iou_type"] == "segm"
    for name in STAT_NAMES:
        assert result[name] == pytest.approx(expected["segm"][name], abs=1e-9, rel=0)


def test_cli_table(capsys):
    assert instances.main([f"gt={GT_PATH}", f"dt={DT_PATHS['bbox']}", "iou_type=bbox"]) == 0
    out = capsys.readouterr().out
    ap_line = next(line for line in out.splitlines() if line.startswith("AP "))
    assert "IoU=0.50:0.95 | area=   all | maxDets=100" in ap_line and ap_line.endswith(" 0.505")
    assert "person" in out


def test_cli_errors(tmp_path, capsys, val_dets):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{]")
    unknown_image = tmp_path / "unknown_image.json"
    unknown_image.write_text(json.dumps([dict(val_dets["bbox"][0], image_id=987654321)]))
    unknown_cat = tmp_path / "unknown_cat.json"
    unknown_cat.write_text(json.dumps([dict(val_dets["bbox"][0], category_id=999)]))
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text("{}")
    cases = [
        ([f"gt={tmp_path / 'missing.json'}", f"dt={DT_PATHS['bbox']}"], "not found"),
        ([f"gt={GT_PATH}", f"dt={bad_json}"], "not valid JSON"),
        ([f"gt={bad_json}", f"dt={DT_PATHS['bbox']}"], "not valid JSON"),
        ([f"gt={GT_PATH}", f"dt={unknown_image}"], "unknown image_id 987654321"),
        ([f"gt={GT_PATH}", f"dt={unknown_cat}"], "unknown category_id 999"),
        ([f"gt={GT_PATH}", f"dt={not_a_list}"], "must be a list"),
        ([f"gt={DT_PATHS['bbox']}", f"dt={DT_PATHS['bbox']}"], "ground truth must be"),
        # the command line itself: each mistake named before any file is read
        ([f"gt={GT_PATH}"], "missing ['dt']"),
        ([f"gt={GT_PATH}", f"dt={DT_PATHS['bbox']}", "iou_type=keypoints"], "iou_type must be one of"),
        ([f"gt={GT_PATH}", f"dt={DT_PATHS['bbox']}", "engine=fast"], "engine must be one of"),
        ([f"gt={GT_PATH}", f"dt={DT_PATHS['bbox']}", "json=yes please"], "json must be true or false"),
        ([f"gt={GT_PATH}", f"dt={DT_PATHS['bbox']}", "--iou-type"], "'--iou-type' is not a key=value word"),
    ]
    for argv, message in cases:
        defaults = ["iou_type=bbox", "json=true"]
        given = {a.split("=")[0] for a in argv}
        assert instances.main([*argv, *(d for d in defaults if d.split("=")[0] not in given)]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and message in captured.err, captured.err
        assert captured.err.count("\n") == 1
    # and through a real process: exit status 2, nothing on stdout
    proc = _cli(f"gt={GT_PATH}", f"dt={unknown_image}", "iou_type=bbox", "json=true")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: detection 0 refers to unknown image_id 987654321"]


# ------------------------------------------------------------------------------------ timing


def test_report_engine_speed(val_gt, val_dets, capsys):
    """Time of the default engine vs pycocotools on the same inputs (reported, not asserted)."""
    def best_of(engine, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for iou_type in ("bbox", "segm"):
                evaluate_coco(val_gt, val_dets[iou_type], iou_type, engine=engine)
            times.append(time.perf_counter() - start)
        return min(times)

    best_of(DEFAULT_ENGINE, 1)  # warm-up (imports)
    best_of("pycocotools", 1)
    fast, reference = best_of(DEFAULT_ENGINE), best_of("pycocotools")
    with capsys.disabled():
        print(f"\n[timing] bbox+segm on val2014 100 images: {DEFAULT_ENGINE} {fast:.3f}s, pycocotools "
              f"{reference:.3f}s, ratio pycocotools/{DEFAULT_ENGINE} = {reference / fast:.2f}x")
