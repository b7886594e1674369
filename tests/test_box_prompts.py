"""Box-prompted segmentation scored against a data set's masks (openseed.evaluation.box_prompts)."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from openseed.evaluation.box_prompts import evaluate_box_prompts, main
from tests.conftest import clone_shard_set


def _truth(shards_dir):
    """(bbox, mask) of every stored non-crowd object of a shard set."""
    from openseed.data.shards import ShardSet, iter_raw_samples

    pairs = []
    for raw in iter_raw_samples(ShardSet.open(shards_dir).urls):
        for obj in json.loads(raw["json"])["objects"]:
            if not obj["iscrowd"] and "rle" in obj:
                pairs.append((torch.tensor(obj["bbox"], dtype=torch.float32),
                              torch.from_numpy(mask_utils.decode(obj["rle"])).bool()))
    return pairs


class Oracle(torch.nn.Module):
    """Answers a box prompt with the stored mask of the object whose box it is (boxes come back unscaled: the test
    decodes at the images' own size). ``box_masks=True``: the filled box instead."""

    config: dict = {}

    def __init__(self, truth, box_masks=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.truth, self.box_masks, self.calls, self.embedded = truth, box_masks, 0, []

    def embed_vocabulary(self, vocabulary):
        self.embedded.append(list(vocabulary.names))
        return torch.zeros(len(vocabulary.names), 4)

    def segment_boxes(self, images, padding_mask, boxes, names, vocabulary=None, text=None):
        assert {n for image_names in names for n in image_names} <= set(vocabulary.names)
        assert text.shape[0] == len(vocabulary.names)
        self.calls += 1
        results = []
        for i, image_boxes in enumerate(boxes):
            height = int((~padding_mask[i]).any(1).sum())
            width = int((~padding_mask[i]).any(0).sum())
            masks = []
            for box in image_boxes:
                if self.box_masks:
                    masks.append(_box_raster(box, height, width))
                    continue
                distance, index = min((float((box - b).abs().max()), k) for k, (b, _) in enumerate(self.truth))
                assert distance < 1e-3, "a prompt box that is not one of the stored boxes"
                masks.append(self.truth[index][1][:height, :width])
            results.append(torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.bool))
        return results


def _box_raster(box, height, width):
    ys = torch.arange(height)[:, None] + 0.5
    xs = torch.arange(width)[None, :] + 0.5
    return (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])


@pytest.fixture(scope="module")
def det_set(synth_shards, tmp_path_factory):
    return clone_shard_set(synth_shards["det_val"], tmp_path_factory.mktemp("det_prompts"), [3, 2])


def _size(shards_dir):
    from openseed.data.shards import ShardSet, read_shards

    return max(next(iter(read_shards(ShardSet.open(shards_dir).root))).orig_size)


def test_perfect_masks_score_ap_and_iou_of_one(det_set):
    truth = _truth(det_set)
    oracle = Oracle(truth)
    metrics = evaluate_box_prompts(oracle, det_set, image_size=_size(det_set), batch_size=2)
    assert oracle.calls == 3 and len(oracle.embedded) == 1  # 5 images in chunks of 2; the names embedded once
    assert metrics["boxes"] == len(truth) > 0
    assert metrics["boxes_without_mask"] == metrics["skipped_images"] == metrics["objects_without_truth"] == 0
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["mask_AP50"] == pytest.approx(1.0)
    assert metrics["mIoU"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in metrics["per_class"]["IoU"].values())


def test_iou_is_each_box_mask_against_its_own_object(det_set):
    truth = _truth(det_set)
    metrics = evaluate_box_prompts(Oracle(truth, box_masks=True), det_set, image_size=_size(det_set))
    expected = []
    for box, mask in truth:
        raster = _box_raster(box, *mask.shape)
        expected.append(float((raster & mask).sum() / (raster | mask).sum()))
    assert metrics["mIoU"] == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert 0.2 < metrics["mIoU"] < 0.95  # a filled box is neither the shape nor disjoint from it
    assert 0.0 <= metrics["mask_AP"] < 1.0


def test_a_dropped_box_is_a_counted_miss_and_never_shifts_the_other_masks(synth_shards, tmp_path):
    def thin_first_box(index, members):
        if index == 0:
            meta = json.loads(members["json"])
            x0, y0, _, y1 = meta["objects"][0]["bbox"]
            meta["objects"][0]["bbox"] = [x0, y0, x0 + 0.2, y1]  # under MIN_BOX_SIDE: the resize drops it
            members["json"] = json.dumps(meta).encode()

    shards = clone_shard_set(synth_shards["det_val"], tmp_path / "thin", [2], mutate=thin_first_box)
    truth = _truth(shards)
    metrics = evaluate_box_prompts(Oracle(truth), shards, image_size=_size(shards))
    assert metrics["boxes"] == len(truth) and metrics["boxes_without_mask"] == 1
    assert metrics["mIoU"] == pytest.approx((len(truth) - 1) / len(truth))  # every other mask is its own object's
    assert min(metrics["per_class"]["IoU"].values()) < 1.0


def test_data_without_instance_masks_is_refused_with_its_name(synth_shards):
    with pytest.raises(ValueError, match="seg_val"):
        evaluate_box_prompts(Oracle([]), synth_shards["seg_val"])
    assert main(["ckpt=missing.safetensors", f"shards={synth_shards['det_val']}"]) == 2


def test_a_vocabulary_embedded_once_gives_the_masks_of_a_per_call_vocabulary():
    from openseed.core.vocabulary import Vocabulary
    from openseed.modeling.openseed import build_openseed

    torch.manual_seed(0)
    model = build_openseed("tiny").eval()
    images, padding = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    boxes, names = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [20.0, 10.0, 60.0, 60.0]])], [["dog", "cat"]]
    per_call = model.segment_boxes(images, padding, boxes, names)
    vocabulary = Vocabulary.from_names(["bird", "cat", "dog", "horse"])
    once = model.segment_boxes(images, padding, boxes, names, vocabulary=vocabulary,
                               text=model.embed_vocabulary(vocabulary))
    assert torch.equal(per_call[0], once[0]) and per_call[0].any()
    with pytest.raises(ValueError, match="not in the given vocabulary"):
        model.segment_boxes(images, padding, boxes, [["dog", "zebra"]], vocabulary=vocabulary)
