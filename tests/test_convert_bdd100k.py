"""data_prep.bdd100k: the 10K segmentation set in its published layout (JPEG images, 8-bit semantic masks, RGBA
panoptic bitmasks) converted, read back pixel-exact, scored by the oracle and, perturbed, against panopticapi,
pycocotools and a plain confusion matrix."""

import json

import numpy as np
import pytest
from PIL import Image

from data_prep import bdd100k
from openseed.core.codecs import decode_label_png, decode_panoptic_png
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
    got = score(out, lambda sample, vocab: perturbed_panoptic(
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
                box = tight_box(expected == s)
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

    got = score(out, perturbed)
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


# ------------------------------------------------------------------------------------------- COCO-panoptic export
def _toolkit_export(root, scenes):
    """What the toolkit's ``bdd100k.label.to_coco_panseg`` writes from these bitmasks, at the paths the reference
    reads (labels/pan_seg/meta/coco_val.json, labels/pan_seg/coco_pano/val/): PNG R = A, G = B (the annotation id);
    one segment per (category, attributes, id) with category 0 left out, in id order, iscrowd = crowd or ignore;
    a later annotation of an already listed stuff category (1..30) is not listed, its area added to the segment at
    index 4 (the toolkit takes the index from the size of a segment dict), whose iscrowd it clears."""
    images, annotations = [], []
    for image_id, (name, (cat, attr, ann)) in enumerate(zip(NAMES, scenes), start=1):
        png = np.zeros((H, W, 3), np.uint8)
        png[..., 0], png[..., 1] = ann & 0xFF, ann >> 8
        path = root / "labels/pan_seg/coco_pano/val" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(path)
        identity = (cat << 24) + (attr << 16) + ann
        instances = []
        for value in np.unique(identity).tolist():
            category, attributes, instance = value >> 24, (value >> 16) & 255, value & 65535
            if category:
                instances.append((instance, category, attributes, int((identity == value).sum())))
        segments, stuff_seen = [], set()
        for instance, category, attributes, area in sorted(instances, key=lambda i: i[0]):
            if category not in stuff_seen:
                segments.append({"id": instance, "category_id": category, "area": area,
                                 "iscrowd": int(bool(attributes & 0b11)), "ignore": 0})
                if category <= 30:
                    stuff_seen.add(category)
            else:
                segments[4]["area"] += area
                segments[4]["iscrowd"] = 0
        images.append({"id": image_id, "file_name": f"{name}.png", "height": H, "width": W})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments})
    categories = [{"id": i, "name": n, "supercategory": "x", "isthing": i >= 31, "color": [0, 0, 0]}
                  for i, n in bdd100k.PANOPTIC_CATEGORIES]
    meta = root / "labels/pan_seg/meta/coco_val.json"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"categories": categories, "images": images, "annotations": annotations}))
    return {name: a["segments_info"] for name, a in zip(NAMES, annotations)}


def test_panoptic_from_the_toolkits_coco_export(bdd_root, tmp_path, capsys):
    scenes = [(cat, attr, ann) for cat, attr, ann, _, _ in _bitmasks()]
    cat, attr, ann = (a.copy() for a in scenes[1])
    cat[21:24, :10], attr[21:24, :10], ann[21:24, :10] = 7, 0, 600  # a second road: unlisted, void
    scenes[1] = (cat, attr, ann)
    listed = _toolkit_export(bdd_root, scenes)
    assert [s["id"] for s in listed[NAMES[1]]] == [1, 2, 3, 4, 258]  # 600 merged into index 4 (the bicycle)
    out = tmp_path / "export"
    assert _convert(bdd_root, out, "panoptic") == 0  # gt=auto: the export, since its JSON is there
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["gt"].startswith("coco_panoptic ")
    assert manifest["summary"]["skipped_images"] == {"image without a label file": 1}
    samples = [s.materialised() for s in read_shards(out)]
    assert [s.image_id for s in samples] == [0, 1]
    for sample, name, (_, _, ann) in zip(samples, NAMES, scenes):
        np.testing.assert_array_equal(decode_panoptic_png(sample.panoptic_png), ann)  # the PNG as written
        objects = {o["segment_id"]: o for o in sample.annotation["objects"]}
        assert {s: (o["category_id"], o["iscrowd"]) for s, o in objects.items()} == \
            {s["id"]: (s["category_id"], s["iscrowd"]) for s in listed[name]}
        for segment_id, obj in objects.items():
            assert obj["area"] == (ann == segment_id).sum()  # from the PNG, not the JSON's merged area
    # what the export changes: the ignored car is a crowd segment, the unlisted ids (7, 600) void
    assert samples[0].annotation["objects"][4]["segment_id"] == 6 and samples[0].annotation["objects"][4]["iscrowd"]
    assert 600 not in {o["segment_id"] for o in samples[1].annotation["objects"]}
    assert_oracle_perfect(out, PANOPTIC_METRICS)
    # gt=bitmasks still reads the bitmasks; a segment with a category outside 1..40 names the JSON
    assert _convert(bdd_root, tmp_path / "bits", "panoptic", "gt=bitmasks") == 0
    assert json.loads((tmp_path / "bits" / "manifest.json").read_text())["source"]["gt"] == "bitmasks"
    meta = bdd_root / "labels/pan_seg/meta/coco_val.json"
    data = json.loads(meta.read_text())
    data["annotations"][0]["segments_info"][0]["category_id"] = 41
    meta.write_text(json.dumps(data))
    assert _convert(bdd_root, tmp_path / "bad", "panoptic") == 2
    err = capsys.readouterr().err
    assert str(meta) in err and "outside BDD100K's 1..40" in err
