"""``bg_training``: how the background queries' content and anchors learn.

"reference" (the released-architecture presets) does what the authors' decoupled decoder does: its proposal
("interm") outputs carry the bg queries' rows (content through the heads, ``sigmoid(anchor)`` as the box), the bg
queries enter the decoder detached, and the proposals are matched fg x things + bg x stuff on segmentation data and
every row x every target on detection data. "openseed" (the CPU sizes) is the computation as it was before the
switch existed.
"""

import pytest
import torch

from openseed.losses.criterion import SetCriterion
from openseed.modeling.decoder import OpenSeeDDecoder
from openseed.modeling.openseed import MODEL_SIZES, build_openseed


def _run(model, criterion, batch, seed=1):
    torch.manual_seed(seed)
    outputs = model(batch)
    losses = criterion(outputs, batch)
    return outputs, losses


def _bg_params(model):
    return [model.decoder.bg_anchor.weight, model.decoder.bg_content.weight]


def test_switch_values_and_presets():
    assert all(MODEL_SIZES[name].bg_training == "reference"
               for name in ("swint_nodecouple", "swint_decouple", "swinl_decouple"))
    assert MODEL_SIZES["tiny"].bg_training == "openseed" and MODEL_SIZES["small"].bg_training == "openseed"
    assert build_openseed("tiny", bg_training="reference").decoder.bg_training == "reference"
    with pytest.raises(ValueError, match="bg_training"):
        OpenSeeDDecoder(64, 32, 64, num_fg=4, num_bg=2, num_layers=1, bg_training="detached")
    with pytest.raises(ValueError, match="bg_training"):
        build_openseed("tiny", bg_training="detached")


def test_reference_proposals_carry_the_bg_queries(seg_batch):
    """In training the proposals are [B, num_fg + num_bg, ...]: the fg rows as before, the bg rows the bg content
    through the decoder's norm and the class / mask heads, with boxes sigmoid(bg anchor) (no box head); the same rows
    as the first prediction's bg rows. In eval the proposals stay fg only."""
    torch.manual_seed(0)
    model = build_openseed("tiny", bg_training="reference")
    decoder = model.decoder
    num_fg, num_bg = decoder.num_fg, decoder.num_bg
    with torch.no_grad():
        memory = model.encode_images(seg_batch.images, seg_batch.padding_mask)
        text = torch.randn(7, MODEL_SIZES["tiny"].text_dim)
        out = decoder.train()(memory, text)
        batch = seg_batch.images.shape[0]
        assert out.proposals.logits.shape == (batch, num_fg + num_bg, 7)
        assert out.proposals.boxes.shape == (batch, num_fg + num_bg, 4)
        assert out.proposals.masks.shape[:2] == (batch, num_fg + num_bg)
        assert (out.num_fg, out.num_bg) == (num_fg, num_bg)

        hidden = decoder.norm(decoder.bg_content.weight)[None].expand(batch, -1, -1)
        torch.testing.assert_close(out.proposals.logits[:, num_fg:], decoder.class_head(hidden, text))
        torch.testing.assert_close(out.proposals.boxes[:, num_fg:],
                                   decoder.bg_anchor.weight.sigmoid()[None].expand(batch, -1, -1))
        masks = torch.einsum("bqc,bchw->bqhw", decoder.mask_head(hidden), memory.mask_features)
        torch.testing.assert_close(out.proposals.masks[:, num_fg:], masks)
        first = out.aux[0]
        torch.testing.assert_close(out.proposals.logits[:, num_fg:], first.logits[:, num_fg:])
        torch.testing.assert_close(out.proposals.boxes[:, num_fg:], first.boxes[:, num_fg:])

        decoder.bg_training = "openseed"  # the same weights: the fg rows and the decoder are unchanged
        plain = decoder(memory, text)
        assert plain.proposals.logits.shape == (batch, num_fg, 7)
        torch.testing.assert_close(out.proposals.logits[:, :num_fg], plain.proposals.logits)
        torch.testing.assert_close(out.proposals.boxes[:, :num_fg], plain.proposals.boxes)
        torch.testing.assert_close(out.final.logits, plain.final.logits)
        decoder.bg_training = "reference"

        evaluated = decoder.eval()(memory, text)
        assert evaluated.proposals.logits.shape == (batch, num_fg, 7)  # inference never reads the bg rows


def test_reference_bg_queries_learn_through_the_proposals_only(seg_batch):
    """"reference": no loss but the proposals' reaches the bg content or anchors (they enter the decoder detached);
    the proposals' loss reaches both. "openseed": the decoder's losses reach both."""
    torch.manual_seed(0)
    model, criterion = build_openseed("tiny", bg_training="reference"), SetCriterion(num_points=256)
    _, losses = _run(model, criterion, seg_batch)
    decoder_loss = criterion.total_loss({k: v for k, v in losses.items() if not k.endswith("_proposals")})
    proposals_loss = criterion.total_loss({k: v for k, v in losses.items() if k.endswith("_proposals")})
    grads = torch.autograd.grad(decoder_loss, _bg_params(model), allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
    anchor, content = torch.autograd.grad(proposals_loss, _bg_params(model), retain_graph=True)
    assert float(anchor.abs().sum()) > 0 and float(content.abs().sum()) > 0
    box_loss = losses["loss_bbox_proposals"] + losses["loss_giou_proposals"]  # the anchors: through the boxes
    assert float(torch.autograd.grad(box_loss, model.decoder.bg_anchor.weight)[0].abs().sum()) > 0

    torch.manual_seed(0)
    model = build_openseed("tiny")
    _, losses = _run(model, criterion, seg_batch)
    decoder_loss = criterion.total_loss({k: v for k, v in losses.items() if not k.endswith("_proposals")})
    anchor, content = torch.autograd.grad(decoder_loss, _bg_params(model))
    assert float(anchor.abs().sum()) > 0 and float(content.abs().sum()) > 0


def _recording(criterion):
    """Records every matcher call's (groups, result) in order: final, aux..., proposals."""
    calls, match = [], criterion.matcher.forward

    def recording(pred, targets, groups=None, use_masks=True):
        result = match(pred, targets, groups, use_masks)
        calls.append((pred.logits.shape[1], groups, result))
        return result

    criterion.matcher.forward = recording
    return calls


def test_reference_proposal_matching_on_segmentation_is_decoupled(seg_batch):
    """Things to fg rows, stuff to bg rows (the reference's split at num_fg), every target matched."""
    torch.manual_seed(0)
    model, criterion = build_openseed("tiny", bg_training="reference"), SetCriterion(num_points=256)
    calls = _recording(criterion)
    outputs, losses = _run(model, criterion, seg_batch)
    num_fg = outputs.num_fg
    rows, _, matches = calls[-1]
    assert rows == num_fg + outputs.num_bg
    stuff_to_bg = 0
    for (queries, matched), target in zip(matches, seg_batch.targets, strict=True):
        assert sorted(matched.tolist()) == list(range(len(target)))
        thing = target.is_thing[matched]
        assert bool((queries[thing] < num_fg).all()) and bool((queries[~thing] >= num_fg).all())
        stuff_to_bg += int((~thing).sum())
    assert stuff_to_bg == sum(int((~t.is_thing).sum()) for t in seg_batch.targets) > 0
    # every row is supervised by the class loss (unmatched bg rows as negatives)
    logits_grad = torch.autograd.grad(losses["loss_class_proposals"], outputs.proposals.logits)[0]
    assert bool((logits_grad.abs().sum(-1) > 0).all())


def test_reference_proposal_matching_on_detection_uses_every_row(det_batch):
    """Detection data: the reference matches all its interm rows (fg and bg) to all targets, one group, and its
    class loss covers every row; the decoder's outputs still match fg queries only."""
    torch.manual_seed(0)
    model, criterion = build_openseed("tiny", bg_training="reference"), SetCriterion(num_points=256)
    calls = _recording(criterion)
    outputs, losses = _run(model, criterion, det_batch)
    total = outputs.num_fg + outputs.num_bg
    rows, groups, matches = calls[-1]
    assert rows == total
    assert all(len(image) == 1 and image[0][0] == slice(0, total) and image[0][1] is None for image in groups)
    for (_, matched), target in zip(matches, det_batch.targets, strict=True):
        assert sorted(matched.tolist()) == list(range(len(target)))
    for _, groups, _ in calls[:-1]:  # final and aux layers: fg queries only, as before
        assert all(image == [(slice(0, outputs.num_fg), None)] for image in groups)
    logits_grad = torch.autograd.grad(losses["loss_class_proposals"], outputs.proposals.logits)[0]
    assert bool((logits_grad[:, outputs.num_fg:].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("task", ["seg", "det"])
def test_openseed_is_the_default_and_bit_identical(seg_batch, det_batch, task):
    """The default builds the "openseed" model: same seed, same outputs, losses and gradients bit for bit; the
    proposals are the fg queries only and the bg anchors learn through the decoder's losses."""
    batch = seg_batch if task == "seg" else det_batch
    runs = []
    for options in ({}, {"bg_training": "openseed"}):
        torch.manual_seed(0)
        model, criterion = build_openseed("tiny", **options), SetCriterion(num_points=256)
        assert model.decoder.bg_training == "openseed"
        outputs, losses = _run(model, criterion, batch)
        criterion.total_loss(losses).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        runs.append((outputs, losses, grads))
    (first, first_losses, first_grads), (second, second_losses, second_grads) = runs
    assert first.proposals.logits.shape[1] == first.num_fg
    for name in ("logits", "boxes", "masks"):
        assert torch.equal(getattr(first.proposals, name), getattr(second.proposals, name))
        assert torch.equal(getattr(first.final, name), getattr(second.final, name))
    assert first_losses.keys() == second_losses.keys()
    assert all(torch.equal(first_losses[k], second_losses[k]) for k in first_losses)
    assert first_grads.keys() == second_grads.keys()
    assert all(torch.equal(first_grads[k], second_grads[k]) for k in first_grads)


def test_inference_is_the_same_with_either_setting(seg_batch):
    """The switch only changes training: the same weights give bit-identical eval outputs."""
    outputs = []
    for setting in ("openseed", "reference"):
        torch.manual_seed(0)
        model = build_openseed("tiny", bg_training=setting).eval()
        with torch.no_grad():
            outputs.append(model.forward_images(seg_batch.images, seg_batch.padding_mask, seg_batch.vocabulary))
    plain, reference = outputs
    for ours, theirs in [(plain.final, reference.final), (plain.proposals, reference.proposals),
                         *zip(plain.aux, reference.aux, strict=True)]:
        assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.boxes, theirs.boxes)
        assert torch.equal(ours.masks, theirs.masks)
