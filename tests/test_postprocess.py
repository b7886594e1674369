"""Post-processing on hand-built outputs with known answers (the reference's rules; the recorded reference outputs
themselves are in test_reference_postprocess.py)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from openseed.core.batch import Targets
from openseed.core.boxes import targets_to_model_boxes
from openseed.core.coco import box_prompt_to_coco, instances_to_coco
from openseed.core.outputs import Outputs, Prediction
from openseed.core.predictions import BoxPromptMasks
from openseed.core.vocabulary import Category, Vocabulary
from openseed.modeling.postprocess import (
    InferenceConfig,
    instance_inference,
    model_boxes_to_original,
    panoptic_class_probs,
    panoptic_inference,
    panoptic_keep,
    postprocess_batch,
    resize_masks_to_original,
    semantic_inference,
    semantic_labels,
)

# 5 classes: 0, 1, 4 things; 2, 3 stuff; the data set's ids are not contiguous.
IS_THING = [True, True, False, False, True]
CATEGORY_IDS = [1, 5, 90, 100, 7]
K = len(IS_THING)


def confident(label: int, num_classes: int = K) -> torch.Tensor:
    row = torch.full((num_classes,), -10.0)
    row[label] = 10.0
    return row


def region_mask(size: tuple[int, int], rows: slice, cols: slice, inside: float = 10.0,
                outside: float = -10.0) -> torch.Tensor:
    mask = torch.full(size, outside)
    mask[rows, cols] = inside
    return mask


def png_equivalent(panoptic_seg: torch.Tensor) -> dict[int, tuple[int, list[int]]]:
    """Write the id map as a COCO panoptic PNG (id = R + 256 G + 256^2 B), read it back, and measure each segment."""
    ids = panoptic_seg.numpy().astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    back = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.uint32)
    back = back[..., 0] + 256 * back[..., 1] + 256**2 * back[..., 2]
    measured = {}
    for segment_id in np.unique(back):
        if segment_id == 0:
            continue
        ys, xs = np.nonzero(back == segment_id)
        measured[int(segment_id)] = (len(ys), [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                               int(ys.max() - ys.min() + 1)])
    return measured


# ---------------------------------------------------------------------------------------------------------- panoptic
def test_temperature_probabilities_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    probs = panoptic_class_probs(logits, 0.06)
    sig = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.5)]
    expected = math.exp(sig[0] / 0.06) / sum(math.exp(s / 0.06) for s in sig)
    assert probs[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert probs[0, 0].item() == pytest.approx(0.98665, abs=1e-4)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_panoptic_stuff_merges_things_separate_low_score_dropped():
    size = (8, 8)
    logits = torch.stack([confident(2), confident(2), confident(0), confident(0), torch.full((K,), -2.0)])
    masks = torch.stack([
        region_mask(size, slice(0, 8), slice(0, 4)),  # stuff 2, left half
        region_mask(size, slice(0, 4), slice(4, 8)),  # stuff 2, top right
        region_mask(size, slice(4, 6), slice(4, 8)),  # thing 0
        region_mask(size, slice(6, 8), slice(4, 8)),  # thing 0
        torch.full(size, 10.0),  # max sigmoid 0.12 < 0.25: dropped although its mask covers everything
    ])
    seg, info = panoptic_inference(logits, masks, IS_THING, CATEGORY_IDS, InferenceConfig())
    assert seg.dtype == torch.int32 and seg.shape == size
    expected = torch.zeros(size, dtype=torch.int32)
    expected[:, :4] = 1
    expected[:4, 4:] = 1
    expected[4:6, 4:] = 2
    expected[6:8, 4:] = 3
    assert torch.equal(seg, expected)
    assert [s["id"] for s in info] == [1, 2, 3]
    assert [s["category_id"] for s in info] == [90, 1, 1]
    assert [s["isthing"] for s in info] == [False, True, True]
    assert [s["area"] for s in info] == [48, 8, 8]
    assert [s["bbox"] for s in info] == [[0, 0, 8, 8], [4, 4, 4, 2], [4, 6, 4, 2]]
    assert all(0.25 < s["score"] <= 1.0 for s in info)
    measured = png_equivalent(seg)
    assert measured == {s["id"]: (s["area"], s["bbox"]) for s in info}
    json.dumps(info)  # plain Python types only
    # deterministic
    seg2, info2 = panoptic_inference(logits, masks, torch.tensor(IS_THING), CATEGORY_IDS)
    assert torch.equal(seg, seg2) and info == info2


def test_panoptic_overlap_threshold_drops_covered_query_and_voids_its_pixels():
    size = (8, 8)
    logits = torch.stack([confident(0), confident(1)])
    masks = torch.stack([
        region_mask(size, slice(0, 6), slice(0, 8), inside=10.0),  # 48 px, prob ~1
        region_mask(size, slice(2, 8), slice(0, 8), inside=3.0),  # 48 px, prob 0.95: loses rows 2-5, keeps 16 / 48
    ])
    seg, info = panoptic_inference(logits, masks, IS_THING, CATEGORY_IDS)
    expected = torch.zeros(size, dtype=torch.int32)
    expected[:6] = 1
    assert torch.equal(seg, expected)  # rows 6-7 were won by the dropped query: void
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 1, 48)]
    # with a lenient threshold the second query survives on the pixels it won
    seg, info = panoptic_inference(logits, masks, IS_THING, CATEGORY_IDS, InferenceConfig(overlap_threshold=0.3))
    expected[6:] = 2
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 1, 48), (2, 5, 16)]
    assert png_equivalent(seg) == {s["id"]: (s["area"], s["bbox"]) for s in info}


def test_panoptic_pixels_follow_score_times_mask_probability():
    size = (8, 8)
    half = torch.full((K,), -10.0)
    half[0] = half[1] = 10.0  # two tied classes: score ~0.5, label 0 (first maximum)
    logits = torch.stack([half, confident(1)])
    scores = panoptic_class_probs(logits).max(dim=-1).values
    assert scores[0].item() == pytest.approx(0.5, abs=1e-3) and scores[1].item() == pytest.approx(1.0, abs=1e-3)
    masks = torch.stack([
        torch.full(size, math.log(9.0)),  # prob 0.9 everywhere -> 0.45
        region_mask(size, slice(0, 1), slice(0, 8), inside=math.log(1.5)),  # prob 0.6 on row 0 -> 0.6 beats 0.45
    ])
    seg, info = panoptic_inference(logits, masks, IS_THING, CATEGORY_IDS)
    expected = torch.ones(size, dtype=torch.int32)
    expected[0] = 2
    assert torch.equal(seg, expected)
    assert [(s["category_id"], s["area"]) for s in info] == [(1, 56), (5, 8)]
    # pixels where the winner's own probability is < 0.5 are void
    masks[0, 4:] = -1.0
    seg, info = panoptic_inference(logits, masks, IS_THING, CATEGORY_IDS, InferenceConfig(overlap_threshold=0.5))
    expected[4:] = 0
    assert torch.equal(seg, expected)


def test_panoptic_nothing_kept_is_all_void():
    seg, info = panoptic_inference(torch.full((3, K), -2.0), torch.full((3, 4, 5), 10.0), IS_THING, CATEGORY_IDS)
    assert info == [] and seg.shape == (4, 5) and not seg.any()


def test_panoptic_keeps_by_max_sigmoid_then_scores_by_the_temperature_softmax():
    """Kept: max sigmoid > 0.25 (not the max of the softmax); the kept query's score and label come from the
    softmax. A flat row (sigmoid 0.5 everywhere, softmax 1/K) is kept; a peaked row with sigmoid 0.2 (softmax 0.87)
    is not."""
    flat = torch.zeros(K)
    peaked = torch.full((K,), -10.0)
    peaked[1] = math.log(0.2 / 0.8)  # sigmoid 0.2
    logits = torch.stack([flat, peaked])
    assert panoptic_keep(logits).tolist() == [True, False]
    probs = panoptic_class_probs(logits)
    assert probs[0].max().item() == pytest.approx(1 / K) and probs[1].max().item() > 0.85
    size = (4, 5)
    seg, info = panoptic_inference(logits, torch.full((2, *size), 10.0), IS_THING, CATEGORY_IDS)
    assert (seg == 1).all()
    assert [(s["category_id"], s["isthing"]) for s in info] == [(1, True)]  # first maximum of a flat softmax: label 0
    assert info[0]["score"] == pytest.approx(1 / K)
    # only the peaked query: nothing kept, although its softmax score is 0.87
    seg, info = panoptic_inference(logits[1:], torch.full((1, *size), 10.0), IS_THING, CATEGORY_IDS)
    assert info == [] and not seg.any()


def test_panoptic_overlap_divides_all_won_pixels_by_the_own_area():
    """The reference code's overlap rule: area(won, whatever the own probability) / area(own) >= 0.8; the segment
    holds only the won pixels with own probability >= 0.5. Here query 0 owns rows 0-1 (16 px), loses row 0 to query
    1 and wins rows 1-7 (56 px, rows 2-7 at probability 0.4): 56 / 16 >= 0.8 -> a segment of row 1 only (the
    paraphrase area(won and own) / area(own) = 8 / 16 would drop it)."""
    size = (8, 8)
    logits = torch.stack([confident(0), confident(1)])
    first = torch.full(size, math.log(0.4 / 0.6))  # prob 0.4
    first[:2] = math.log(9.0)  # prob 0.9 on rows 0-1
    second = region_mask(size, slice(0, 1), slice(0, 8), inside=math.log(19.0))  # prob 0.95 on row 0
    seg, info = panoptic_inference(logits, torch.stack([first, second]), IS_THING, CATEGORY_IDS)
    expected = torch.zeros(size, dtype=torch.int32)
    expected[1] = 1
    expected[0] = 2
    assert torch.equal(seg, expected)  # rows 2-7: won by query 0 below 0.5: void
    assert [(s["id"], s["category_id"], s["area"]) for s in info] == [(1, 1, 8), (2, 5, 8)]
    # a query must still hold some won pixel with probability >= 0.5: query 0 without any own pixel it wins
    first[1] = math.log(0.4 / 0.6)
    seg, info = panoptic_inference(logits, torch.stack([first, second]), IS_THING, CATEGORY_IDS)
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 5)] and int((seg == 1).sum()) == 8


# ---------------------------------------------------------------------------------------------------------- instance
def _instance_case():
    # 3 fg queries + 1 bg query, 3 classes
    logits = torch.tensor([
        [2.0, -1.0, 0.0],
        [-3.0, 1.0, -2.0],
        [0.5, -4.0, 3.0],
        [20.0, 20.0, 20.0],  # a confident bg query: never used
    ])
    boxes = torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6], [0, 0, 8, 8]])
    size = (6, 8)
    masks = torch.full((4, *size), -10.0)
    masks[0, :2, :2] = math.log(3.0)  # prob 0.75 on 4 px
    masks[0, 2:4, :2] = math.log(9.0)  # prob 0.9 on 4 px -> mean 0.825
    masks[1, 3, 3] = 0.0  # prob 0.5, not > 0.5: empty mask -> score 0
    masks[2] = 10.0
    masks[3] = 10.0
    return logits, masks, boxes


def test_instance_topk_fg_only_rescoring_and_boxes():
    logits, masks, boxes = _instance_case()
    result = instance_inference(logits, masks, boxes, InferenceConfig(top_k=4), num_fg=3)
    # top 4 of sigmoid over fg queries x classes: (2,2)=3.0, (0,0)=2.0, (1,1)=1.0, (2,0)=0.5
    assert result.labels.tolist() == [2, 0, 1, 0]
    assert torch.equal(result.boxes, boxes[[2, 0, 1, 2]])
    raw = torch.tensor([3.0, 2.0, 1.0, 0.5]).sigmoid()
    mean_prob = torch.tensor([torch.tensor(10.0).sigmoid().item(), 0.825, 0.0, torch.tensor(10.0).sigmoid().item()])
    assert torch.allclose(result.scores, raw * mean_prob, atol=1e-6)
    assert result.masks.dtype == torch.bool and result.masks.shape == (4, 6, 8)
    assert torch.equal(result.masks[1], masks[0] > 0) and not result.masks[2].any()
    # top-k is capped at fg queries x classes; the bg query (20.0 everywhere) never appears
    everything = instance_inference(logits, masks, boxes, InferenceConfig(top_k=100), num_fg=3)
    assert len(everything.scores) == 9
    assert not any(torch.equal(b, boxes[3]) for b in everything.boxes)
    # with instance_from_fg_only=False the bg query wins
    with_bg = instance_inference(logits, masks, boxes, InferenceConfig(top_k=3, instance_from_fg_only=False), 3)
    assert torch.equal(with_bg.boxes, boxes[[3, 3, 3]]) and with_bg.labels.tolist() == [0, 1, 2]
    # boxes only
    no_masks = instance_inference(logits, None, boxes, InferenceConfig(top_k=2), num_fg=3)
    assert no_masks.masks is None and torch.allclose(no_masks.scores, torch.tensor([3.0, 2.0]).sigmoid())


def test_instance_stuff_labels_dropped_after_the_topk():
    """As the reference on panoptic data: the top-k runs over every class, then the stuff pairs go (fewer than k)."""
    logits, masks, boxes = _instance_case()
    is_thing = [True, False, True]
    result = instance_inference(logits, masks, boxes, InferenceConfig(top_k=4), num_fg=3, is_thing=is_thing)
    # top 4: (2,2)=3.0, (0,0)=2.0, (1,1)=1.0 (stuff: dropped), (2,0)=0.5
    assert result.labels.tolist() == [2, 0, 0]
    assert torch.equal(result.boxes, boxes[[2, 0, 2]]) and result.masks.shape == (3, 6, 8)
    everything = instance_inference(logits, masks, boxes, InferenceConfig(top_k=4), num_fg=3)
    assert torch.equal(result.scores, everything.scores[[0, 1, 3]])
    # dropping before the top-k would have let a fourth thing pair in: (0, 2) at sigmoid(0)
    assert torch.tensor(is_thing)[everything.labels].sum() == 3


def test_instances_to_coco_round_trip():
    logits, masks, boxes = _instance_case()
    result = instance_inference(logits, masks, boxes, InferenceConfig(top_k=4), num_fg=3)
    records = instances_to_coco(result, image_id=42, category_ids=[11, 22, 33])
    assert len(records) == 4
    json.loads(json.dumps(records))
    for record, mask, box, label, score in zip(records, result.masks, result.boxes, result.labels,
                                               result.scores):
        assert record["image_id"] == 42 and record["category_id"] == [11, 22, 33][label]
        assert record["score"] == pytest.approx(score.item())
        x0, y0, x1, y1 = box.tolist()
        assert record["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
        assert isinstance(record["segmentation"]["counts"], str)
        assert record["segmentation"]["size"] == [6, 8]
        assert np.array_equal(mask_util.decode(record["segmentation"]).astype(bool), mask.numpy())
    no_masks = instance_inference(logits, None, boxes, InferenceConfig(top_k=2), num_fg=3)
    assert all("segmentation" not in r for r in instances_to_coco(no_masks, 1, [11, 22, 33]))


# ---------------------------------------------------------------------------------------------------------- semantic
def test_semantic_sums_and_argmax():
    logits = torch.tensor([[2.0, -2.0, 0.0], [-2.0, 1.0, -1.0]])
    masks = torch.tensor([
        [[4.0, 4.0], [-4.0, -4.0]],  # query 0 (mostly class 0): top row
        [[-4.0, 0.0], [4.0, 4.0]],  # query 1 (mostly class 1): bottom row, half on (0, 1)
    ])
    mask_p = masks.sigmoid()
    softmax_p = [[math.exp(_sig(v) / 0.06) / sum(math.exp(_sig(u) / 0.06) for u in row) for v in row]
                 for row in logits.tolist()]  # the reference's class probabilities, by hand
    sigmoid_p = [[_sig(v) for v in row] for row in logits.tolist()]
    for mode, class_p in (("softmax", softmax_p), ("sigmoid", sigmoid_p)):
        scores = semantic_inference(logits, masks) if mode == "softmax" else semantic_inference(logits, masks, mode)
        assert scores.shape == (3, 2, 2)
        for k in range(3):
            for y in range(2):
                for x in range(2):
                    expected = class_p[0][k] * mask_p[0, y, x].item() + class_p[1][k] * mask_p[1, y, x].item()
                    assert scores[k, y, x].item() == pytest.approx(expected, rel=1e-5)
        assert semantic_labels(scores).tolist() == [[0, 0], [1, 1]]
        assert semantic_labels(scores, [10, 20, 30]).tolist() == [[10, 10], [20, 20]]
    with pytest.raises(ValueError, match="class_probs"):
        semantic_inference(logits, masks, "softmax2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="semantic_class_probs"):
        InferenceConfig(semantic_class_probs="bogus")  # type: ignore[arg-type]


def _sig(value: float) -> float:
    return 1 / (1 + math.exp(-value))


# ---------------------------------------------------------------------------------------------------------- resizing
PADDED, IMAGE, ORIG = (64, 96), (48, 64), (24, 40)


def test_masks_cropped_from_valid_region():
    low = torch.full((3, 16, 24), -10.0)
    low[0, :12, :16] = 10.0  # exactly the valid region at 1/4
    low[1, 12:, :] = 10.0  # only padding
    low[1, :, 16:] = 10.0
    low[2, :12, :8] = 10.0  # left half of the valid region
    out = resize_masks_to_original(low, PADDED, IMAGE, ORIG, chunk_size=2)
    assert out.shape == (3, *ORIG) and out.dtype == torch.float32
    assert (out[0] > 0).all()
    assert not (out[1] > 0).any()
    assert (out[2][:, :19] > 0).all() and not (out[2][:, 21:] > 0).any()
    # no-op when everything already has the right size
    same = torch.randn(2, 8, 8)
    assert torch.allclose(resize_masks_to_original(same, (8, 8), (8, 8), (8, 8)), same)


def test_mask_resizing_is_bilinear_crop_then_antialiased_bicubic():
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(5, 16, 24, generator=generator) * 4
    out = resize_masks_to_original(low, PADDED, IMAGE, ORIG, chunk_size=2)
    up = torch.nn.functional.interpolate(low[None], size=PADDED, mode="bilinear", align_corners=False)
    crop = up[..., : IMAGE[0], : IMAGE[1]]
    expected = torch.nn.functional.interpolate(crop, size=ORIG, mode="bicubic", align_corners=False, antialias=True)[0]
    assert torch.equal(out, expected)  # chunks of 2 queries: the same numbers as all at once
    assert not torch.allclose(out, torch.nn.functional.interpolate(crop, size=ORIG, mode="bilinear")[0], atol=1e-3)


def test_boxes_map_back_to_original():
    valid = torch.tensor([[0.0, 0.0, IMAGE[1], IMAGE[0]], [8.0, 4.0, 40.0, 60.0]])
    model_boxes = targets_to_model_boxes(valid, PADDED)
    # straight from the box head: xyxy x (padded / image x orig), one multiplication
    out = model_boxes_to_original(model_boxes, PADDED, IMAGE, ORIG)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.0, ORIG[1], ORIG[0]]), atol=1e-4)
    # x scaled by 40 / 64, y by 24 / 48, and the part in the padding (y up to 60 > 48) clipped
    assert torch.allclose(out[1], torch.tensor([5.0, 2.0, 25.0, 24.0]), atol=1e-4)
    unclipped = model_boxes_to_original(model_boxes, PADDED, IMAGE, ORIG, clip=False)
    assert torch.allclose(unclipped[1], torch.tensor([5.0, 2.0, 25.0, 30.0]), atol=1e-4)
    assert unclipped[1, 3].item() == pytest.approx(30.0)


# ---------------------------------------------------------------------------------------------------------- batches
def _targets(image_size, orig_size, image_id):
    empty = torch.zeros(0, dtype=torch.bool)
    return Targets(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4), masks=None, is_thing=empty,
                   mask_is_pseudo=empty, has_mask=empty, ignore_mask=None, image_id=image_id, orig_size=orig_size,
                   image_size=image_size)


def _outputs():
    vocab = Vocabulary([Category(cid, f"c{cid}", thing, (f"c{cid}",)) for cid, thing in zip(CATEGORY_IDS, IS_THING)])
    batch, num_fg, num_bg = 2, 2, 2
    logits = torch.stack([torch.stack([confident(0), confident(1), confident(2), torch.zeros(K)])] * batch)
    logits[:, 3, 4] = 30.0  # bg query with a huge thing score: excluded from instances
    boxes_px = torch.tensor([[0.0, 0.0, IMAGE[1], IMAGE[0]], [0.0, 0.0, 32.0, 24.0], [0, 0, 96, 64], [0, 0, 8, 8]])
    boxes = targets_to_model_boxes(boxes_px, PADDED)[None].repeat(batch, 1, 1)
    masks = torch.full((batch, 4, 16, 24), -10.0)
    masks[:, 0, :6, :] = 10.0  # top half of the valid region (and padding)
    masks[:, 1, 6:12, :8] = 10.0  # bottom left quarter
    masks[:, 2, 6:, 8:] = 10.0  # stuff: bottom right quarter
    masks[:, 3] = -10.0  # empty: no panoptic segment (top-k picks before mask rescoring, so fg-only is still tested)
    final = Prediction(logits=logits, boxes=boxes, masks=masks)
    outputs = Outputs(final=final, aux=[], proposals=final, conditioned=None, num_fg=num_fg, num_bg=num_bg)
    return outputs, vocab


def test_postprocess_batch_all_tasks():
    outputs, vocab = _outputs()
    targets = [_targets(IMAGE, ORIG, 7), _targets(IMAGE, (96, 128), 8)]
    pan = postprocess_batch(outputs, targets, vocab, PADDED, "panoptic")
    assert [r.image_id for r in pan] == [7, 8]
    seg, info = pan[0].panoptic_seg, pan[0].segments_info
    assert seg.shape == ORIG
    assert [(s["category_id"], s["isthing"]) for s in info] == [(1, True), (5, True), (90, False)]
    assert (seg[:12] == 1).all() and (seg[12:, :19] == 2).all() and (seg[12:, 21:] == 3).all()
    assert ((seg[12:, 19:21] == 2) | (seg[12:, 19:21] == 3)).all()  # the bilinear seam: either neighbour
    assert pan[1].panoptic_seg.shape == (96, 128)
    # padded_size inferred from the mask size; explicit sizes instead of targets
    pan_sizes = postprocess_batch(outputs, [(IMAGE, ORIG), (IMAGE, (96, 128))], vocab, None, "panoptic")
    assert torch.equal(pan_sizes[0].panoptic_seg, seg) and pan_sizes[0].image_id is None

    inst = postprocess_batch(outputs, targets, vocab, PADDED, "instance", InferenceConfig(top_k=3))
    first = inst[0]
    # fg queries 0 and 1 only: the bg query's 30.0 never appears; the third pick is a tie at sigmoid(-10), broken by
    # (query, class) order -> query 0, class 1
    assert first.labels.tolist() == [0, 1, 1]
    assert torch.equal(first.boxes[2], first.boxes[0])
    assert torch.allclose(first.boxes[0], torch.tensor([0.0, 0.0, ORIG[1], ORIG[0]]), atol=1e-4)
    assert torch.allclose(first.boxes[1], torch.tensor([0.0, 0.0, 20.0, 12.0]), atol=1e-4)
    assert first.masks.shape == (3, *ORIG)
    assert first.masks[0][:12].all() and not first.masks[0][12:].any()
    direct = instance_inference(outputs.final.logits[0],
                                resize_masks_to_original(outputs.final.masks[0], PADDED, IMAGE, ORIG),
                                model_boxes_to_original(outputs.final.boxes[0], PADDED, IMAGE, ORIG),
                                InferenceConfig(top_k=3), outputs.num_fg)
    for key in ("scores", "labels", "boxes", "masks"):
        assert torch.allclose(getattr(first, key).float(), getattr(direct, key).float())
    with pytest.raises(TypeError, match=r"fields are attributes \(instances\.boxes\)"):
        first["boxes"]  # the dict results of earlier versions: a clear error, not a tensor-indexing one
    # things_only drops the stuff pairs after the top-k; clip_boxes=False leaves boxes past the image as they are
    inst_things = postprocess_batch(outputs, targets, vocab, PADDED, "instance", InferenceConfig(top_k=3),
                                    things_only=True)
    assert inst_things[0].labels.tolist() == [0, 1, 1]  # no stuff among the top 3 here: unchanged
    # with the bg query too, the top 4 are (3, 4), (0, 0), (1, 1), (2, 2): the last is stuff and goes afterwards
    with_bg = InferenceConfig(top_k=4, instance_from_fg_only=False)
    kept = postprocess_batch(outputs, targets, vocab, PADDED, "instance", with_bg, things_only=True)
    assert kept[0].labels.tolist() == [4, 0, 1]
    unclipped = postprocess_batch(outputs, targets, vocab, PADDED, "instance",
                                  InferenceConfig(top_k=4, instance_from_fg_only=False, clip_boxes=False))
    clipped = postprocess_batch(outputs, targets, vocab, PADDED, "instance", with_bg)
    assert unclipped[0].labels.tolist() == [4, 0, 1, 2] and clipped[0].labels.tolist() == [4, 0, 1, 2]
    # query 2's box covers the padded frame (96 x 64): 60 x 32 in the original, clipped to 40 x 24
    assert torch.allclose(unclipped[0].boxes[3], torch.tensor([0.0, 0.0, 60.0, 32.0]), atol=1e-4)
    assert torch.allclose(clipped[0].boxes[3], torch.tensor([0.0, 0.0, 40.0, 24.0]), atol=1e-4)

    sem = postprocess_batch(outputs, targets, vocab, PADDED, "semantic", InferenceConfig(chunk_size=3),
                            return_semantic_scores=True)
    assert sem[0].sem_seg.shape == ORIG and sem[0].scores.shape == (K, *ORIG)
    expected = semantic_inference(outputs.final.logits[0],
                                  resize_masks_to_original(outputs.final.masks[0], PADDED, IMAGE, ORIG))
    assert torch.allclose(sem[0].scores, expected, atol=1e-5)
    assert torch.equal(sem[0].sem_seg, semantic_labels(expected))

    with pytest.raises(ValueError):
        postprocess_batch(outputs, targets, vocab, PADDED, "bogus")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- prompts
def test_box_prompt_records():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 10, 12, generator=generator) > 0.5
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [2.0, 3.0, 12.0, 10.0], [1.5, 1.0, 2.5, 4.0]])
    prompted = BoxPromptMasks(masks, boxes, ["cat", "dog", "sky"])
    records = box_prompt_to_coco(prompted, image_id=3, scores=torch.tensor([0.9, 0.8, 0.7]))
    assert len(records) == 3
    json.loads(json.dumps(records))
    for record, mask, name in zip(records, masks, ["cat", "dog", "sky"]):
        assert record["category_name"] == name and record["image_id"] == 3
        assert np.array_equal(mask_util.decode(record["segmentation"]).astype(bool), mask.numpy())
        assert record["area"] == int(mask.sum())
    assert records[1]["bbox"] == pytest.approx([2.0, 3.0, 10.0, 7.0])
    assert records[2]["score"] == pytest.approx(0.7)
    assert box_prompt_to_coco(BoxPromptMasks(masks[:1], boxes[:1], ["cat"]), 3)[0]["score"] == 1.0
    assert box_prompt_to_coco(BoxPromptMasks(masks[:0], boxes[:0], []), 3) == []
    with pytest.raises(ValueError, match="3 masks, 2 boxes and 3 names must match"):
        box_prompt_to_coco(BoxPromptMasks(masks, boxes[:2], ["cat", "dog", "sky"]), 3)
