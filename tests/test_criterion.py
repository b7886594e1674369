"""SetCriterion on hand-built Outputs/Targets (B=2, Q=6 = 4 fg + 2 bg, K=5, padded 64x64, masks 16x16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from openseed.core.batch import Batch, Targets
from openseed.core.boxes import targets_to_model_boxes
from openseed.core.outputs import ConditionedOutputs, Outputs, Prediction
from openseed.core.vocabulary import Vocabulary
from openseed.losses.criterion import BASE_KEYS, SetCriterion
from openseed.losses.matcher import HungarianMatcher
from openseed.losses.point_sampling import uncertain_points_with_randomness

PADDED = (64, 64)
NUM_FG, NUM_BG, K = 4, 2, 5
NUM_AUX, NUM_COND_LAYERS, GROUPS = 2, 3, 2


def _targets(rects: list[tuple[int, int, int, int]], labels: list[int], things: list[bool],
             with_masks: bool = True) -> Targets:
    """Rectangles (x0, y0, w, h) in pixels, 4-aligned so that 16x16 logits represent them exactly."""
    n = len(rects)
    masks = torch.zeros(n, *PADDED, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for j, (x0, y0, w, h) in enumerate(rects):
        masks[j, y0:y0 + h, x0:x0 + w] = True
        boxes[j] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
    return Targets(
        labels=torch.tensor(labels, dtype=torch.long),
        boxes=boxes,
        masks=masks if with_masks else None,
        is_thing=torch.tensor(things, dtype=torch.bool),
        mask_is_pseudo=torch.zeros(n, dtype=torch.bool),
        has_mask=torch.full((n,), with_masks, dtype=torch.bool),
        ignore_mask=None,
        image_id=0,
        orig_size=PADDED,
        image_size=PADDED,
    )


def _batch(targets: list[Targets], task: str) -> Batch:
    """A batch of blank PADDED images around ``targets`` (the criterion reads its targets, task and padded size)."""
    return Batch(images=torch.zeros(len(targets), 3, *PADDED, dtype=torch.uint8),
                 padding_mask=torch.zeros(len(targets), *PADDED, dtype=torch.bool), targets=targets,
                 vocabulary=Vocabulary.from_names([f"class{i}" for i in range(K)]), task=task, dataset="test")


def seg_targets() -> list[Targets]:
    return [
        _targets([(4, 4, 16, 12), (32, 8, 20, 24), (0, 40, 64, 24)], [1, 3, 4], [True, True, False]),
        _targets([(8, 16, 24, 16), (0, 0, 64, 12), (36, 32, 28, 32)], [0, 2, 4], [True, False, False]),
    ]


def det_targets() -> list[Targets]:
    return [
        _targets([(4, 4, 16, 12), (32, 8, 20, 24), (8, 40, 40, 20)], [1, 3, 0], [True] * 3, with_masks=False),
        _targets([(8, 16, 24, 16)], [2], [True], with_masks=False),
    ]


def empty_targets(with_masks: bool = True) -> Targets:
    return _targets([], [], [], with_masks=with_masks)


def _assignment(targets: list[Targets], task: str) -> list[dict[int, int]]:
    """A valid assignment target -> query for the 'perfect' predictions (things -> fg, stuff -> bg)."""
    out = []
    for t in targets:
        fg, bg, mapping = 0, NUM_FG, {}
        for j in range(len(t)):
            if task == "det" or bool(t.is_thing[j]):
                mapping[j], fg = fg, fg + 1
            else:
                mapping[j], bg = bg, bg + 1
        out.append(mapping)
    return out


def _perfect_single(t: Targets, slot_to_target: dict[int, int], num_queries: int) -> tuple:
    logits = torch.full((num_queries, K), -20.0)
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).repeat(num_queries, 1)
    masks = torch.full((num_queries, 16, 16), -20.0)
    model_boxes = targets_to_model_boxes(t.boxes, PADDED)
    for q, j in slot_to_target.items():
        logits[q, t.labels[j]] = 20.0
        boxes[q] = model_boxes[j]
        if t.masks is not None:
            small = F.avg_pool2d(t.masks[j][None, None].float(), 4)[0, 0] > 0.5
            masks[q] = torch.where(small, 20.0, -20.0)
    return logits, boxes, masks


def _prediction(parts: list[tuple], requires_grad: bool = True) -> Prediction:
    logits, boxes, masks = (torch.stack([p[i] for p in parts]).clone().requires_grad_(requires_grad)
                            for i in range(3))
    return Prediction(logits, boxes, masks)


def _conditioned(targets: list[Targets], perfect: bool, gen: torch.Generator | None) -> ConditionedOutputs:
    slots = max(max(len(t) for t in targets), 1)
    index = torch.full((len(targets), GROUPS * slots), -1, dtype=torch.long)
    for b, t in enumerate(targets):
        for g in range(GROUPS):
            index[b, g * slots: g * slots + len(t)] = torch.arange(len(t))
    predictions = []
    for _ in range(NUM_COND_LAYERS):
        if perfect:
            parts = []
            for b, t in enumerate(targets):
                mapping = {s: int(index[b, s]) for s in range(GROUPS * slots) if index[b, s] >= 0}
                parts.append(_perfect_single(t, mapping, GROUPS * slots))
            predictions.append(_prediction(parts))
        else:
            predictions.append(_random_prediction(len(targets), GROUPS * slots, gen))
    return ConditionedOutputs(predictions=predictions, target_index=index, num_groups=GROUPS)


def _random_prediction(batch: int, queries: int, gen: torch.Generator) -> Prediction:
    logits = torch.randn(batch, queries, K, generator=gen) * 2
    boxes = torch.rand(batch, queries, 4, generator=gen) * 0.4 + 0.2
    masks = torch.randn(batch, queries, 16, 16, generator=gen) * 3
    return Prediction(logits.requires_grad_(), boxes.requires_grad_(), masks.requires_grad_())


def make_outputs(targets: list[Targets], task: str, perfect: bool, conditioned: bool = False,
                 seed: int = 0) -> Outputs:
    gen = torch.Generator().manual_seed(seed)
    if perfect:
        mappings = _assignment(targets, task)

        def make(num_queries: int) -> Prediction:
            return _prediction([_perfect_single(t, {q: j for j, q in m.items() if q < num_queries}, num_queries)
                                for t, m in zip(targets, mappings, strict=True)])
    else:
        def make(num_queries: int) -> Prediction:
            return _random_prediction(len(targets), num_queries, gen)
    return Outputs(
        final=make(NUM_FG + NUM_BG),
        aux=[make(NUM_FG + NUM_BG) for _ in range(NUM_AUX)],
        proposals=make(NUM_FG),
        conditioned=_conditioned(targets, perfect, gen) if conditioned else None,
        num_fg=NUM_FG,
        num_bg=NUM_BG,
    )


def _all_predictions(outputs: Outputs) -> dict[str, Prediction]:
    preds = {"final": outputs.final, "proposals": outputs.proposals}
    preds.update({f"aux{i}": p for i, p in enumerate(outputs.aux)})
    if outputs.conditioned is not None:
        preds.update({f"cond{i}": p for i, p in enumerate(outputs.conditioned.predictions)})
    return preds


def criterion(**kwargs) -> SetCriterion:
    kwargs.setdefault("num_points", 2048)
    return SetCriterion(HungarianMatcher(num_points=kwargs["num_points"]), **kwargs)


@pytest.mark.parametrize("task", ["seg", "det"])
@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("empty", ["none", "one", "all"])
def test_keys_finite_and_weighted(task, conditioned, empty):
    torch.manual_seed(0)
    targets = seg_targets() if task == "seg" else det_targets()
    if empty == "one":
        targets[1] = empty_targets(with_masks=task == "seg")
    elif empty == "all":
        targets = [empty_targets(with_masks=task == "seg")] * 2
    outputs = make_outputs(targets, task, perfect=False, conditioned=conditioned)
    crit = criterion()
    losses = crit(outputs, _batch(targets, task))
    expected = crit.expected_keys(NUM_AUX, True, NUM_COND_LAYERS if conditioned else 0)
    assert sorted(losses) == sorted(expected)
    assert len(expected) == len(BASE_KEYS) * (1 + NUM_AUX + 1 + (NUM_COND_LAYERS if conditioned else 0))
    assert all(k in crit.weight_dict for k in losses)
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in losses.values())
    assert crit.weight_dict["loss_class_aux1"] == 4.0 and crit.weight_dict["loss_dice_proposals"] == 5.0
    total = crit.total_loss(losses)
    assert torch.isfinite(total) and total.requires_grad
    if empty == "all":
        for key, value in losses.items():
            if not key.startswith("loss_class") or (conditioned and "_cond" in key):
                assert value.item() == 0.0, key
    total.backward()  # connected even when there is nothing to supervise


def test_perfect_predictions_give_small_losses():
    torch.manual_seed(0)
    for task, targets in (("seg", seg_targets()), ("det", det_targets())):
        crit = criterion()
        good = crit(make_outputs(targets, task, perfect=True, conditioned=True), _batch(targets, task))
        bad = crit(make_outputs(targets, task, perfect=False, conditioned=True, seed=1), _batch(targets, task))
        for key, value in good.items():
            if key.startswith(("loss_bbox", "loss_giou")):
                assert value.item() < 1e-4, (task, key, value.item())
            elif key.startswith(("loss_mask", "loss_dice")):
                # not exactly 0: the uncertainty-sampled points concentrate on the 1-pixel boundary band where the
                # bilinearly sampled GT is soft (BCE there is bounded below by the target's entropy)
                assert value.item() < 0.15, (task, key, value.item())
            else:
                assert value.item() < 1e-3, (task, key, value.item())
        assert crit.total_loss(bad) > 20 * crit.total_loss(good) + 1.0
        for base in ("loss_class", "loss_bbox", "loss_giou") + (("loss_mask", "loss_dice") if task == "seg" else ()):
            assert bad[base].item() > 5 * good[base].item() + 0.05, (task, base)


def test_gradients_reach_every_prediction_on_seg():
    torch.manual_seed(0)
    targets = seg_targets()
    outputs = make_outputs(targets, "seg", perfect=False, conditioned=True)
    crit = criterion()
    crit.total_loss(crit(outputs, _batch(targets, "seg"))).backward()
    for name, pred in _all_predictions(outputs).items():
        for field in ("logits", "boxes", "masks"):
            grad = getattr(pred, field).grad
            assert grad is not None and float(grad.abs().sum()) > 0, (name, field)
    # both query groups are supervised on segmentation data (class loss on every query)
    assert float(outputs.final.logits.grad[:, NUM_FG:].abs().sum()) > 0


def test_det_batch_bg_queries_and_masks_get_no_gradient():
    torch.manual_seed(0)
    targets = det_targets()
    outputs = make_outputs(targets, "det", perfect=False, conditioned=True)
    crit = criterion()
    losses = crit(outputs, _batch(targets, "det"))
    # mask keys are present on detection data (documented): zero and connected when the targets have no masks
    for key, value in losses.items():
        if key.startswith(("loss_mask", "loss_dice")):
            assert value.item() == 0.0 and value.requires_grad, key
    crit.total_loss(losses).backward()
    for name, pred in _all_predictions(outputs).items():
        assert pred.masks.grad is not None and float(pred.masks.grad.abs().sum()) == 0.0, name
        if not name.startswith("cond"):
            assert float(pred.logits.grad[:, NUM_FG:].abs().sum()) == 0.0, name
            assert float(pred.boxes.grad[:, NUM_FG:].abs().sum()) == 0.0, name
            assert float(pred.logits.grad[:, :NUM_FG].abs().sum()) > 0, name
            assert float(pred.boxes.grad[:, :NUM_FG].abs().sum()) > 0, name


def test_det_with_masks_gets_mask_losses():
    torch.manual_seed(0)
    targets = det_targets()
    seg = seg_targets()
    targets[0].masks = torch.zeros(3, *PADDED, dtype=torch.bool)
    targets[0].masks[:2] = seg[0].masks[:2]
    targets[0].has_mask = torch.tensor([True, True, False])
    targets[1].masks = torch.zeros(1, *PADDED, dtype=torch.bool)  # has_mask stays False
    outputs = make_outputs(targets, "det", perfect=False)
    losses = criterion()(outputs, _batch(targets, "det"))
    assert losses["loss_mask"].item() > 0 and losses["loss_dice"].item() > 0


def test_online_mask_assistance_feeds_only_the_matcher():
    torch.manual_seed(0)
    targets = det_targets()
    outputs = make_outputs(targets, "det", perfect=False, conditioned=True)
    outputs.conditioned.clean_group = True  # group 0 built from the clean boxes (the model adds it for assistance)
    seen = []

    class Recording(HungarianMatcher):
        def forward(self, pred, match_targets, groups=None, use_masks=True):
            seen.append([t.get("masks") for t in match_targets])
            return super().forward(pred, match_targets, groups, use_masks)

    crit = SetCriterion(Recording(num_points=512), num_points=512, mask_assistance="online")
    losses = crit(outputs, _batch(targets, "det"))
    assert len(seen) == 1 + NUM_AUX + 1
    last = outputs.conditioned.predictions[-1].masks
    for masks in seen:
        for b, t in enumerate(targets):
            assert masks[b].shape == (len(t), 16, 16)
            assert torch.equal(masks[b], (last[b, : len(t)] > 0).float())  # group 0 slots are 0..N-1 here
    crit.total_loss(losses).backward()
    assert float(last.grad.abs().sum()) == 0.0  # assistance is detached and no mask loss on det data
    assert losses["loss_mask"].item() == 0.0
    with pytest.raises(ValueError):
        SetCriterion(mask_assistance="offline")


def _recorded_matches(crit: SetCriterion) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every matcher call's result (per image (queries, targets)), in call order: final, aux..., proposals."""
    calls, match = [], crit.matcher.forward

    def recording(*args, **kwargs):
        calls.append(match(*args, **kwargs))
        return calls[-1]

    crit.matcher.forward = recording
    return calls


def test_decoupling_follows_the_outputs():
    """The criterion has no decoupled switch of its own: outputs without bg queries (num_bg == 0) match every
    target, things and stuff, to the fg queries; decoupled outputs match things to fg and stuff to bg queries."""
    targets = seg_targets()
    with pytest.raises(TypeError):
        SetCriterion(decoupled=True)  # no second owner of the model's switch
    decoupled = make_outputs(targets, "seg", perfect=False)
    coupled = Outputs(decoupled.final, decoupled.aux, _random_prediction(2, NUM_FG + NUM_BG,
                      torch.Generator().manual_seed(5)), None, num_fg=NUM_FG + NUM_BG, num_bg=0)

    crit = SetCriterion(num_points=256)  # defaults, as conf/criterion/default.yaml builds it
    calls = _recorded_matches(crit)
    torch.manual_seed(0)
    losses = crit(coupled, _batch(targets, "seg"))
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert len(calls) == 1 + NUM_AUX + 1
    for call in calls:  # final, aux layers and proposals alike: all 3 + 3 targets, stuff included
        for (queries, matched), t in zip(call, targets, strict=True):
            assert sorted(matched.tolist()) == list(range(len(t)))
            assert bool((queries < NUM_FG + NUM_BG).all())
    stuff_matched = sum(int((~t.is_thing[m]).sum()) for (_, m), t in zip(calls[0], targets, strict=True))
    assert stuff_matched == 3

    calls.clear()
    torch.manual_seed(0)
    crit(decoupled, _batch(targets, "seg"))
    for call in calls[:-1]:  # final and aux: things -> fg queries, stuff -> bg queries, every target matched
        for (queries, matched), t in zip(call, targets, strict=True):
            assert sorted(matched.tolist()) == list(range(len(t)))
            thing = t.is_thing[matched]
            assert bool((queries[thing] < NUM_FG).all()) and bool((queries[~thing] >= NUM_FG).all())
    for (_, matched), t in zip(calls[-1], targets, strict=True):  # proposals (fg only): things only
        assert sorted(matched.tolist()) == torch.nonzero(t.is_thing).flatten().tolist()


def test_weights_are_the_matching_costs():
    """One source: conf/criterion/default.yaml spells out SPEC section 3's weights; changing one there changes the
    loss weight and the matching cost alike; a matcher whose costs contradict the weights is refused."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from openseed.config import CONF

    spec = {"class_weight": 4.0, "bbox_weight": 5.0, "giou_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["criterion.num_points=256"])
        changed = compose("train", overrides=["criterion.num_points=256", "criterion.class_weight=2.5",
                                              "criterion.dice_weight=1.0"])
    assert {key: cfg.criterion[key] for key in spec} == spec
    assert "decoupled" not in cfg.criterion  # the model's switch has one owner
    crit = instantiate(cfg.criterion)
    costs = (crit.matcher.cost_class, crit.matcher.cost_box, crit.matcher.cost_giou, crit.matcher.cost_mask,
             crit.matcher.cost_dice)
    assert costs == (4.0, 5.0, 2.0, 5.0, 5.0) and crit.weight_for("loss_class_aux2") == 4.0
    crit = instantiate(changed.criterion)
    assert crit.weight_for("loss_class") == crit.weight_for("loss_class_proposals") == 2.5
    assert crit.weight_for("loss_dice") == 1.0
    assert (crit.matcher.cost_class, crit.matcher.cost_dice, crit.matcher.cost_box) == (2.5, 1.0, 5.0)
    assert crit.matcher.num_points == 256

    with pytest.raises(ValueError, match="cost_class"):
        SetCriterion(HungarianMatcher(cost_class=1.0, num_points=256), num_points=256)
    with pytest.raises(ValueError, match="cost_giou"):
        SetCriterion(HungarianMatcher(num_points=256), num_points=256, giou_weight=3.0)
    with pytest.raises(ValueError, match="class_weight"):  # the base weights have one way in
        SetCriterion(num_points=256, weight_dict={"loss_class": 2.0})
    agreeing = SetCriterion(HungarianMatcher(cost_giou=3.0, num_points=256), num_points=256, giou_weight=3.0)
    assert agreeing.matcher.cost_giou == agreeing.weight_for("loss_giou") == 3.0


def test_conditioned_normalisation():
    torch.manual_seed(0)
    targets = seg_targets()
    outputs = make_outputs(targets, "seg", perfect=False, conditioned=True)
    losses = criterion()(outputs, _batch(targets, "seg"))
    pred = outputs.conditioned.predictions[0]
    index = outputs.conditioned.target_index
    l1 = 0.0
    for b, t in enumerate(targets):
        model_boxes = targets_to_model_boxes(t.boxes, PADDED)
        for s in range(index.shape[1]):
            if index[b, s] >= 0:
                l1 += (pred.boxes[b, s] - model_boxes[index[b, s]]).abs().sum().item()
    num_boxes = sum(len(t) for t in targets)
    assert losses["loss_bbox_cond0"].item() == pytest.approx(l1 / (num_boxes * GROUPS), rel=1e-5)


def test_uncertain_point_sampling_split():
    torch.manual_seed(0)
    logits = torch.full((3, 1, 32, 32), 30.0)
    logits[:, :, :, :16] = 0.0  # left half maximally uncertain
    points = uncertain_points_with_randomness(logits, num_points=400, oversample_ratio=3.0,
                                              importance_sample_ratio=0.75)
    assert points.shape == (3, 400, 2)
    assert bool(((points >= 0) & (points <= 1)).all())
    important, uniform = points[:, :300], points[:, 300:]
    # the 300 importance points all come from the uncertain half (x < 0.5 minus the bilinear border)
    assert bool((important[..., 0] < 0.5).all())
    # the 100 uniform points cover both halves
    right = (uniform[..., 0] > 0.52).float().mean()
    assert 0.3 < float(right) < 0.7
    assert math.isclose(important.shape[1] / 400, 0.75)


def test_crowd_regions_do_not_count_in_mask_losses():
    from dataclasses import replace

    targets = seg_targets()
    crowd = torch.zeros(PADDED, dtype=torch.bool)
    crowd[0:8, 52:64] = True  # no target there in image 0
    assert not (targets[0].masks & crowd).any()
    outputs = make_outputs(targets, "seg", perfect=True)
    with torch.no_grad():  # every query's mask spills into the crowd region of image 0 (logit +20 there)
        for pred in _all_predictions(outputs).values():
            pred.masks[0, :, 0:2, 13:16] = 20.0

    def mask_terms(image0: Targets) -> dict[str, float]:
        torch.manual_seed(0)
        losses = criterion()(outputs, _batch([image0, targets[1]], "seg"))
        return {k: v.item() for k, v in losses.items() if k.startswith(("loss_mask", "loss_dice"))}

    penalised = mask_terms(targets[0])
    ignored = mask_terms(replace(targets[0], ignore_mask=crowd))
    for key in penalised:
        assert ignored[key] < 0.15, (key, ignored[key])  # as good as the perfect prediction
        if key.startswith("loss_mask"):
            assert penalised[key] > ignored[key] + 0.2, (key, penalised[key], ignored[key])
