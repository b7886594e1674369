"""synthshapes end to end: generate -> shards -> joint batches, with the class splits intact."""

import json

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.prepare_synthshapes import prepare_synthshapes
from openseed.data.datamodule import OpenSeeDDataModule
from openseed.data.shards import ShardSet, read_shards


@pytest.fixture(scope="module")
def shard_dirs(synth_shards):
    return synth_shards


def test_vocabularies_and_class_splits(shard_dirs):
    seg, det = ShardSet.open(shard_dirs["seg_train"]), ShardSet.open(shard_dirs["det_train"])
    assert seg.task == "seg" and seg.mask_format == "panoptic" and len(seg.vocabulary) == 22
    assert det.task == "det" and det.mask_format == "none" and len(det.vocabulary) == 32
    assert ShardSet.open(shard_dirs["det_val"]).mask_format == "rle"
    assert "brick wall" in seg.vocabulary.prompt_names() and seg.vocabulary.num_things == 16
    det_only = set(synthetic.det_only_classes())
    assert not det_only & set(seg.vocabulary.names) and det_only <= set(det.vocabulary.names)
    labels = {det.vocabulary.names[int(label)] for s in read_shards(shard_dirs["det_train"]) for label in s.labels}
    assert labels & det_only  # detection-only classes really occur, with boxes only
    assert all(s.masks is None for s in read_shards(shard_dirs["det_train"]))


def test_seg_shards_match_the_generated_pngs(shard_dirs):
    raw = shard_dirs["seg_val"].parents[1] / "raw" / "seg_val"
    gt = {a["image_id"]: a for a in json.loads((raw / "panoptic.json").read_text())["annotations"]}
    vocab = ShardSet.open(shard_dirs["seg_val"]).vocabulary
    for sample in read_shards(shard_dirs["seg_val"]):
        ann = gt[sample.image_id]
        rgb = np.asarray(Image.open(raw / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert len(sample.labels) == len(ann["segments_info"])
        for i, segment in enumerate(ann["segments_info"]):
            assert np.array_equal(sample.masks[i].numpy(), ids == segment["id"])
            assert vocab.categories[int(sample.labels[i])].id == segment["category_id"]
        assert sample.masks.sum(0).eq(1).all()  # no void in synthshapes: every pixel in exactly one segment


def test_prepare_is_cached(shard_dirs):
    manifest = shard_dirs["seg_train"] / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = prepare_synthshapes(shard_dirs["seg_train"].parents[1], scale=0.02, workers=2, progress=False)
    assert again == shard_dirs and manifest.stat().st_mtime_ns == before


def test_crowded_variant_is_prepared_beside_and_not_confused_with_the_standard(tmp_path):
    dirs = prepare_synthshapes(tmp_path, scale=0.005, workers=1, progress=False, variant="crowded")
    seg = ShardSet.open(dirs["seg_train"])
    assert len(seg.vocabulary) == 16 + 12 and seg.vocabulary.num_things == 16
    assert {"tiles", "wood floor", "sky"} <= set(seg.vocabulary.names)
    assert len(ShardSet.open(dirs["det_train"]).vocabulary) == 32
    assert seg.name == "synthshapes_crowded_seg_train"  # its metrics are not mistaken for the standard set's
    manifest = dirs["seg_train"] / "manifest.json"
    assert json.loads(manifest.read_text())["source"]["synthshapes"]["variant"] == "crowded"
    before = manifest.stat().st_mtime_ns
    prepare_synthshapes(tmp_path, scale=0.005, workers=1, progress=False, variant="crowded")
    assert manifest.stat().st_mtime_ns == before  # cached
    prepare_synthshapes(tmp_path, scale=0.005, workers=1, progress=False)  # the standard set in the same root
    standard = ShardSet.open(dirs["seg_train"])
    assert len(standard.vocabulary) == 16 + 6 and standard.name == "synthshapes_seg_train"  # remade
    assert "variant" not in json.loads(manifest.read_text())["source"]["synthshapes"]


def test_joint_batches_from_synthshapes(shard_dirs):
    module = OpenSeeDDataModule(seg={"path": str(shard_dirs["seg_train"]), "batch_size": 4},
                                det={"path": str(shard_dirs["det_train"]), "batch_size": 8},
                                val=[{"path": str(shard_dirs["seg_val"]), "batch_size": 4}],
                                image_size=160, num_workers=0)
    loader = module.train_dataloader()
    assert len(loader) == 40 // 4
    batch = next(iter(loader))
    seg, det = batch["seg"], batch["det"]
    assert seg.images.shape == (4, 3, 160, 160) and det.images.shape == (8, 3, 160, 160)
    assert seg.vocabulary is module.train_sets["seg"].vocabulary and len(det.vocabulary) == 32
    for target in seg.targets:
        assert target.masks is not None and target.masks.shape[0] == len(target.labels)
        assert target.is_thing.any() or len(target) > 0
    assert all(t.masks is None for t in det.targets)
    assert sum(len(b) for b in module.val_dataloader()[0]) == 4


def test_check_loader_uses_the_synthshapes_config(shard_dirs, capsys):
    from data_prep.prepare_synthshapes import check_loader

    check_loader(shard_dirs, steps=2)
    out = capsys.readouterr().out
    assert "train step 1: seg: (16, 3, 160, 160) images" in out and "det: (32, 3, 160, 160) images" in out
    assert "training epoch = 2 steps (seg batch 16)" in out  # 40 seg_train images at scale 0.02
    assert "validation synthshapes_seg_val: 4 of 4 images" in out
