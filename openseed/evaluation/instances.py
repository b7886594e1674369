"""COCO box / mask AP with the official semantics (pycocotools' ``COCOeval``), safe for ids that start at 0.

``evaluate_coco(gt, detections, iou_type)`` returns the 12 standard COCO stats by name
(``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``, fractions in [0, 1]) and the per-category AP
(IoU 0.50:0.95, area "all", 100 detections), identical to pycocotools 2.0.x to floating-point rounding.
``InstanceEvaluator`` accumulates per-image detections on every rank, gathers them once with
:func:`openseed.evaluation.common.gather_to_all` and evaluates every requested IoU type.

Engines
-------
``engine="faster_coco_eval"`` (the default when the package is installed) runs pycocotools' algorithm in C++
(faster-coco-eval); ``engine="pycocotools"`` runs the reference implementation. On the official COCO API
fake-results test (val2014, 100 images) both give the expected 12 stats for bbox and segm to 1e-15, which
``tests/test_eval_instances.py`` checks; without faster-coco-eval the default falls back to pycocotools.
The engines' progress prints are swallowed so that ``json=true`` output stays clean.

Ids that start at 0 (the "AP 0.9488" pitfall)
---------------------------------------------
COCOeval stores the id of the matched annotation as the match marker, with 0 meaning "unmatched", so a ground
truth annotation with id 0 can never count as matched: a perfect prediction of a data set whose annotation ids
start at 0 scores less than 1. Before evaluating, image ids, category ids and ground-truth annotation ids are
therefore renumbered 1..N, consistently in ground truth and detections. The renumbering is monotone (sorted
image / category ids keep their order; annotations keep their list order), which is all COCOeval depends on,
so results for data with positive ids are unchanged. Per-category results are reported under the original
ids and names.

Undefined values (mirroring pycocotools)
----------------------------------------
A stat whose ground truth is empty (e.g. ``APs`` with no small objects) is ``-1``, exactly as pycocotools
reports it; per-category AP of a category without ground truth is ``-1`` too. With no detections at all
(which makes pycocotools' ``loadRes`` crash) the evaluation runs on an empty result set: every defined stat is
0 and undefined ones stay ``-1``.

Detections
----------
COCO result dicts: ``image_id``, ``category_id``, ``score`` and, for bbox, ``bbox`` ``[x, y, w, h]``; for segm,
``segmentation`` as compressed RLE (``counts`` str or bytes; polygons and uncompressed RLE are converted).
As in detectron2, a bbox evaluation ignores ``segmentation`` and a segm evaluation ignores ``bbox`` (so detection
areas come from the mask). Detections for unknown image or category ids, a ``score`` that is not a finite number
(a string, ``NaN``, ``Infinity``) and, for bbox, a ``bbox`` that is not 4 finite numbers with ``w, h >= 0`` raise
:class:`EvaluationInputError` naming the detection's index and the field (and the file, when read from one), before
anything is scored.

CLI: ``python -m openseed.evaluation.instances gt=G dt=D iou_type=bbox|segm [engine=E] [json=true]``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openseed.cli import Option, command, one_of, path
from openseed.core.codecs import segmentation_to_rle
from openseed.evaluation.common import gather_to_all

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
ENGINES = ("pycocotools", "faster_coco_eval")
DEFAULT_ENGINE = "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") is not None else "pycocotools"


class EvaluationInputError(ValueError):
    """Ground truth or detections that cannot be evaluated (unknown ids, missing fields, wrong types)."""


# ----------------------------------------------------------------------------------------------- loading


def _load_json(source: str | Path | dict | list, what: str) -> Any:
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            with path.open() as f:
                return json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"{what} file {path} is not valid JSON: {e}") from None
    return source


def _check_gt(gt: Any) -> dict:
    if not isinstance(gt, dict):
        raise EvaluationInputError(f"ground truth must be a COCO json object, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationInputError(f"ground truth has no '{key}' list")
    return gt


# ----------------------------------------------------------------------------------------------- remapping


class _Remap:
    """Monotone renumbering of a COCO ground truth to ids 1..N (images, categories, annotations)."""

    def __init__(self, gt: dict):
        try:
            image_ids = sorted({img["id"] for img in gt["images"]})
            cat_ids = sorted({cat["id"] for cat in gt["categories"]})
        except KeyError as e:
            raise EvaluationInputError(f"ground truth image or category without {e}") from None
        except TypeError as e:
            raise EvaluationInputError(f"ground truth ids cannot be ordered: {e}") from None
        self.image = {old: new for new, old in enumerate(image_ids, start=1)}
        self.category = {old: new for new, old in enumerate(cat_ids, start=1)}
        self.images_by_new = {}
        images = []
        for img in gt["images"]:
            new = dict(img, id=self.image[img["id"]])
            if new["id"] in self.images_by_new:  # duplicate image entry: pycocotools keeps the last one
                images = [i for i in images if i["id"] != new["id"]]
            self.images_by_new[new["id"]] = new
            images.append(new)
        categories = [dict(cat, id=self.category[cat["id"]]) for cat in gt["categories"]]
        # per-category output: original id and name, in sorted-id order (COCOeval's category axis)
        names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
        self.categories_out = [(old, names[old]) for old in cat_ids]

        annotations, dropped = [], 0
        for ann in gt["annotations"]:
            try:
                img, cat = self.image.get(ann["image_id"]), self.category.get(ann["category_id"])
            except (KeyError, TypeError) as e:
                raise EvaluationInputError(f"ground truth annotation without image_id / category_id: {e}") from None
            if img is None or cat is None:
                dropped += 1  # COCOeval never looks at annotations outside its image / category lists
                continue
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=img, category_id=cat))
        if dropped:
            warnings.warn(f"{dropped} ground-truth annotations refer to unknown images or categories; ignored",
                          stacklevel=3)
        self.gt = {"images": images, "annotations": annotations, "categories": categories}
        if "info" in gt:
            self.gt["info"] = gt["info"]

    def detections(self, detections: Iterable[dict], iou_type: str, source: str | None = None) -> list[dict]:
        """Renumbered, checked copies of ``detections``; a bad score or bbox is an error naming ``source`` (the file
        they were read from, if any), the detection's index and the field."""
        where = f"{source}: " if source else ""
        out = []
        for k, det in enumerate(detections):
            if not isinstance(det, dict):
                raise EvaluationInputError(f"detection {k} is not an object")
            try:
                image_id, category_id, score = det["image_id"], det["category_id"], det["score"]
            except KeyError as e:
                raise EvaluationInputError(f"detection {k} has no {e}") from None
            try:
                img = self.image.get(image_id)
                cat = self.category.get(category_id)
            except TypeError:  # unhashable id
                img = cat = None
            if img is None:
                raise EvaluationInputError(f"detection {k} refers to unknown image_id {image_id!r}")
            if cat is None:
                raise EvaluationInputError(f"detection {k} refers to unknown category_id {category_id!r}")
            score = _score(score, k, where)
            new = {"image_id": img, "category_id": cat, "score": score}
            if iou_type == "bbox":
                new["bbox"] = _bbox(det, k, where)
            else:
                new["segmentation"] = _rle(det, k, self.images_by_new[img])
            out.append(new)
        return out


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a number (not a string, a bool or None), else None."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _score(score: Any, k: int, where: str = "") -> float:
    value = _real(score)
    if value is None or not math.isfinite(value):
        raise EvaluationInputError(f"{where}detection {k}: field 'score' must be a finite number, got {score!r}")
    return value


def _bbox(det: dict, k: int, where: str = "") -> list[float]:
    bbox = det.get("bbox")
    values = [_real(v) for v in bbox] if isinstance(bbox, (list, tuple, np.ndarray)) else []
    if len(values) != 4 or any(v is None for v in values):
        raise EvaluationInputError(f"{where}detection {k}: field 'bbox' must be 4 numbers [x, y, w, h], "
                                   f"got {bbox!r}")
    if not all(math.isfinite(v) for v in values) or values[2] < 0 or values[3] < 0:
        raise EvaluationInputError(f"{where}detection {k}: field 'bbox' {bbox!r} must be finite with w >= 0 and "
                                   f"h >= 0")
    return values


def _rle(det: dict, k: int, image: dict) -> dict:
    seg = det.get("segmentation")
    if seg is None:
        raise EvaluationInputError(f"detection {k} has no segmentation (needed for iou_type 'segm')")
    height, width = image.get("height"), image.get("width")
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        counts = seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]
        size = [int(s) for s in seg.get("size", ())]
        if len(size) != 2:
            raise EvaluationInputError(f"detection {k}: RLE without a [height, width] size")
        if height is not None and width is not None and size != [int(height), int(width)]:
            raise EvaluationInputError(f"detection {k}: RLE size {size} differs from the image's "
                                       f"[{height}, {width}]")
        return {"size": size, "counts": counts}
    # polygons or uncompressed RLE: convert with the image size
    if height is None or width is None:
        raise EvaluationInputError(f"detection {k}: polygon / uncompressed segmentation needs the image size")
    try:
        return segmentation_to_rle(seg, height, width)
    except ValueError as e:
        raise EvaluationInputError(f"detection {k}: {e}") from None


# ----------------------------------------------------------------------------------------------- engines


def _resolve_engine(engine: str | None) -> str:
    engine = DEFAULT_ENGINE if engine is None else engine
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "faster_coco_eval" and importlib.util.find_spec("faster_coco_eval") is None:
        raise ImportError("engine 'faster_coco_eval' needs the faster-coco-eval package")
    return engine


def _noop(*args, **kwargs) -> None:
    pass


def _run_cocoeval(gt: dict, detections: list[dict], iou_type: str, engine: str):
    """COCOeval (evaluate, accumulate, summarize) on already renumbered data; returns the evaluator."""
    with contextlib.redirect_stdout(io.StringIO()):
        if engine == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            if detections:
                coco_dt = coco_gt.loadRes(detections)
            else:  # pycocotools' loadRes cannot load an empty list: build the empty result set it would mean
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]),
                                   "annotations": []}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        else:
            from faster_coco_eval import COCO, COCOeval_faster

            coco_gt = COCO(gt)
            coco_gt.print_function = _noop
            coco_dt = coco_gt.loadRes(detections)
            evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_noop)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _per_category(evaluator, categories: Sequence[tuple[Any, str]]) -> list[dict]:
    """AP at IoU 0.50:0.95, area "all", the largest maxDets, for each category (-1 without ground truth)."""
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]  # [T, R, K]
    out = []
    for k, (cat_id, name) in enumerate(categories):
        p = precision[:, :, k]
        p = p[p > -1]
        out.append({"id": cat_id, "name": name, "AP": float(p.mean()) if p.size else -1.0})
    return out


# ----------------------------------------------------------------------------------------------- public API


def evaluate_coco(gt: str | Path | dict, detections: str | Path | list, iou_type: str = "bbox",
                  engine: str | None = None) -> dict:
    """COCO AP of ``detections`` against ``gt`` (paths or loaded JSON) for ``iou_type`` "bbox" or "segm".

    Returns ``{"AP": ..., ..., "ARl": ..., "per_category": [{"id", "name", "AP"}, ...]}`` with the 12 stats as
    floats (pycocotools' ``stats`` order, ``-1`` where undefined). ``gt`` and ``detections`` are not modified.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    engine = _resolve_engine(engine)
    remap = _Remap(_check_gt(_load_json(gt, "ground truth")))
    dets = _load_json(detections, "detections")
    if not isinstance(dets, list):
        raise EvaluationInputError(f"detections must be a list of COCO result objects, got {type(dets).__name__}")
    source = f"detections file {detections}" if isinstance(detections, (str, Path)) else None
    return _evaluate_remapped(remap, dets, iou_type, engine, source)


def _evaluate_remapped(remap: _Remap, detections: list[dict], iou_type: str, engine: str,
                       source: str | None = None) -> dict:
    dets = remap.detections(detections, iou_type, source)
    # fresh annotation dicts for every run: both engines add fields (ignore, rle, segmentation masks) in place
    gt = dict(remap.gt, annotations=[dict(a) for a in remap.gt["annotations"]])
    evaluator = _run_cocoeval(gt, dets, iou_type, engine)
    stats = [float(s) for s in evaluator.stats[: len(STAT_NAMES)]]
    result: dict[str, Any] = dict(zip(STAT_NAMES, stats))
    result["per_category"] = _per_category(evaluator, remap.categories_out)
    return result


class InstanceEvaluator:
    """Accumulates COCO result dicts per rank; ``compute()`` gathers all ranks and returns stats per IoU type.

    Every rank ends up with the same complete detection list (rank order) and computes the same result.
    """

    def __init__(self, gt: dict, iou_types: Sequence[str] = IOU_TYPES, engine: str | None = None):
        for t in iou_types:
            if t not in IOU_TYPES:
                raise ValueError(f"iou_types must be from {IOU_TYPES}, got {t!r}")
        self.iou_types = tuple(iou_types)
        self.engine = _resolve_engine(engine)
        self._remap = _Remap(_check_gt(gt))
        self._detections: list[dict] = []

    def reset(self) -> None:
        self._detections = []

    def update(self, detections: Iterable[dict]) -> None:
        """Add COCO result dicts (``image_id``, ``category_id``, ``bbox``, ``score``, optional ``segmentation``)."""
        self._detections.extend(dict(d) for d in detections)

    def compute(self) -> dict[str, dict]:
        """``{iou_type: evaluate_coco-style result}`` over the detections of all ranks."""
        detections = gather_to_all(self._detections)
        return {t: _evaluate_remapped(self._remap, detections, t, self.engine) for t in self.iou_types}


# ----------------------------------------------------------------------------------------------- CLI


def format_table(result: dict, iou_type: str) -> str:
    labels = {
        "AP": "AP   @[IoU=0.50:0.95 | area=   all | maxDets=100]",
        "AP50": "AP   @[IoU=0.50      | area=   all | maxDets=100]",
        "AP75": "AP   @[IoU=0.75      | area=   all | maxDets=100]",
        "APs": "AP   @[IoU=0.50:0.95 | area= small | maxDets=100]",
        "APm": "AP   @[IoU=0.50:0.95 | area=medium | maxDets=100]",
        "APl": "AP   @[IoU=0.50:0.95 | area= large | maxDets=100]",
        "AR1": "AR   @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
        "AR10": "AR   @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
        "AR100": "AR   @[IoU=0.50:0.95 | area=   all | maxDets=100]",
        "ARs": "AR   @[IoU=0.50:0.95 | area= small | maxDets=100]",
        "ARm": "AR   @[IoU=0.50:0.95 | area=medium | maxDets=100]",
        "ARl": "AR   @[IoU=0.50:0.95 | area= large | maxDets=100]",
    }
    lines = [f"COCO {iou_type} evaluation", f"{'stat':<6} {'':<50} {'value':>7}"]
    lines += [f"{name:<6} {labels[name]:<50} {result[name]:>7.3f}" for name in STAT_NAMES]
    per_cat = result.get("per_category", [])
    if per_cat:
        lines += ["", f"{'id':>6}  {'category':<30} {'AP':>7}"]
        lines += [f"{str(c['id']):>6}  {str(c['name'])[:30]:<30} {c['AP']:>7.3f}" for c in per_cat]
    return "\n".join(lines)


CLI_OPTIONS = {
    "gt": Option("the ground truth: a COCO instances JSON", required=True, check=path),
    "dt": Option("the detections: a COCO results JSON (a list of records)", required=True, check=path),
    "iou_type": Option("bbox (box AP) or segm (mask AP)", required=True, check=one_of(IOU_TYPES)),
    "engine": Option(f"one of {list(ENGINES)} (null: {DEFAULT_ENGINE})", None, one_of(ENGINES)),
    "json": Option("print exactly one JSON object instead of the table", False),
}


@command(CLI_OPTIONS, "python -m openseed.evaluation.instances",
         "COCO box / mask AP of a results file (pycocotools semantics, 0-based ids safe): a table, or one JSON object "
         "on stdout with json=true.")
def main(args) -> int:
    gt, dt, iou_type, wanted_engine, as_json = args.gt, args.dt, args.iou_type, args.engine, args.json
    try:
        with contextlib.redirect_stdout(sys.stderr):  # anything an engine prints goes to stderr
            engine = _resolve_engine(wanted_engine)
            result = evaluate_coco(gt, dt, iou_type, engine=engine)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        if as_json:
            print(json.dumps({"iou_type": iou_type, "engine": engine, **result}))
        else:
            print(format_table(result, iou_type))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
