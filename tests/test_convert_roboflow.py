"""data_prep.roboflow_sets: SegInW and ODinW sets in their published Roboflow COCO layout -> one shard folder per set;
the Roboflow super-category left out, masks read back pixel-exact, the oracle perfect, a perturbed prediction scored
as pycocotools scores it directly on the JSON the test wrote, the suite's missing sets listed, bad input named."""

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

from data_prep.roboflow_sets import ODINW_SETS, SEGINW_SETS, find_sets, main, shard_name
from openseed.core.predictions import Instances
from openseed.data.shards import ShardSet, read_shards
from openseed.evaluation.oracle import annotation_of, oracle_predictions, score
from openseed.evaluation.runner import DatasetEvaluator

# one image: (file name, width, height, [(category id, polygon)])
SEG_IMAGES = [
    ("IMG_0001_jpg.rf.6f1c0e2a9b.jpg", 64, 48, [(1, [4.0, 4.0, 30.0, 6.0, 26.0, 30.0, 6.0, 26.0]),
                                               (2, [34.0, 10.0, 60.0, 10.0, 60.0, 44.0, 40.0, 40.0]),
                                               (1, [2.0, 34.0, 14.0, 34.0, 8.0, 46.0])]),
    ("IMG_0002_jpg.rf.0aa3b4c5d6.jpg", 48, 40, [(2, [10.0, 5.0, 40.0, 8.0, 44.0, 30.0, 12.0, 33.0]),
                                               (1, [20.0, 30.0, 30.0, 31.0, 26.0, 38.0])]),
]
DET_IMAGES = [
    ("pothole_01_jpg.rf.1b2c3d.jpg", 64, 48, [(1, [3.0, 4.0, 20.0, 15.0]), (1, [30.5, 20.0, 25.0, 22.0])]),
    ("pothole_02_jpg.rf.4e5f6a.jpg", 56, 40, [(1, [8.0, 6.0, 30.0, 20.0])]),
]


def _bbox(poly):
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def write_roboflow(folder, images, categories, masks, json_name="_annotations.coco.json", seed=0):
    """A Roboflow COCO export: the JSON (ids from 0) and the JPEGs beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {"info": {"year": "2022", "version": "2", "description": "Exported from roboflow.ai",
                     "contributor": "", "url": "https://public.roboflow.ai/object-detection/x",
                     "date_created": "2022-03-21T10:32:44+00:00"},
            "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
            "categories": categories, "images": [], "annotations": []}
    for image_id, (name, width, height, objects) in enumerate(images):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name, quality=90)
        data["images"].append({"id": image_id, "license": 1, "file_name": name, "height": height, "width": width,
                               "date_captured": "2022-03-21T10:32:44+00:00"})
        for category_id, shape in objects:
            ann = {"id": len(data["annotations"]), "image_id": image_id, "category_id": category_id, "iscrowd": 0}
            if masks:
                rle = mask_utils.frPyObjects([shape], height, width)[0]
                ann.update(bbox=_bbox(shape), area=float(mask_utils.area(rle)), segmentation=[shape])
            else:
                ann.update(bbox=shape, area=shape[2] * shape[3], segmentation=[])
            data["annotations"].append(ann)
    (folder / json_name).write_text(json.dumps(data))
    return folder / json_name


SEG_CATEGORIES = [{"id": 0, "name": "cows", "supercategory": "none"},
                  {"id": 1, "name": "cow", "supercategory": "cows"},
                  {"id": 2, "name": "calf_young", "supercategory": "cows"}]
DET_CATEGORIES = [{"id": 0, "name": "potholes", "supercategory": "none"},
                  {"id": 1, "name": "pothole", "supercategory": "potholes"}]


def seginw_root(tmp_path):
    root = tmp_path / "seginw"
    cows = write_roboflow(root / "Cows" / "valid", SEG_IMAGES, SEG_CATEGORIES, masks=True)
    write_roboflow(root / "Cows" / "train", SEG_IMAGES[:1], SEG_CATEGORIES, masks=True)  # another split: not read
    salmon = write_roboflow(root / "Salmon Fillet.v2-raw" / "valid", SEG_IMAGES[1:], SEG_CATEGORIES, masks=True,
                            seed=1)
    return root, {"Cows": cows, "Salmon Fillet.v2-raw": salmon}


def odinw_root(tmp_path):
    root = tmp_path / "odinw"
    pothole = write_roboflow(root / "pothole" / "valid", DET_IMAGES, DET_CATEGORIES, masks=False)
    # GLIP's benchmark file (super-category already removed, ids from 1) beside Roboflow's: the benchmark's is read
    aquarium_dir = root / "Aquarium" / "Aquarium Combined.v2-raw-1024.coco" / "valid"
    write_roboflow(aquarium_dir, DET_IMAGES[:1], DET_CATEGORIES, masks=False)
    glip_categories = [{"id": 1, "name": "fish", "supercategory": "creatures"},
                       {"id": 2, "name": "jellyfish", "supercategory": "creatures"}]
    aquarium = write_roboflow(aquarium_dir, DET_IMAGES[:1], glip_categories, masks=False,
                              json_name="annotations_without_background.json")
    # a set exported without split folders
    pistols = write_roboflow(root / "pistols" / "export", DET_IMAGES[1:], [{"id": 1, "name": "pistol",
                                                                             "supercategory": "Guns"}],
                             masks=False, json_name="val_annotations_without_background.json", seed=2)
    return root, {"pothole": pothole, "Aquarium/Aquarium Combined.v2-raw-1024.coco": aquarium,
                  "pistols/export": pistols}


def run_suite(suite, root, out, capsys, *extra):
    assert main([f"suite={suite}", f"root={root}", "split=valid", f"out={out}", "workers=0", "progress=false",
                 *extra]) == 0
    return capsys.readouterr().out


def test_suite_facts():
    assert len(SEGINW_SETS) == len(set(SEGINW_SETS)) == 25
    assert len(ODINW_SETS) == len(set(ODINW_SETS)) == 35
    assert shard_name("odinw", "Aquarium/Aquarium Combined.v2-raw-1024.coco", "valid") == \
        "odinw_Aquarium_Aquarium_Combined_v2-raw-1024_coco_valid"
    assert shard_name("seginw", "Nutterfly-Squireel", "valid") == "seginw_Nutterfly-Squireel_valid"


def test_seginw_sets_read_back_pixel_exact(tmp_path, capsys):
    root, jsons = seginw_root(tmp_path)
    out = tmp_path / "out"
    printed = run_suite("seginw", root, out, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["seginw_Cows_valid", "seginw_Salmon_Fillet_v2-raw_valid"]
    # what was found, the super-category left out, the suite's missing sets
    assert "found 2 set(s)" in printed and str(jsons["Cows"]) in printed
    assert printed.count("left out of the vocabulary: category 0 'cows'") == 2
    missing = printed[printed.index("missing under"):]
    assert "(24 of 25 sets" in missing and "Elephants" in missing and "Ginger-Garlic" in missing
    assert "Cows" not in missing.split(":", 1)[1]
    assert "not in the paper's seginw suite (converted too): Salmon Fillet.v2-raw" in printed
    for set_name, shard_dir in (("Cows", "seginw_Cows_valid"), ("Salmon Fillet.v2-raw",
                                                                "seginw_Salmon_Fillet_v2-raw_valid")):
        shards = ShardSet.open(out / shard_dir)
        assert shards.task == "det" and shards.mask_format == "rle" and shards.name == shard_dir
        assert shards.vocabulary.ids == [1, 2] and shards.vocabulary.names == ["cow", "calf_young"]
        assert shards.vocabulary.prompt_names() == ["cow", "calf young"]
        manifest = json.loads((out / shard_dir / "manifest.json").read_text())
        assert manifest["source"]["left_out_categories"] == [{"id": 0, "name": "cows"}]
        coco = _coco(jsons[set_name])
        samples = list(read_shards(out / shard_dir))
        assert sorted(s.image_id for s in samples) == sorted(coco.getImgIds())
        for sample in samples:
            image = coco.imgs[sample.image_id]
            assert sample.annotation["file_name"] == image["file_name"]
            assert sample.orig_size == (image["height"], image["width"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id]))
            assert len(anns) == len(sample.labels) > 0
            for k, ann in enumerate(anns):
                assert shards.vocabulary.ids[int(sample.labels[k])] == ann["category_id"]
                x, y, w, h = ann["bbox"]
                assert sample.boxes[k].tolist() == pytest.approx([x, y, x + w, y + h])
                assert np.array_equal(sample.masks[k].numpy(), coco.annToMask(ann).astype(bool))


def test_seginw_oracle_and_perturbed_match_pycocotools(tmp_path, capsys):
    root, jsons = seginw_root(tmp_path)
    out = tmp_path / "out"
    run_suite("seginw", root, out, capsys, "sets=[Cows]")
    assert [p.name for p in out.iterdir()] == ["seginw_Cows_valid"]
    shard_dir = out / "seginw_Cows_valid"
    metrics = {k: v for k, v in score(shard_dir).items() if k != "per_class"}
    assert set(metrics) == {"box_AP", "box_AP50", "mask_AP", "mask_AP50"}
    assert all(v == 1.0 for v in metrics.values()), metrics
    expected, metrics = _perturbed(shard_dir, jsons["Cows"], masks=True)
    assert 0.2 < expected["box_AP"] < 0.95 and 0.2 < expected["mask_AP"] < 0.95
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_odinw_sets_boxes_oracle_and_perturbed(tmp_path, capsys):
    root, jsons = odinw_root(tmp_path)
    out = tmp_path / "out"
    assert [f.name for f in find_sets("odinw", root, "valid")] == sorted(jsons)
    assert [f.json_path for f in find_sets("odinw", root, "valid")] == [jsons[n] for n in sorted(jsons)]
    printed = run_suite("odinw", root, out, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["odinw_Aquarium_Aquarium_Combined_v2-raw-1024_coco_valid",
                                                     "odinw_pistols_export_valid", "odinw_pothole_valid"]
    assert "(32 of 35 sets" in printed and "PascalVOC" in printed
    assert printed.count("left out of the vocabulary") == 1  # pothole's Roboflow JSON only
    vocabularies = {p.name: ShardSet.open(p).vocabulary for p in out.iterdir()}
    assert vocabularies["odinw_pothole_valid"].names == ["pothole"]
    assert vocabularies["odinw_Aquarium_Aquarium_Combined_v2-raw-1024_coco_valid"].names == ["fish", "jellyfish"]
    assert vocabularies["odinw_pistols_export_valid"].ids == [1]
    shard_dir = out / "odinw_pothole_valid"
    shards = ShardSet.open(shard_dir)
    assert shards.task == "det" and shards.mask_format == "none"
    coco = _coco(jsons["pothole"])
    for sample in read_shards(shard_dir):
        assert sample.masks is None
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id]))
        assert len(anns) == len(sample.labels) > 0
        np.testing.assert_allclose(sample.boxes.numpy(), [[x, y, x + w, y + h] for x, y, w, h in
                                                          (a["bbox"] for a in anns)], rtol=0, atol=1e-5)
    for folder in out.iterdir():
        metrics = {k: v for k, v in score(folder).items() if k != "per_class"}
        assert metrics == {"box_AP": 1.0, "box_AP50": 1.0}, (folder.name, metrics)
    expected, metrics = _perturbed(shard_dir, jsons["pothole"], masks=False)
    assert 0.1 < expected["box_AP"] < 0.95
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_seginw_benchmark_file_keeps_category_zero(tmp_path, capsys):
    """X-Decoder's ``_annotations_min1cat.coco.json`` has no super-category: its category 0 is a class."""
    root = tmp_path / "seginw"
    categories = [{"id": 0, "name": "cow", "supercategory": "cow"}]
    images = [(name, w, h, [(0, poly) for _, poly in objects]) for name, w, h, objects in SEG_IMAGES]
    write_roboflow(root / "Cows" / "valid", images, SEG_CATEGORIES, masks=True)  # Roboflow's, not read
    write_roboflow(root / "Cows" / "valid", images, categories, masks=True, json_name="_annotations_min1cat.coco.json")
    out = tmp_path / "out"
    printed = run_suite("seginw", root, out, capsys)
    assert "left out" not in printed
    vocab = ShardSet.open(out / "seginw_Cows_valid").vocabulary
    assert vocab.ids == [0] and vocab.names == ["cow"]
    assert all(v == 1.0 for k, v in score(out / "seginw_Cows_valid").items() if k != "per_class")


def test_bad_input_is_named(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["split=valid", f"out={out}", "progress=false", "workers=0"]
    assert main(["suite=seginw", f"root={tmp_path / 'nowhere'}", *argv]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["suite=odinw", f"root={tmp_path / 'empty'}", *argv]) == 2
    assert "no odinw set with a 'valid' split" in capsys.readouterr().err
    # an annotation labelled with the super-category
    root, jsons = seginw_root(tmp_path)
    data = json.loads(jsons["Cows"].read_text())
    data["annotations"][1]["category_id"] = 0
    jsons["Cows"].write_text(json.dumps(data))
    assert main(["suite=seginw", f"root={root}", *argv]) == 2
    err = capsys.readouterr().err
    assert str(jsons["Cows"]) in err and "super-category" in err and "'cows'" in err
    # a malformed JSON
    jsons["Cows"].write_text('{"images": [{"id": 0,')
    assert main(["suite=seginw", f"root={root}", *argv]) == 2
    err = capsys.readouterr().err
    assert str(jsons["Cows"]) in err and "malformed JSON" in err
    # an unknown category: named with the set's file, not a temporary copy
    data["annotations"][1]["category_id"] = 7
    jsons["Cows"].write_text(json.dumps(data))
    assert main(["suite=seginw", f"root={root}", *argv]) == 2
    err = capsys.readouterr().err
    assert str(jsons["Cows"]) in err and "unknown category id 7" in err
    assert main(["suite=seginw", f"root={root}", "sets=[Nowhere]", *argv]) == 2
    assert "Nowhere" in capsys.readouterr().err
    assert main(["suite=coco", f"root={root}", *argv]) == 2


# ------------------------------------------------------------------------------------------------ helpers
def _coco(json_path) -> COCO:
    """pycocotools' COCO of a written Roboflow JSON, as the evaluation should see it: the super-category left out,
    and annotation ids renumbered from 1 (COCOeval cannot match a ground truth whose id is 0)."""
    data = json.loads(json_path.read_text())
    data["categories"] = [c for c in data["categories"] if c["supercategory"] != "none"]
    for index, ann in enumerate(data["annotations"]):
        ann["id"] = index + 1
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perturbed(shard_dir, json_path, masks: bool):
    """Oracle predictions with one instance dropped, one box shifted and (with masks) one mask grown, scored by
    ``DatasetEvaluator`` and by pycocotools on the written JSON; (expected, metrics)."""
    shards = ShardSet.open(shard_dir)
    evaluator = DatasetEvaluator.for_shards(shards)
    coco = _coco(json_path)
    results = {"bbox": [], "segm": []}
    for sample in read_shards(shard_dir):
        prediction = oracle_predictions(sample, shards.vocabulary)["instances"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id]))
        keep = list(range(len(anns)))
        boxes = prediction.boxes.clone()
        grown = None if prediction.masks is None else prediction.masks.clone()
        scores = torch.linspace(0.9, 0.4, len(anns))
        if sample.image_id == 0:
            keep.remove(len(anns) - 1)  # one instance dropped
            boxes[0] += torch.tensor([4.0, 3.0, 4.0, 3.0])  # one box shifted
            if grown is not None:
                grown[1, :, :8] = True  # one mask grown by a block of pixels
        index = torch.tensor(keep, dtype=torch.long)
        evaluator.add(annotation_of(sample), instances=Instances(
            scores=scores[index], labels=prediction.labels[index], queries=index, boxes=boxes[index],
            masks=None if grown is None else grown[index], image_id=sample.image_id))
        for k in keep:
            common = {"image_id": sample.image_id, "category_id": anns[k]["category_id"], "score": float(scores[k])}
            x0, y0, x1, y1 = boxes[k].tolist()
            results["bbox"].append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            if grown is not None:
                rle = mask_utils.encode(np.asfortranarray(grown[k].numpy().astype(np.uint8)))
                results["segm"].append({**common, "segmentation": {**rle, "counts": rle["counts"].decode()}})
    metrics = evaluator.compute()
    expected = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        if iou_type == "segm" and not masks:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(results[iou_type])), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        expected[f"{prefix}_AP"], expected[f"{prefix}_AP50"] = evaluation.stats[0], evaluation.stats[1]
    return expected, metrics


def test_odinw_classes_named_as_glip_prompts_them(tmp_path, capsys):
    from data_prep.odinw_names import GLIP_ODINW_NAMES
    from data_prep.roboflow_sets import ODINW_SETS

    assert set(GLIP_ODINW_NAMES) == set(ODINW_SETS)
    assert dict(GLIP_ODINW_NAMES["MaskWearing/raw"]) == {1: "mask", 2: "no-mask"}  # GLIP's MaskWearing_raw.yaml
    root = tmp_path / "odinw"
    categories = [{"id": 1, "name": "face_mask", "supercategory": "people"},
                  {"id": 2, "name": "no_mask", "supercategory": "people"},
                  {"id": 3, "name": "visor", "supercategory": "people"}]  # not in GLIP's table: kept
    write_roboflow(root / "MaskWearing" / "raw" / "valid", DET_IMAGES, categories, masks=False,
                   json_name="annotations_without_background.json")
    chess = [{"id": 1, "name": "pieces", "supercategory": "pieces"}]  # GLIP names id 1 blank: the JSON's name stays
    write_roboflow(root / "ChessPieces" / "Chess Pieces.v23-raw.coco" / "valid", DET_IMAGES[:1], chess,
                   masks=False, json_name="annotations_without_background.json")
    run_suite("odinw", root, tmp_path / "glip", capsys)
    masks = tmp_path / "glip" / "odinw_MaskWearing_raw_valid"
    assert ShardSet.open(masks).vocabulary.names == ["mask", "no-mask", "visor"]
    source = json.loads((masks / "manifest.json").read_text())["source"]
    assert source["names"] == "glip" and source["renamed_categories"] == [
        {"id": 1, "from": "face_mask", "to": "mask"}, {"id": 2, "from": "no_mask", "to": "no-mask"}]
    chess_set = tmp_path / "glip" / "odinw_ChessPieces_Chess_Pieces_v23-raw_coco_valid"
    assert ShardSet.open(chess_set).vocabulary.names == ["pieces"]
    assert json.loads((chess_set / "manifest.json").read_text())["source"]["renamed_categories"] == []
    run_suite("odinw", root, tmp_path / "json", capsys, "names=json")
    assert ShardSet.open(tmp_path / "json" / masks.name).vocabulary.names == ["face_mask", "no_mask", "visor"]
