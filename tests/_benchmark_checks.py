"""Independent checks for the benchmark converters' tests: tiny pictures and label PNGs, the oracle's metrics, and
the same scores computed without openseed (panopticapi's pq_compute, pycocotools' COCOeval, a plain confusion-matrix
mIoU), plus a perturbation of the oracle's panoptic predictions."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from panopticapi.evaluation import pq_compute
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from openseed.core.codecs import id_to_rgb
from openseed.core.predictions import Instances, PanopticSegmentation, SemanticSegmentation
from openseed.evaluation.oracle import oracle_predictions, score

H, W = 24, 32
PANOPTIC_METRICS = {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "box_AP", "box_AP50", "mask_AP", "mask_AP50"}
SEMANTIC_METRICS = {"mIoU", "fwIoU", "mACC", "pACC"}


def write_jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_grey(path, values, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = values.astype(np.uint8 if mode == "L" else np.uint16)
    Image.fromarray(array).save(path)
    with Image.open(path) as check:
        assert check.mode == ("L" if mode == "L" else "I;16")
    return path


def flat(metrics):
    return {k: v for k, v in metrics.items() if k != "per_class"}


def assert_oracle_perfect(out, expected_keys):
    metrics = flat(score(out))
    assert set(metrics) == expected_keys
    # exactly 1 up to float summation (fwIoU is a frequency-weighted sum: 0.9999999999999999 on some maps)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in metrics.values()), metrics
    assert metrics.get("PQ", 1.0) == 1.0 and metrics["mIoU"] == 1.0


def plain_miou(truth_and_preds, num_classes, ignore):
    """mIoU of (truth labels, predicted labels) pairs from a plain confusion matrix over the classes with ground
    truth; ``ignore`` pixels of the truth are left out."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for truth, pred in truth_and_preds:
        valid = truth != ignore
        np.add.at(conf, (truth[valid], pred[valid]), 1)
    tp, gt, predicted = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt > 0
    return float(np.mean(tp[present] / (gt + predicted - tp)[present]))


def panopticapi_pq(tmp_path, categories, truth, preds):
    """PQ from panopticapi's pq_compute on files written here. ``truth`` / ``preds``: per image id,
    (id map, [{"id", "category_id", "iscrowd"}])."""
    result = {}
    for kind, maps in (("gt", truth), ("pred", preds)):
        folder = tmp_path / f"pq_{kind}"
        folder.mkdir()
        annotations = []
        for image_id, (ids, segments) in maps.items():
            Image.fromarray(id_to_rgb(ids)).save(folder / f"{image_id}.png")
            annotations.append({"image_id": image_id, "file_name": f"{image_id}.png",
                                "segments_info": [{**s, "area": int((ids == s["id"]).sum())} for s in segments]})
        data = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in maps],
                "annotations": annotations, "categories": categories}
        (tmp_path / f"pq_{kind}.json").write_text(json.dumps(data))
        result[kind] = (str(tmp_path / f"pq_{kind}.json"), str(folder))
    with contextlib.redirect_stdout(io.StringIO()):
        return pq_compute(result["gt"][0], result["pred"][0], result["gt"][1], result["pred"][1])


def rle_of(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def pycocotools_ap(thing_ids, truth, detections, iou_type):
    """AP of pycocotools' COCOeval run directly. ``truth``: per image id, [(mask, category_id, iscrowd)];
    ``detections``: [(image_id, category_id, mask, xywh box)] with score 1."""
    annotations = []
    for image_id, objects in truth.items():
        for mask, category_id, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "iscrowd": crowd, "area": float(mask.sum()), "bbox": tight_box(mask),
                                "segmentation": rle_of(mask)})
    gt = {"images": [{"id": i, "height": H, "width": W} for i in truth], "annotations": annotations,
          "categories": [{"id": c, "name": str(c)} for c in thing_ids]}
    dets = [{"image_id": i, "category_id": c, "score": 1.0, "bbox": box, "segmentation": rle_of(mask)}
            for i, c, mask, box in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def perturbed_panoptic(sample, vocab, drop_segment, shift_segment, shift, relabel_block, relabel_to):
    """The oracle's predictions with one thing segment dropped (panoptic map and instances), one instance box
    shifted by ``shift`` pixels in x, and a block of the semantic map relabelled to class index ``relabel_to``."""
    predictions = oracle_predictions(sample, vocab)
    meta = sample.annotation
    pan = predictions["panoptic"]
    ids = pan.panoptic_seg.clone()
    ids[ids == drop_segment] = 0
    segments = [s for s in pan.segments_info if s["id"] != drop_segment]
    sem = predictions["semantic"].sem_seg.clone()
    sem[relabel_block] = relabel_to
    things = [o["segment_id"] for o in meta["objects"] if not o["iscrowd"] and o["is_thing"]]
    inst = predictions["instances"]
    keep = [k for k, s in enumerate(things) if s != drop_segment]
    boxes = inst.boxes.clone()
    for k, s in enumerate(things):
        if s == shift_segment:
            boxes[k, [0, 2]] += shift
    keep_t = torch.tensor(keep, dtype=torch.long)
    return {"panoptic": PanopticSegmentation(ids, segments, sample.image_id),
            "semantic": SemanticSegmentation(sem, image_id=sample.image_id),
            "instances": Instances(scores=inst.scores[keep_t], labels=inst.labels[keep_t],
                                   queries=inst.queries[keep_t], boxes=boxes[keep_t], masks=inst.masks[keep_t],
                                   image_id=sample.image_id)}
