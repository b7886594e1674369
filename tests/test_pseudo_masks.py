"""Offline mask assistance: pseudo masks for every box of detection shards, then trained on behind a switch."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from data_prep.pseudo_masks import main, pseudo_mask_shards
from openseed.data.datamodule import OpenSeeDDataModule
from openseed.data.shards import ShardSet, read_shards
from openseed.modeling.checkpoint import save_model
from openseed.modeling.openseed import build_openseed, load_model
from tests.conftest import clone_shard_set, read_tar


@pytest.fixture(scope="module")
def det_small(synth_shards, tmp_path_factory):
    return clone_shard_set(synth_shards["det_train"], tmp_path_factory.mktemp("det_small"), [4, 2])


@pytest.fixture(scope="module")
def pseudo(det_small, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pseudo")
    summary = pseudo_mask_shards(build_openseed("tiny"), det_small, out, image_size=128, batch_size=4,
                                 progress=False)
    return out, summary


def test_every_box_gets_a_pseudo_mask(det_small, pseudo):
    out, summary = pseudo
    boxes = sum(len(s.labels) for s in read_shards(det_small))
    assert summary["images"] == 6 and summary["pseudo_masks"] == boxes > 0
    shard_set = ShardSet.open(out)
    assert shard_set.mask_format == "rle" and shard_set.counts == (4, 2) and shard_set.task == "det"
    for sample in read_shards(out):
        assert sample.masks.shape == (len(sample.labels), *sample.orig_size)
        assert sample.mask_is_pseudo.all() and sample.has_mask.all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["pseudo_masks"]["from"] == str(det_small)


def test_images_and_boxes_are_copied_untouched(det_small, pseudo):
    out, _ = pseudo
    before = dict(read_tar(det_small / "synthshapes_det_train-000000.tar"))
    after = dict(read_tar(out / "synthshapes_det_train-000000.tar"))
    assert sorted(before) == sorted(after)
    for name, data in before.items():
        if name.endswith(".jpg"):
            assert after[name] == data
        else:
            old, new = json.loads(data), json.loads(after[name])
            assert [o["bbox"] for o in old["objects"]] == [o["bbox"] for o in new["objects"]]
            for obj in new["objects"]:
                mask = mask_utils.decode(obj["rle"])
                assert mask.shape == (new["height"], new["width"]) and mask.dtype == np.uint8


def test_data_module_uses_pseudo_masks_only_when_switched_on(synth_shards, pseudo):
    out, _ = pseudo

    def det_batch(det_masks):
        module = OpenSeeDDataModule(seg={"path": str(synth_shards["seg_train"]), "batch_size": 2},
                                    det={"path": str(out), "batch_size": 3}, image_size=128, num_workers=0,
                                    det_masks=det_masks)
        return next(iter(module.train_dataloader()))["det"]

    assert all(t.masks is None and not t.has_mask.any() for t in det_batch(False).targets)
    with_masks = det_batch(True)
    assert all(t.masks is not None and t.mask_is_pseudo.all() for t in with_masks.targets)


def test_cli_with_a_saved_model(det_small, tmp_path, capsys):
    torch.manual_seed(0)
    save_model(build_openseed("tiny"), tmp_path / "model.pt")
    assert load_model(tmp_path / "model.pt").config.hidden_dim == 64
    code = main([f"ckpt={tmp_path / 'model.pt'}", f"shards={det_small}", f"out={tmp_path / 'out'}", "image_size=128",
                 "device=cpu"])
    assert code == 0 and "pseudo masks" in capsys.readouterr().out
    assert main([f"ckpt={tmp_path / 'missing.pt'}", f"shards={det_small}", f"out={tmp_path / 'o'}"]) == 2
    assert main([f"ckpt={tmp_path / 'model.pt'}", f"shards={det_small}", f"out={tmp_path / 'o'}", "image_size=0"]) == 2
    assert "image_size must be an integer >= 1" in capsys.readouterr().err


class _BoxFillModel(torch.nn.Module):
    """Stands in for a trained model: each box's mask is exactly its box (at the decoded size)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def embed_vocabulary(self, vocabulary):
        return torch.zeros(len(vocabulary.names), 4)

    def segment_boxes(self, images, padding_mask, boxes, names, vocabulary=None, text=None):
        masks = []
        for i, image_boxes in enumerate(boxes):
            height, width = int((~padding_mask[i]).any(1).sum()), int((~padding_mask[i]).any(0).sum())
            ys, xs = torch.arange(height)[:, None] + 0.5, torch.arange(width)[None] + 0.5
            masks.append(torch.stack([(xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
                                      for b in image_boxes.cpu()]) if len(image_boxes)
                         else torch.zeros((0, height, width), dtype=torch.bool))
        return masks


def test_masks_stay_with_their_objects_when_the_resize_drops_boxes(synth_shards, tmp_path):
    # 160 x 160 images decoded at 80: a 1.5 px wide box becomes 0.75 px and one outside the image nothing, so the
    # resize drops both; they come before the other boxes (and a crowd box sits among them). The third image has
    # only boxes that are dropped.
    thin, a, outside, b = [70.0, 20.0, 71.5, 120.0], [8.0, 8.0, 60.0, 60.0], [170.0, 0.0, 200.0, 40.0], \
        [92.0, 96.0, 150.0, 152.0]
    crowd = [0.0, 130.0, 40.0, 160.0]

    def mutate(index, members):
        meta = json.loads(members["json"])
        template = meta["objects"][0]
        meta["objects"] = [dict(template, bbox=box, iscrowd=int(box is crowd), area=1.0)
                           for box in ((thin, a, crowd, outside, b) if index < 2 else (thin, outside))]
        members["json"] = json.dumps(meta).encode()

    source = clone_shard_set(synth_shards["det_train"], tmp_path / "source", [3], mutate=mutate)
    summary = pseudo_mask_shards(_BoxFillModel(), source, tmp_path / "out", image_size=80, batch_size=2,
                                 progress=False)
    assert summary["images"] == 3 and summary["pseudo_masks"] == 4
    assert sum(summary["boxes_without_mask"].values()) == 6
    assert "resize" in next(iter(summary["boxes_without_mask"]))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["pseudo_masks"]["boxes_without_mask"] == summary["boxes_without_mask"]

    def inside(mask, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return int(mask[max(y0, 0):y1, max(x0, 0):x1].sum())

    for name, data in read_tar(tmp_path / "out" / "synthshapes_det_train-000000.tar"):
        if not name.endswith(".json"):
            continue
        objects = json.loads(data)["objects"]
        if len(objects) == 2:
            assert [o["bbox"] for o in objects] == [thin, outside] and not any("rle" in o for o in objects)
            continue
        assert [o["bbox"] for o in objects] == [thin, a, crowd, outside, b]
        assert ["rle" in o for o in objects] == [False, True, False, False, True]
        assert not objects[0]["pseudo_mask"] and not objects[3]["pseudo_mask"]
        mask_a, mask_b = (mask_utils.decode(objects[i]["rle"]) for i in (1, 4))
        for mask, own, other in ((mask_a, a, b), (mask_b, b, a)):
            assert inside(mask, own) == mask.sum() > 0.9 * (own[2] - own[0]) * (own[3] - own[1])
            assert inside(mask, other) == 0
    samples = list(read_shards(tmp_path / "out"))  # the dropped boxes read back as boxes without a mask
    assert [s.has_mask.tolist() for s in samples] == [[False, True, False, True]] * 2 + [[False, False]]
    assert [s.mask_is_pseudo.tolist() for s in samples] == [[False, True, False, True]] * 2 + [[False, False]]
    assert not any(s.masks[0].any() or s.masks[2].any() for s in samples[:2]) and not samples[2].masks.any()
