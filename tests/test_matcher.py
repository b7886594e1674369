"""Hungarian matcher: optimality, decoupled groups, detection without mask costs, mask assistance."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from openseed.core.outputs import Prediction
from openseed.losses.matcher import HungarianMatcher, build_match_groups, mask_bce_cost, solve_assignment
from openseed.losses.point_sampling import point_sample_shared, sample_masks, uniform_points


def _brute_force(cost: torch.Tensor) -> float:
    """Minimal total cost over all assignments of min(R, C) pairs."""
    rows, cols = cost.shape
    best = float("inf")
    if rows >= cols:
        for perm in itertools.permutations(range(rows), cols):
            best = min(best, sum(float(cost[perm[j], j]) for j in range(cols)))
    else:
        for perm in itertools.permutations(range(cols), rows):
            best = min(best, sum(float(cost[i, perm[i]]) for i in range(rows)))
    return best


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def _random_prediction(batch: int, queries: int, classes: int, gen: torch.Generator, masks: bool = True,
                       mask_size: int = 8) -> Prediction:
    return Prediction(
        logits=torch.randn(batch, queries, classes, generator=gen) * 2,
        boxes=torch.stack([_random_boxes(queries, gen) for _ in range(batch)]),
        masks=torch.randn(batch, queries, mask_size, mask_size, generator=gen) * 3 if masks else None,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (6, 2)])
def test_solve_assignment_is_optimal(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(*shape, generator=gen) * 10 - 3
    rows, cols = solve_assignment(cost)
    assert rows.numel() == min(shape) == cols.numel()
    assert len(set(rows.tolist())) == rows.numel() and len(set(cols.tolist())) == cols.numel()
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost), abs=1e-5)


def test_solve_assignment_nonfinite_warns_and_works():
    cost = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")], [0.5, 3.0]])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rows, cols = solve_assignment(cost)
    pairs = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert pairs == {(0, 1), (2, 0)}
    empty_rows, empty_cols = solve_assignment(torch.zeros(3, 0))
    assert empty_rows.numel() == 0 and empty_cols.numel() == 0


def _independent_cost(pred: Prediction, b: int, labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Class + L1 + GIoU cost, written out with loops (no mask terms)."""
    alpha, gamma = 0.25, 2.0
    q, n = pred.logits.shape[1], labels.numel()
    cost = torch.zeros(q, n, dtype=torch.float64)
    pxyxy = box_convert(pred.boxes[b], "cxcywh", "xyxy").double()
    txyxy = box_convert(boxes, "cxcywh", "xyxy").double()
    for i in range(q):
        for j in range(n):
            p = torch.sigmoid(pred.logits[b, i, labels[j]].double())
            pos = alpha * (1 - p) ** gamma * -torch.log(p)
            neg = (1 - alpha) * p**gamma * -torch.log(1 - p)
            l1 = (pred.boxes[b, i].double() - boxes[j].double()).abs().sum()
            a, c = pxyxy[i], txyxy[j]
            inter_w = (torch.min(a[2], c[2]) - torch.max(a[0], c[0])).clamp(min=0)
            inter_h = (torch.min(a[3], c[3]) - torch.max(a[1], c[1])).clamp(min=0)
            inter = inter_w * inter_h
            union = (a[2] - a[0]) * (a[3] - a[1]) + (c[2] - c[0]) * (c[3] - c[1]) - inter
            hull = (torch.max(a[2], c[2]) - torch.min(a[0], c[0])) * (torch.max(a[3], c[3]) - torch.min(a[1], c[1]))
            giou = inter / union - (hull - union) / hull
            cost[i, j] = 4 * (pos - neg) + 5 * l1 - 2 * giou
    return cost


@pytest.mark.parametrize("seed", range(5))
def test_matcher_total_cost_is_minimal(seed):
    gen = torch.Generator().manual_seed(seed)
    pred = _random_prediction(2, 5, 4, gen, masks=False)
    targets = []
    for n in (3, 2):
        targets.append({"labels": torch.randint(0, 4, (n,), generator=gen), "boxes": _random_boxes(n, gen)})
    matcher = HungarianMatcher()
    result = matcher(pred, targets)
    for b, (q, t) in enumerate(result):
        cost = _independent_cost(pred, b, targets[b]["labels"], targets[b]["boxes"])
        assert q.numel() == t.numel() == targets[b]["labels"].numel()
        assert len(set(t.tolist())) == t.numel() and len(set(q.tolist())) == q.numel()
        assert float(cost[q, t].sum()) == pytest.approx(_brute_force(cost), rel=1e-6, abs=1e-6)
        # and the matcher's own cost matrix agrees with the independent one
        own = matcher.cost_matrix(pred.logits[b], pred.boxes[b], targets[b]["labels"], targets[b]["boxes"])
        assert torch.allclose(own.double(), cost, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_decoupled_groups_respect_thing_stuff(seed):
    gen = torch.Generator().manual_seed(seed)
    num_fg, num_bg, batch = 6, 4, 3
    pred = _random_prediction(batch, num_fg + num_bg, 7, gen)
    targets, is_thing = [], []
    for _ in range(batch):
        n = int(torch.randint(0, 8, (1,), generator=gen))
        thing = torch.rand(n, generator=gen) < 0.5
        masks = torch.rand(n, 32, 32, generator=gen) < 0.3
        targets.append({"labels": torch.randint(0, 7, (n,), generator=gen), "boxes": _random_boxes(n, gen),
                        "masks": masks, "mask_valid": torch.ones(n, dtype=torch.bool)})
        is_thing.append(thing)
    groups = build_match_groups(is_thing, "seg", num_fg, num_bg, decoupled=True)
    result = HungarianMatcher(num_points=256)(pred, targets, groups)
    for (q, t), thing in zip(result, is_thing, strict=True):
        fg = q < num_fg
        assert bool(thing[t[fg]].all()) and not bool(thing[t[~fg]].any())
        assert int(fg.sum()) == min(num_fg, int(thing.sum()))
        assert int((~fg).sum()) == min(num_bg, int((~thing).sum()))
        assert len(set(t.tolist())) == t.numel()

    # detection: only fg queries match, any target
    det_groups = build_match_groups(is_thing, "det", num_fg, num_bg)
    for (q, t), target in zip(HungarianMatcher()(pred, targets, det_groups, use_masks=False), targets, strict=True):
        assert bool((q < num_fg).all()) and t.numel() == min(num_fg, target["labels"].numel())
    # not decoupled: all queries x all targets
    all_groups = build_match_groups(is_thing, "seg", num_fg, num_bg, decoupled=False)
    for (_, t), target in zip(HungarianMatcher(num_points=64)(pred, targets, all_groups), targets, strict=True):
        assert t.numel() == min(num_fg + num_bg, target["labels"].numel())


def test_groups_follow_the_query_split_unless_told():
    """Without bg queries (a model that is not decoupled) the default groups match every target, stuff included,
    to the queries; with bg queries, things to fg and stuff to bg. Proposals (fg only, num_bg=0) of a decoupled
    model say ``decoupled=True`` and match things only."""
    is_thing = [torch.tensor([True, False, True, False]), torch.tensor([False]), torch.zeros(0, dtype=torch.bool)]
    coupled = build_match_groups(is_thing, "seg", 6, 0)
    assert all(len(g) == 1 and g[0][0] == slice(0, 6) and g[0][1] is None for g in coupled)
    decoupled = build_match_groups(is_thing, "seg", 4, 2)
    assert [g[0][1].tolist() for g in decoupled] == [[0, 2], [], []]
    assert [g[1][1].tolist() for g in decoupled] == [[1, 3], [0], []]
    assert all(g[0][0] == slice(0, 4) and g[1][0] == slice(4, 6) for g in decoupled)
    proposals = build_match_groups(is_thing, "seg", 4, 0, decoupled=True)
    assert [[sel.tolist() for _, sel in g] for g in proposals] == [[[0, 2]], [[]], [[]]]


def test_detection_never_touches_mask_costs_without_assistance():
    gen = torch.Generator().manual_seed(3)
    num_fg, num_bg = 5, 2
    pred = _random_prediction(2, num_fg + num_bg, 4, gen, masks=False)
    nan_pred = Prediction(pred.logits, pred.boxes, torch.full((2, num_fg + num_bg, 8, 8), float("nan")))
    targets = [{"labels": torch.randint(0, 4, (n,), generator=gen), "boxes": _random_boxes(n, gen), "masks": None}
               for n in (4, 2)]
    groups = build_match_groups([torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)], "det",
                                num_fg, num_bg)
    matcher = HungarianMatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-finite cost warning: the NaN masks are never read
        plain = matcher(pred, targets, groups)
        with_nan = matcher(nan_pred, targets, groups)
    for (q0, t0), (q1, t1) in zip(plain, with_nan, strict=True):
        assert torch.equal(q0, q1) and torch.equal(t0, t1)


def test_assistance_masks_change_detection_matching():
    # two fg queries, two targets with the same class and box; query 0's box is marginally closer to target 0,
    # but its mask is target 1's assistance mask (and vice versa): the mask cost must flip the matching.
    size = 16
    left = torch.zeros(size, size, dtype=torch.bool)
    left[:, : size // 2] = True
    right = ~left
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, :, 0] = 5.0
    boxes = torch.tensor([[[0.50, 0.5, 0.5, 0.5], [0.52, 0.5, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1]]])
    masks = torch.stack([torch.where(right, 8.0, -8.0), torch.where(left, 8.0, -8.0), torch.zeros(size, size)])
    pred = Prediction(logits, boxes, masks[None])
    target = {"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.501, 0.5, 0.5, 0.5], [0.519, 0.5, 0.5, 0.5]]),
              "masks": None}
    groups = build_match_groups([torch.ones(2, dtype=torch.bool)], "det", num_fg=2, num_bg=1)
    matcher = HungarianMatcher(num_points=512)
    q, t = matcher(pred, [target], groups)[0]
    assert q.tolist() == [0, 1] and t.tolist() == [0, 1]
    assisted = dict(target, masks=torch.stack([left, right]).float())
    q, t = matcher(pred, [assisted], groups)[0]
    assert q.tolist() == [0, 1] and t.tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(4))
def test_exact_prediction_is_matched_to_its_target(seed):
    gen = torch.Generator().manual_seed(seed)
    queries, classes, n = 8, 6, 3
    pred = _random_prediction(1, queries, classes, gen, mask_size=16)
    labels = torch.randint(0, classes, (n,), generator=gen)
    boxes = _random_boxes(n, gen)
    gt_masks = torch.zeros(n, 64, 64, dtype=torch.bool)
    for j in range(n):  # 4x4-aligned rectangles so the 1/4-resolution logits are exact
        x0, y0 = (torch.randint(0, 8, (2,), generator=gen) * 4).tolist()
        w, h = (torch.randint(2, 8, (2,), generator=gen) * 4).tolist()
        gt_masks[j, y0:y0 + h, x0:x0 + w] = True
    perm = torch.randperm(queries, generator=gen)[:n]
    for j in range(n):
        qi = int(perm[j])
        pred.logits[0, qi] = -10.0
        pred.logits[0, qi, labels[j]] = 10.0
        pred.boxes[0, qi] = boxes[j]
        small = F.avg_pool2d(gt_masks[j][None, None].float(), 4)[0, 0] > 0.5
        pred.masks[0, qi] = torch.where(small, 10.0, -10.0)
    target = {"labels": labels, "boxes": boxes, "masks": gt_masks, "mask_valid": torch.ones(n, dtype=torch.bool)}
    q, t = HungarianMatcher(num_points=2000)(pred, [target])[0]
    assert dict(zip(t.tolist(), q.tolist(), strict=True)) == {j: int(perm[j]) for j in range(n)}


def test_sample_masks_matches_grid_sample():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 28, generator=gen) < 0.4
    points = torch.rand(500, 2, generator=gen) * 1.2 - 0.1  # includes points outside [0, 1]
    expected = point_sample_shared(masks.float(), points)
    assert torch.allclose(sample_masks(masks, points), expected, atol=1e-5)
    per_row = torch.rand(4, 50, 2, generator=gen)
    index = torch.tensor([2, 0, 2, 1])
    expected = F.grid_sample(masks.float()[index][:, None], (2 * per_row - 1)[:, :, None], align_corners=False)
    assert torch.allclose(sample_masks(masks, per_row, index), expected[:, 0, :, 0], atol=1e-5)


def test_mask_bce_cost_equals_pairwise_bce():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(5, 40, generator=gen) * 4
    tgt = (torch.rand(3, 40, generator=gen) > 0.5).float()
    tgt[0, :7] = 0.25  # soft values (bilinear samples at mask borders) too
    expected = torch.stack([torch.stack([F.binary_cross_entropy_with_logits(pred[i], tgt[j]) for j in range(3)])
                            for i in range(5)])
    assert torch.allclose(mask_bce_cost(pred, tgt), expected, atol=1e-5)


def test_precomputed_points_give_the_same_matching_as_drawn_points():
    gen = torch.Generator().manual_seed(4)
    pred = _random_prediction(2, 8, 5, gen, mask_size=16)
    targets = []
    for n in (3, 4):
        masks = torch.rand(n, 64, 64, generator=gen) > 0.6
        targets.append({"labels": torch.randint(0, 5, (n,), generator=gen), "boxes": _random_boxes(n, gen),
                        "masks": masks, "mask_valid": torch.ones(n, dtype=torch.bool)})
    matcher = HungarianMatcher(num_points=300)
    torch.manual_seed(11)
    drawn = matcher(pred, targets)
    torch.manual_seed(11)  # the matcher draws one point set per image, in image order
    precomputed = []
    for t in targets:
        coords = uniform_points(300)
        precomputed.append({**t, "point_coords": coords, "point_values": sample_masks(t["masks"], coords)})
    torch.manual_seed(99)  # no draw may happen with precomputed points
    given = matcher(pred, precomputed)
    for (q1, t1), (q2, t2) in zip(drawn, given, strict=True):
        assert torch.equal(q1, q2) and torch.equal(t1, t2)
    # and the cost really uses the given values: with mask costs only, reversing the targets' sampled rows
    # reverses which query each target gets
    mask_only = HungarianMatcher(cost_class=0.0, cost_box=0.0, cost_giou=0.0, num_points=300)
    reference = mask_only(pred, precomputed)
    flipped = [{**t, "point_values": t["point_values"].flip(0)} for t in precomputed]
    for (q1, t1), (q2, t2), t in zip(reference, mask_only(pred, flipped), precomputed, strict=True):
        n = t["labels"].numel()
        assert dict(zip(t1.tolist(), q1.tolist())) == {n - 1 - j: q for j, q in zip(t2.tolist(), q2.tolist())}


def _per_group_reference(matcher: HungarianMatcher, pred: Prediction, targets: list[dict],
                         groups: list[list]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The matching written image by image and group by group with ``cost_matrix`` and ``solve_assignment``."""
    out = []
    for b, target in enumerate(targets):
        n = target["labels"].numel()
        points = values = None
        if target.get("masks") is not None and n > 0:
            points, values = target["point_coords"], target["point_values"]
        pred_points = None if points is None else point_sample_shared(pred.masks[b], points)
        queries, found = [], []
        for query_sel, target_sel in groups[b]:
            q_idx = torch.arange(pred.logits.shape[1])[query_sel] if isinstance(query_sel, slice) else query_sel
            t_idx = torch.arange(n) if target_sel is None else target_sel
            if q_idx.numel() == 0 or t_idx.numel() == 0:
                continue
            valid = target.get("mask_valid")
            cost = matcher.cost_matrix(pred.logits[b, q_idx], pred.boxes[b, q_idx], target["labels"][t_idx],
                                       target["boxes"][t_idx],
                                       None if pred_points is None else pred_points[q_idx],
                                       None if values is None else values[t_idx],
                                       None if valid is None or pred_points is None else valid[t_idx])
            rows, cols = solve_assignment(cost)
            queries.append(q_idx[rows])
            found.append(t_idx[cols])
        q_all = torch.cat(queries) if queries else torch.zeros(0, dtype=torch.long)
        t_all = torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(q_all)
        out.append((q_all[order], t_all[order]))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_batched_matching_equals_the_per_group_matching(seed):
    """The batch's costs computed at once (targets padded) give each image and group the assignment of its own
    cost matrix: images without targets, without masks, with invalid masks, decoupled groups, detection."""
    gen = torch.Generator().manual_seed(seed)
    num_fg, num_bg, batch, points = 7, 4, 4, 200
    pred = _random_prediction(batch, num_fg + num_bg, 6, gen, mask_size=12)
    targets, is_thing = [], []
    for b in range(batch):
        n = [0, 1, 5, 9][(b + seed) % 4]
        masks = torch.rand(n, 48, 48, generator=gen) < 0.35
        coords = torch.rand(points, 2, generator=gen)
        target = {"labels": torch.randint(0, 6, (n,), generator=gen), "boxes": _random_boxes(n, gen),
                  "masks": None if b == 1 else masks, "mask_valid": torch.rand(n, generator=gen) < 0.7,
                  "point_coords": coords, "point_values": sample_masks(masks, coords)}
        targets.append(target)
        is_thing.append(torch.rand(n, generator=gen) < 0.5)
    matcher = HungarianMatcher(num_points=points)
    for task, decoupled in (("seg", True), ("seg", False), ("det", None)):
        groups = build_match_groups(is_thing, task, num_fg, num_bg, decoupled)
        expected = _per_group_reference(matcher, pred, targets, groups)
        for (q, t), (eq, et) in zip(matcher(pred, targets, groups), expected, strict=True):
            assert q.tolist() == eq.tolist() and t.tolist() == et.tolist()
