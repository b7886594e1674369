"""data_prep.bdd100k: the 10K segmentation set in its published layout (JPEG images, 8-bit semantic masks, RGBA
panoptic bitmasks) converted, read back pixel-exact, scored by the oracle and, perturbed, against panopticapi,
pycocotools and a plain confusion matrix. The scoring helpers here also serve test_convert_sunrgbd_scannet.py."""

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

from data_prep import bdd100k
from openseed.core.codecs import decode_label_png, decode_panoptic_png, id_to_rgb
from openseed.core.predictions import Instances, PanopticSegmentation, SemanticSegmentation
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.runner import DatasetEvaluator

H, W = 24, 32
PANOPTIC_METRICS = {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "box_AP", "box_AP50", "mask_AP", "mask_AP50"}
SEMANTIC_METRICS = {"mIoU", "fwIoU", "mACC", "pACC"}


# ------------------------------------------------------------------------------------------- shared helpers
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


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def pycocotools_ap(thing_ids, truth, detections, iou_type):
    """AP of pycocotools' COCOeval run directly. ``truth``: per image id, [(mask, category_id, iscrowd)];
    ``detections``: [(image_id, category_id, mask, xywh box)] with score 1."""
    annotations = []
    for image_id, objects in truth.items():
        for mask, category_id, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "iscrowd": crowd, "area": float(mask.sum()), "bbox": _tight_box(mask),
                                "segmentation": _rle(mask)})
    gt = {"images": [{"id": i, "height": H, "width": W} for i in truth], "annotations": annotations,
          "categories": [{"id": c, "name": str(c)} for c in thing_ids]}
    dets = [{"image_id": i, "category_id": c, "score": 1.0, "bbox": box, "segmentation": _rle(mask)}
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


def score_with(out, predict):
    shards = ShardSet.open(out)
    evaluator = DatasetEvaluator.for_shards(shards)
    for sample in read_shards(out):
        evaluator.add(annotation_of(sample), **predict(sample, shards.vocabulary))
    return evaluator.compute()


# ------------------------------------------------------------------------------------------- the BDD sample
NAMES = ("7d2f7975-e0c1c5a7", "9a0f1e2b-3c4d5e6f")
CATEGORIES = [{"id": i, "name": n, "isthing": int(i >= 31)} for i, n in bdd100k.PANOPTIC_CATEGORIES]


def _bitmasks():
    """Per image: (category R, attributes G, annotation id) arrays, and the expected segments
    {id: (category, iscrowd)} with the expected id map (void = 0)."""
    scenes = []
    # image 0: sky, road, two cars (one with an id > 255: B and A both used; truncated and occluded bits set),
    # a crowd of persons, an ignored car (void), an "unlabeled" patch with an annotation id (void), vegetation
    cat, attr, ann = (np.zeros((H, W), np.int64) for _ in range(3))
    for rows, cols, c, g, a in [((0, 6), (0, 32), 30, 0, 1), ((16, 24), (0, 32), 7, 0, 2),
                                ((8, 16), (2, 10), 35, 0b1100, 300), ((8, 16), (12, 20), 35, 0, 4),
                                ((8, 14), (22, 30), 31, 0b0010, 5), ((14, 16), (22, 30), 35, 0b0001, 6),
                                ((6, 8), (0, 4), 0, 0, 7), ((8, 16), (30, 32), 29, 0, 8)]:
        cat[slice(*rows), slice(*cols)], attr[slice(*rows), slice(*cols)], ann[slice(*rows), slice(*cols)] = c, g, a
    scenes.append((cat, attr, ann, {1: (30, 0), 2: (7, 0), 300: (35, 0), 4: (35, 0), 5: (31, 1), 8: (29, 0)}))
    # image 1: building, road, a rider on a bicycle (id 258 = B 1, A 2), a truck
    cat, attr, ann = (np.zeros((H, W), np.int64) for _ in range(3))
    for rows, cols, c, g, a in [((0, 12), (0, 32), 10, 0, 2), ((12, 24), (0, 32), 7, 0, 1),
                                ((4, 10), (4, 12), 32, 0, 3), ((10, 16), (4, 12), 33, 0b0100, 258),
                                ((14, 21), (20, 31), 40, 0, 4)]:
        cat[slice(*rows), slice(*cols)], attr[slice(*rows), slice(*cols)], ann[slice(*rows), slice(*cols)] = c, g, a
    scenes.append((cat, attr, ann, {2: (10, 0), 1: (7, 0), 3: (32, 0), 258: (33, 0), 4: (40, 0)}))
    result = []
    for cat, attr, ann, segments in scenes:
        expected = np.where((cat == 0) | (attr & 1 == 1), 0, ann)
        assert set(np.unique(expected)) - {0} == set(segments)
        result.append((cat, attr, ann, segments, expected))
    return result


def _semantic_masks():
    masks = []
    for k in range(2):
        values = np.full((H, W), 0, dtype=np.int64)  # road
        values[:8] = 10  # sky
        values[8:14, 3:12] = 13 + k  # car / truck
        values[10:20, 20:26] = 18  # bicycle: the top class
        values[:, 30:] = 255  # unknown: void
        masks.append(values)
    return masks


@pytest.fixture
def bdd_root(tmp_path):
    root = tmp_path / "bdd100k"
    for k, name in enumerate(NAMES):
        write_jpeg(root / "images/10k/val" / f"{name}.jpg", k)
    write_jpeg(root / "images/10k/val/ffffffff-unlabelled.jpg", 9)  # an image without labels: counted
    for name, (cat, attr, ann, _, _) in zip(NAMES, _bitmasks()):
        rgba = np.stack([cat, attr, ann >> 8, ann & 0xFF], axis=-1).astype(np.uint8)
        path = root / "labels/pan_seg/bitmasks/val" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgba, "RGBA").save(path)
    for name, values in zip(NAMES, _semantic_masks()):
        write_grey(root / "labels/sem_seg/masks/val" / f"{name}.png", values)
    return root


def _convert(root, out, kind, *extra):
    return bdd100k.main([f"root={root}", "split=val", f"kind={kind}", f"out={out}", "workers=0", "progress=false",
                         *extra])


# ------------------------------------------------------------------------------------------- panoptic
def test_panoptic_bitmasks_read_back_exactly(bdd_root, tmp_path):
    out = tmp_path / "bdd100k_panoptic_val"
    assert _convert(bdd_root, out, "panoptic") == 0
    shards = ShardSet.open(out)
    assert shards.name == "bdd100k_panoptic_val" and shards.task == "seg" and shards.mask_format == "panoptic"
    vocab = shards.vocabulary
    assert len(vocab) == 40 and vocab.ids == list(range(1, 41))
    assert vocab.names[:4] == ["dynamic", "ego vehicle", "ground", "static"] and vocab.names[-1] == "truck"
    assert vocab.is_thing == [i >= 31 for i in range(1, 41)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["skipped_images"] == {"image without a label file": 1}
    samples = [s.materialised() for s in read_shards(out)]
    assert [s.image_id for s in samples] == [0, 1]
    for sample, name, (_, _, _, segments, expected) in zip(samples, NAMES, _bitmasks()):
        meta = sample.annotation
        assert meta["file_name"] == f"{name}.jpg" and (meta["height"], meta["width"]) == (H, W)
        np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), expected)
        objects = {o["segment_id"]: o for o in meta["objects"]}
        assert {s: (o["category_id"], o["iscrowd"]) for s, o in objects.items()} == segments
        for segment_id, obj in objects.items():
            mask = expected == segment_id
            ys, xs = np.nonzero(mask)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert obj["area"] == mask.sum() and obj["is_thing"] == (obj["category_id"] >= 31)
            assert obj["label"] == vocab.index_of_id(obj["category_id"])
        # targets: every non-crowd segment, its mask exact; crowd pixels ignored
        targets = [s for s, o in objects.items() if not o["iscrowd"]]
        assert sample.labels.tolist() == [vocab.index_of_id(segments[s][0]) for s in targets]
        for mask, segment_id in zip(sample.masks, targets):
            np.testing.assert_array_equal(mask.numpy(), expected == segment_id)
        crowd = np.isin(expected, [s for s, o in objects.items() if o["iscrowd"]])
        np.testing.assert_array_equal(sample.ignore_mask.numpy(), crowd)
    assert samples[0].annotation["objects"][0]["segment_id"] == 1
    assert_oracle_perfect(out, PANOPTIC_METRICS)


def test_panoptic_perturbed_matches_panopticapi_and_pycocotools(bdd_root, tmp_path):
    out = tmp_path / "pan"
    assert _convert(bdd_root, out, "panoptic", "name=pan") == 0
    block = (slice(0, 4), slice(0, 8))
    drop = {0: 4, 1: None}  # image 0 loses car 4
    shift = {0: None, 1: 4}  # image 1's truck box moves 3 px right
    got = score_with(out, lambda sample, vocab: perturbed_panoptic(
        sample, vocab, drop[sample.image_id], shift[sample.image_id], 3.0, block, 6))
    vocab = ShardSet.open(out).vocabulary
    truth, preds, sem_pairs, thing_truth, detections = {}, {}, [], {}, []
    for image_id, (_, _, _, segments, expected) in enumerate(_bitmasks()):
        listed = [{"id": s, "category_id": c, "iscrowd": crowd} for s, (c, crowd) in segments.items()]
        truth[image_id] = (expected, listed)
        pred = expected.copy()
        pred[np.isin(pred, [s for s, (_, crowd) in segments.items() if crowd] + [drop[image_id]])] = 0
        preds[image_id] = (pred, [s for s in listed if not s["iscrowd"] and s["id"] != drop[image_id]])
        labels = np.full((H, W), 255, dtype=np.int64)
        for s, (c, _) in segments.items():
            labels[expected == s] = vocab.index_of_id(c)
        pred_sem = np.where(labels == 255, 0, labels)
        pred_sem[block] = 6
        sem_pairs.append((labels, pred_sem))
        thing_truth[image_id] = [(expected == s, c, crowd) for s, (c, crowd) in segments.items() if c >= 31]
        for s, (c, crowd) in segments.items():
            if c >= 31 and not crowd and s != drop[image_id]:
                box = _tight_box(expected == s)
                box[0] += 3.0 if s == shift[image_id] else 0.0
                detections.append((image_id, c, expected == s, box))
    theirs = panopticapi_pq(tmp_path, CATEGORIES, truth, preds)
    assert got["PQ"] == pytest.approx(theirs["All"]["pq"], abs=1e-12)
    assert got["PQ_things"] == pytest.approx(theirs["Things"]["pq"], abs=1e-12)
    assert got["PQ_stuff"] == pytest.approx(theirs["Stuff"]["pq"], abs=1e-12)
    assert got["SQ"] == pytest.approx(theirs["All"]["sq"], abs=1e-12) and got["PQ"] < 1.0
    assert got["mIoU"] == pytest.approx(plain_miou(sem_pairs, 40, 255), abs=1e-12) and got["mIoU"] < 1.0
    things = [c["id"] for c in CATEGORIES if c["isthing"]]
    for metric, iou_type in (("box", "bbox"), ("mask", "segm")):
        ap, ap50 = pycocotools_ap(things, thing_truth, detections, iou_type)
        assert got[f"{metric}_AP"] == pytest.approx(ap, abs=1e-9), metric
        assert got[f"{metric}_AP50"] == pytest.approx(ap50, abs=1e-9), metric
    assert got["box_AP"] < got["box_AP50"] <= 1.0 and got["mask_AP"] < 1.0


# ------------------------------------------------------------------------------------------- semantic
def test_semantic_masks_read_back_and_score(bdd_root, tmp_path):
    out = tmp_path / "bdd100k_semantic_val"
    assert _convert(bdd_root, out, "semantic") == 0
    shards = ShardSet.open(out)
    assert shards.task == "sem" and shards.name == "bdd100k_semantic_val"
    assert shards.vocabulary.names == list(bdd100k.SEMANTIC_CLASSES) and shards.vocabulary.ids == list(range(19))
    assert not any(shards.vocabulary.is_thing)
    samples = list(read_shards(out))
    masks = _semantic_masks()
    for sample, name, values in zip(samples, NAMES, masks):
        assert sample.annotation["file_name"] == f"{name}.jpg" and sample.annotation["ignore_label"] == 255
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), values)  # ids 0..18 = indices
        assert sorted(o["category_id"] for o in sample.annotation["objects"]) == sorted(set(values.ravel()) - {255})
    assert_oracle_perfect(out, SEMANTIC_METRICS)

    block = (slice(4, 12), slice(0, 16))

    def perturbed(sample, vocab):
        pred = oracle_predictions(sample, vocab)["semantic"].sem_seg.clone()
        pred[block] = 11  # person
        return {"semantic": SemanticSegmentation(pred, image_id=sample.image_id)}

    got = score_with(out, perturbed)
    pairs = []
    for values in masks:
        pred = np.where(values == 255, 0, values)
        pred[block] = 11
        pairs.append((values, pred))
    assert got["mIoU"] == pytest.approx(plain_miou(pairs, 19, 255), abs=1e-12) and got["mIoU"] < 1.0


# ------------------------------------------------------------------------------------------- bad input
def test_missing_folders_and_files_end_with_exit_code_2(bdd_root, tmp_path, capsys):
    assert _convert(tmp_path / "nowhere", tmp_path / "o1", "panoptic") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BDD100K image folder not found" in err and "nowhere/images/10k/val" in err
    assert bdd100k.main([f"root={bdd_root}", "split=train", f"out={tmp_path / 'o2'}", "progress=false"]) == 2
    assert "images/10k/train" in capsys.readouterr().err
    (bdd_root / "images/10k/val" / f"{NAMES[1]}.jpg").unlink()
    assert _convert(bdd_root, tmp_path / "o3", "semantic") == 2
    assert f"image file not found for {bdd_root / 'labels/sem_seg/masks/val' / NAMES[1]}.png" in capsys.readouterr().err
    assert _convert(bdd_root, tmp_path / "o4", "semantic", "skip_missing=true") == 0
    summary = json.loads((tmp_path / "o4/manifest.json").read_text())["summary"]
    assert summary["written"] == 1 and summary["skipped_images"] == {"missing image file": 1,
                                                                      "image without a label file": 1}


def test_malformed_labels(bdd_root, tmp_path, capsys, caplog):
    pan = bdd_root / "labels/pan_seg/bitmasks/val" / f"{NAMES[0]}.png"
    rgba = np.asarray(Image.open(pan)).copy()
    vegetation = ((rgba[..., 2].astype(int) << 8) + rgba[..., 3]) == 8
    rgba[vegetation, 0] = 77  # a category no BDD100K panoptic table has
    Image.fromarray(rgba, "RGBA").save(pan)
    assert _convert(bdd_root, tmp_path / "p1", "panoptic") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(pan) in err and "category id(s) [77]" in err
    rgba[0, 0, 0] = 29  # annotation 1 (sky) now spans two categories: a counted skip naming the file
    Image.fromarray(rgba, "RGBA").save(pan)
    assert _convert(bdd_root, tmp_path / "p2", "panoptic") == 0
    summary = json.loads((tmp_path / "p2/manifest.json").read_text())["summary"]
    assert summary["skipped_images"]["bitmask annotation with several categories"] == 1
    assert f"{pan}: bitmask annotation with several categories (annotation id 1" in caplog.text
    Image.fromarray(rgba[..., :3]).save(pan)  # RGB, not a bitmask: a counted skip naming the file
    assert _convert(bdd_root, tmp_path / "p2", "panoptic") == 0
    summary = json.loads((tmp_path / "p2/manifest.json").read_text())["summary"]
    assert summary["written"] == 1 and summary["skipped_images"]["bitmask PNG of the wrong kind"] == 1
    assert f"{pan}: bitmask PNG of the wrong kind (mode RGB" in caplog.text
    capsys.readouterr()
    sem = bdd_root / "labels/sem_seg/masks/val" / f"{NAMES[1]}.png"
    values = _semantic_masks()[1]
    values[0, 0] = 40  # not one of the 19 classes and not 255
    write_grey(sem, values)
    assert _convert(bdd_root, tmp_path / "s1", "semantic") == 2
    err = capsys.readouterr().err
    assert str(sem) in err and "category id 40 is not in the data set's vocabulary" in err
    sem.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert _convert(bdd_root, tmp_path / "s2", "semantic") == 0
    summary = json.loads((tmp_path / "s2/manifest.json").read_text())["summary"]
    assert summary["skipped_images"]["unreadable label PNG"] == 1


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as done:
        bdd100k.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(f"  {key}" in text for key in ("root", "split", "kind", "out", "name", "workers", "skip_missing"))
