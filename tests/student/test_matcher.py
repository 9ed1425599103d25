"""Hungarian matcher against brute force, its cost terms one by one, and the box conversions it uses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from student.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    denormalize_cxcywh,
    generalized_box_iou,
    normalize_xyxy,
)
from student.losses.matcher import OUTPUT_KEYS, HungarianMatcher, LossError, has_object_box, verb_cost

torch.set_num_threads(1)
NUM_CLASSES = 80
NO_OBJECT = 80


def random_boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    """(n, 4) cxcywh boxes well inside the unit square."""
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.4 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, size], dim=-1)


def random_outputs(generator: torch.Generator, batch: int, queries: int, verbs: int) -> dict[str, torch.Tensor]:
    return {
        "pred_obj_logits": 2 * torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator),
        "pred_verb_logits": 2 * torch.randn(batch, queries, verbs, generator=generator),
        "pred_sub_boxes": torch.stack([random_boxes(generator, queries) for _ in range(batch)]),
        "pred_obj_boxes": torch.stack([random_boxes(generator, queries) for _ in range(batch)]),
    }


def random_target(generator: torch.Generator, pairs: int, verbs: int, without_object: int = 0) -> dict:
    """``pairs`` pairs; the last ``without_object`` of them have no object (V-COCO style)."""
    obj_labels = torch.randint(0, NUM_CLASSES, (pairs,), generator=generator)
    obj_boxes = random_boxes(generator, pairs)
    if without_object:
        obj_labels[pairs - without_object :] = NO_OBJECT
        obj_boxes[pairs - without_object :] = 0
    verb_labels = (torch.rand(pairs, verbs, generator=generator) < 0.3).float()
    verb_labels[torch.arange(pairs), torch.randint(0, verbs, (pairs,), generator=generator)] = 1
    return {
        "obj_labels": obj_labels,
        "verb_labels": verb_labels,
        "sub_boxes": random_boxes(generator, pairs),
        "obj_boxes": obj_boxes,
    }


# -- an independent, element-by-element statement of the cost -----------------------------------


def scalar_giou(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes, written out with plain floats."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def scalar_cost(outputs: dict, b: int, q: int, target: dict, p: int, weights: tuple[float, ...]) -> float:
    w_obj, w_verb, w_bbox, w_giou = weights
    prob = torch.softmax(outputs["pred_obj_logits"][b, q].double(), -1)
    obj = -float(prob[int(target["obj_labels"][p])])
    s = torch.sigmoid(outputs["pred_verb_logits"][b, q].double()).tolist()
    t = target["verb_labels"][p].tolist()
    n_pos, n_neg = sum(t), sum(1 - x for x in t)
    pos = sum(si * ti for si, ti in zip(s, t, strict=True)) / n_pos if n_pos else 0.0
    neg = sum((1 - si) * (1 - ti) for si, ti in zip(s, t, strict=True)) / n_neg if n_neg else 0.0
    verb = -(pos + neg) / 2
    sub_pred, sub_gt = outputs["pred_sub_boxes"][b, q].tolist(), target["sub_boxes"][p].tolist()
    obj_pred, obj_gt = outputs["pred_obj_boxes"][b, q].tolist(), target["obj_boxes"][p].tolist()
    l1 = sum(abs(x - y) for x, y in zip(sub_pred, sub_gt, strict=True))
    giou = -scalar_giou(sub_pred, sub_gt)
    if any(obj_gt):
        l1 = max(l1, sum(abs(x - y) for x, y in zip(obj_pred, obj_gt, strict=True)))
        giou = max(giou, -scalar_giou(obj_pred, obj_gt))
    return w_obj * obj + w_verb * verb + w_bbox * l1 + w_giou * giou


def brute_force(outputs: dict, b: int, target: dict, weights: tuple[float, ...]) -> tuple[float, set]:
    """Least total cost over every one-to-one assignment, and the (query, pair) set achieving it."""
    queries = outputs["pred_obj_logits"].shape[1]
    pairs = target["obj_labels"].shape[0]
    cost = [[scalar_cost(outputs, b, q, target, p, weights) for p in range(pairs)] for q in range(queries)]
    best, best_set = math.inf, set()
    if pairs <= queries:
        for chosen in itertools.permutations(range(queries), pairs):  # pair p -> query chosen[p]
            total = sum(cost[q][p] for p, q in enumerate(chosen))
            if total < best:
                best, best_set = total, {(q, p) for p, q in enumerate(chosen)}
    else:
        for chosen in itertools.permutations(range(pairs), queries):  # query q -> pair chosen[q]
            total = sum(cost[q][p] for q, p in enumerate(chosen))
            if total < best:
                best, best_set = total, {(q, p) for q, p in enumerate(chosen)}
    return best, best_set


@pytest.mark.parametrize(
    ("queries", "pairs", "without_object", "weights"),
    [
        (4, 3, 0, (1.0, 1.0, 2.5, 1.0)),
        (4, 3, 1, (1.0, 1.0, 2.5, 1.0)),
        (5, 2, 2, (1.0, 1.0, 2.5, 1.0)),
        (3, 3, 0, (2.0, 0.5, 1.0, 3.0)),
        (2, 4, 1, (1.0, 1.0, 2.5, 1.0)),
        (4, 4, 0, (0.0, 0.0, 1.0, 0.0)),
    ],
)
def test_matcher_equals_brute_force(queries: int, pairs: int, without_object: int, weights: tuple) -> None:
    matcher = HungarianMatcher(*weights)
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        outputs = random_outputs(generator, batch=2, queries=queries, verbs=5)
        targets = [random_target(generator, pairs, 5, without_object) for _ in range(2)]
        indices = matcher(outputs, targets)
        for b, (query_idx, pair_idx) in enumerate(indices):
            best, best_set = brute_force(outputs, b, targets[b], weights)
            got = sum(
                scalar_cost(outputs, b, q, targets[b], p, weights) for q, p in zip(query_idx, pair_idx, strict=True)
            )
            assert got == pytest.approx(best, abs=1e-5)
            assert set(zip(query_idx.tolist(), pair_idx.tolist(), strict=True)) == best_set
            assert len(query_idx) == min(queries, pairs)


def test_cost_matrix_matches_elementwise_formula() -> None:
    generator = torch.Generator().manual_seed(11)
    outputs = random_outputs(generator, batch=1, queries=6, verbs=7)
    target = random_target(generator, 4, 7, without_object=2)
    target["verb_labels"][0] = 0  # a pair with no verb: the positive term's denominator is 0
    weights = (1.0, 1.0, 2.5, 1.0)
    cost = HungarianMatcher(*weights).cost_matrix({k: v[0] for k, v in outputs.items()}, target)
    expected = torch.tensor([[scalar_cost(outputs, 0, q, target, p, weights) for p in range(4)] for q in range(6)])
    torch.testing.assert_close(cost, expected.float(), atol=1e-5, rtol=1e-5)


def test_indices_are_cpu_int64_sorted_by_query() -> None:
    generator = torch.Generator().manual_seed(3)
    outputs = random_outputs(generator, batch=3, queries=10, verbs=4)
    targets = [random_target(generator, n, 4) for n in (5, 1, 7)]
    for query_idx, pair_idx in HungarianMatcher()(outputs, targets):
        assert query_idx.dtype == pair_idx.dtype == torch.int64
        assert query_idx.device.type == "cpu"
        assert torch.equal(query_idx, query_idx.sort().values)
        assert len(set(query_idx.tolist())) == len(query_idx)
        assert len(set(pair_idx.tolist())) == len(pair_idx)


def test_image_without_pairs_gets_empty_match() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = random_outputs(generator, batch=2, queries=4, verbs=3)
    empty = {
        "obj_labels": torch.zeros(0, dtype=torch.int64),
        "verb_labels": torch.zeros(0, 3),
        "sub_boxes": torch.zeros(0, 4),
        "obj_boxes": torch.zeros(0, 4),
    }
    indices = HungarianMatcher()(outputs, [empty, random_target(generator, 2, 3)])
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 2


def test_box_cost_recovers_a_shuffled_assignment() -> None:
    """Queries hold the ground-truth boxes in a shuffled order: the box costs alone find the order."""
    generator = torch.Generator().manual_seed(5)
    target = random_target(generator, 5, 3)
    order = torch.tensor([3, 0, 4, 1, 2])  # query q holds pair order[q]
    outputs = {
        "pred_obj_logits": torch.zeros(1, 5, NUM_CLASSES + 1),
        "pred_verb_logits": torch.zeros(1, 5, 3),
        "pred_sub_boxes": target["sub_boxes"][order][None],
        "pred_obj_boxes": target["obj_boxes"][order][None],
    }
    query_idx, pair_idx = HungarianMatcher(cost_obj_class=0, cost_verb_class=0)(outputs, [target])[0]
    assert torch.equal(pair_idx, order[query_idx])


def test_pairs_without_object_are_matched_on_the_human_box_only() -> None:
    generator = torch.Generator().manual_seed(9)
    target = random_target(generator, 2, 3, without_object=2)
    outputs = {
        "pred_obj_logits": torch.zeros(1, 2, NUM_CLASSES + 1),
        "pred_verb_logits": torch.zeros(1, 2, 3),
        "pred_sub_boxes": target["sub_boxes"].flip(0)[None],  # query 0 holds pair 1's human box
        "pred_obj_boxes": random_boxes(generator, 2)[None],
    }
    matcher = HungarianMatcher(cost_obj_class=0, cost_verb_class=0)
    _, pair_idx = matcher(outputs, [target])[0]
    assert pair_idx.tolist() == [1, 0]
    # Any object box prediction leaves the cost of such pairs unchanged.
    before = matcher.cost_matrix({k: v[0] for k, v in outputs.items()}, target)
    outputs["pred_obj_boxes"] = random_boxes(generator, 2)[None]
    after = matcher.cost_matrix({k: v[0] for k, v in outputs.items()}, target)
    torch.testing.assert_close(before, after)


def test_object_class_cost_prefers_the_confident_query() -> None:
    target = {
        "obj_labels": torch.tensor([7]),
        "verb_labels": torch.zeros(1, 2),
        "sub_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
        "obj_boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
    }
    logits = torch.zeros(1, 3, NUM_CLASSES + 1)
    logits[0, 2, 7] = 6.0
    outputs = {
        "pred_obj_logits": logits,
        "pred_verb_logits": torch.zeros(1, 3, 2),
        "pred_sub_boxes": torch.full((1, 3, 4), 0.3),
        "pred_obj_boxes": torch.full((1, 3, 4), 0.3),
    }
    query_idx, _ = HungarianMatcher()(outputs, [target])[0]
    assert query_idx.tolist() == [2]


def test_verb_cost_guards_zero_denominators() -> None:
    logits = torch.tensor([[0.0, 2.0, -2.0]])
    prob = logits.sigmoid()[0]
    no_verbs = torch.zeros(1, 3)
    all_verbs = torch.ones(1, 3)
    assert torch.isfinite(verb_cost(logits, no_verbs)).all()
    torch.testing.assert_close(verb_cost(logits, no_verbs)[0, 0], -(1 - prob).mean() / 2)
    torch.testing.assert_close(verb_cost(logits, all_verbs)[0, 0], -prob.mean() / 2)


def test_has_object_box() -> None:
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])
    assert has_object_box(boxes).tolist() == [True, False, True]


def test_non_finite_outputs_raise_loss_error() -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = random_outputs(generator, batch=1, queries=3, verbs=2)
    outputs["pred_sub_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(LossError, match="image 0 has a non-finite cost"):
        HungarianMatcher()(outputs, [random_target(generator, 2, 2)])


def test_malformed_targets_and_outputs_raise_loss_error_naming_the_field() -> None:
    generator = torch.Generator().manual_seed(2)
    outputs = random_outputs(generator, batch=1, queries=3, verbs=4)
    bad = random_target(generator, 2, 4)
    bad["verb_labels"] = torch.zeros(2, 5)
    with pytest.raises(LossError, match=r"targets\[0\]\['verb_labels'\]: expected shape \(2, 4\)"):
        HungarianMatcher()(outputs, [bad])
    missing = random_target(generator, 2, 4)
    del missing["sub_boxes"]
    with pytest.raises(LossError, match=r"targets\[0\]: missing key 'sub_boxes'"):
        HungarianMatcher()(outputs, [missing])
    with pytest.raises(LossError, match="2 entries for a batch of 1"):
        HungarianMatcher()(outputs, [random_target(generator, 1, 4)] * 2)
    del outputs["pred_obj_boxes"]
    with pytest.raises(LossError, match="missing key 'pred_obj_boxes'"):
        HungarianMatcher()(outputs, [random_target(generator, 1, 4)])
    with pytest.raises(LossError, match="costs must be >= 0"):
        HungarianMatcher(cost_bbox=-1)
    with pytest.raises(LossError, match="at least one cost"):
        HungarianMatcher(0, 0, 0, 0)


# -- box conversions (student/box_ops.py, used by the matcher and the box losses) ------------------


def test_box_conversions_round_trip_and_known_values() -> None:
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    pixels = torch.tensor([[10.0, 20.0, 110.0, 220.0]])
    normalised = normalize_xyxy(pixels, width=200, height=400)
    torch.testing.assert_close(normalised, torch.tensor([[0.3, 0.3, 0.5, 0.5]]))
    torch.testing.assert_close(denormalize_cxcywh(normalised, 200.0, 400.0), pixels)


def test_generalized_box_iou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    same, half, apart = a, torch.tensor([[1.0, 0.0, 3.0, 2.0]]), torch.tensor([[3.0, 0.0, 4.0, 1.0]])
    assert generalized_box_iou(a, same).item() == pytest.approx(1.0)
    assert generalized_box_iou(a, half).item() == pytest.approx(2 / 6)  # IoU 2/6, hull = union
    # Disjoint: IoU 0, hull 4 x 2 = 8, union 4 + 1 = 5 -> -(8 - 5) / 8.
    assert generalized_box_iou(a, apart).item() == pytest.approx(-3 / 8)


def test_the_batch_cost_is_each_images_own_cost() -> None:
    # DETR's layout: one (B*Q, sum P) cost matrix for the whole batch, one copy to the host, then
    # split per image. It must give each image exactly the cost (and so the matching) it gets alone.
    generator = torch.Generator().manual_seed(5)
    queries, verbs = 8, 6
    outputs = random_outputs(generator, batch=4, queries=queries, verbs=verbs)
    targets = [random_target(generator, n, verbs, without_object=min(n, 1)) for n in (3, 0, 5, 2)]
    targets[2]["verb_known"] = torch.tensor([True, False, True, True, True])  # one image has the key
    matcher = HungarianMatcher(1.0, 1.0, 2.5, 1.0)
    costs = matcher.batch_costs(outputs, targets)
    indices = matcher(outputs, targets)
    for b, target in enumerate(targets):
        alone = matcher.cost_matrix({key: outputs[key][b] for key in OUTPUT_KEYS}, target).numpy()
        assert costs[b].shape == alone.shape == (queries, len(target["obj_labels"]))
        np.testing.assert_array_equal(costs[b], alone)
        rows, cols = linear_sum_assignment(alone)
        assert indices[b][0].tolist() == sorted(rows.tolist())
        assert dict(zip(indices[b][0].tolist(), indices[b][1].tolist(), strict=True)) == dict(
            zip(rows.tolist(), cols.tolist(), strict=True)
        )
