"""Distillation losses: ``kl`` against its formula and ``margin`` through the student's confidence."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student.losses import (
    DistillSettings,
    LossError,
    MarginTriplets,
    kl_distill_loss,
    margin_loss,
    select_margin_triplets,
    teacher_soft_targets,
    teacher_verb_margin,
)

torch.set_num_threads(1)
NUM_CLASSES = 80
VERBS = 6
NAN = float("nan")


def make_outputs(seed: int, batch: int = 1, queries: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pred_obj_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator).requires_grad_(),
        "pred_verb_logits": torch.randn(batch, queries, VERBS, generator=generator).requires_grad_(),
        "pred_sub_boxes": torch.full((batch, queries, 4), 0.5),
        "pred_obj_boxes": torch.full((batch, queries, 4), 0.5),
    }


def make_target(obj_labels: list[int], verbs: list[list[int]], margin: list[list[float]] | None = None) -> dict:
    pairs = len(obj_labels)
    target = {
        "obj_labels": torch.tensor(obj_labels, dtype=torch.int64),
        "verb_labels": torch.tensor(verbs, dtype=torch.float32).reshape(pairs, VERBS),
        "sub_boxes": torch.full((pairs, 4), 0.5),
        "obj_boxes": torch.full((pairs, 4), 0.5),
    }
    if margin is not None:
        target["teacher_verb_margin"] = torch.tensor(margin, dtype=torch.float32).reshape(pairs, VERBS)
    return target


def match(*pairs: tuple[list[int], list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(q, dtype=torch.int64), torch.tensor(p, dtype=torch.int64)) for q, p in pairs]


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(softmax(z_c / tau) || softmax(s_c / tau)) over the finite entries c of one row."""
    c = torch.isfinite(teacher)
    log_q = F.log_softmax(student[c] / tau, -1)
    p = F.softmax(teacher[c] / tau, -1)
    return tau**2 * F.kl_div(log_q, p, reduction="sum")


# -- kl ----------------------------------------------------------------------------------------


TEACHER_ROWS = [[2.0, NAN, -1.0, 0.5, NAN, NAN], [NAN, 1.5, NAN, NAN, -2.0, 0.0]]


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_kl_matches_the_formula_on_candidate_verbs(tau: float) -> None:
    outputs = make_outputs(0)
    target = make_target([3, 7], [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], TEACHER_ROWS)
    indices = match(([1, 3], [1, 0]))  # query 1 <- pair 1, query 3 <- pair 0
    loss, stats = kl_distill_loss(outputs, indices, [target], tau=tau)
    logits = outputs["pred_verb_logits"][0].detach()
    margins = target["teacher_verb_margin"]
    expected = (reference_kl(logits[1], margins[1], tau) + reference_kl(logits[3], margins[0], tau)) / 2
    torch.testing.assert_close(loss, expected)
    assert stats == {"num_terms": 2, "num_skipped": 0}


def test_kl_gradient_reaches_only_candidate_verb_logits_of_matched_queries() -> None:
    outputs = make_outputs(1)
    target = make_target([3, 7], [[1, 0, 0, 0, 0, 0]] * 2, TEACHER_ROWS)
    loss, _ = kl_distill_loss(outputs, match(([1, 3], [1, 0])), [target])
    loss.backward()
    grad = outputs["pred_verb_logits"].grad[0]
    candidates = torch.zeros(4, VERBS, dtype=torch.bool)
    candidates[1] = torch.isfinite(target["teacher_verb_margin"][1])
    candidates[3] = torch.isfinite(target["teacher_verb_margin"][0])
    assert (grad[candidates] != 0).all()
    assert (grad[~candidates] == 0).all()
    assert outputs["pred_obj_logits"].grad is None  # kl acts on the verb head only


def test_kl_falls_as_the_student_moves_toward_the_teacher() -> None:
    outputs = make_outputs(2)
    target = make_target([3, 7], [[1, 0, 0, 0, 0, 0]] * 2, TEACHER_ROWS)
    indices = match(([0, 2], [0, 1]))
    start = outputs["pred_verb_logits"].detach().clone()
    goal = start.clone()
    goal[0, 0] = torch.nan_to_num(target["teacher_verb_margin"][0], nan=0.0)
    goal[0, 2] = torch.nan_to_num(target["teacher_verb_margin"][1], nan=0.0)
    values = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        moved = dict(outputs, pred_verb_logits=(1 - t) * start + t * goal)
        values.append(kl_distill_loss(moved, indices, [target])[0].item())
    assert all(a > b for a, b in itertools.pairwise(values)), values
    assert values[-1] == pytest.approx(0.0, abs=1e-6)

    # And plain gradient descent on the student's logits lowers it.
    loss, _ = kl_distill_loss(outputs, indices, [target])
    loss.backward()
    stepped = dict(
        outputs,
        pred_verb_logits=outputs["pred_verb_logits"].detach() - 0.5 * outputs["pred_verb_logits"].grad,
    )
    assert kl_distill_loss(stepped, indices, [target])[0].item() < loss.item()


def test_kl_skips_single_candidate_rows_nan_rows_and_images_without_teacher() -> None:
    outputs = make_outputs(3, batch=2)
    margins = [
        [2.0, NAN, -1.0, 0.5, NAN, NAN],  # 3 candidates: a term
        [NAN, 4.0, NAN, NAN, NAN, NAN],  # 1 candidate: no information, skipped
        [NAN] * VERBS,  # nothing scored: skipped
    ]
    with_teacher = make_target([3, 7, 9], [[1, 0, 0, 0, 0, 0]] * 3, margins)
    without_teacher = make_target([4, 5], [[0, 1, 0, 0, 0, 0]] * 2)
    indices = match(([0, 1, 2], [0, 1, 2]), ([1, 3], [0, 1]))
    loss, stats = kl_distill_loss(outputs, indices, [with_teacher, without_teacher], tau=1.0)
    expected = reference_kl(outputs["pred_verb_logits"][0, 0].detach(), with_teacher["teacher_verb_margin"][0], 1.0)
    torch.testing.assert_close(loss, expected)
    assert stats == {"num_terms": 1, "num_skipped": 4}
    loss.backward()
    grad = outputs["pred_verb_logits"].grad
    assert torch.isfinite(grad).all()
    assert grad[0, 1:].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_kl_without_any_term_is_a_connected_zero() -> None:
    outputs = make_outputs(4)
    target = make_target([3], [[1, 0, 0, 0, 0, 0]], [[NAN, 1.0, NAN, NAN, NAN, NAN]])
    loss, stats = kl_distill_loss(outputs, match(([2], [0])), [target])
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert stats == {"num_terms": 0, "num_skipped": 1}
    loss.backward()
    assert outputs["pred_verb_logits"].grad is not None
    assert (outputs["pred_verb_logits"].grad == 0).all()
    empty = make_target([], [], [])
    loss, stats = kl_distill_loss(outputs, match(([], [])), [empty])
    assert loss.item() == 0.0 and stats == {"num_terms": 0, "num_skipped": 0}


def test_kl_rejects_malformed_teacher_rows_and_tau() -> None:
    outputs = make_outputs(5)
    target = make_target([3], [[1, 0, 0, 0, 0, 0]])
    target["teacher_verb_margin"] = torch.zeros(1, VERBS + 1)
    with pytest.raises(LossError, match=r"targets\[0\]\['teacher_verb_margin'\]: expected shape \(1, 6\)"):
        kl_distill_loss(outputs, match(([0], [0])), [target])
    with pytest.raises(LossError, match="tau must be > 0"):
        kl_distill_loss(outputs, match(([0], [0])), [target], tau=0.0)
    with pytest.raises(LossError, match="for a batch of 1"):
        kl_distill_loss(outputs, match(([0], [0]), ([1], [0])), [target])


def test_teacher_verb_margin_builds_candidate_rows() -> None:
    correspondence = np.zeros((VERBS, NUM_CLASSES), dtype=bool)
    correspondence[[0, 2, 5], 3] = True
    correspondence[[1, 4], 7] = True
    scores = {(0, 3): 1.5, (2, 3): -0.5, (1, 7): 0.25}  # (5, 3) and (4, 7) have no score

    margin = teacher_verb_margin(torch.tensor([3, 7, 80]), correspondence, lambda v, o, p: scores.get((v, o)))
    assert margin.shape == (3, VERBS) and margin.dtype == torch.float32
    assert margin[0, 0].item() == 1.5 and margin[0, 2].item() == -0.5
    assert margin[1, 1].item() == 0.25
    finite = torch.isfinite(margin)
    assert finite.sum().item() == 3  # non-candidates, missing scores and the no-object pair stay NaN
    assert not finite[2].any()
    with pytest.raises(LossError, match="correspondence must be"):
        teacher_verb_margin(torch.tensor([0]), np.zeros(3, dtype=bool), lambda v, o, p: 0.0)


# -- margin: selecting the triplets ----------------------------------------------------------------


def crafted_outputs() -> dict[str, torch.Tensor]:
    """4 queries: 0 matched and right, 1 confident but unmatched, 2 says "no object", 3 matched, wrong object."""
    obj = torch.full((1, 4, NUM_CLASSES + 1), -10.0)
    verb = torch.full((1, 4, VERBS), -6.0)
    obj[0, 0, 3] = 10.0  # query 0: object 3 ...
    verb[0, 0, 1] = 4.0  # ... verb 1 (ground truth: yes)
    verb[0, 0, 2] = 2.0  # ... verb 2 (ground truth: no) -> a negative
    obj[0, 1, 7] = 10.0
    verb[0, 1, 4] = 3.0
    verb[0, 1, 5] = 1.0  # less confident than (1, 4)
    obj[0, 2, NUM_CLASSES] = 10.0  # "no object": predicts nothing
    verb[0, 2, 0] = 5.0
    obj[0, 3, 9] = 10.0  # matched to a pair whose object is 5
    verb[0, 3, 0] = 3.0
    return {
        "pred_obj_logits": obj.requires_grad_(),
        "pred_verb_logits": verb.requires_grad_(),
        "pred_sub_boxes": torch.full((1, 4, 4), 0.5),
        "pred_obj_boxes": torch.full((1, 4, 4), 0.5),
    }


def as_set(triplets: MarginTriplets) -> set[tuple[int, int, int, bool]]:
    rows = zip(triplets.query, triplets.verb, triplets.obj, triplets.is_positive, strict=True)
    return {(int(q), int(v), int(o), bool(p)) for q, v, o, p in rows}


def test_select_margin_triplets_splits_positives_and_negatives() -> None:
    outputs = crafted_outputs()
    target = make_target([3, 5], [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    (triplets,) = select_margin_triplets(outputs, match(([0, 3], [0, 1])), [target], top_k=10, score_threshold=0.5)
    assert as_set(triplets) == {
        (0, 1, 3, True),  # matched, object and verb agree
        (0, 2, 3, False),  # confident verb the pair does not have
        (1, 4, 7, False),  # unmatched query
        (1, 5, 7, False),
        (3, 0, 9, False),  # matched, but the object is wrong
    }
    assert triplets.query.dtype == torch.int64 and triplets.is_positive.dtype == torch.bool
    assert len(triplets) == 5


def test_select_margin_triplets_keeps_the_top_k_most_confident_negatives() -> None:
    outputs = crafted_outputs()
    target = make_target([3, 5], [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    indices = match(([0, 3], [0, 1]))
    (top2,) = select_margin_triplets(outputs, indices, [target], top_k=2, score_threshold=0.5)
    assert as_set(top2) == {(0, 1, 3, True), (1, 4, 7, False), (3, 0, 9, False)}
    (none,) = select_margin_triplets(outputs, indices, [target], top_k=0, score_threshold=0.5)
    assert as_set(none) == {(0, 1, 3, True)}
    # A high threshold drops the negatives; the positive is its query's top verb, so it stays.
    (strict,) = select_margin_triplets(outputs, indices, [target], top_k=10, score_threshold=0.99)
    assert as_set(strict) == {(0, 1, 3, True)}


def test_select_margin_triplets_skips_verbs_without_sentence() -> None:
    outputs = crafted_outputs()
    target = make_target([3, 5], [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    (triplets,) = select_margin_triplets(
        outputs, match(([0, 3], [0, 1])), [target], top_k=10, score_threshold=0.5, skip_verbs={1, 4}
    )
    assert as_set(triplets) == {(0, 2, 3, False), (1, 5, 7, False), (3, 0, 9, False)}
    with pytest.raises(LossError, match=r"skip_verbs \[6\] outside 0..5"):
        select_margin_triplets(outputs, match(([0, 3], [0, 1])), [target], skip_verbs={6})


def test_select_margin_triplets_with_no_pairs_gives_only_negatives() -> None:
    outputs = crafted_outputs()
    (triplets,) = select_margin_triplets(outputs, match(([], [])), [make_target([], [])], 10, 0.5)
    assert not triplets.is_positive.any()
    assert (0, 1, 3, False) in as_set(triplets)


# -- margin: the loss --------------------------------------------------------------------------


def confidence(outputs: dict, q: int, v: int, o: int) -> torch.Tensor:
    return outputs["pred_verb_logits"][0, q, v].sigmoid() * outputs["pred_obj_logits"][0, q].softmax(-1)[o]


FOUR = MarginTriplets(
    query=torch.tensor([0, 1, 2, 3]),
    verb=torch.tensor([1, 2, 3, 4]),
    obj=torch.tensor([5, 6, 7, 8]),
    is_positive=torch.tensor([True, True, False, False]),
)
FOUR_Z = torch.tensor([0.8, -1.5, 2.0, -3.0])  # pos accepted, pos rejected, neg accepted, neg rejected


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_margin_loss_matches_the_formula(alpha: float) -> None:
    outputs = make_outputs(6)
    loss, stats = margin_loss(outputs, [FOUR], [FOUR_Z], alpha=alpha)
    c = [
        confidence(outputs, q, v, o).detach() for q, v, o in zip([0, 1, 2, 3], [1, 2, 3, 4], [5, 6, 7, 8], strict=True)
    ]
    z = FOUR_Z.tolist()
    expected = (
        max(0.0, alpha - c[0] * z[0]) + max(0.0, alpha - c[1] * z[1]) + max(0.0, c[2] * z[2]) + max(0.0, c[3] * z[3])
    ) / 4
    assert loss.item() == pytest.approx(float(expected), abs=1e-6)
    assert stats == {"num_terms": 4, "num_skipped": 0, "num_positive": 2, "num_negative": 2}


def test_margin_gradient_reaches_verb_and_object_logits_in_the_right_direction() -> None:
    outputs = make_outputs(7)
    loss, _ = margin_loss(outputs, [FOUR], [FOUR_Z], alpha=1.0)
    loss.backward()
    verb_grad = outputs["pred_verb_logits"].grad[0]
    obj_grad = outputs["pred_obj_logits"].grad[0]
    # Descent moves a logit against its gradient: the teacher-accepted positive goes up, the
    # rejected positive and the accepted negative go down, the rejected negative is left alone.
    assert verb_grad[0, 1] < 0 and obj_grad[0, 5] < 0
    assert verb_grad[1, 2] > 0 and obj_grad[1, 6] > 0
    assert verb_grad[2, 3] > 0 and obj_grad[2, 7] > 0
    assert verb_grad[3].abs().sum() == 0 and obj_grad[3].abs().sum() == 0
    # Only the triplet's own verb logit moves; the object softmax moves every class of the query.
    untouched = torch.ones(4, VERBS, dtype=torch.bool)
    untouched[[0, 1, 2], [1, 2, 3]] = False
    assert (verb_grad[untouched] == 0).all()


def test_margin_loss_falls_under_gradient_descent_on_confidences() -> None:
    outputs = make_outputs(8)
    before, _ = margin_loss(outputs, [FOUR], [FOUR_Z])
    before.backward()
    stepped = dict(
        outputs,
        pred_verb_logits=outputs["pred_verb_logits"].detach() - 1.0 * outputs["pred_verb_logits"].grad,
        pred_obj_logits=outputs["pred_obj_logits"].detach() - 1.0 * outputs["pred_obj_logits"].grad,
    )
    after, _ = margin_loss(stepped, [FOUR], [FOUR_Z])
    assert after.item() < before.item()
    c_before = [confidence(outputs, q, v, o).item() for q, v, o in ((0, 1, 5), (1, 2, 6), (2, 3, 7))]
    c_after = [confidence(stepped, q, v, o).item() for q, v, o in ((0, 1, 5), (1, 2, 6), (2, 3, 7))]
    assert c_after[0] > c_before[0]  # accepted positive: more confident
    assert c_after[1] < c_before[1]  # rejected positive: less
    assert c_after[2] < c_before[2]  # negative the teacher believes: less (eq. 4's negative term)


def test_margin_skips_missing_scores_and_images_without_scores() -> None:
    outputs = make_outputs(9, batch=2)
    z = torch.tensor([0.8, NAN, 2.0, NAN])
    loss, stats = margin_loss(outputs, [FOUR, FOUR], [z, None])
    c0 = confidence(outputs, 0, 1, 5).detach()
    c2 = confidence(outputs, 2, 3, 7).detach()
    expected = (max(0.0, 1.0 - 0.8 * c0.item()) + 2.0 * c2.item()) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats == {"num_terms": 2, "num_skipped": 6, "num_positive": 1, "num_negative": 1}
    loss.backward()
    assert torch.isfinite(outputs["pred_verb_logits"].grad).all()
    assert outputs["pred_verb_logits"].grad[1].abs().sum() == 0


def test_margin_without_any_term_is_a_connected_zero() -> None:
    outputs = make_outputs(10)
    empty = MarginTriplets(*(torch.zeros(0, dtype=torch.int64) for _ in range(3)), torch.zeros(0, dtype=torch.bool))
    for triplets, margins in (
        ([empty], [torch.zeros(0)]),
        ([FOUR], [torch.full((4,), NAN)]),
        ([FOUR], [None]),
    ):
        loss, stats = margin_loss(outputs, triplets, margins)
        assert loss.item() == 0.0 and loss.grad_fn is not None and not math.isnan(loss.item())
        assert stats["num_terms"] == 0
    loss.backward()
    assert (outputs["pred_verb_logits"].grad == 0).all() and (outputs["pred_obj_logits"].grad == 0).all()


def test_margin_rejects_misaligned_scores() -> None:
    outputs = make_outputs(11)
    with pytest.raises(LossError, match=r"teacher_margins\[0\]: expected shape \(4,\)"):
        margin_loss(outputs, [FOUR], [torch.zeros(3)])
    with pytest.raises(LossError, match="2 margin tensors for a batch of 1"):
        margin_loss(outputs, [FOUR], [FOUR_Z, FOUR_Z])
    with pytest.raises(LossError, match="alpha must be >= 0"):
        margin_loss(outputs, [FOUR], [FOUR_Z], alpha=-1.0)


def test_selected_triplets_feed_the_margin_loss_end_to_end() -> None:
    outputs = crafted_outputs()
    target = make_target([3, 5], [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    triplets = select_margin_triplets(outputs, match(([0, 3], [0, 1])), [target], top_k=10, score_threshold=0.5)
    z = torch.where(triplets[0].is_positive, 1.5, 0.7)  # what a teacher client would hand back
    loss, stats = margin_loss(outputs, triplets, [z])
    assert stats["num_positive"] == 1 and stats["num_negative"] == 4
    loss.backward()
    assert outputs["pred_verb_logits"].grad.abs().sum() > 0
    assert outputs["pred_obj_logits"].grad.abs().sum() > 0


# -- settings ----------------------------------------------------------------------------------


def test_distill_settings_defaults_and_validation() -> None:
    settings = DistillSettings()
    assert (settings.variant, settings.lambda_itm, settings.tau, settings.alpha) == ("soft", 1.0, 1.0, 1.0)
    for bad, field in (
        ({"variant": "mse"}, "variant"),
        ({"tau": 0.0}, "tau"),
        ({"lambda_itm": -1.0}, "lambda_itm"),
        ({"alpha": -0.5}, "alpha"),
        ({"top_k": -1}, "top_k"),
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"confidence": 1.0}, "confidence"),
    ):
        with pytest.raises(LossError, match=rf"DistillSettings\.{field}"):
            DistillSettings(**bad)


# -- soft: the teacher completes the verb labels -----------------------------------------------


def test_teacher_soft_targets_complete_only_what_the_label_leaves_open() -> None:
    margin = torch.tensor([[2.0, -1.0, NAN, 0.0, NAN, NAN], [1.0, 3.0, NAN, NAN, NAN, NAN]])
    labels = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    known = torch.tensor([True, False])
    soft = teacher_soft_targets(margin, labels, known, tau=2.0)
    # Pair 0: verb 0 is asserted (stays a hard positive); verbs 1 and 3 are completed with
    # sigmoid(z / 2); verb 2 has no score. Pair 1's verbs are unknown: every scored verb is open,
    # whatever its label row says (it means nothing for such a pair).
    assert torch.isnan(soft[0, 0]) and torch.isnan(soft[0, 2])
    assert torch.allclose(soft[0, [1, 3]], torch.sigmoid(torch.tensor([-0.5, 0.0])))
    assert torch.allclose(soft[1, [0, 1]], torch.sigmoid(torch.tensor([0.5, 1.5])))
    assert torch.isnan(soft[1, 2:]).all()
    # Without verb_known every pair counts as annotated: pair 1's labelled verb 0 is then asserted.
    all_known = teacher_soft_targets(margin, labels)
    assert torch.isnan(all_known[1, 0]) and torch.isfinite(all_known[1, 1])
    # With a confidence, only the verbs the teacher believes are completed: sigmoid(z / 2) of
    # -0.5, 0.0, 0.5, 1.5 is 0.38, 0.5, 0.62, 0.82, so 0.6 keeps pair 1's two entries and no other.
    believed = teacher_soft_targets(margin, labels, known, tau=2.0, confidence=0.6)
    assert torch.isfinite(believed).nonzero().tolist() == [[1, 0], [1, 1]]
    # A teacher whose scores sit in the middle (an uninformed one) completes nothing.
    flat = torch.where(torch.isfinite(margin), torch.full_like(margin, -0.43), margin)
    assert torch.isnan(teacher_soft_targets(flat, labels, known, confidence=0.7)).all()
    with pytest.raises(LossError, match="tau must be > 0"):
        teacher_soft_targets(margin, labels, tau=0.0)
    with pytest.raises(LossError, match="same shape"):
        teacher_soft_targets(margin[:, :3], labels)


def test_soft_variant_in_the_training_loss() -> None:
    from student.losses import HOICriterion, TrainingLoss

    class ScoredTeacher:  # TrainingLoss only asks whether a teacher is enabled for ``soft``
        enabled = True

    outputs = make_outputs(31, batch=1, queries=3)
    target = make_target([5], [[1, 0, 0, 0, 0, 0]], [[2.0, 1.5, -2.0, NAN, NAN, NAN]])
    criterion = HOICriterion(num_verbs=VERBS)
    none = TrainingLoss(criterion, DistillSettings(variant="soft"), None, aux_loss=False)(outputs, [target])
    soft = TrainingLoss(criterion, DistillSettings(variant="soft", lambda_itm=1.0), ScoredTeacher(), aux_loss=False)
    result = soft(outputs, [target])
    # sigmoid(z) of verbs 1 and 2 is 0.82 and 0.12: at the default confidence 0.7 only verb 1 is
    # completed; L_HOI loses that entry, L_ITM is its soft focal term.
    assert result.terms["itm_terms"] == 1 and result.terms["itm_skipped"] == 0
    assert result.terms["loss_itm"] > 0 and result.terms["loss_hoi"] < none.terms["loss_hoi"]
    half = TrainingLoss(criterion, DistillSettings(variant="soft", lambda_itm=0.5), ScoredTeacher(), aux_loss=False)
    halved = half(outputs, [target])
    assert math.isclose(halved.terms["loss"], result.terms["loss_hoi"] + 0.5 * result.terms["loss_itm"], rel_tol=1e-6)
    # The original targets are not modified (the soft targets live on shallow copies).
    assert "verb_soft_target" not in target
    # Without teacher margins, the soft term is a connected zero.
    bare = make_target([5], [[1, 0, 0, 0, 0, 0]])
    empty = soft(outputs, [bare])
    assert empty.terms["loss_itm"] == 0 and empty.terms["itm_terms"] == 0
    empty.total.backward()
