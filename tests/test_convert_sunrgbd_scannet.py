"""data_prep.sunrgbd and data_prep.scannet: samples in the layouts the reference reads (SUN RGB-D image / label37,
ScanNet frames with labelNN folders, a meta list and a COCO panoptic JSON + PNGs) converted, read back pixel-exact,
scored by the oracle and, perturbed, against panopticapi, pycocotools and a plain confusion matrix."""

import json
import pickle
from functools import partial

import numpy as np
import pytest
from PIL import Image

from data_prep import bdd100k, scannet, sunrgbd
from data_prep.shard_writer import encode_panoptic, encode_semantic
from openseed.core.codecs import decode_label_png, decode_panoptic_png, id_to_rgb
from openseed.core.predictions import SemanticSegmentation
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.oracle import oracle_predictions, score
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
    tight_box,
    write_grey,
    write_jpeg,
)


def _labels(num_classes, k):
    """A label map with values 0 (void) .. num_classes: blocks of several classes, the top class included."""
    values = np.full((H, W), 1 + k % num_classes, dtype=np.int64)
    values[:6] = 2
    values[6:12, 4:14] = 3 + k
    values[14:, 20:] = num_classes
    values[:, :2] = 0
    return values


def _semantic_perturbation_matches(out, maps, num_classes):
    """A block relabelled in the oracle's semantic map: the evaluator's mIoU against a plain confusion matrix of the
    written label values (value v = class index v - 1; 0 void)."""
    block = (slice(2, 10), slice(8, 24))

    def perturbed(sample, vocab):
        pred = oracle_predictions(sample, vocab)["semantic"].sem_seg.clone()
        pred[block] = 0  # the first class
        return {"semantic": SemanticSegmentation(pred, image_id=sample.image_id)}

    got = score(out, perturbed)
    pairs = []
    for values in maps:
        truth = np.where(values == 0, 255, values - 1)
        pred = np.where(values == 0, 0, values - 1)
        pred[block] = 0
        pairs.append((truth, pred))
    assert got["mIoU"] == pytest.approx(plain_miou(pairs, num_classes, 255), abs=1e-12) and got["mIoU"] < 1.0


# ------------------------------------------------------------------------------------------- SUN RGB-D
@pytest.fixture
def sun_root(tmp_path):
    root = tmp_path / "sun_rgbd"
    maps = {}
    for number in (3, 1, 12):  # img-000001.jpg pairs with 00000001.png (test37.txt's naming)
        write_jpeg(root / "image/test" / f"img-{number:06d}.jpg", number)
        maps[number] = _labels(37, number)
        write_grey(root / "label37/test" / f"{number:08d}.png", maps[number])
    write_jpeg(root / "image/train/img-000001.jpg", 0)
    write_grey(root / "label37/train/img37labels-000001.png", _labels(37, 5))
    return root, maps


def test_sunrgbd_reads_back_and_scores(sun_root, tmp_path):
    root, maps = sun_root
    out = tmp_path / "sunrgbd_val"
    assert sunrgbd.main([f"root={root}", f"out={out}", "workers=0", "progress=false"]) == 0
    shards = ShardSet.open(out)
    assert shards.name == "sunrgbd_val" and shards.task == "sem"
    vocab = shards.vocabulary
    assert vocab.ids == list(range(1, 38)) and vocab.names[0] == "wall" and vocab.names[23] == "refridgerator"
    assert vocab.names[-1] == "bag" and not any(vocab.is_thing)
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == [1, 3, 12]
    for sample in samples:
        values = maps[sample.image_id]
        assert sample.annotation["file_name"] == f"img-{sample.image_id:06d}.jpg"
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), np.where(values == 0, 255, values - 1))
        objects = {o["category_id"]: o for o in sample.annotation["objects"]}
        assert sorted(objects) == sorted(set(values.ravel()) - {0})
        for category_id, obj in objects.items():
            assert obj["bbox"] == [int(v) for v in _xyxy(values == category_id)]
            assert obj["area"] == (values == category_id).sum() and obj["label"] == category_id - 1
    assert_oracle_perfect(out, SEMANTIC_METRICS)
    _semantic_perturbation_matches(out, [maps[n] for n in (1, 3, 12)], 37)
    # the train split: labels named img37labels-NNNNNN.png pair with img-NNNNNN.jpg by number
    assert sunrgbd.main([f"root={root}", "split=train", f"out={tmp_path / 'train'}", "progress=false"]) == 0
    sample = next(read_shards(tmp_path / "train"))
    assert sample.image_id == 1 and sample.annotation["file_name"] == "img-000001.jpg"


def _xyxy(mask):
    x, y, w, h = tight_box(mask)
    return [x, y, x + w, y + h]


def test_sunrgbd_bad_input(sun_root, tmp_path, capsys, caplog):
    root, _ = sun_root
    assert sunrgbd.main([f"root={tmp_path / 'none'}", f"out={tmp_path / 'o'}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SUN RGB-D image folder not found" in err and "none/image/test" in err
    (root / "image/test/img-000003.jpg").unlink()
    assert sunrgbd.main([f"root={root}", f"out={tmp_path / 'o'}", "progress=false"]) == 2
    assert "image file not found for" in capsys.readouterr().err
    assert sunrgbd.main([f"root={root}", f"out={tmp_path / 'o'}", "progress=false", "skip_missing=true"]) == 0
    assert json.loads((tmp_path / "o/manifest.json").read_text())["summary"]["skipped_images"] == {
        "missing image file": 1}
    label = root / "label37/test/00000012.png"
    write_grey(label, np.full((H, W), 38))  # one past the 37 classes
    assert sunrgbd.main([f"root={root}", f"out={tmp_path / 'o'}", "progress=false", "skip_missing=true"]) == 2
    assert f"{label}: category id 38 is not in the data set's vocabulary" in capsys.readouterr().err
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(label)  # a colour PNG: a counted skip naming it
    assert sunrgbd.main([f"root={root}", f"out={tmp_path / 'o'}", "progress=false", "skip_missing=true"]) == 0
    summary = json.loads((tmp_path / "o/manifest.json").read_text())["summary"]
    assert summary["written"] == 1 and summary["skipped_images"]["label PNG of the wrong kind"] == 1
    assert f"{label}: label PNG of the wrong kind (mode RGB" in caplog.text
    write_grey(root / "label37/test/img37labels-000001.png", _labels(37, 0))  # a second label numbered 1
    assert sunrgbd.main([f"root={root}", f"out={tmp_path / 'o'}", "progress=false", "skip_missing=true"]) == 2
    assert "two labels numbered 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- ScanNet
FRAMES = (("scene0011_00", "000000"), ("scene0011_00", "000100"), ("scene0707_01", "001500"))
NUM_CLASSES = {"semantic20": 20, "semantic38": 37, "semantic41": 40}


def _pan_scene(k):
    """Per frame: the panoptic id map and its segments (NYU40 ids): wall, floor, chairs, a crowd of books-less
    'otherfurniture', a door; 0 = void."""
    ids = np.zeros((H, W), dtype=np.int64)
    ids[:10] = 1 + k  # wall
    ids[16:] = 2 + k * 10  # floor
    ids[10:16, 2:10] = 1001
    ids[10:16, 12:20] = 256 * 3 + 7  # a second chair with an id needing two bytes
    ids[4:9, 22:30] = 70000  # otherfurniture crowd, three bytes
    ids[18:23, 2 + k:8 + k] = 555  # door
    ids[10:16, 28:] = 0  # void
    segments = [{"id": 1 + k, "category_id": 1, "iscrowd": 0}, {"id": 2 + k * 10, "category_id": 2, "iscrowd": 0},
                {"id": 1001, "category_id": 5, "iscrowd": 0}, {"id": 775, "category_id": 5, "iscrowd": 0},
                {"id": 70000, "category_id": 39, "iscrowd": 1}, {"id": 555, "category_id": 8, "iscrowd": 0}]
    return ids, segments


@pytest.fixture
def scan_root(tmp_path):
    root = tmp_path / "scannet_frames_25k"
    maps = {kind: [] for kind in scannet.SEMANTIC_KINDS}
    annotations = []
    for k, (scene, frame) in enumerate(FRAMES):
        write_jpeg(root / "images" / scene / "color" / f"{frame}.jpg", k)
        for kind, (folder, names) in scannet.SEMANTIC_KINDS.items():
            values = _labels(len(names), k)
            write_grey(root / "images" / scene / folder / f"{frame}.png", values)
            maps[kind].append(values)
        ids, segments = _pan_scene(k)
        (root / "scannet_panoptic").mkdir(parents=True, exist_ok=True)
        Image.fromarray(id_to_rgb(ids)).save(root / "scannet_panoptic" / f"{scene}__{frame}.png")
        annotations.append({"image_id": 40 + k, "file_name": f"{scene}__{frame}.png",
                            "segments_info": [{**s, "area": int((ids == s["id"]).sum())} for s in segments]})
    (root / "meta").mkdir()
    (root / "meta/val.txt").write_text("".join(f"{s}/color/{f}.jpg {s}/label/{f}.png\n" for s, f in FRAMES))
    (root / "scannet_panoptic.json").write_text(json.dumps({"annotations": annotations, "categories": [
        {"id": i, "name": n, "isthing": int(t)} for i, n, t in scannet.PANOPTIC_CATEGORIES]}))
    return root, maps


def _scan(root, out, kind, *extra):
    return scannet.main([f"root={root}", f"kind={kind}", f"out={out}", "workers=0", "progress=false", *extra])


@pytest.mark.parametrize("kind", ["semantic20", "semantic41", "semantic38"])
def test_scannet_semantic_reads_back_and_scores(scan_root, tmp_path, kind):
    root, maps = scan_root
    out = tmp_path / f"scannet_{kind}_val"
    assert _scan(root, out, kind) == 0
    shards = ShardSet.open(out)
    assert shards.name == f"scannet_{kind}_val" and shards.task == "sem"
    names = scannet.SEMANTIC_KINDS[kind][1]
    assert shards.vocabulary.names == list(names) and shards.vocabulary.ids == list(range(1, len(names) + 1))
    assert len(names) == NUM_CLASSES[kind]
    samples = list(read_shards(out))
    assert [s.image_id for s in samples] == [1100000000, 1100000100, 70701001500]
    for sample, values, (_, frame) in zip(samples, maps[kind], FRAMES):
        assert sample.annotation["file_name"] == f"{frame}.jpg"
        np.testing.assert_array_equal(decode_label_png(sample.semantic_png), np.where(values == 0, 255, values - 1))
    assert_oracle_perfect(out, SEMANTIC_METRICS)
    _semantic_perturbation_matches(out, maps[kind], NUM_CLASSES[kind])


def test_scannet_names_follow_the_reference():
    assert scannet.SCAN_20[14] == "refrigerator" and scannet.SCAN_20[-1] == "otherfurniture"
    assert scannet.SCAN_40[-3:] == ("otherstructure", "otherfurniture", "otherprop") and len(scannet.SCAN_40) == 40
    vocab = scannet.panoptic_vocabulary()
    assert vocab.ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
    assert vocab.is_thing == [False, False] + [True] * 18 and vocab.names[8] == "window"
    assert [n for _, n, _ in scannet.PANOPTIC_CATEGORIES] == list(scannet.SCAN_20)


def test_scannet_panoptic_reads_back_and_matches_panopticapi_and_pycocotools(scan_root, tmp_path):
    root, _ = scan_root
    out = tmp_path / "scannet_panoptic_val"
    assert _scan(root, out, "panoptic") == 0
    shards = ShardSet.open(out)
    assert shards.name == "scannet_panoptic_val" and shards.task == "seg" and len(shards.vocabulary) == 20
    vocab = shards.vocabulary
    samples = [s.materialised() for s in read_shards(out)]
    assert [s.image_id for s in samples] == [40, 41, 42]
    for k, (sample, (_, frame)) in enumerate(zip(samples, FRAMES)):
        ids, segments = _pan_scene(k)
        assert sample.annotation["file_name"] == f"{frame}.jpg"
        np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), ids)
        objects = {o["segment_id"]: o for o in sample.annotation["objects"]}
        assert {s: (o["category_id"], o["iscrowd"]) for s, o in objects.items()} == {
            s["id"]: (s["category_id"], s["iscrowd"]) for s in segments}
        for segment_id, obj in objects.items():
            assert obj["bbox"] == [int(v) for v in _xyxy(ids == segment_id)]
            assert obj["area"] == (ids == segment_id).sum()
            assert obj["is_thing"] == (obj["category_id"] > 2)
        targets = [s["id"] for s in segments if not s["iscrowd"]]
        for mask, segment_id in zip(sample.masks, targets):
            np.testing.assert_array_equal(mask.numpy(), ids == segment_id)
        np.testing.assert_array_equal(sample.ignore_mask.numpy(), ids == 70000)
    assert_oracle_perfect(out, PANOPTIC_METRICS)

    block = (slice(0, 5), slice(0, 10))
    drop = {40: 1001, 41: None, 42: 555}
    shift = {40: None, 41: 775, 42: 1001}
    got = score(out, lambda sample, v: perturbed_panoptic(
        sample, v, drop[sample.image_id], shift[sample.image_id], 2.0, block, 4))
    truth, preds, pairs, thing_truth, detections = {}, {}, [], {}, []
    for k in range(3):
        image_id = 40 + k
        ids, segments = _pan_scene(k)
        truth[image_id] = (ids, segments)
        pred = ids.copy()
        pred[np.isin(pred, [70000, drop[image_id]])] = 0
        preds[image_id] = (pred, [s for s in segments if not s["iscrowd"] and s["id"] != drop[image_id]])
        labels = np.full((H, W), 255, dtype=np.int64)
        for s in segments:
            labels[ids == s["id"]] = vocab.index_of_id(s["category_id"])
        pred_sem = np.where(labels == 255, 0, labels)
        pred_sem[block] = 4
        pairs.append((labels, pred_sem))
        things = [s for s in segments if s["category_id"] > 2]
        thing_truth[image_id] = [(ids == s["id"], s["category_id"], s["iscrowd"]) for s in things]
        for s in things:
            if not s["iscrowd"] and s["id"] != drop[image_id]:
                box = tight_box(ids == s["id"])
                box[0] += 2.0 if s["id"] == shift[image_id] else 0.0
                detections.append((image_id, s["category_id"], ids == s["id"], box))
    categories = [{"id": i, "name": n, "isthing": int(t)} for i, n, t in scannet.PANOPTIC_CATEGORIES]
    theirs = panopticapi_pq(tmp_path, categories, truth, preds)
    for ours, part in (("PQ", "All"), ("PQ_things", "Things"), ("PQ_stuff", "Stuff")):
        assert got[ours] == pytest.approx(theirs[part]["pq"], abs=1e-12), ours
    assert got["PQ"] < 1.0 and got["PQ_stuff"] == 1.0
    assert got["mIoU"] == pytest.approx(plain_miou(pairs, 20, 255), abs=1e-12) and got["mIoU"] < 1.0
    thing_ids = [c["id"] for c in categories if c["isthing"]]
    for metric, iou_type in (("box", "bbox"), ("mask", "segm")):
        ap, ap50 = pycocotools_ap(thing_ids, thing_truth, detections, iou_type)
        assert got[f"{metric}_AP"] == pytest.approx(ap, abs=1e-9) and got[f"{metric}_AP50"] == pytest.approx(
            ap50, abs=1e-9)
    assert got["box_AP"] < 1.0


def test_scannet_bad_input(scan_root, tmp_path, capsys, caplog):
    root, _ = scan_root
    assert _scan(tmp_path / "none", tmp_path / "o", "semantic20") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ScanNet images folder not found" in err and "none/images" in err
    assert _scan(root, tmp_path / "o", "semantic20", "split=train") == 2
    assert f"ScanNet frame list not found: {root / 'meta/train.txt'}" in capsys.readouterr().err
    assert scannet.main([f"root={root}", f"out={tmp_path / 'o'}"]) == 2  # kind is required
    assert "kind" in capsys.readouterr().err
    label = root / "images/scene0707_01/label21/001500.png"
    label.unlink()
    assert _scan(root, tmp_path / "o", "semantic20") == 2
    assert f"label file not found: {label}" in capsys.readouterr().err
    assert _scan(root, tmp_path / "o", "semantic20", "skip_missing=true") == 0
    assert json.loads((tmp_path / "o/manifest.json").read_text())["summary"]["skipped_images"] == {
        "missing label file": 1}
    # panoptic: a PNG that is not a PNG is a counted skip; a category outside the 20 an error naming the JSON
    png = root / "scannet_panoptic/scene0011_00__000100.png"
    png.write_bytes(b"not a png")
    assert _scan(root, tmp_path / "p", "panoptic") == 0
    assert json.loads((tmp_path / "p/manifest.json").read_text())["summary"]["skipped_images"] == {
        "unreadable panoptic PNG": 1}
    assert f"{png}: unreadable panoptic PNG" in caplog.text
    json_path = root / "scannet_panoptic.json"
    data = json.loads(json_path.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 13  # pillow: not a ScanNet-20 category
    json_path.write_text(json.dumps(data))
    assert _scan(root, tmp_path / "p", "panoptic") == 2
    err = capsys.readouterr().err
    assert f"{json_path}: scene0011_00__000000.png has category id(s) [13]" in err
    json_path.write_text("{ not json")
    assert _scan(root, tmp_path / "p", "panoptic") == 2
    assert f"{json_path}: malformed JSON" in capsys.readouterr().err
    json_path.unlink()
    assert _scan(root, tmp_path / "p", "panoptic") == 2
    assert f"annotation file not found: {json_path}" in capsys.readouterr().err


def test_readers_and_encoders_pickle_for_workers():
    vocab = scannet.panoptic_vocabulary()
    for encode in (partial(encode_panoptic, vocab=bdd100k.panoptic_vocabulary(), dataset="d",
                           read=bdd100k.read_bitmask),
                   partial(encode_semantic, vocab=bdd100k.semantic_vocabulary(), dataset="d",
                           read=bdd100k.read_semantic_mask),
                   partial(encode_semantic, vocab=sunrgbd.vocabulary(), dataset="d", read=sunrgbd.read_label37),
                   partial(encode_semantic, vocab=vocab, dataset="d", read=scannet.read_label),
                   partial(encode_panoptic, vocab=vocab, dataset="d")):
        assert pickle.loads(pickle.dumps(encode)).keywords.keys() == encode.keywords.keys()


def test_scannet_with_workers_writes_the_same_samples(scan_root, tmp_path):
    root, _ = scan_root
    assert _scan(root, tmp_path / "a", "panoptic") == 0
    assert scannet.main([f"root={root}", "kind=panoptic", f"out={tmp_path / 'b'}", "workers=2", "progress=false"]) == 0
    first, second = list(read_shards(tmp_path / "a")), list(read_shards(tmp_path / "b"))
    assert [s.panoptic_png for s in first] == [s.panoptic_png for s in second]
    assert [s.annotation for s in first] == [s.annotation for s in second]


def test_scannet_panoptic_ids_from_scene_and_frame_when_the_json_has_no_integer_ids(scan_root, tmp_path):
    root, _ = scan_root
    json_path = root / "scannet_panoptic.json"
    data = json.loads(json_path.read_text())
    for ann, (scene, frame) in zip(data["annotations"], FRAMES):
        ann["image_id"] = f"{scene}{frame}"  # the reference's own string id
    json_path.write_text(json.dumps(data))
    assert _scan(root, tmp_path / "p", "panoptic") == 0
    assert [s.image_id for s in read_shards(tmp_path / "p")] == [1100000000, 1100000100, 70701001500]
