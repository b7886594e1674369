"""openseed.evaluation.panoptic against the official panopticapi ``pq_compute`` on the real COCO panoptic sample.

Predictions are derived from the ground-truth PNGs / JSON (dropped, relabelled, shifted, split, voided, merged,
crowd-covering and boundary-noised segments, alone and combined, several seeds), written to tmp as COCO panoptic
results, and scored by both implementations; every number must agree to 1e-9.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from panopticapi.evaluation import pq_compute, pq_compute_single_core
from PIL import Image

from openseed.evaluation import panoptic
from openseed.evaluation.panoptic import (
    CategoryStat,
    PanopticEvaluator,
    PanopticFormatError,
    evaluate_files,
    pq_per_image,
)
from tests.conftest import PANOPTIC, ROOT

GT_JSON = PANOPTIC / "panoptic_examples.json"
GT_DIR = PANOPTIC / "panoptic_examples"
TOL = 1e-9


# ----------------------------------------------------------------------------------------------- data helpers

def load_gt() -> tuple[dict, dict[int, np.ndarray]]:
    """The ground-truth JSON and image id -> id map."""
    if not GT_JSON.exists():
        pytest.fail(f"real test data missing: {GT_JSON}")
    data = json.loads(GT_JSON.read_text())
    maps = {}
    for ann in data["annotations"]:
        rgb = np.asarray(Image.open(GT_DIR / ann["file_name"]).convert("RGB")).astype(np.int64)
        maps[ann["image_id"]] = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    return data, maps


def write_png(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


class Scene:
    """One image's prediction under construction: id map, segments (id -> category) and a random generator."""

    def __init__(self, ids: np.ndarray, segments: list[dict], categories: list[dict], rng: np.random.Generator):
        self.ids = ids.copy()
        self.cat = {s["id"]: s["category_id"] for s in segments}
        self.crowd = {s["id"] for s in segments if s["iscrowd"]}
        self.isthing = {c["id"]: c["isthing"] for c in categories}
        self.rng = rng

    def new_id(self) -> int:
        while True:
            sid = int(self.rng.integers(1, 1 << 24))
            if sid not in self.cat:
                return sid

    def present(self) -> list[int]:
        return [s for s in self.cat if (self.ids == s).any()]

    def pick(self, k: int) -> list[int]:
        ids = self.present()
        return [ids[i] for i in self.rng.choice(len(ids), size=min(k, len(ids)), replace=False)]


def drop(sc: Scene) -> None:
    for sid in sc.pick(3):
        sc.ids[sc.ids == sid] = 0


def relabel(sc: Scene) -> None:
    for sid in sc.pick(3):
        same_kind = [c for c, t in sc.isthing.items() if t == sc.isthing[sc.cat[sid]] and c != sc.cat[sid]]
        sc.cat[sid] = int(sc.rng.choice(same_kind))


def shift(sc: Scene) -> None:
    sc.ids = np.roll(sc.ids, tuple(int(v) for v in sc.rng.integers(-25, 26, size=2)), axis=(0, 1))


def split(sc: Scene) -> None:
    for sid in sc.pick(4):
        ys, xs = np.nonzero(sc.ids == sid)
        cut = np.quantile(xs, sc.rng.uniform(0.2, 0.8))
        new = sc.new_id()
        sc.cat[new] = sc.cat[sid]
        sc.ids[ys[xs > cut], xs[xs > cut]] = new


def void(sc: Scene) -> None:
    for sid in sc.pick(4):
        ys, xs = np.nonzero(sc.ids == sid)
        cut = np.quantile(ys, sc.rng.uniform(0.0, 0.9))
        sc.ids[ys[ys >= cut], xs[ys >= cut]] = 0


def merge(sc: Scene) -> None:
    for _ in range(3):
        a, b = sc.pick(2)
        sc.ids[sc.ids == b] = a


def crowd(sc: Scene) -> None:
    """Predictions over the crowd regions: split into pieces, grown into void, taken by a neighbour, relabelled."""
    for sid in sorted(sc.crowd):
        mode = int(sc.rng.integers(4))
        mask = sc.ids == sid
        if mode == 0:  # pieces of the crowd category, some partly over void
            ys, xs = np.nonzero(mask)
            for lo, hi in zip([0.0, 0.3, 0.7], [0.3, 0.7, 1.0]):
                sel = (xs >= np.quantile(xs, lo)) & (xs <= np.quantile(xs, hi))
                new = sc.new_id()
                sc.cat[new] = sc.cat[sid]
                sc.ids[ys[sel], xs[sel]] = new
            grow = np.roll(mask, 10, axis=1) & (sc.ids == 0)
            sc.ids[grow] = new
        elif mode == 1:  # a same-category segment covering part of the crowd region and beyond
            box = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            y0, x0 = int(np.quantile(ys, 0.3)), int(np.quantile(xs, 0.3))
            box[y0:y0 + 60, x0:x0 + 80] = True
            new = sc.new_id()
            sc.cat[new] = sc.cat[sid]
            sc.ids[box] = new
        elif mode == 2:  # taken by a non-crowd segment of the same category
            others = [s for s in sc.present() if sc.cat[s] == sc.cat[sid] and s != sid]
            if others:
                sc.ids[mask] = others[int(sc.rng.integers(len(others)))]
        else:  # predicted with another category
            sc.cat[sid] = next(c for c, t in sc.isthing.items() if t == sc.isthing[sc.cat[sid]] and c != sc.cat[sid])


def noise(sc: Scene) -> None:
    """Boundary pixels take a neighbour's id; a few random pixels take random present ids."""
    ids = sc.ids
    boundary = np.zeros(ids.shape, dtype=bool)
    for axis in (0, 1):
        for step in (1, -1):
            boundary |= np.roll(ids, step, axis=axis) != ids
    flip = boundary & (sc.rng.random(ids.shape) < 0.5)
    neighbour = np.roll(ids, int(sc.rng.choice([1, -1])), axis=int(sc.rng.integers(2)))
    ids[flip] = neighbour[flip]
    salt = sc.rng.random(ids.shape) < 0.002
    present = np.array(sc.present() + [0])
    ids[salt] = present[sc.rng.integers(len(present), size=int(salt.sum()))]


def boxes(sc: Scene) -> None:
    """Random rectangles of new segments with random categories (false positives, partial matches)."""
    h, w = sc.ids.shape
    cats = list(sc.isthing)
    for _ in range(5):
        y, x = int(sc.rng.integers(h - 40)), int(sc.rng.integers(w - 40))
        new = sc.new_id()
        sc.cat[new] = int(cats[int(sc.rng.integers(len(cats)))])
        sc.ids[y:y + int(sc.rng.integers(10, 120)), x:x + int(sc.rng.integers(10, 160))] = new


EDITS = {f.__name__: f for f in (drop, relabel, shift, split, void, merge, crowd, noise, boxes)}
SCENARIOS = {name: [name] for name in EDITS} | {
    "identity": [],
    "split+relabel+drop": ["split", "relabel", "drop"],
    "shift+noise": ["shift", "noise"],
    "crowd+void+merge": ["crowd", "void", "merge"],
    "all": ["crowd", "split", "merge", "void", "relabel", "drop", "boxes", "noise", "shift"],
}


def write_prediction(out: Path, edits: list[str], seed: int, copies: int = 1) -> tuple[Path, Path]:
    """Derived predictions for the sample (optionally replicated ``copies`` times under new image ids), written
    as COCO panoptic results: ``out/pred.json`` + ``out/pred/*.png``; ground truth to ``out/gt.json`` +
    ``out/gt/`` when replicated. Returns (pred json, pred folder)."""
    data, maps = load_gt()
    rng = np.random.default_rng(seed)
    pred_dir = out / "pred"
    pred_dir.mkdir(parents=True, exist_ok=True)
    annotations, gt_annotations = [], []
    if copies > 1:
        (out / "gt").mkdir(exist_ok=True)
    for copy_no in range(copies):
        for ann in data["annotations"]:
            image_id = ann["image_id"] + copy_no * 10**6
            sc = Scene(maps[ann["image_id"]], ann["segments_info"], data["categories"], rng)
            for name in edits:
                EDITS[name](sc)
            file_name = f"{image_id:012d}.png"
            write_png(pred_dir / file_name, sc.ids)
            present = set(np.unique(sc.ids).tolist())
            # "area" is deliberately stale: both implementations must count predicted areas in the PNG
            segments = [{"id": sid, "category_id": cat, "area": 1} for sid, cat in sc.cat.items() if sid in present]
            annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
            if copies > 1:
                write_png(out / "gt" / file_name, maps[ann["image_id"]])
                gt_annotations.append(dict(ann, image_id=image_id, file_name=file_name))
    (out / "pred.json").write_text(json.dumps({"annotations": annotations, "categories": data["categories"]}))
    if copies > 1:
        (out / "gt.json").write_text(json.dumps(dict(data, annotations=gt_annotations)))
    return out / "pred.json", pred_dir


def official_counts(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path) -> dict[int, tuple]:
    """Per-category (iou, tp, fp, fn) of panopticapi's single-core worker (in process)."""
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    by_id = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, copy.deepcopy(by_id[a["image_id"]])) for a in gt["annotations"]]
    stat = pq_compute_single_core(0, pairs, str(gt_dir), str(pred_dir), {c["id"]: c for c in gt["categories"]})
    return {c: (s.iou, s.tp, s.fp, s.fn) for c, s in stat.pq_per_cat.items() if s.tp + s.fp + s.fn}


def assert_same(ours: dict, theirs: dict) -> None:
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == theirs[group]["n"], group
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(theirs[group][key], abs=TOL, rel=0), (group, key)
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for cat, values in theirs["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][cat][key] == pytest.approx(values[key], abs=TOL, rel=0), (cat, key)


# ------------------------------------------------------------------------------------------------------ tests

def test_ground_truth_against_itself(capsys):
    ours = evaluate_files(GT_JSON, GT_DIR, GT_JSON, GT_DIR)
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["pq"] == ours[group]["sq"] == ours[group]["rq"] == 1.0
    assert (ours["All"]["n"], ours["Things"]["n"], ours["Stuff"]["n"]) == (8, 4, 4)
    assert_same(ours, pq_compute(str(GT_JSON), str(GT_JSON), str(GT_DIR), str(GT_DIR)))
    assert "100.0  100.0  100.0" in panoptic.format_table(ours)


@pytest.mark.parametrize("scenario, seed", [(name, seed) for name in SCENARIOS
                                             for seed in ((0,) if name == "identity" else (0, 1, 2))])
def test_matches_panopticapi(tmp_path, scenario, seed, capsys):
    pred_json, pred_dir = write_prediction(tmp_path, SCENARIOS[scenario], seed)
    ours = evaluate_files(GT_JSON, GT_DIR, pred_json, pred_dir)
    assert_same(ours, pq_compute(str(GT_JSON), str(pred_json), str(GT_DIR), str(pred_dir)))
    counts = official_counts(GT_JSON, GT_DIR, pred_json, pred_dir)
    ours_counts = {c: r for c, r in ours["per_class"].items() if r["tp"] + r["fp"] + r["fn"]}
    assert set(ours_counts) == set(counts)
    for cat, (iou, tp, fp, fn) in counts.items():
        r = ours_counts[cat]
        assert (r["tp"], r["fp"], r["fn"]) == (tp, fp, fn), cat
        assert r["sq"] * r["tp"] == pytest.approx(iou, abs=TOL, rel=0)
    if scenario != "identity":
        assert ours["All"]["pq"] < 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_quirks_match_panopticapi(tmp_path, seed, capsys):
    """As officially: GT PNG ids missing from the JSON are ignored, JSON-only GT segments are false negatives,
    the JSON ``area`` enters the IoU, and only the last crowd segment of a category excuses predictions."""
    data = json.loads(GT_JSON.read_text())
    for ann in data["annotations"]:
        segments = ann["segments_info"]
        del segments[1]
        segments[0]["area"] = int(segments[0]["area"] * 1.6)
        segments.append({"id": 123, "category_id": 1, "iscrowd": 0, "area": 50, "bbox": [0, 0, 1, 1]})
        if ann["image_id"] == 142238:
            segments.append({"id": 124, "category_id": 1, "iscrowd": 1, "area": 10, "bbox": [0, 0, 1, 1]})
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(data))
    pred_json, pred_dir = write_prediction(tmp_path, ["crowd", "noise", "shift"], seed)
    ours = evaluate_files(gt_json, GT_DIR, pred_json, pred_dir)
    assert_same(ours, pq_compute(str(gt_json), str(pred_json), str(GT_DIR), str(pred_dir)))
    counts = official_counts(gt_json, GT_DIR, pred_json, pred_dir)
    assert {c: (r["tp"], r["fp"], r["fn"]) for c, r in ours["per_class"].items() if c in counts} == {
        c: v[1:] for c, v in counts.items()}


@pytest.mark.parametrize("hash_fails", [False, True])
def test_relabel_against_a_dictionary(monkeypatch, hash_fails):
    """The hash-table relabelling (and its np.unique fallback) against a plain dictionary lookup."""
    if hash_fails:  # every key in slot 0: no collision-free table, the np.unique path
        monkeypatch.setattr(panoptic, "_HASH_MULTIPLIERS", [np.uint32(0)])
    rng = np.random.default_rng(0)
    for n_keys, high in [(1, 10), (50, 1 << 24), (3000, 1 << 24), (200, 1 << 32), (20, 1 << 40)]:
        keys = [int(k) for k in rng.choice(high, size=n_keys, replace=False)]
        pool = np.array(keys + [0] + [int(v) for v in rng.integers(0, high, size=20)], dtype=np.int64)
        ids = pool[rng.integers(len(pool), size=(40, 50))]
        labels, count = panoptic._relabel(ids, keys)
        table = {k: i + 1 for i, k in enumerate(keys)}
        table.setdefault(0, n_keys + 1)
        assert count == n_keys + 2
        assert labels.tolist() == [table.get(v, 0) for v in ids.ravel().tolist()]


def test_void_and_crowd_rules_by_hand():
    """Union without the prediction's void pixels; predictions mostly on void + same-category crowd are ignored."""
    cats = {1: {"id": 1, "isthing": 1}, 2: {"id": 2, "isthing": 1}}
    gt = np.zeros((10, 10), dtype=np.int64)
    gt[:, :4] = 5  # 40 px, category 1
    gt[:, 6:] = 9  # 40 px crowd, category 2
    pred = np.zeros_like(gt)
    pred[:, :2] = 7  # 20 px inside gt 5
    pred[:, 4:6] = 7  # 20 px on void: IoU = 20 / (40 + 40 - 20 - 20) = 0.5 -> no match ...
    pred[0, 2] = 7  # ... one more pixel: 21 / (41 + 40 - 21 - 20) = 0.525 -> match
    pred[:, 6:9] = 8  # category 2, 30 px on the crowd region -> ignored
    pred[:, 9] = 3  # category 1 on crowd of category 2 -> false positive
    gt_segs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 40}, {"id": 9, "category_id": 2, "iscrowd": 1}]
    pred_segs = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2}, {"id": 3, "category_id": 1}]
    stats = pq_per_image(gt, gt_segs, pred, pred_segs, cats)
    assert stats == {1: CategoryStat(21 / 40, 1, 1, 0)}
    pred[0, 2] = 0
    assert pq_per_image(gt, gt_segs, pred, pred_segs, cats) == {1: CategoryStat(0.0, 0, 2, 1)}


def test_large_ids_take_the_unique_path():
    cats = {1: {"id": 1, "isthing": 1}}
    gt = np.full((4, 4), 1 << 40, dtype=np.int64)
    pred = np.full((4, 4), 3, dtype=np.int64)
    stats = pq_per_image(gt, [{"id": 1 << 40, "category_id": 1, "iscrowd": 0}], pred, [{"id": 3, "category_id": 1}],
                         cats)
    assert stats == {1: CategoryStat(1.0, 1, 0, 0)}


def test_evaluator_gathers_and_counts_each_image_once(monkeypatch):
    data, maps = load_gt()
    anns = data["annotations"]
    single = PanopticEvaluator(data["categories"])
    ranks = [PanopticEvaluator(data["categories"]) for _ in range(2)]
    rng = np.random.default_rng(3)
    preds = []
    for ann in anns:
        sc = Scene(maps[ann["image_id"]], ann["segments_info"], data["categories"], rng)
        noise(sc)
        split(sc)
        present = set(np.unique(sc.ids).tolist())
        preds.append((sc.ids, [{"id": s, "category_id": c} for s, c in sc.cat.items() if s in present]))
    for ann, (ids, segs) in zip(anns, preds):
        single.update(maps[ann["image_id"]], ann["segments_info"], ids, segs, image_id=ann["image_id"])
    # rank 0 scores image 0, rank 1 image 1; both also score image 0 again (sampler padding)
    for rank, evaluator in enumerate(ranks):
        for k in (rank, 0):
            ann = anns[k]
            stats = pq_per_image(maps[ann["image_id"]], ann["segments_info"], *preds[k], single.categories)
            evaluator.add_image_stats(stats, image_id=ann["image_id"])
    everything = ranks[0]._images + ranks[1]._images
    monkeypatch.setattr(panoptic, "gather_to_all", lambda items: list(everything))
    expected = single.compute()
    for evaluator in ranks:
        assert evaluator.compute() == expected
    monkeypatch.undo()
    single.reset()
    assert single.compute()["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}


def _bad_prediction(tmp_path: Path, mutate) -> tuple[Path, Path]:
    pred_json, pred_dir = write_prediction(tmp_path, [], 0)
    data = json.loads(pred_json.read_text())
    mutate(data, pred_dir)
    pred_json.write_text(json.dumps(data))
    return pred_json, pred_dir


def _unknown_category(data, _):
    data["annotations"][1]["segments_info"][0]["category_id"] = 999


def _png_id_without_segment(data, _):
    del data["annotations"][1]["segments_info"][2]


def _segment_without_pixels(data, _):
    data["annotations"][1]["segments_info"].append({"id": 77, "category_id": 1})


@pytest.mark.parametrize("mutate, message", [
    (_unknown_category, "unknown category ids [999]"),
    (_png_id_without_segment, "in the PNG but not in the JSON"),
    (_segment_without_pixels, "[77] are in the JSON segments_info but not in the PNG"),
])
def test_inconsistent_predictions_are_errors(tmp_path, mutate, message, capsys):
    pred_json, pred_dir = _bad_prediction(tmp_path, mutate)
    with pytest.raises(PanopticFormatError, match="image 439180") as info:
        evaluate_files(GT_JSON, GT_DIR, pred_json, pred_dir)
    assert message in str(info.value)
    with pytest.raises(KeyError):  # the official code refuses the same inputs
        official_counts(GT_JSON, GT_DIR, pred_json, pred_dir)


def test_missing_prediction_and_mismatched_size(tmp_path):
    pred_json, pred_dir = _bad_prediction(tmp_path, lambda data, _: data["annotations"].pop(0))
    with pytest.raises(PanopticFormatError, match="image 142238: no prediction"):
        evaluate_files(GT_JSON, GT_DIR, pred_json, pred_dir)
    pred_json, pred_dir = write_prediction(tmp_path / "small", [], 0)
    name = json.loads(pred_json.read_text())["annotations"][0]["file_name"]
    Image.open(pred_dir / name).crop((0, 0, 100, 100)).save(pred_dir / name)
    with pytest.raises(PanopticFormatError, match="image 142238: ground truth is 640x427 pixels"):
        evaluate_files(GT_JSON, GT_DIR, pred_json, pred_dir)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openseed.evaluation.panoptic", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path, capsys):
    pred_json, pred_dir = write_prediction(tmp_path, ["shift", "noise"], 5)
    args = [f"gt_json={GT_JSON}", f"gt_dir={GT_DIR}", f"pred_json={pred_json}", f"pred_dir={pred_dir}"]
    done = _cli(*args, "json=true")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # exactly one JSON document on stdout
    assert isinstance(result, dict) and done.stdout.strip().startswith("{")
    expected = evaluate_files(GT_JSON, GT_DIR, pred_json, pred_dir)
    assert result["All"] == expected["All"] and result["per_class"]["1"] == expected["per_class"][1]

    assert panoptic.main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["|", "PQ", "SQ", "RQ", "N"]
    assert table[2].split()[:3] == ["All", "|", f"{100 * expected['All']['pq']:.1f}"]

    pred_data = json.loads(pred_json.read_text())
    pred_data["annotations"].pop()
    pred_json.write_text(json.dumps(pred_data))
    done = _cli(*args, "json=true")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "image 439180: no prediction" in done.stderr
    assert panoptic.main([f"gt_json={GT_JSON}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "missing ['gt_dir', 'pred_json', 'pred_dir']" in error[0]


def test_speed_against_panopticapi(tmp_path, capsys):
    """Not a timed test: reports our time / panopticapi's on the sample replicated to 20 images (same run)."""
    pred_json, pred_dir = write_prediction(tmp_path, ["split", "noise", "shift"], 11, copies=10)
    gt_json, gt_dir = tmp_path / "gt.json", tmp_path / "gt"
    start = time.perf_counter()
    theirs = pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    t_theirs = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluate_files(gt_json, gt_dir, pred_json, pred_dir)
    t_ours = time.perf_counter() - start
    assert_same(ours, theirs)
    with capsys.disabled():
        print(f"\n[panoptic PQ, 20 images] ours {t_ours:.3f} s, panopticapi {t_theirs:.3f} s, "
              f"ratio ours/theirs {t_ours / t_theirs:.3f}")
