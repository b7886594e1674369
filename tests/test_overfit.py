"""Learning: the tiny model overfits two synthshapes images (every matched mask and box reaches IoU >= 0.9)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from openseed.core.boxes import model_boxes_to_pixels
from openseed.data.shards import ShardSet, read_shards
from openseed.data.transforms import collate
from openseed.losses.criterion import SetCriterion
from openseed.losses.matcher import build_match_groups
from openseed.modeling.openseed import build_openseed

STEPS = 400


def _matched_ious(model, criterion, batch):
    model.eval()
    with torch.no_grad():
        outputs = model.forward_images(batch.images, batch.padding_mask, batch.vocabulary)
    model.train()
    padded = tuple(batch.images.shape[-2:])
    prepared = [{"labels": t.labels, "boxes": boxes, "masks": t.masks}
                for t, boxes in zip(batch.targets, batch.model_boxes())]
    groups = build_match_groups([t.is_thing for t in batch.targets], "seg", outputs.num_fg, outputs.num_bg)
    matches = criterion.matcher(outputs.final, prepared, groups)
    masks = F.interpolate(outputs.final.masks, size=padded, mode="bilinear", align_corners=False) > 0
    mask_ious, box_ious, labels_right = [], [], []
    for i, (queries, targets) in enumerate(matches):
        truth = batch.targets[i]
        predicted, expected = masks[i, queries], truth.masks[targets]
        union = (predicted | expected).flatten(1).sum(1)
        mask_ious.append((predicted & expected).flatten(1).sum(1) / union)
        boxes = model_boxes_to_pixels(outputs.final.boxes[i, queries], padded)
        box_ious.append(box_iou(boxes, truth.boxes[targets]).diagonal())
        labels_right.append(outputs.final.logits[i, queries].argmax(-1) == truth.labels[targets])
        assert len(targets) == len(truth)  # every ground truth is matched
    return torch.cat(mask_ious), torch.cat(box_ious), torch.cat(labels_right)


@pytest.mark.slow
def test_tiny_model_overfits_two_images(synth_shards):
    torch.manual_seed(0)
    shard_set = ShardSet.open(synth_shards["seg_train"])
    batch = collate(list(itertools.islice(read_shards(synth_shards["seg_train"]), 2)), shard_set.vocabulary, "seg")
    model, criterion = build_openseed("tiny"), SetCriterion(num_points=1600)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.75 * STEPS)], gamma=0.1)
    first = None
    for _ in range(STEPS):
        outputs = model(batch)
        loss = criterion.total_loss(criterion(outputs, batch))
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        schedule.step()
    mask_ious, box_ious, labels_right = _matched_ious(model, criterion, batch)
    assert loss.item() < first / 5
    assert mask_ious.min() >= 0.9, mask_ious
    assert box_ious.min() >= 0.9, box_ious
    assert labels_right.all()
