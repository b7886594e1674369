"""Panoptic quality (PQ / SQ / RQ) with the official COCO panoptic semantics, vectorised.

The numbers are those of ``panopticapi.evaluation.pq_compute`` (the official COCO panoptic API):

* A panoptic PNG encodes segment ids as ``id = R + 256 G + 256^2 B``. Ground-truth pixels with id 0 are void.
  Only segments listed in the JSON ``segments_info`` take part; other ground-truth ids in the PNG are ignored.
* A ground-truth and a predicted segment of the same category match when their IoU exceeds 0.5, where the union
  leaves out the predicted segment's void pixels: ``union = pred_area + gt_area - intersection - pred_void``.
  The ground-truth area is the JSON ``area`` (the PNG pixel count where the JSON has none); the predicted area
  is always counted in the PNG. Crowd ground-truth segments (``iscrowd`` 1) never match.
* Unmatched non-crowd ground-truth segments are false negatives. An unmatched predicted segment is a false
  positive unless more than half of its pixels fall on void or on the crowd region of its category (the last
  crowd segment of that category in the JSON, as in the official code).
* Per category the IoU sum and the tp / fp / fn counts add up over images;
  ``PQ = iou / (tp + fp / 2 + fn / 2)``, ``SQ = iou / tp``, ``RQ = tp / (tp + fp / 2 + fn / 2)``, and the
  All / Things / Stuff results average over the categories with ``tp + fp + fn > 0`` (``n`` of them).
  The official code divides by zero when ``n`` is 0; here such a group reports 0.0 with ``n`` 0.

Instead of the official per-pair Python loops and worker processes, one image costs a hash-table relabelling
of both id maps to contiguous labels, one ``np.bincount`` joint histogram and array arithmetic over the (small)
segment-pair matrix; on files, PNG decoding runs a few images ahead in background threads.

Run on files: ``python -m openseed.evaluation.panoptic gt_json=G gt_dir=GD pred_json=P pred_dir=PD``.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from openseed.cli import Option, command, path
from openseed.evaluation.common import gather_to_all

# Odd 32-bit multipliers for the id -> label hash table of _relabel, tried in turn until the keys do not collide.
_HASH_MULTIPLIERS = [np.uint32(m) for m in (2654435769, 2246822519, 3266489917, 668265263, 374761393, 3864292197,
                                            2870177451, 1597334677)]


class PanopticFormatError(ValueError):
    """Inconsistent panoptic inputs: PNG and JSON segments disagree, unknown category, missing prediction."""


class CategoryStat(NamedTuple):
    """Accumulated statistics of one category: IoU sum of the matches and tp / fp / fn counts."""

    iou: float
    tp: int
    fp: int
    fn: int


def _add_stats(total: dict[int, CategoryStat], stats: Mapping[int, CategoryStat]) -> None:
    """Add the per-category ``stats`` of one image into ``total`` in place."""
    for cat, s in stats.items():
        t = total.get(cat)
        total[cat] = s if t is None else CategoryStat(t.iou + s.iou, t.tp + s.tp, t.fp + s.fp, t.fn + s.fn)


def _where(image_id: object) -> str:
    return "" if image_id is None else f"image {image_id}: "


def _hash_slots(keys: np.ndarray) -> tuple[int, np.uint32, np.ndarray] | None:
    """(bits, multiplier, slots) of a collision-free multiplicative hash of uint32 ``keys`` into 2^bits slots
    (``slot = (key * multiplier mod 2^32) >> (32 - bits)``), or None if the few tries all collide."""
    base = max(10, keys.size.bit_length() + 4)
    for bits in range(base, base + 4):
        for multiplier in _HASH_MULTIPLIERS:
            slots = (keys * multiplier) >> np.uint32(32 - bits)
            if np.unique(slots).size == slots.size:
                return bits, multiplier, slots
    return None


def _relabel(ids: np.ndarray, segment_ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """Map an id map to contiguous labels: ``segment_ids[k]`` -> ``k + 1``, raw id 0 -> its segment's label or
    ``len(segment_ids) + 1`` if 0 is no segment, every other id -> 0. Returns (flat labels, number of labels).

    Ids below 2^32 (every RGB-encoded id) go through a small hash table whose stored keys are checked;
    larger ids through ``np.unique``.
    """
    labels = {sid: k + 1 for k, sid in enumerate(segment_ids)}
    labels.setdefault(0, len(segment_ids) + 1)
    flat = ids.ravel()
    if flat.size == 0 or int(flat.max()) <= 0xFFFFFFFF:
        keys = {sid: lab for sid, lab in labels.items() if 0 <= sid <= 0xFFFFFFFF}  # others cannot occur
        key_array = np.array(list(keys), dtype=np.uint32)
        found = _hash_slots(key_array)
        if found is not None:
            bits, multiplier, slots = found
            table_key = np.zeros(1 << bits, dtype=np.uint32)  # empty slots hold 0, whose own slot (0) is taken
            table_label = np.zeros(1 << bits, dtype=np.int32)
            table_key[slots] = key_array
            table_label[slots] = list(keys.values())
            slot = flat.astype(np.uint32, copy=False) * multiplier
            slot >>= np.uint32(32 - bits)
            slot = slot.astype(np.intp)
            out = table_label.take(slot)
            out[table_key.take(slot) != flat] = 0
            return out, len(segment_ids) + 2
    values, inverse = np.unique(flat, return_inverse=True)
    return np.array([labels.get(v, 0) for v in values.tolist()], dtype=np.int32)[inverse.ravel()], len(segment_ids) + 2


def _check_id_map(ids: np.ndarray, name: str, image_id: object) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise PanopticFormatError(f"{_where(image_id)}{name} must be a 2-D integer id map, got {ids.dtype} {ids.shape}")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and int(ids.min()) < 0:
        raise PanopticFormatError(f"{_where(image_id)}{name} has negative segment ids")
    return ids


def pq_per_image(gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray, pred_segments: list[dict],
                 categories: Mapping[int, dict], *, image_id: object = None) -> dict[int, CategoryStat]:
    """Per-category PQ statistics of one image.

    ``gt_ids`` / ``pred_ids``: [H, W] segment id maps (0 = void in the ground truth); ``gt_segments`` /
    ``pred_segments``: COCO ``segments_info`` dicts (``id``, ``category_id``; ground truth also ``iscrowd`` and
    ``area``); ``categories``: category id -> info, the valid predicted categories. ``image_id`` only names the
    image in error messages. Returns category id -> :class:`CategoryStat` for the categories with any count.

    Raises :class:`PanopticFormatError` when the id maps differ in shape, a predicted id in the PNG has no JSON
    segment, a predicted JSON segment has no pixel, or a predicted segment has an unknown category.
    """
    gt_ids = _check_id_map(gt_ids, "ground-truth id map", image_id)
    pred_ids = _check_id_map(pred_ids, "predicted id map", image_id)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticFormatError(f"{_where(image_id)}ground truth is {gt_ids.shape[1]}x{gt_ids.shape[0]} pixels "
                                  f"but the prediction {pred_ids.shape[1]}x{pred_ids.shape[0]}")
    gt = {s["id"]: s for s in gt_segments}
    pred = {s["id"]: s for s in pred_segments}
    gt_keys, pred_keys = list(gt), list(pred)
    gt_lab, n_gt = _relabel(gt_ids, gt_keys)
    pred_lab, n_pred = _relabel(pred_ids, pred_keys)
    hist = np.bincount(gt_lab * n_pred + pred_lab, minlength=n_gt * n_pred).reshape(n_gt, n_pred)

    # Prediction sanity checks (label 0 of pred_lab: ids in the PNG without a JSON segment).
    if hist[:, 0].any():
        unknown = np.unique(pred_ids.ravel()[pred_lab == 0]).tolist()
        raise PanopticFormatError(f"{_where(image_id)}predicted segment ids {unknown} are in the PNG but not in "
                                  "the JSON segments_info")
    pred_area = hist.sum(axis=0)[1:len(pred_keys) + 1]
    bad_cats = sorted({s["category_id"] for s in pred.values() if s["category_id"] not in categories})
    if bad_cats:
        raise PanopticFormatError(f"{_where(image_id)}predicted segments have unknown category ids {bad_cats}")
    absent = [sid for sid, area in zip(pred_keys, pred_area.tolist()) if area == 0]
    if absent:
        raise PanopticFormatError(f"{_where(image_id)}predicted segment ids {absent} are in the JSON "
                                  "segments_info but not in the PNG")

    gt_cat = np.array([s["category_id"] for s in gt.values()], dtype=np.int64)
    gt_crowd = np.array([s.get("iscrowd", 0) == 1 for s in gt.values()], dtype=bool)
    gt_pixels = hist.sum(axis=1)[1:len(gt_keys) + 1]
    gt_area = np.array([s.get("area", px) for s, px in zip(gt.values(), gt_pixels.tolist())], dtype=np.float64)
    pred_cat = np.array([s["category_id"] for s in pred.values()], dtype=np.int64)
    void_label = gt_keys.index(0) + 1 if 0 in gt else n_gt - 1
    pred_void = hist[void_label, 1:len(pred_keys) + 1]
    inter = hist[1:len(gt_keys) + 1, 1:len(pred_keys) + 1]

    # Matches: same category, non-crowd ground truth, IoU > 0.5.
    gi, pj = np.nonzero((inter > 0) & ~gt_crowd[:, None] & (gt_cat[:, None] == pred_cat[None, :]))
    pair_inter = inter[gi, pj]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = pair_inter / (pred_area[pj] + gt_area[gi] - pair_inter - pred_void[pj])
    ok = iou > 0.5
    gi, pj, iou = gi[ok], pj[ok], iou[ok]

    stats: dict[int, list] = {}

    def bump(cat: int, field: int, value: float | int) -> None:
        stats.setdefault(cat, [0.0, 0, 0, 0])[field] += value

    for cat, value in zip(gt_cat[gi].tolist(), iou.tolist()):
        bump(cat, 0, value)
        bump(cat, 1, 1)
    gt_matched = np.zeros(len(gt_keys), dtype=bool)
    gt_matched[gi] = True
    crowd_of_cat: dict[int, int] = {}
    for k, (cat, crowd, matched) in enumerate(zip(gt_cat.tolist(), gt_crowd.tolist(), gt_matched.tolist())):
        if crowd:
            crowd_of_cat[cat] = k  # the official code keeps the last crowd segment of each category
        elif not matched:
            bump(cat, 3, 1)
    pred_matched = np.zeros(len(pred_keys), dtype=bool)
    pred_matched[pj] = True
    for j in np.flatnonzero(~pred_matched).tolist():
        cat = int(pred_cat[j])
        ignored = int(pred_void[j])
        if cat in crowd_of_cat:
            ignored += int(inter[crowd_of_cat[cat], j])
        if ignored / int(pred_area[j]) <= 0.5:
            bump(cat, 2, 1)
    return {cat: CategoryStat(*s) for cat, s in stats.items()}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def summarize(stats: Mapping[int, CategoryStat], categories: Mapping[int, dict]) -> dict:
    """PQ / SQ / RQ of accumulated per-category ``stats`` over ``categories`` (id -> info with ``isthing``).

    Returns ``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {"pq", "sq", "rq", "tp",
    "fp", "fn"}}}`` as fractions (1.0 = perfect). Categories without any tp / fp / fn score 0.0 per class and are
    left out of the averages; statistics of categories not in ``categories`` are ignored.
    """
    per_class: dict[int, dict] = {}
    groups = {"All": [], "Things": [], "Stuff": []}
    for cat, info in categories.items():
        iou, tp, fp, fn = stats.get(cat, CategoryStat(0.0, 0, 0, 0))
        if tp + fp + fn == 0:
            per_class[cat] = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
            continue
        den = tp + 0.5 * fp + 0.5 * fn
        result = {"pq": iou / den, "sq": _ratio(iou, tp), "rq": tp / den, "tp": tp, "fp": fp, "fn": fn}
        per_class[cat] = result
        groups["All"].append(result)
        groups["Things" if info["isthing"] == 1 else "Stuff"].append(result)
    out: dict = {}
    for name, members in groups.items():
        n = len(members)
        sums = {key: sum(m[key] for m in members) for key in ("pq", "sq", "rq")}  # in category order, as official
        out[name] = {key: _ratio(value, n) for key, value in sums.items()} | {"n": n}
    out["per_class"] = per_class
    return out


class PanopticEvaluator:
    """Accumulates per-image PQ statistics (on every rank) and computes PQ / SQ / RQ once.

    ``categories``: COCO panoptic categories (dicts with ``id`` and ``isthing``). Each image's statistics are
    kept separately, keyed by the optional ``image_id``; :meth:`compute` gathers them from all ranks and counts
    each image id once (a distributed sampler that pads its last batch repeats images), images without an id
    each time they were added.
    """

    def __init__(self, categories: list[dict]):
        self.categories = {c["id"]: c for c in categories}
        self._images: list[tuple[object, dict[int, CategoryStat]]] = []

    def reset(self) -> None:
        """Forget every image added so far."""
        self._images = []

    def update(self, gt_ids: np.ndarray, gt_segments: list[dict], pred_ids: np.ndarray,
               pred_segments: list[dict], image_id: object = None) -> dict[int, CategoryStat]:
        """Score one image (see :func:`pq_per_image`), keep and return its statistics."""
        stats = pq_per_image(gt_ids, gt_segments, pred_ids, pred_segments, self.categories, image_id=image_id)
        self._images.append((image_id, stats))
        return stats

    def add_image_stats(self, stats: Mapping[int, CategoryStat], image_id: object = None) -> None:
        """Keep statistics already computed with :func:`pq_per_image`."""
        self._images.append((image_id, dict(stats)))

    def compute(self) -> dict:
        """Gather every rank's images and return the metrics of :func:`summarize`."""
        total: dict[int, CategoryStat] = {}
        seen: set = set()
        for image_id, stats in gather_to_all(self._images):
            if image_id is not None:
                if image_id in seen:
                    continue
                seen.add(image_id)
            _add_stats(total, stats)
        return summarize(total, self.categories)


def read_id_map(path: str | Path) -> np.ndarray:
    """Segment id map (uint32 [H, W], ``R + 256 G + 256^2 B``) of an RGB(A) panoptic PNG."""
    with Image.open(path) as image:
        if image.mode not in ("RGB", "RGBA"):
            raise PanopticFormatError(f"{path}: expected an RGB panoptic PNG, got mode {image.mode}")
        raw = image.tobytes("raw", "RGBX" if image.mode == "RGB" else "RGBA")
        width, height = image.size
    return (np.frombuffer(raw, dtype="<u4") & 0xFFFFFF).reshape(height, width)


def _load_json(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    with open(source) as f:
        return json.load(f)


def _name(source: str | Path | dict) -> str:
    return "the prediction JSON" if isinstance(source, dict) else str(source)


def evaluate_files(gt_json: str | Path | dict, gt_dir: str | Path, pred_json: str | Path | dict,
                   pred_dir: str | Path, categories: Iterable[dict] | Mapping[int, dict] | None = None) -> dict:
    """PQ of COCO panoptic predictions on files, as ``panopticapi.evaluation.pq_compute``.

    ``gt_json`` / ``pred_json``: COCO panoptic JSON files (or their loaded dicts) whose ``annotations`` have
    ``image_id``, ``file_name`` (PNG in ``gt_dir`` / ``pred_dir``) and ``segments_info``; predictions are matched
    to ground truth by ``image_id``. ``categories`` (COCO category dicts, or id -> dict) defaults to the
    ground-truth JSON's; predictions for images not in the ground truth are ignored. Returns the dict of
    :func:`summarize`. Raises :class:`PanopticFormatError` naming the image for a missing prediction or PNG
    and for inconsistent segments.
    """
    gt_data, pred_data = _load_json(gt_json), _load_json(pred_json)
    if categories is None:
        categories = gt_data["categories"]
    evaluator = PanopticEvaluator(list(categories.values() if isinstance(categories, Mapping) else categories))
    predictions = {ann["image_id"]: ann for ann in pred_data["annotations"]}
    pairs = []
    for gt_ann in gt_data["annotations"]:
        pred_ann = predictions.get(gt_ann["image_id"])
        if pred_ann is None:
            raise PanopticFormatError(f"image {gt_ann['image_id']}: no prediction in {_name(pred_json)}")
        pairs.append((gt_ann, pred_ann))

    def read_pair(pair: tuple[dict, dict]) -> list[np.ndarray]:
        id_maps = []
        for folder, ann in zip((gt_dir, pred_dir), pair):
            path = Path(folder) / ann["file_name"]
            try:
                id_maps.append(read_id_map(path))
            except OSError as e:
                raise PanopticFormatError(f"image {ann['image_id']}: cannot read {path}: {e}") from e
        return id_maps

    for (gt_ann, pred_ann), (gt_ids, pred_ids) in zip(pairs, _prefetched(read_pair, pairs)):
        evaluator.update(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"],
                         image_id=gt_ann["image_id"])
    return evaluator.compute()


def _prefetched(load: Callable, items: list, ahead: int = 4, threads: int = 2) -> Iterator:
    """``load(item)`` for each item in order, computed up to ``ahead`` items early in background threads
    (PNG decoding releases the GIL, so reading overlaps scoring)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def format_table(results: dict) -> str:
    """The official PQ / SQ / RQ / N table (percentages) of :func:`summarize` results."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)


CLI_OPTIONS = {
    "gt_json": Option("the ground truth's COCO panoptic JSON (with its categories)", required=True, check=path),
    "gt_dir": Option("the ground truth's PNG folder", required=True, check=path),
    "pred_json": Option("the predictions' COCO panoptic JSON", required=True, check=path),
    "pred_dir": Option("the predictions' PNG folder", required=True, check=path),
    "json": Option("print one JSON object instead of the table", False),
}


@command(CLI_OPTIONS, "python -m openseed.evaluation.panoptic",
         "PQ of COCO panoptic prediction files (panopticapi semantics): a table, or one JSON object with json=true.")
def main(args) -> int:
    prog = "python -m openseed.evaluation.panoptic"
    files, as_json = [args.gt_json, args.gt_dir, args.pred_json, args.pred_dir], args.json
    try:
        results = evaluate_files(*files)
    except (PanopticFormatError, OSError, KeyError, TypeError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError):
            message = f"missing field {e} in a JSON file"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(results) if as_json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
