"""The HOI criterion: each loss against its formula, V-COCO pairs without object, aux layers, weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from testkit.servers import free_port

from student.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from student.losses import HOICriterion, HungarianMatcher, LossError, LossWeights, soft_focal_sum, verb_focal_loss

torch.set_num_threads(1)
NUM_CLASSES = 80
VERBS = 4


def box(cx: float, cy: float, w: float, h: float) -> list[float]:
    return [cx, cy, w, h]


def make_target(obj_labels: list[int], verbs: list[list[int]], sub: list, obj: list) -> dict:
    return {
        "obj_labels": torch.tensor(obj_labels, dtype=torch.int64),
        "verb_labels": torch.tensor(verbs, dtype=torch.float32).reshape(len(obj_labels), VERBS),
        "sub_boxes": torch.tensor(sub, dtype=torch.float32).reshape(len(obj_labels), 4),
        "obj_boxes": torch.tensor(obj, dtype=torch.float32).reshape(len(obj_labels), 4),
    }


def random_outputs(seed: int, batch: int = 2, queries: int = 5, aux_layers: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def layer() -> dict:
        return {
            "pred_obj_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator).requires_grad_(),
            "pred_verb_logits": torch.randn(batch, queries, VERBS, generator=generator).requires_grad_(),
            "pred_sub_boxes": (0.3 + 0.4 * torch.rand(batch, queries, 4, generator=generator)).requires_grad_(),
            "pred_obj_boxes": (0.3 + 0.4 * torch.rand(batch, queries, 4, generator=generator)).requires_grad_(),
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(aux_layers)]
    return outputs


def two_targets() -> list[dict]:
    return [
        make_target(
            [3, 17],
            [[1, 0, 0, 1], [0, 1, 0, 0]],
            [box(0.4, 0.5, 0.2, 0.4), box(0.6, 0.4, 0.3, 0.3)],
            [box(0.5, 0.5, 0.2, 0.2), box(0.5, 0.6, 0.1, 0.2)],
        ),
        make_target([0], [[0, 0, 1, 0]], [box(0.5, 0.5, 0.4, 0.4)], [box(0.45, 0.5, 0.3, 0.3)]),
    ]


def criterion(**kwargs) -> HOICriterion:
    return HOICriterion(num_verbs=VERBS, matcher=HungarianMatcher(), **kwargs)


# -- verb focal loss ---------------------------------------------------------------------------


def test_verb_focal_loss_matches_qpic_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(3, 6, VERBS, generator=generator)
    targets = (torch.rand(3, 6, VERBS, generator=generator) < 0.2).float()
    p = logits.sigmoid()
    pos = (torch.log(p) * (1 - p) ** 2 * targets).sum()
    neg = (torch.log(1 - p) * p**2 * (1 - targets)).sum()
    expected = -(pos + neg) / targets.sum()
    torch.testing.assert_close(verb_focal_loss(logits, targets), expected)


def test_verb_focal_loss_without_positives_is_the_negative_sum() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    p = logits.sigmoid()
    expected = -(torch.log(1 - p) * p**2).sum()
    torch.testing.assert_close(verb_focal_loss(logits, torch.zeros_like(logits)), expected)


def test_verb_focal_loss_divides_by_a_given_positive_count() -> None:
    # Under DDP the denominator is the global (rank-averaged) count, not the batch's own.
    logits = torch.randn(2, 3, VERBS, generator=torch.Generator().manual_seed(3))
    targets = torch.zeros_like(logits)
    targets[0, 0, 1] = targets[1, 2, 3] = 1
    own = verb_focal_loss(logits, targets)
    torch.testing.assert_close(verb_focal_loss(logits, targets, num_positives=4.0), own * 2 / 4)
    torch.testing.assert_close(verb_focal_loss(logits, targets, num_positives=0.0), own * 2)  # at least 1


def test_verb_focal_loss_is_finite_where_sigmoid_saturates() -> None:
    logits = torch.tensor([[60.0, -60.0, 60.0, -60.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss = verb_focal_loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 50  # two confidently wrong verbs
    assert torch.isfinite(logits.grad).all()
    right = verb_focal_loss(torch.tensor([[20.0, -20.0]]), torch.tensor([[1.0, 0.0]]))
    assert right.item() == pytest.approx(0.0, abs=1e-6)


# -- object classification -----------------------------------------------------------------------


def test_object_ce_uses_no_object_for_unmatched_queries_with_eos_weight() -> None:
    outputs = random_outputs(1)
    targets = two_targets()
    crit = criterion(losses=("obj_labels",), eos_coef=0.1)
    indices = crit.matcher(outputs, targets)
    losses = crit(outputs, targets, indices)
    classes = torch.full((2, 5), NUM_CLASSES)
    for b, (query, pair) in enumerate(indices):
        classes[b, query] = targets[b]["obj_labels"][pair]
    weight = torch.ones(NUM_CLASSES + 1)
    weight[-1] = 0.1
    logits = outputs["pred_obj_logits"].detach()
    per_query = F.cross_entropy(logits.reshape(-1, NUM_CLASSES + 1), classes.reshape(-1), reduction="none")
    weights = weight[classes.reshape(-1)]
    torch.testing.assert_close(losses["loss_obj_ce"], (per_query * weights).sum() / weights.sum())
    assert set(losses) == {"loss_obj_ce", "obj_class_error"}


def test_obj_class_error_is_top1_error_of_matched_queries() -> None:
    outputs = random_outputs(2)
    targets = two_targets()
    crit = criterion(losses=("obj_labels",))
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([4]), torch.tensor([0]))]
    with torch.no_grad():
        outputs["pred_obj_logits"][0, 0, 3] = 50.0  # right
        outputs["pred_obj_logits"][0, 1, 5] = 50.0  # wrong (label 17)
        outputs["pred_obj_logits"][1, 4, 0] = 50.0  # right
    error = crit(outputs, targets, indices)["obj_class_error"]
    assert error.item() == pytest.approx(100 / 3)
    assert not error.requires_grad


# -- boxes ---------------------------------------------------------------------------------------


def test_box_losses_are_zero_for_exact_boxes_and_match_the_formula_otherwise() -> None:
    targets = two_targets()
    outputs = random_outputs(3)
    indices = [(torch.tensor([1, 3]), torch.tensor([1, 0])), (torch.tensor([0]), torch.tensor([0]))]
    crit = criterion(losses=("boxes",))
    with torch.no_grad():
        for b, (query, pair) in enumerate(indices):
            outputs["pred_sub_boxes"][b, query] = targets[b]["sub_boxes"][pair]
            outputs["pred_obj_boxes"][b, query] = targets[b]["obj_boxes"][pair]
    exact = crit(outputs, targets, indices)
    for key in ("loss_sub_bbox", "loss_obj_bbox", "loss_sub_giou", "loss_obj_giou"):
        assert exact[key].item() == pytest.approx(0.0, abs=1e-6), key

    with torch.no_grad():
        outputs["pred_sub_boxes"][0, 1] += torch.tensor([0.05, -0.02, 0.0, 0.1])
        outputs["pred_obj_boxes"][1, 0] += torch.tensor([0.0, 0.03, 0.02, 0.0])
    moved = crit(outputs, targets, indices)
    assert moved["loss_sub_bbox"].item() == pytest.approx(0.17 / 3, abs=1e-6)  # 3 pairs in the batch
    assert moved["loss_obj_bbox"].item() == pytest.approx(0.05 / 3, abs=1e-6)
    pred = box_cxcywh_to_xyxy(outputs["pred_sub_boxes"][0, 1].detach()[None])
    gt = box_cxcywh_to_xyxy(targets[0]["sub_boxes"][1][None])
    expected_giou = (1 - generalized_box_iou(pred, gt)[0, 0]) / 3
    assert moved["loss_sub_giou"].item() == pytest.approx(expected_giou.item(), abs=1e-6)


def test_pairs_without_object_skip_object_box_terms() -> None:
    """V-COCO: a pair with object label 80 and a zero box adds nothing to the object box losses."""
    targets = [
        make_target(
            [80, 5],
            [[1, 0, 0, 0], [0, 1, 0, 0]],
            [box(0.4, 0.5, 0.2, 0.4), box(0.6, 0.5, 0.2, 0.4)],
            [[0, 0, 0, 0], box(0.5, 0.5, 0.2, 0.2)],
        )
    ]
    outputs = random_outputs(4, batch=1)
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    crit = criterion(losses=("boxes",))
    with torch.no_grad():
        outputs["pred_obj_boxes"][0, 2] = targets[0]["obj_boxes"][1]
    losses = crit(outputs, targets, indices)
    # The only object box present is predicted exactly, whatever query 0 predicts for "its object".
    assert losses["loss_obj_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_obj_giou"].item() == pytest.approx(0.0, abs=1e-6)
    crit.weighted_total(losses).backward()
    assert outputs["pred_obj_boxes"].grad[0, 0].abs().sum() == 0
    assert outputs["pred_sub_boxes"].grad[0, 0].abs().sum() > 0


def test_batch_of_only_objectless_pairs_gives_zero_object_box_losses() -> None:
    targets = [make_target([80], [[0, 0, 0, 1]], [box(0.5, 0.5, 0.2, 0.2)], [[0, 0, 0, 0]])]
    losses = criterion()(random_outputs(5, batch=1), targets)
    assert losses["loss_obj_bbox"].item() == 0.0 and losses["loss_obj_giou"].item() == 0.0
    assert losses["loss_sub_bbox"].item() > 0
    assert all(torch.isfinite(value) for value in losses.values())


def test_images_without_pairs_give_finite_losses() -> None:
    empty = make_target([], [], [], [])
    outputs = random_outputs(6, batch=2)
    losses = criterion()(outputs, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    for key in ("loss_sub_bbox", "loss_obj_bbox", "loss_sub_giou", "loss_obj_giou"):
        assert losses[key].item() == 0.0
    assert losses["loss_obj_ce"].item() > 0  # every query should say "no object"
    assert losses["obj_class_error"].item() == 0.0
    criterion().weighted_total(losses).backward()
    assert torch.isfinite(outputs["pred_verb_logits"].grad).all()


# -- the criterion as a whole ----------------------------------------------------------------------


def test_all_terms_and_aux_layers_with_suffixes() -> None:
    outputs = random_outputs(7, aux_layers=2)
    losses = criterion()(outputs, two_targets())
    base = ["loss_obj_ce", "loss_verb_ce", "loss_sub_bbox", "loss_obj_bbox", "loss_sub_giou", "loss_obj_giou"]
    expected = {*base, "obj_class_error"} | {f"{key}_{i}" for key in base for i in (0, 1)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_aux_layer_identical_to_final_gives_identical_terms() -> None:
    outputs = random_outputs(8)
    outputs["aux_outputs"] = [{k: v for k, v in outputs.items() if k != "aux_outputs"}]
    losses = criterion()(outputs, two_targets())
    for key in ("loss_obj_ce", "loss_verb_ce", "loss_sub_bbox", "loss_obj_giou"):
        torch.testing.assert_close(losses[f"{key}_0"], losses[key])


def test_weighted_total_applies_weights_to_every_layer_and_ignores_metrics() -> None:
    weights = LossWeights(bbox=2.5, giou=1.5, obj_class=0.5, verb_class=2.0)
    crit = criterion(weights=weights)
    losses = crit(random_outputs(9, aux_layers=1), two_targets())
    per_key = {
        "obj_ce": 0.5,
        "verb_ce": 2.0,
        "sub_bbox": 2.5,
        "obj_bbox": 2.5,
        "sub_giou": 1.5,
        "obj_giou": 1.5,
    }
    expected = sum(w * (losses[f"loss_{k}"] + losses[f"loss_{k}_0"]) for k, w in per_key.items())
    torch.testing.assert_close(crit.weighted_total(losses), expected)
    with pytest.raises(LossError, match="no weight for loss term 'loss_itm'"):
        crit.weighted_total({**losses, "loss_itm": torch.tensor(1.0)})


def test_default_weights_are_the_papers() -> None:
    assert LossWeights() == LossWeights(bbox=2.5, giou=1.0, obj_class=1.0, verb_class=1.0)
    crit = HOICriterion(num_verbs=VERBS)
    assert crit.eos_coef == 0.1 and crit.num_obj_classes == 80
    assert (crit.matcher.cost_obj_class, crit.matcher.cost_verb_class) == (1.0, 1.0)
    assert (crit.matcher.cost_bbox, crit.matcher.cost_giou) == (2.5, 1.0)


def test_gradients_reach_every_prediction_head() -> None:
    outputs = random_outputs(10, aux_layers=1)
    crit = criterion()
    crit.weighted_total(crit(outputs, two_targets())).backward()
    for layer in (outputs, outputs["aux_outputs"][0]):
        for key in ("pred_obj_logits", "pred_verb_logits", "pred_sub_boxes", "pred_obj_boxes"):
            assert layer[key].grad is not None and layer[key].grad.abs().sum() > 0, key


def test_given_indices_are_used_for_the_final_layer() -> None:
    outputs = random_outputs(11)
    targets = two_targets()
    crit = criterion(losses=("boxes",))
    forced = [(torch.tensor([0, 4]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    losses = crit(outputs, targets, forced)
    l1 = sum(
        (outputs["pred_sub_boxes"][b, q] - targets[b]["sub_boxes"][p]).abs().sum()
        for b, (query, pair) in enumerate(forced)
        for q, p in zip(query.tolist(), pair.tolist(), strict=True)
    )
    torch.testing.assert_close(losses["loss_sub_bbox"], l1 / 3)
    # The forced matching is not the matcher's own, so the loss did not come from re-matching.
    matched = crit.matcher(outputs, targets)
    assert [(q.tolist(), p.tolist()) for q, p in matched] != [(q.tolist(), p.tolist()) for q, p in forced]


def test_invalid_configuration_raises_loss_error() -> None:
    with pytest.raises(LossError, match="unknown losses"):
        HOICriterion(num_verbs=VERBS, losses=("boxes", "cardinality"))
    with pytest.raises(LossError, match="eos_coef must be in"):
        HOICriterion(num_verbs=VERBS, eos_coef=2.0)
    with pytest.raises(LossError, match=r"LossWeights\.giou"):
        LossWeights(giou=-1)
    with pytest.raises(LossError, match="3 verbs, the criterion expects 4"):
        outputs = random_outputs(0)
        outputs["pred_verb_logits"] = outputs["pred_verb_logits"][..., :3]
        criterion()(outputs, two_targets())


# -- num_pairs: the all-reduce hook ----------------------------------------------------------------


def test_num_pairs_without_distributed_counts_local_pairs() -> None:
    counts = criterion().num_pairs(two_targets(), torch.device("cpu"))
    assert (counts.pairs, counts.pairs_with_object) == (3.0, 3.0)
    assert counts.verb_positives == 4.0 and counts.obj_class_weight is None
    # With 5 queries per image: 3 matched pairs of weight 1, and 3 + 4 queries of "no object" at 0.1.
    counts = criterion(eos_coef=0.1).num_pairs(two_targets(), torch.device("cpu"), num_queries=5)
    assert counts.obj_class_weight == pytest.approx(3 + 7 * 0.1)
    vcoco = [
        make_target(
            [80, 2],
            [[1, 0, 0, 0]] * 2,
            [box(0.5, 0.5, 0.1, 0.1)] * 2,
            [[0, 0, 0, 0], box(0.5, 0.5, 0.1, 0.1)],
        )
    ]
    counts = criterion().num_pairs(vcoco, torch.device("cpu"))
    assert (counts.pairs, counts.pairs_with_object) == (2.0, 1.0)
    empty = criterion().num_pairs([make_target([], [], [], [])], torch.device("cpu"))
    assert (empty.pairs, empty.pairs_with_object) == (1.0, 1.0)  # clamped: never divide by 0


def _num_pairs_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Rank 0 holds 3 pairs (1 without object), rank 1 holds 1 pair.
        objectless = [0, 0, 0, 0]
        if rank == 0:
            targets = [
                make_target(
                    [1, 2, 80],
                    [[1, 0, 0, 0]] * 3,
                    [box(0.5, 0.5, 0.1, 0.1)] * 3,
                    [box(0.5, 0.5, 0.1, 0.1)] * 2 + [objectless],
                )
            ]
        else:
            targets = [make_target([4], [[0, 1, 0, 0]], [box(0.5, 0.5, 0.1, 0.1)], [box(0.4, 0.4, 0.1, 0.1)])]
        counts = HOICriterion(num_verbs=VERBS, eos_coef=0.1).num_pairs(targets, torch.device("cpu"), num_queries=4)
        queue.put((rank, counts.pairs, counts.pairs_with_object, counts.verb_positives, counts.obj_class_weight))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_num_pairs_is_averaged_over_ranks_when_distributed() -> None:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_num_pairs_worker, args=(free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    # Class weights: rank 0 has 2 objects (1 each), 1 no-object pair and 1 free query (0.1 each):
    # 2.2; rank 1 has 1 object and 3 free queries: 1.3. Every rank divides by the means.
    for rank, (got_rank, *values) in enumerate(results):
        assert got_rank == rank
        assert values == pytest.approx([2.0, 1.5, 2.0, 1.75])


# -- pairs whose verbs are unknown, and teacher-completed soft targets ---------------------------


def reference_focal_terms(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CornerNet/QPIC focal terms per entry: -(1-p)^2 log p (positive), -p^2 log(1-p) (negative)."""
    p = logits.sigmoid()
    return torch.where(targets > 0.5, -((1 - p) ** 2) * torch.log(p), -(p**2) * torch.log(1 - p))


def test_soft_focal_sum_is_the_focal_loss_at_hard_targets_and_ignores_nan() -> None:
    logits = torch.randn(3, VERBS, generator=torch.Generator().manual_seed(3))
    hard = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert torch.allclose(soft_focal_sum(logits, hard), reference_focal_terms(logits, hard).sum(), atol=1e-6)
    # A soft target t: -|t - p|^2 (t log p + (1 - t) log(1 - p)); NaN entries take no part.
    soft = torch.full((3, VERBS), float("nan"))
    soft[0, 1] = 0.3
    p = logits[0, 1].sigmoid()
    expected = -((0.3 - p) ** 2) * (0.3 * torch.log(p) + 0.7 * torch.log(1 - p))
    assert torch.allclose(soft_focal_sum(logits, soft), expected, atol=1e-6)
    # The soft term is smallest where the student's probability equals the target.
    grid = torch.linspace(-4, 4, 801)[:, None]
    best = grid[soft_focal_sum_rows(grid, torch.full((801, 1), 0.3)).argmin()]
    assert abs(float(best.sigmoid()) - 0.3) < 0.01


def soft_focal_sum_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.stack([soft_focal_sum(logits[i : i + 1], targets[i : i + 1]) for i in range(len(logits))])


def test_focal_loss_weight_masks_entries_and_their_positives() -> None:
    logits = torch.randn(2, VERBS, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    weight = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])
    # Masking row 1 equals the loss of row 0 alone (its 2 positives are the denominator).
    assert torch.allclose(verb_focal_loss(logits, targets, weight=weight), verb_focal_loss(logits[:1], targets[:1]))


def test_a_pair_with_unknown_verbs_has_no_verb_term_and_no_verb_cost() -> None:
    outputs = random_outputs(21, batch=1, queries=3)
    target = make_target([3], [[0, 0, 0, 0]], [box(0.4, 0.5, 0.2, 0.4)], [box(0.5, 0.5, 0.2, 0.2)])
    target["verb_known"] = torch.tensor([False])
    criterion = HOICriterion(num_verbs=VERBS)
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    losses = criterion(outputs, [target], indices)
    losses["loss_verb_ce"].backward()
    grad = outputs["pred_verb_logits"].grad[0]
    assert torch.all(grad[1] == 0), "the matched query of an unannotated pair gets no verb gradient"
    assert torch.all(grad[0] != 0) and torch.all(grad[2] != 0), "unmatched queries still learn 'no verb'"
    # The matcher ignores the verbs of such a pair: its cost is that of a pair with verb cost 0.
    known = dict(target, verb_known=torch.tensor([True]))
    single = {key: value[0] for key, value in outputs.items() if key != "aux_outputs"}
    matcher = HungarianMatcher(cost_obj_class=0, cost_bbox=0, cost_giou=0, cost_verb_class=1)
    assert torch.all(matcher.cost_matrix(single, target) == 0)
    assert torch.any(matcher.cost_matrix(single, known) != 0)


def test_soft_targets_leave_the_focal_loss_for_their_own_term() -> None:
    outputs = random_outputs(22, batch=1, queries=3)
    target = make_target([3], [[1, 0, 0, 0]], [box(0.4, 0.5, 0.2, 0.4)], [box(0.5, 0.5, 0.2, 0.2)])
    nan = float("nan")
    criterion = HOICriterion(num_verbs=VERBS)
    indices = [(torch.tensor([2]), torch.tensor([0]))]
    logits = outputs["pred_verb_logits"].detach()
    # Soft targets equal to the hard labels: focal + soft = the plain focal loss (same denominator).
    same = dict(target, verb_soft_target=torch.tensor([[nan, 0.0, 0.0, nan]]))
    plain = criterion(outputs, [target], indices)["loss_verb_ce"]
    split = criterion(outputs, [same], indices)
    assert torch.allclose(split["loss_verb_ce"] + split["loss_verb_soft"], plain, atol=1e-6)
    # A soft positive (t = 0.8 on verb 1) enlarges the denominator by 0.8 and pulls its logit up.
    soft = dict(target, verb_soft_target=torch.tensor([[nan, 0.8, nan, nan]]))
    losses = criterion(outputs, [soft], indices)
    p = logits[0, 2, 1].sigmoid()
    expected = -((0.8 - p) ** 2) * (0.8 * torch.log(p) + 0.2 * torch.log(1 - p)) / 1.8
    assert torch.allclose(losses["loss_verb_soft"], expected, atol=1e-6)
    verb_logits = outputs["pred_verb_logits"]
    verb_logits.grad = None
    losses["loss_verb_soft"].backward()
    grad = verb_logits.grad[0]
    assert torch.count_nonzero(grad) == 1 and (grad[2, 1] < 0) == bool(p < 0.8)
    assert criterion.weighted_total(losses) > 0  # the soft term has a weight (verb_class)
