"""Offline mask assistance: pseudo masks for every box of detection shards, then trained on behind a switch."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from data_prep.pseudo_masks import main, pseudo_mask_shards
from openseed.data.datamodule import OpenSeeDDataModule
from openseed.data.shards import ShardSet, read_shards
from openseed.modeling.checkpoint import load_model, save_model
from openseed.modeling.openseed import build_openseed
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
    assert load_model(tmp_path / "model.pt").config["hidden_dim"] == 64
    code = main(["--ckpt", str(tmp_path / "model.pt"), "--shards", str(det_small), "--out", str(tmp_path / "out"),
                 "--image-size", "128", "--device", "cpu"])
    assert code == 0 and "pseudo masks" in capsys.readouterr().out
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--shards", str(det_small), "--out",
                 str(tmp_path / "o")]) == 2
