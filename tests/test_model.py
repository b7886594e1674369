"""The OpenSeeD model end to end on synthshapes batches: losses, gradients, attention masks, box prompts."""

import pytest
import torch

from openseed.core.boxes import targets_to_model_boxes
from openseed.core.conditions import Conditions
from openseed.losses.criterion import SetCriterion
from openseed.modeling import decoder as decoder_module
from openseed.modeling.openseed import MODEL_SIZES, build_openseed


def _losses(model, criterion, batch):
    outputs = model(batch)
    losses = criterion(outputs, batch)
    return outputs, losses


@pytest.mark.parametrize("task", ["seg", "det"])
def test_forward_backward_all_losses_finite(seg_batch, det_batch, task):
    torch.manual_seed(0)
    batch = seg_batch if task == "seg" else det_batch
    model, criterion = build_openseed("tiny"), SetCriterion(num_points=256)
    outputs, losses = _losses(model, criterion, batch)
    num_layers = MODEL_SIZES["tiny"].decoder_layers
    assert outputs.final.logits.shape == (2, 15, len(batch.vocabulary))
    assert outputs.final.masks.shape == (2, 15, 32, 32) and outputs.final.boxes.shape == (2, 15, 4)
    assert len(outputs.aux) == num_layers and len(outputs.conditioned.predictions) == num_layers + 1
    assert set(losses) == set(criterion.expected_keys(num_layers, True, num_layers + 1))
    assert all(torch.isfinite(v) for v in losses.values())
    total = criterion.total_loss(losses)
    assert total > 0
    total.backward()
    if task == "det":
        assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0  # boxes-only data: no mask supervision


def test_every_trainable_parameter_gets_a_gradient_on_a_segmentation_batch(seg_batch):
    """After one optimiser step (zero-initialised box heads and sampling offsets pass no gradient on the very
    first step, by design), every trainable parameter receives a non-zero gradient. Stochastic depth is off: it may
    drop a block's branch for the whole batch in a step, which zeroes that branch's gradient legitimately."""
    torch.manual_seed(0)
    model, criterion = build_openseed("tiny", drop_path_rate=0.0), SetCriterion(num_points=256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        criterion.total_loss(_losses(model, criterion, seg_batch)[1]).backward()
        optimizer.step()
    without = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert without == []
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == []  # the tiny model trains everything, text tower included


def _conditions(batch, labels_shift=0, box_shift=0.0):
    padded = tuple(batch.images.shape[-2:])
    return Conditions(labels=[(t.labels + labels_shift) % len(batch.vocabulary) for t in batch.targets],
                      boxes=[(targets_to_model_boxes(t.boxes, padded) + box_shift).clamp(0.01, 0.99)
                             for t in batch.targets], add_noise=False)


def test_matching_queries_never_see_conditioned_queries(seg_batch):
    torch.manual_seed(0)
    model = build_openseed("tiny").eval()
    with torch.no_grad():
        a = model(seg_batch, conditions=_conditions(seg_batch))
        b = model(seg_batch, conditions=_conditions(seg_batch, labels_shift=3, box_shift=0.05))
        none = model.forward_images(seg_batch.images, seg_batch.padding_mask, seg_batch.vocabulary)
    assert torch.equal(a.final.logits, b.final.logits)  # bit for bit
    assert torch.equal(a.final.boxes, b.final.boxes)
    assert torch.equal(a.final.masks, b.final.masks)
    assert all(torch.equal(x.masks, y.masks) and torch.equal(x.boxes, y.boxes) for x, y in zip(a.aux, b.aux))
    # without any conditioned query the attention runs over fewer keys: equal up to float rounding
    torch.testing.assert_close(a.final.logits, none.final.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.final.masks, none.final.masks, rtol=1e-4, atol=1e-4)
    assert not torch.equal(a.conditioned.predictions[-1].masks, b.conditioned.predictions[-1].masks)


def test_conditioned_groups_are_independent(seg_batch, monkeypatch):
    """Two noisy groups: changing the noise of group 1 leaves group 0's outputs bit-identical."""
    torch.manual_seed(0)
    model = build_openseed("tiny").eval()

    def run(second_group_shift):
        def jitter(boxes, scale):  # one call per image over both groups, group-major: shift group 1 only
            half = boxes.shape[0] // 2
            return torch.cat([boxes[:half], (boxes[half:] + second_group_shift).clamp(0.01, 0.99)])

        monkeypatch.setattr(decoder_module, "jitter_boxes", jitter)
        conditions = _conditions(seg_batch)
        conditions.add_noise, conditions.num_groups = True, 2
        with torch.no_grad():
            return model(seg_batch, conditions=conditions)

    first, second = run(0.02), run(-0.04)
    slots = first.conditioned.target_index.shape[1] // 2
    for x, y in zip(first.conditioned.predictions, second.conditioned.predictions):
        assert torch.equal(x.masks[:, :slots], y.masks[:, :slots]) and torch.equal(x.logits[:, :slots],
                                                                                   y.logits[:, :slots])
    assert not torch.equal(first.conditioned.predictions[-1].masks[:, slots:],
                           second.conditioned.predictions[-1].masks[:, slots:])
    valid = first.conditioned.target_index[:, :slots]
    assert torch.equal(valid, first.conditioned.target_index[:, slots:])  # both groups carry every target once
    assert [int((row >= 0).sum()) for row in valid] == [len(t) for t in seg_batch.targets]


def test_box_prompted_decoding(seg_batch):
    torch.manual_seed(0)
    model = build_openseed("tiny")
    boxes = [torch.tensor([[10.0, 12.0, 60.0, 70.0], [0.0, 0.0, 128.0, 128.0], [30.0, 30.0, 31.0, 31.0]]),
             torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    names = [["red circle", "sky", "blue ring"], ["green square"]]
    first = model.segment_boxes(seg_batch.images, seg_batch.padding_mask, boxes, names)
    second = model.segment_boxes(seg_batch.images, seg_batch.padding_mask, boxes, names)
    assert model.training  # the mode is restored
    for i, masks in enumerate(first):
        height, width = seg_batch.targets[i].image_size
        assert masks.shape == (len(boxes[i]), height, width) and masks.dtype == torch.bool
        assert torch.equal(masks, second[i])
    with pytest.raises(ValueError, match="3 boxes but 2 names"):
        model.segment_boxes(seg_batch.images, seg_batch.padding_mask, boxes, [names[0][:2], names[1]])


def test_ablation_switches(seg_batch, det_batch):
    torch.manual_seed(0)
    criterion = SetCriterion(num_points=256)  # not decoupled: read from the outputs (num_bg == 0)
    coupled = build_openseed("tiny", decoupled=False)
    outputs, losses = _losses(coupled, criterion, seg_batch)
    assert outputs.num_fg == 15 and outputs.num_bg == 0 and all(torch.isfinite(v) for v in losses.values())
    plain = build_openseed("tiny", conditioned=False)
    outputs = plain(seg_batch)
    assert outputs.conditioned is None
    assert not any("cond" in name for name, _ in plain.named_parameters())
    online = SetCriterion(num_points=256, mask_assistance="online")
    _, losses = _losses(build_openseed("tiny"), online, det_batch)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="unknown model option"):
        build_openseed("tiny", hiden_dim=3)


def test_inference_mask_modes_give_the_same_masks_they_keep(seg_batch):
    """``masks="final"`` (the predictor, the evaluation loop) and ``masks="prompts"`` (box prompts) compute the masks
    they keep exactly as ``masks="all"`` does, and no others; logits and boxes of every layer are unchanged."""
    torch.manual_seed(0)
    model = build_openseed("tiny").eval()
    images, padding, vocabulary = seg_batch.images, seg_batch.padding_mask, seg_batch.vocabulary
    with torch.no_grad():
        full = model.forward_images(images, padding, vocabulary)
        final = model.forward_images(images, padding, vocabulary, masks="final")
        pixel_boxes = [t.boxes[:3] for t in seg_batch.targets]
        labels = [t.labels[:3] for t in seg_batch.targets]
        prompted_all = model.decode_boxes(images, padding, vocabulary, pixel_boxes, labels)
        prompted = model.decode_boxes(images, padding, vocabulary, pixel_boxes, labels, masks="prompts")
    for ours, theirs in [(final.final, full.final), (final.proposals, full.proposals), *zip(final.aux, full.aux)]:
        assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.boxes, theirs.boxes)
    assert torch.equal(final.final.masks, full.final.masks)
    assert final.proposals.masks is None and all(p.masks is None for p in final.aux)
    last, last_all = prompted.conditioned.predictions[-1], prompted_all.conditioned.predictions[-1]
    torch.testing.assert_close(last.masks, last_all.masks, rtol=1e-5, atol=1e-5)  # fewer rows through the MLP
    assert torch.equal(last.logits, last_all.logits)
    assert prompted.final.masks is None and all(p.masks is None for p in prompted.conditioned.predictions[:-1])
    with pytest.raises(ValueError, match="masks must be one of"):
        model.forward_images(images, padding, vocabulary, masks="some")
