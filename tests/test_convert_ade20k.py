"""data_prep.ade20k: a tiny ADEChallengeData2016 tree (images, 8-bit semantic PNGs, the instance challenge's RGB
PNGs, and the files Mask2Former's preparation scripts write) and a tiny ADE20K-full tree (16-bit TIFFs), converted to
sem / det / seg shards, read back pixel-exact, scored by the oracle (1.0) and, perturbed, against panopticapi,
pycocotools and a plain confusion matrix computed from the arrays this test wrote."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import ade20k
from openseed.core.codecs import decode_label_png, decode_panoptic_png, decode_rle, id_to_rgb
from openseed.core.predictions import Instances, SemanticSegmentation
from openseed.core.vocabulary import Vocabulary
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.runner import DatasetEvaluator
from tests._benchmark_checks import (
    PANOPTIC_METRICS,
    SEMANTIC_METRICS,
    H,
    W,
    assert_oracle_perfect,
    panopticapi_pq,
    perturbed_panoptic,
    plain_miou,
    pycocotools_ap,
    rle_of,
    tight_box,
    write_grey,
    write_jpeg,
)

# The test's own facts. Mask2Former's register_ade20k_instance.py ADE_CATEGORIES ids: the 0-based 150-class ids of
# the 100 instance classes, in instance-class order (R value 1..100 of annotations_instance/*.png).
M2F_THING_IDS = [7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44,
                 45, 47, 49, 50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81,
                 82, 83, 85, 86, 87, 88, 89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116,
                 118, 119, 120, 121, 123, 124, 125, 126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142,
                 143, 144, 146, 147, 148, 149]
# spot checks of the reference's utils/constants.py ADE_PANOPTIC_CLASSES and ADE20K_847
REFERENCE_150 = {0: "wall", 6: "road", 8: "window", 12: "person", 20: "car", 89: "tv", 138: "trash can",
                 141: "crt screen", 149: "flag"}
REFERENCE_847 = {0: "wall", 3: "tree", 13: "windowpane", 500: "cat", 846: "adding machine"}
WALL, SKY, FLOOR, TREE, ROAD, GRASS = 0, 2, 3, 4, 6, 9
BED, PERSON, CHAIR, CAR = 7, 12, 19, 20
STEMS = ("ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000005")
IDS = [1, 2, 5]


def _r(class_id):
    """The instance PNG's R value of a thing class."""
    return M2F_THING_IDS.index(class_id) + 1


def _scenes():
    """Per image: the release semantic map (class + 1, 0 = other) and instance map (R, G)."""
    scenes = []
    sem = np.full((H, W), WALL + 1, np.uint8)  # image 1: a room
    sem[12:] = FLOOR + 1
    sem[:3, :4] = 0
    sem[14:22, 2:14] = BED + 1
    sem[4:16, 18:22] = PERSON + 1
    sem[4:16, 24:28] = PERSON + 1
    sem[16:22, 28:32] = CHAIR + 1  # a chair without an instance: void in panoptic
    ins = np.zeros((H, W, 3), np.uint8)
    ins[14:22, 2:14] = (_r(BED), 1, 0)
    ins[4:16, 18:22] = (_r(PERSON), 2, 0)
    ins[3:16, 24:28] = (_r(PERSON), 3, 0)  # one row over the wall: pasted over it
    scenes.append((sem, ins))
    sem = np.full((H, W), SKY + 1, np.uint8)  # image 2: stuff only
    sem[10:16], sem[16:] = TREE + 1, GRASS + 1
    scenes.append((sem, np.zeros((H, W, 3), np.uint8)))
    sem = np.full((H, W), ROAD + 1, np.uint8)  # image 5: a street, grass hidden under a car
    sem[:12] = SKY + 1
    sem[22:, 28:] = GRASS + 1
    sem[14:20, 4:14] = CAR + 1
    sem[14:20, 18:28] = CAR + 1
    ins = np.zeros((H, W, 3), np.uint8)
    ins[14:20, 4:14] = (_r(CAR), 1, 0)
    ins[14:24, 18:32] = (_r(CAR), 2, 0)
    scenes.append((sem, ins))
    return scenes


def _classes(sem):
    """0-based class per pixel, 255 for "other"."""
    return np.where(sem == 0, 255, sem.astype(np.int64) - 1)


def _instances(ins):
    """[(G, class, mask)] of an instance map."""
    return [(g, M2F_THING_IDS[int(np.unique(ins[..., 0][ins[..., 1] == g])[0]) - 1], ins[..., 1] == g)
            for g in np.unique(ins[..., 1]).tolist() if g]


def _panoptic(sem, ins):
    """The id map and segments {id: class} as prepare_ade20k_pan_seg.py combines them (stuff first, instances
    pasted over), with the converter's documented ids (class + 1 for stuff, 1000 * (class + 1) + G for things)."""
    classes = _classes(sem)
    ids = np.zeros((H, W), np.int64)
    for c in np.unique(classes).tolist():
        if c != 255 and c not in M2F_THING_IDS:
            ids[classes == c] = c + 1
    for g, c, mask in _instances(ins):
        ids[mask] = 1000 * (c + 1) + g
    segments = {s: (s - 1 if s < 1000 else s // 1000 - 1) for s in np.unique(ids).tolist() if s}
    return ids, segments


@pytest.fixture()
def ade_root(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for k, (stem, (sem, ins)) in enumerate(zip(STEMS, _scenes())):
        write_jpeg(root / "images" / "validation" / f"{stem}.jpg", k)
        write_grey(root / "annotations" / "validation" / f"{stem}.png", sem)
        (root / "annotations_instance" / "validation").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ins, "RGB").save(root / "annotations_instance" / "validation" / f"{stem}.png")
    return root


def _write_detectron2_files(root):
    """What Mask2Former's prepare_ade20k_{sem,pan,ins}_seg.py write: annotations_detectron2/ (value - 1, uint8 wrap:
    0 -> 255), ade20k_panoptic_val.json + PNGs (string image ids, segment ids from a colour generator: here a
    scrambled numbering), ade20k_instance_val.json (COCO RLE, category ids = 0-based class)."""
    pan_images, pan_annotations, ins_annotations = [], [], []
    categories = [{"id": i, "name": f"class {i}", "isthing": int(i in M2F_THING_IDS)} for i in range(150)]
    written = {}
    for stem, (sem, ins) in zip(STEMS, _scenes()):
        write_grey(root / "annotations_detectron2" / "validation" / f"{stem}.png", sem - np.uint8(1))
        ids, segments = _panoptic(sem, ins)
        scrambled = np.zeros_like(ids)
        info = []
        for k, (s, c) in enumerate(sorted(segments.items())):
            new = 7_000_000 - 4099 * k  # any ids the colour generator could give
            scrambled[ids == s] = new
            info.append({"id": new, "category_id": c, "area": int((ids == s).sum()), "iscrowd": 0,
                         "bbox": tight_box(ids == s)})
        (root / "ade20k_panoptic_val").mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(scrambled)).save(root / "ade20k_panoptic_val" / f"{stem}.png")
        written[stem] = (scrambled, {s["id"]: s["category_id"] for s in info})
        pan_images.append({"id": stem, "file_name": f"{stem}.jpg", "width": W, "height": H})
        pan_annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": info})
        for _, c, mask in _instances(ins):
            ins_annotations.append({"id": len(ins_annotations) + 1, "image_id": stem, "iscrowd": 0, "category_id": c,
                                    "bbox": tight_box(mask), "segmentation": rle_of(mask), "area": int(mask.sum())})
    (root / "ade20k_panoptic_val.json").write_text(json.dumps(
        {"images": pan_images, "annotations": pan_annotations, "categories": categories}))
    (root / "ade20k_instance_val.json").write_text(json.dumps(
        {"images": pan_images, "annotations": ins_annotations,
         "categories": [{"id": c, "name": f"thing {c}"} for c in M2F_THING_IDS]}))
    return written


def _convert(root, out, *words):
    return ade20k.main([f"root={root}", "split=validation", f"out={out}", "workers=0", "progress=false", *words])


# ------------------------------------------------------------------------------------------- vocabularies
def test_vocabularies_follow_mask2former_and_the_reference():
    assert [v - 1 for v in ade20k.INSTANCE_TO_SEMANTIC] == M2F_THING_IDS
    sem = ade20k.vocabulary("semantic")
    assert sem.ids == list(range(150)) and len(sem.names) == 150
    assert [i for i, t in enumerate(sem.is_thing) if t] == M2F_THING_IDS
    assert all(sem.names[i] == n for i, n in REFERENCE_150.items())
    assert ade20k.vocabulary("panoptic") == sem
    det = ade20k.vocabulary("instance")
    assert det.ids == M2F_THING_IDS and all(det.is_thing) and det.names[:3] == ["bed", "window", "cabinet"]
    full = ade20k.vocabulary("full")
    assert full.ids == list(range(847)) and not any(full.is_thing)
    assert all(full.names[i] == n for i, n in REFERENCE_847.items())
    assert len(set(ade20k.ADE847_CLASSES)) == 837  # the reference list repeats 10 names: ids stay distinct


# ------------------------------------------------------------------------------------------- semantic
@pytest.mark.parametrize("layout", ["release", "detectron2"])
def test_semantic_read_back_oracle_and_numpy(ade_root, tmp_path, layout):
    if layout == "detectron2":
        _write_detectron2_files(ade_root)
    out = tmp_path / "sem"
    assert _convert(ade_root.parent, out, "kind=semantic", f"layout={layout}") == 0  # the folder holding the root
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format, shards.name) == ("sem", "semantic", "ade20k_semantic_val")
    assert json.loads((out / "manifest.json").read_text())["source"]["layout"] == layout
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == IDS
    for sample, stem, (sem, _) in zip(samples, STEMS, _scenes()):
        meta = sample.annotation
        assert meta["file_name"] == f"{stem}.jpg" and meta["ignore_label"] == 255
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), _classes(sem))
        present = {int(v) - 1 for v in np.unique(sem) if v}
        assert {o["category_id"] for o in meta["objects"]} == present == {o["label"] for o in meta["objects"]}
        person = [o for o in meta["objects"] if o["label"] == PERSON]
        assert all(o["is_thing"] for o in person)
    assert_oracle_perfect(out, SEMANTIC_METRICS)

    block = (slice(0, 8), slice(8, 24))
    preds = []

    def predict(sample, vocab):
        labels = oracle_predictions(sample, vocab)["semantic"].sem_seg.clone()
        labels[block] = FLOOR
        return {"semantic": SemanticSegmentation(labels, image_id=sample.image_id)}

    got = score(out, predict)
    for sem, _ in _scenes():
        truth = _classes(sem)
        pred = np.where(truth == 255, 0, truth)
        pred[block] = FLOOR
        preds.append((truth, pred))
    assert got["mIoU"] == pytest.approx(plain_miou(preds, 150, 255), abs=1e-12) and got["mIoU"] < 1.0


def test_auto_layout_reads_the_release_else_the_prepared_files(ade_root, tmp_path):
    _write_detectron2_files(ade_root)
    assert _convert(ade_root, tmp_path / "a", "kind=semantic") == 0
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["source"]["layout"] == "release"
    for folder in ("annotations", "annotations_instance"):
        (ade_root / folder).rename(ade_root / f"{folder}_moved")
    for kind in ("semantic", "panoptic", "instance"):
        assert _convert(ade_root, tmp_path / kind, f"kind={kind}") == 0
        assert json.loads((tmp_path / kind / "manifest.json").read_text())["source"]["layout"] == "detectron2"


# ------------------------------------------------------------------------------------------- panoptic
def test_panoptic_release_read_back_and_oracle(ade_root, tmp_path):
    out = tmp_path / "pan"
    assert _convert(ade_root, out, "kind=panoptic") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format, shards.name) == ("seg", "panoptic", "ade20k_panoptic_val")
    assert shards.vocabulary.num_things == 100
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == IDS
    for sample, (sem, ins) in zip(samples, _scenes()):
        ids, segments = _panoptic(sem, ins)
        np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), ids)
        objects = {o["segment_id"]: o for o in sample.annotation["objects"]}
        assert set(objects) == set(segments)
        for s, c in segments.items():
            o = objects[s]
            assert (o["category_id"], o["label"], o["is_thing"], o["iscrowd"]) == (c, c, c in M2F_THING_IDS, 0)
            x, y, w, h = tight_box(ids == s)
            assert o["bbox"] == [x, y, x + w, y + h] and o["area"] == int((ids == s).sum())
    first, third = (decode_panoptic_png(s.panoptic_png) for s in (samples[0], samples[2]))
    assert (first[16:22, 28:32] == 0).all() and first[3, 25] == 1000 * (PERSON + 1) + 3  # chair void, wall covered
    assert GRASS + 1 not in third  # the grass under the car is gone, and not listed
    assert_oracle_perfect(out, PANOPTIC_METRICS)


def _segment_key(obj):
    return obj["category_id"], obj["bbox"], obj["area"], obj["is_thing"]


def test_panoptic_from_mask2former_json(ade_root, tmp_path):
    written = _write_detectron2_files(ade_root)
    out = tmp_path / "pan_json"
    assert _convert(ade_root, out, "kind=panoptic", "layout=detectron2", "name=ade_pan") == 0
    assert _convert(ade_root, tmp_path / "pan", "kind=panoptic", "layout=release", "workers=2") == 0
    samples, release = list(read_shards(out)), list(read_shards(tmp_path / "pan"))
    assert [s.image_id for s in samples] == IDS == [s.image_id for s in release]
    for sample, other, stem in zip(samples, release, STEMS):
        scrambled, categories = written[stem]
        assert sample.panoptic_png == (ade_root / "ade20k_panoptic_val" / f"{stem}.png").read_bytes()
        np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), scrambled)
        got = {o["segment_id"]: o for o in sample.annotation["objects"]}
        assert {s: o["category_id"] for s, o in got.items()} == categories
        # the same segments as the release conversion, up to their ids
        assert sorted(map(_segment_key, got.values())) == sorted(map(_segment_key, other.annotation["objects"]))
    assert_oracle_perfect(out, PANOPTIC_METRICS)


def test_panoptic_perturbed_matches_panopticapi_pycocotools_numpy(ade_root, tmp_path):
    out = tmp_path / "pan"
    assert _convert(ade_root, out, "kind=panoptic") == 0
    block = (slice(0, 6), slice(8, 16))
    drop = {1: 1000 * (PERSON + 1) + 2, 2: None, 5: 1000 * (CAR + 1) + 1}
    shift = {1: 1000 * (BED + 1) + 1, 2: None, 5: None}
    got = score(out, lambda sample, vocab: perturbed_panoptic(
        sample, vocab, drop[sample.image_id], shift[sample.image_id], 3.0, block, FLOOR))
    categories = [{"id": i, "name": str(i), "isthing": int(i in M2F_THING_IDS)} for i in range(150)]
    truth, preds, pairs, thing_truth, detections = {}, {}, [], {}, []
    for image_id, (sem, ins) in zip(IDS, _scenes()):
        ids, segments = _panoptic(sem, ins)
        listed = [{"id": s, "category_id": c, "iscrowd": 0} for s, c in segments.items()]
        truth[image_id] = (ids, listed)
        pred = np.where(ids == drop[image_id], 0, ids)
        preds[image_id] = (pred, [s for s in listed if s["id"] != drop[image_id]])
        labels = np.full((H, W), 255, np.int64)
        for s, c in segments.items():
            labels[ids == s] = c
        predicted = np.where(labels == 255, 0, labels)
        predicted[block] = FLOOR
        pairs.append((labels, predicted))
        thing_truth[image_id] = [(ids == s, c, 0) for s, c in segments.items() if c in M2F_THING_IDS]
        for s, c in segments.items():
            if c in M2F_THING_IDS and s != drop[image_id]:
                box = tight_box(ids == s)
                box[0] += 3.0 if s == shift[image_id] else 0.0
                detections.append((image_id, c, ids == s, box))
    theirs = panopticapi_pq(tmp_path, categories, truth, preds)
    for key, (group, metric) in {"PQ": ("All", "pq"), "SQ": ("All", "sq"), "RQ": ("All", "rq"),
                                 "PQ_things": ("Things", "pq"), "PQ_stuff": ("Stuff", "pq")}.items():
        assert got[key] == pytest.approx(theirs[group][metric], abs=1e-12), key
    assert got["PQ_things"] < 1.0 and got["PQ"] < 1.0
    assert got["mIoU"] == pytest.approx(plain_miou(pairs, 150, 255), abs=1e-12) and got["mIoU"] < 1.0
    for metric, iou_type in (("box", "bbox"), ("mask", "segm")):
        ap, ap50 = pycocotools_ap(M2F_THING_IDS, thing_truth, detections, iou_type)
        assert got[f"{metric}_AP"] == pytest.approx(ap, abs=1e-9), metric
        assert got[f"{metric}_AP50"] == pytest.approx(ap50, abs=1e-9), metric
    assert got["box_AP"] < 1.0 and got["mask_AP"] < 1.0


# ------------------------------------------------------------------------------------------- instance
@pytest.mark.parametrize("layout", ["release", "detectron2"])
def test_instance_read_back_oracle_and_pycocotools(ade_root, tmp_path, layout):
    if layout == "detectron2":
        _write_detectron2_files(ade_root)
    out = tmp_path / "det"
    assert _convert(ade_root, out, "kind=instance", f"layout={layout}") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format, shards.name) == ("det", "rle", "ade20k_instance_val")
    assert shards.vocabulary.ids == M2F_THING_IDS and shards.vocabulary.names[3] == "person"
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == IDS  # image 2 has no instance: kept (false positives count there)
    for sample, (_, ins) in zip(samples, _scenes()):
        objects = sample.annotation["objects"]
        expected = _instances(ins)
        assert len(objects) == len(expected)
        for obj, (_, c, mask) in zip(sorted(objects, key=lambda o: o["bbox"][:2]),
                                     sorted(expected, key=lambda e: tight_box(e[2])[:2])):
            np.testing.assert_array_equal(decode_rle(obj["rle"]).numpy(), mask)
            x, y, w, h = tight_box(mask)
            assert (obj["category_id"], obj["is_thing"], obj["iscrowd"]) == (c, True, 0)
            assert obj["bbox"] == [x, y, x + w, y + h] and obj["area"] == mask.sum()
    assert_oracle_perfect_det(out)

    def predict(sample, vocab):
        inst = oracle_predictions(sample, vocab)["instances"]
        keep = list(range(1, len(inst))) if sample.image_id == 1 else list(range(len(inst)))  # image 1 loses one
        boxes = inst.boxes.clone()
        if sample.image_id == 5:
            boxes[0, [0, 2]] += 3.0
        return {"instances": Instances(scores=inst.scores[keep], labels=inst.labels[keep], queries=inst.queries[keep],
                                       boxes=boxes[keep], masks=inst.masks[keep], image_id=sample.image_id)}

    got = score(out, predict)
    thing_truth, detections = {}, []
    for sample in samples:
        inst = predict(sample, shards.vocabulary)["instances"]
        for k in range(len(inst)):
            x0, y0, x1, y1 = inst.boxes[k].tolist()
            detections.append((sample.image_id, shards.vocabulary.ids[int(inst.labels[k])], inst.masks[k].numpy(),
                               [x0, y0, x1 - x0, y1 - y0]))
    for image_id, (_, ins) in zip(IDS, _scenes()):
        thing_truth[image_id] = [(mask, c, 0) for _, c, mask in _instances(ins)]
    for metric, iou_type in (("box", "bbox"), ("mask", "segm")):
        ap, ap50 = pycocotools_ap(M2F_THING_IDS, thing_truth, detections, iou_type)
        assert got[f"{metric}_AP"] == pytest.approx(ap, abs=1e-9), metric
        assert got[f"{metric}_AP50"] == pytest.approx(ap50, abs=1e-9), metric
    assert got["box_AP"] < 1.0 and got["mask_AP"] < 1.0


def test_instance_set_prompted_with_the_150_names_as_the_reference(ade_root, tmp_path):
    """The ade20k protocol scores the instance set prompting all 150 classes (prompt_with): the panoptic
    vocabulary holds the 100 things under the same ids; detections of stuff classes are dropped before scoring."""
    out = tmp_path / "det"
    assert _convert(ade_root, out, "kind=instance") == 0
    shards = ShardSet.open(out)
    prompt = ade20k.vocabulary("panoptic")
    evaluator = DatasetEvaluator.for_shards(shards, prompt_vocabulary=prompt)
    assert evaluator.prompt_vocabulary is prompt
    wall = prompt.index_of_id(0)
    for sample in read_shards(out):
        inst = oracle_predictions(sample, shards.vocabulary)["instances"]
        labels = torch.tensor([prompt.index_of_id(shards.vocabulary.ids[int(k)]) for k in inst.labels],
                              dtype=torch.long)
        # a confident "wall" (stuff) detection covering the image: dropped, so it costs nothing
        full = torch.ones(1, *sample.orig_size, dtype=torch.bool)
        h, w = sample.orig_size
        evaluator.add(annotation_of(sample), instances=Instances(
            scores=torch.cat([inst.scores, torch.ones(1)]), labels=torch.cat([labels, torch.tensor([wall])]),
            queries=torch.arange(len(labels) + 1), boxes=torch.cat([inst.boxes, torch.tensor([[0.0, 0, w, h]])]),
            masks=torch.cat([inst.masks, full]), image_id=sample.image_id))
    metrics = {k: v for k, v in evaluator.compute().items() if k != "per_class"}
    assert metrics == {"box_AP": 1.0, "box_AP50": 1.0, "mask_AP": 1.0, "mask_AP50": 1.0}
    with pytest.raises(ValueError, match="categories \\[7, 8, 10,.* are things in one vocabulary and stuff"):
        DatasetEvaluator.for_shards(shards, prompt_vocabulary=ade20k.vocabulary("full"))  # 847 classes, all stuff
    with pytest.raises(ValueError, match="lacks categories \\[7, 8, 10"):
        DatasetEvaluator.for_shards(shards, prompt_vocabulary=Vocabulary(
            [c for c in prompt.categories if c.id < 5]))


def assert_oracle_perfect_det(out):
    metrics = {k: v for k, v in score(out).items() if k != "per_class"}
    assert metrics == {"box_AP": 1.0, "box_AP50": 1.0, "mask_AP": 1.0, "mask_AP50": 1.0}


# ------------------------------------------------------------------------------------------- ADE20K-full
def _full_labels():
    maps = []
    a = np.full((H, W), 0, np.uint16)
    a[12:], a[:4, :4], a[6:10, 10:20] = 5, 65535, 846
    maps.append(a)
    b = np.full((H, W), 300, np.uint16)
    b[:, 16:] = 13
    maps.append(b)
    return maps


@pytest.fixture()
def full_root(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    for k, (stem, labels) in enumerate(zip(STEMS[:2], _full_labels())):
        write_jpeg(root / "images_detectron2" / "validation" / f"{stem}.jpg", 10 + k)
        path = root / "annotations_detectron2" / "validation" / f"{stem}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(path)  # a 16-bit TIFF, as prepare_ade20k_full_sem_seg.py saves it
        with Image.open(path) as check:
            assert check.mode == "I;16" and check.format == "TIFF"
    return root


def test_full_read_back_16_bit_oracle_and_numpy(full_root, tmp_path):
    out = tmp_path / "full"
    assert _convert(full_root, out, "kind=full") == 0
    shards = ShardSet.open(out)
    assert (shards.task, shards.mask_format, shards.name) == ("sem", "semantic", "ade20k_full_val")
    assert len(shards.vocabulary) == 847
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == IDS[:2]
    for sample, labels in zip(samples, _full_labels()):
        assert sample.annotation["ignore_label"] == 65535
        with Image.open(io.BytesIO(sample.semantic_png)) as png:
            assert png.mode == "I;16"  # 16-bit: 847 classes do not fit 8 bits
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), labels.astype(np.int64))
        assert {o["category_id"] for o in sample.annotation["objects"]} == set(np.unique(labels).tolist()) - {65535}
    assert_oracle_perfect(out, SEMANTIC_METRICS)
    block = (slice(0, 8), slice(4, 24))

    def predict(sample, vocab):
        labels = oracle_predictions(sample, vocab)["semantic"].sem_seg.clone()
        labels[block] = 846
        return {"semantic": SemanticSegmentation(labels, image_id=sample.image_id)}

    got = score(out, predict)
    pairs = []
    for labels in _full_labels():
        truth = labels.astype(np.int64)
        pred = np.where(truth == 65535, 0, truth)
        pred[block] = 846
        pairs.append((truth, pred))
    assert got["mIoU"] == pytest.approx(plain_miou(pairs, 847, 65535), abs=1e-12) and got["mIoU"] < 1.0


def test_full_training_ids_fall_back_to_the_sorted_index(full_root, tmp_path):
    for k, stem in enumerate(("ADE_train_00000001", "ADE_frame_00000001")):  # one number twice
        write_jpeg(full_root / "images_detectron2" / "training" / f"{stem}.jpg", k)
        write_grey(full_root / "annotations_detectron2" / "training" / f"{stem}.tif",
                   np.full((H, W), 700 + k), mode="I;16")
    assert ade20k.main([f"root={full_root.parent}", "split=train", "kind=full", f"out={tmp_path / 'o'}",
                        "workers=0", "progress=false"]) == 0
    samples = list(read_shards(tmp_path / "o"))
    assert [(s.image_id, s.annotation["file_name"]) for s in samples] == [
        (0, "ADE_frame_00000001.jpg"), (1, "ADE_train_00000001.jpg")]
    assert ShardSet.open(tmp_path / "o").name == "ade20k_full_train"


# ------------------------------------------------------------------------------------------- bad input
def test_missing_folders_and_files_end_with_exit_code_2(ade_root, full_root, tmp_path, capsys):
    assert _convert(tmp_path / "nowhere", tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
    assert ade20k.main([f"root={ade_root}", "split=training", f"out={tmp_path / 'o2'}", "progress=false"]) == 2
    assert str(ade_root / "annotations" / "training") in capsys.readouterr().err
    assert _convert(ade_root, tmp_path / "o3", "kind=semantic", "layout=detectron2") == 2
    assert str(ade_root / "annotations_detectron2" / "validation") in capsys.readouterr().err
    assert _convert(full_root, tmp_path / "o4", "kind=full", "layout=release") == 2
    assert "prepare_ade20k_full_sem_seg.py" in capsys.readouterr().err
    missing = ade_root / "annotations_instance" / "validation" / f"{STEMS[1]}.png"
    missing.unlink()
    assert _convert(ade_root, tmp_path / "o5", "kind=panoptic") == 2
    assert str(missing) in capsys.readouterr().err
    assert _convert(ade_root, tmp_path / "o6", "kind=panoptic", "skip_missing=true") == 0
    manifest = json.loads((tmp_path / "o6" / "manifest.json").read_text())
    assert manifest["summary"]["skipped_images"] == {"missing annotation file": 1}
    assert [s.image_id for s in read_shards(tmp_path / "o6")] == [1, 5]
    (full_root / "annotations_detectron2" / "validation" / f"{STEMS[0]}.tif").unlink()
    assert _convert(full_root, tmp_path / "o7", "kind=full") == 2
    assert f"{STEMS[0]}.tif" in capsys.readouterr().err


def test_malformed_prepared_files_end_with_exit_code_2(ade_root, tmp_path, capsys):
    _write_detectron2_files(ade_root)
    pan_json = ade_root / "ade20k_panoptic_val.json"
    data = json.loads(pan_json.read_text())
    data["categories"].append({"id": 150, "name": "extra", "isthing": 0})
    pan_json.write_text(json.dumps(data))
    assert _convert(ade_root, tmp_path / "o1", "kind=panoptic", "layout=detectron2") == 2
    err = capsys.readouterr().err
    assert str(pan_json) in err and "[150]" in err
    pan_json.write_text("{broken")
    assert _convert(ade_root, tmp_path / "o2", "kind=panoptic", "layout=detectron2") == 2
    assert str(pan_json) in capsys.readouterr().err
    ins_json = ade_root / "ade20k_instance_val.json"
    data = json.loads(ins_json.read_text())
    data["annotations"][0]["category_id"] = 0  # wall is no thing
    ins_json.write_text(json.dumps(data))
    assert _convert(ade_root, tmp_path / "o3", "kind=instance", "layout=detectron2") == 2
    assert str(ins_json) in capsys.readouterr().err


def test_unreadable_annotations_are_counted_skips(ade_root, tmp_path):
    sem_dir, ins_dir = ade_root / "annotations" / "validation", ade_root / "annotations_instance" / "validation"
    bad = _scenes()[2][0].copy()
    bad[0, 0] = 151  # not an ADE20K-150 value
    write_grey(sem_dir / f"{STEMS[2]}.png", bad)
    ins = _scenes()[0][1].copy()
    ins[0, 0] = (101, 9, 0)  # instance class 101 does not exist
    Image.fromarray(ins, "RGB").save(ins_dir / f"{STEMS[0]}.png")
    assert _convert(ade_root, tmp_path / "sem", "kind=semantic") == 0
    summary = json.loads((tmp_path / "sem" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"label PNG value out of range": 1} and summary["written"] == 2
    assert _convert(ade_root, tmp_path / "pan", "kind=panoptic") == 0
    summary = json.loads((tmp_path / "pan" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"label PNG value out of range": 1, "unknown instance class": 1}
    assert [s.image_id for s in read_shards(tmp_path / "pan")] == [2]
    write_grey(ins_dir / f"{STEMS[1]}.png", np.zeros((H, W)))  # grey, not RGB
    assert _convert(ade_root, tmp_path / "det", "kind=instance") == 0
    summary = json.loads((tmp_path / "det" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"unknown instance class": 1, "instance PNG of the wrong kind": 1}
    assert [s.image_id for s in read_shards(tmp_path / "det")] == [5]
    (ade_root / "images" / "validation" / f"{STEMS[2]}.jpg").write_bytes(b"not a jpeg")
    assert _convert(ade_root, tmp_path / "none", "kind=instance") == 2  # nothing left to write: an error


def test_size_mismatch_is_a_counted_skip(ade_root, tmp_path):
    sem, ins = _scenes()[0]
    Image.fromarray(ins[:, : W - 2].copy(), "RGB").save(
        ade_root / "annotations_instance" / "validation" / f"{STEMS[0]}.png")
    write_grey(ade_root / "annotations" / "validation" / f"{STEMS[1]}.png", _scenes()[1][0][: H - 1])
    assert _convert(ade_root, tmp_path / "pan", "kind=panoptic") == 0
    summary = json.loads((tmp_path / "pan" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"instance map size differs from the semantic map": 1,
                                         "label map size differs from the image": 1}
    assert _convert(ade_root, tmp_path / "det", "kind=instance") == 0
    summary = json.loads((tmp_path / "det" / "manifest.json").read_text())["summary"]
    assert summary["skipped_images"] == {"instance map size differs from the image": 1}
    assert [s.image_id for s in read_shards(tmp_path / "det")] == [2, 5]
