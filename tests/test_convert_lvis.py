"""data_prep.lvis: LVIS v1 in its published layout (an LVIS JSON whose images name their file only by ``coco_url``, the
COCO 2017 image root with train2017/ and val2017/) -> detection shards with RLE masks, read back pixel-exact, scored by
the oracle and against LVIS's federated protocol run directly on the JSON the test wrote."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_prep.lvis import main
from openseed.core.predictions import Instances
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import DataError
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.lvis import evaluate_lvis
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.runner import DatasetEvaluator

# LVIS v1 category entries as the JSON writes them (names, synonyms, synsets and definitions of real LVIS v1 classes,
# as detectron2's lvis_v1_categories.py lists them; counts made up)
CATEGORIES = [
    {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "synset": "aerosol.n.02",
     "def": "a dispenser that holds a substance under pressure", "frequency": "c", "image_count": 64,
     "instance_count": 109},
    {"id": 3, "name": "airplane", "synonyms": ["airplane", "aeroplane"], "synset": "airplane.n.01",
     "def": "an aircraft that has a fixed wing and is powered by propellers or jets", "frequency": "f",
     "image_count": 478, "instance_count": 1099},
    {"id": 136, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)"], "synset": "bow.n.04",
     "def": "a weapon for shooting arrows", "frequency": "r", "image_count": 2, "instance_count": 2},
    {"id": 162, "name": "bull", "synonyms": ["horned_cow"], "synset": "bull.n.11",
     "def": "a cow with horns", "frequency": "c", "image_count": 41, "instance_count": 72},
    {"id": 698, "name": "monitor_(computer_equipment) computer_monitor",
     "synonyms": ["monitor_(computer_equipment) computer_monitor"], "synset": "monitor.n.04",
     "def": "a computer monitor", "frequency": "f",
     "image_count": 1000, "instance_count": 1500},
]

# (id, folder, width, height, neg_category_ids, not_exhaustive_category_ids)
IMAGES = [(139, "val2017", 64, 48, [136, 162], [3]), (9, "train2017", 56, 40, [], [1]),
          (632, "val2017", 48, 32, [698], [])]

# (image id, category id, polygons)
ANNOTATIONS = [
    (139, 1, [[4.0, 4.0, 20.5, 4.0, 20.5, 18.0, 4.0, 18.0]]),
    (139, 698, [[30.0, 10.0, 60.0, 12.0, 50.0, 40.0, 33.0, 35.5]]),
    (139, 162, [[2.0, 30.0, 12.0, 30.0, 7.0, 46.0], [14.0, 40.0, 20.0, 40.0, 20.0, 46.0, 14.0, 46.0]]),
    (9, 136, [[10.0, 5.0, 40.0, 8.0, 44.0, 30.0, 12.0, 33.0]]),
    (9, 3, [[45.0, 2.0, 54.0, 2.0, 54.0, 12.0, 45.0, 12.0]]),
    (9, 1, [[20.0, 20.0, 30.0, 22.0, 26.0, 38.0]]),
]


def _bbox(polygons):
    xs = [x for poly in polygons for x in poly[0::2]]
    ys = [y for poly in polygons for y in poly[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def write_lvis(root, with_images=True):
    """An LVIS v1 JSON and a COCO 2017 image root, as published (images named only by coco_url)."""
    coco_root = root / "coco"
    rng = np.random.default_rng(0)
    images = []
    for image_id, folder, width, height, neg, not_exhaustive in IMAGES:
        name = f"{image_id:012d}.jpg"
        (coco_root / folder).mkdir(parents=True, exist_ok=True)
        if with_images:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(coco_root / folder / name, quality=90)
        images.append({"id": image_id, "width": width, "height": height, "license": 1,
                       "date_captured": "2013-11-14 11:18:45",
                       "flickr_url": f"http://farm3.staticflickr.com/2/{image_id}.jpg",
                       "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
                       "neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive})
    annotations = []
    for index, (image_id, category_id, polygons) in enumerate(ANNOTATIONS):
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *next((h, w) for i, _, w, h, *_ in IMAGES
                                                                      if i == image_id)))
        annotations.append({"id": index + 1, "image_id": image_id, "category_id": category_id,
                            "segmentation": polygons, "bbox": _bbox(polygons),
                            "area": float(mask_utils.area(rle))})
    data = {"info": {"description": "LVIS v1 (test sample)", "version": "1.0", "year": 2020},
            "licenses": [{"id": 1, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}],
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    json_path = root / "lvis_v1_val.json"
    json_path.write_text(json.dumps(data))
    return json_path, coco_root


def convert(tmp_path, *extra):
    json_path, coco_root = write_lvis(tmp_path)
    out = tmp_path / "shards"
    argv = ["split=val", f"json={json_path}", f"coco_root={coco_root}", f"out={out}", "workers=0", "progress=false",
            *extra]
    assert main(argv) == 0
    return json_path, out


def test_lvis_read_back_pixel_exact(tmp_path):
    json_path, out = convert(tmp_path)
    shards = ShardSet.open(out)
    assert shards.task == "det" and shards.mask_format == "rle" and shards.name == "lvis_v1_val"
    coco = _coco(json_path)
    samples = {s.image_id: s for s in read_shards(out)}
    assert sorted(samples) == [9, 139, 632]  # the empty image is kept
    vocab = shards.vocabulary
    for image_id, _folder, width, height, neg, not_exhaustive in IMAGES:
        sample = samples[image_id]
        meta = sample.annotation
        assert sample.orig_size == (height, width)
        assert meta["file_name"] == f"{image_id:012d}.jpg"
        assert meta["extra"] == {"neg_category_ids": neg, "not_exhaustive_category_ids": not_exhaustive}
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(meta["objects"]) == len(anns) == len(sample.labels)
        for k, ann in enumerate(anns):
            assert vocab.ids[int(sample.labels[k])] == ann["category_id"]
            assert meta["objects"][k]["category_id"] == ann["category_id"]
            x, y, w, h = ann["bbox"]
            assert sample.boxes[k].tolist() == pytest.approx([x, y, x + w, y + h])
            assert bool(sample.is_thing[k]) and bool(sample.has_mask[k])
            assert np.array_equal(sample.masks[k].numpy(), coco.annToMask(ann).astype(bool))
        if not anns:
            assert sample.masks is None or sample.masks.shape[0] == 0


def test_lvis_vocabulary_and_reference_names(tmp_path):
    _, out = convert(tmp_path)
    vocab = ShardSet.open(out).vocabulary
    assert vocab.ids == [1, 3, 136, 162, 698]
    assert vocab.names == [c["name"] for c in CATEGORIES]  # the raw LVIS names
    assert all(vocab.is_thing)
    # openseed's words: underscores read as spaces, parenthesised qualifiers kept, LVIS synonyms after the name
    assert vocab.categories[0].synonyms == ("aerosol can", "spray can")
    assert vocab.prompt_names() == ["aerosol can", "airplane", "bow (weapon)", "bull",
                                    "monitor (computer equipment) computer monitor"]
    # the reference prompts with utils/constants.py LVIS_CATEGORIES, each class's first LVIS synonym as written
    # (these entries are its ids 1, 3, 136, 162, 698); the vocabulary's "reference" style reads the raw name, which
    # differs from it for "bull" (first synonym "horned_cow") alone, here and among all 1203 LVIS v1 classes
    reference_lvis_categories = ["aerosol_can", "airplane", "bow_(weapon)", "horned_cow",
                                 "monitor_(computer_equipment) computer_monitor"]
    assert [c["synonyms"][0] for c in CATEGORIES] == reference_lvis_categories
    assert vocab.prompt_names(style="reference") == [
        "aerosol_can", "airplane", "bow_(weapon)", "bull", "monitor_(computer_equipment) computer_monitor"]
    assert "horned cow" in vocab.categories[3].synonyms


def test_lvis_oracle_is_perfect(tmp_path):
    _, out = convert(tmp_path)
    metrics = {k: v for k, v in score(out).items() if k != "per_class"}
    # a federated set (the manifest's category_frequency): LVIS's protocol, with AP per frequency group
    assert set(metrics) == {f"{p}_{k}" for p in ("box", "mask") for k in ("AP", "AP50", "APr", "APc", "APf")}
    # (the group means round: two classes' APs of 1.0 average to 0.9999999999999998, in the lvis-api too)
    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0), abs=1e-12)


def test_lvis_manifest_keeps_category_frequency(tmp_path):
    _, out = convert(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["category_frequency"] == {str(c["id"]): c["frequency"] for c in CATEGORIES}
    assert ShardSet.open(out).category_frequency == {c["id"]: c["frequency"] for c in CATEGORIES}
    # a manifest whose frequencies do not fit the vocabulary is refused, naming the file
    for broken, message in (({**manifest["category_frequency"], "1": "x"}, "must be one of"),
                            ({k: v for k, v in manifest["category_frequency"].items() if k != "3"}, "missing \\[3\\]")):
        (out / "manifest.json").write_text(json.dumps({**manifest, "category_frequency": broken}))
        with pytest.raises(DataError, match=message) as error:
            ShardSet.open(out)
        assert str(out / "manifest.json") in str(error.value)


def test_lvis_perturbed_matches_federated_evaluation_of_the_json(tmp_path):
    """Perturbed predictions scored through the shards equal LVIS's federated protocol run on the JSON the test
    wrote; the detections the federated rules treat differently from COCO's (a class verified absent, a class not
    annotated exhaustively, a class not checked on the image) make the figures differ from pycocotools'."""
    json_path, out = convert(tmp_path)
    shards = ShardSet.open(out)
    vocab = shards.vocabulary
    evaluator = DatasetEvaluator.for_shards(shards)
    assert evaluator.federated
    coco = _coco(json_path)
    box_results, mask_results = [], []
    for sample in read_shards(out):
        prediction = oracle_predictions(sample, vocab)["instances"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id]))
        labels = prediction.labels.clone()
        boxes = prediction.boxes.clone()
        masks = prediction.masks.clone() if prediction.masks is not None else torch.zeros(0, *sample.orig_size,
                                                                                          dtype=torch.bool)
        scores = torch.linspace(0.9, 0.5, len(anns)) if anns else torch.zeros(0)
        keep = list(range(len(anns)))
        extra = []  # (category id, box xyxy, score): detections with no ground truth
        if sample.image_id == 139:
            keep.remove(1)  # one instance dropped
            boxes[0] += torch.tensor([3.0, 2.0, 3.0, 2.0])  # one box shifted
            masks[2, :, :6] = True  # one mask grown by a block of pixels
            # 136 is verified absent here (a false positive), 3 is not exhaustive (forgiven), 1 is positive (a
            # false positive under both protocols)
            extra = [(136, [30.0, 2.0, 50.0, 20.0], 0.95), (3, [40.0, 20.0, 60.0, 40.0], 0.97),
                     (1, [0.0, 20.0, 10.0, 30.0], 0.55)]
        if sample.image_id == 632:
            extra = [(3, [1.0, 1.0, 20.0, 20.0], 0.99)]  # 3 is neither annotated nor verified absent: dropped
        index = torch.tensor(keep, dtype=torch.long)
        labels, boxes, masks, scores = labels[index], boxes[index], masks[index], scores[index]
        categories = [anns[k]["category_id"] for k in keep]
        for category_id, box, score_value in extra:
            mask = torch.zeros(1, *sample.orig_size, dtype=torch.bool)
            x0, y0, x1, y1 = (int(v) for v in box)
            mask[0, y0:y1, x0:x1] = True
            labels = torch.cat([labels, torch.tensor([vocab.index_of_id(category_id)])])
            boxes = torch.cat([boxes, torch.tensor([box])])
            masks = torch.cat([masks, mask])
            scores = torch.cat([scores, torch.tensor([score_value])])
            categories.append(category_id)
        perturbed = Instances(scores=scores, labels=labels, queries=torch.arange(len(labels)), boxes=boxes,
                              masks=masks, image_id=sample.image_id)
        evaluator.add(annotation_of(sample), instances=perturbed)
        for k, category_id in enumerate(categories):
            x0, y0, x1, y1 = boxes[k].tolist()
            common = {"image_id": sample.image_id, "category_id": category_id, "score": float(scores[k])}
            box_results.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            rle = mask_utils.encode(np.asfortranarray(masks[k].numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            mask_results.append({**common, "segmentation": rle})
    metrics = evaluator.compute()
    gt = json.loads(json_path.read_text())
    for iou_type, results in (("bbox", box_results), ("segm", mask_results)):
        expected = evaluate_lvis(gt, copy.deepcopy(results), iou_type)
        coco_ap = _cocoeval(coco, copy.deepcopy(results), iou_type)[0]
        prefix = "box" if iou_type == "bbox" else "mask"
        assert 0.3 < expected["AP"] < 0.95  # the perturbation shows
        assert abs(expected["AP"] - coco_ap) > 0.02  # and the federated rules matter
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert metrics[f"{prefix}_{key}"] == pytest.approx(expected[key], abs=1e-12), (prefix, key)
        assert {c["name"]: c["AP"] for c in expected["per_category"]} == \
            pytest.approx(metrics["per_class"][f"{prefix}_AP"], abs=1e-12)


def test_lvis_federated_set_needs_the_per_image_lists(tmp_path, capsys):
    json_path, coco_root = write_lvis(tmp_path)
    data = json.loads(json_path.read_text())
    del data["images"][1]["neg_category_ids"]
    json_path.write_text(json.dumps(data))
    assert main(["split=val", f"json={json_path}", f"coco_root={coco_root}", f"out={tmp_path / 'out'}",
                 "progress=false"]) == 2
    err = capsys.readouterr().err
    assert str(json_path) in err and "image 9" in err and "neg_category_ids" in err
    data["images"][1]["neg_category_ids"] = []
    del data["categories"][2]["frequency"]
    json_path.write_text(json.dumps(data))
    assert main(["split=val", f"json={json_path}", f"coco_root={coco_root}", f"out={tmp_path / 'out'}",
                 "progress=false"]) == 2
    err = capsys.readouterr().err
    assert str(json_path) in err and "category 136" in err and "frequency" in err


def test_lvis_images_from_both_coco_folders(tmp_path):
    json_path, out = convert(tmp_path, "name=lvis_check")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "lvis_check" and manifest["num_samples"] == 3
    assert manifest["source"]["coco_root"].endswith("coco") and manifest["source"]["json"] == str(json_path)
    assert manifest["summary"]["skipped_images"] == {}


def test_lvis_missing_image_folder_and_malformed_json(tmp_path, capsys):
    json_path, coco_root = write_lvis(tmp_path)
    out = tmp_path / "shards"
    assert main(["split=val", f"json={json_path}", f"coco_root={tmp_path / 'nowhere'}", f"out={out}",
                 "progress=false"]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    # an image that is not in its coco_url folder: an error naming the user's JSON and the file
    (coco_root / "train2017" / "000000000009.jpg").unlink()
    assert main(["split=val", f"json={json_path}", f"coco_root={coco_root}", f"out={out}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert str(json_path) in err and "train2017/000000000009.jpg" in err
    bad = tmp_path / "lvis_v1_minival.json"
    bad.write_text('{"images": [')
    assert main(["split=minival", f"json={bad}", f"coco_root={coco_root}", f"out={out}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "malformed JSON" in err
    assert main(["split=test", f"json={json_path}", f"coco_root={coco_root}", f"out={out}"]) == 2


def _quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def _coco(json_path) -> COCO:
    """pycocotools' COCO of the written LVIS JSON; LVIS annotations carry no ``iscrowd``, which COCOeval reads."""
    data = json.loads(json_path.read_text())
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    _quiet(coco.createIndex)
    return coco


def _cocoeval(coco: COCO, results: list[dict], iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_vocabulary_from_lvis_categories_keeps_ids():
    vocab = Vocabulary.from_coco_categories(CATEGORIES)
    assert [vocab.index_of_id(c["id"]) for c in CATEGORIES] == [0, 1, 2, 3, 4]
