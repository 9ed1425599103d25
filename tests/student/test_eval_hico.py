"""HICO-DET mAP: hand-computed cases of the protocol, and a loop-based re-statement of the protocol
that the vectorised evaluator must agree with on random data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from student.evaluation.boxes import iou_touching_apart
from student.evaluation.hico import (
    RECALL_POINTS,
    count_triplets,
    evaluate_hico,
    load_correspondence,
    voc_ap_11_point,
)
from student.evaluation.predictions import EvaluationError, parse_hoi_entries, parse_predictions
from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, OBJECT_NAMES, hico_correspondence

COCO = {name: COCO_OBJECT_IDS[i] for i, name in enumerate(OBJECT_NAMES)}
OBJ = {name: i for i, name in enumerate(OBJECT_NAMES)}
VERB = {name: i for i, name in enumerate(HICO_VERBS)}
PERSON_BOX = [10, 10, 60, 110]
HORSE_BOX = [50, 60, 150, 160]
CUP_BOX = [200, 20, 230, 60]


def gt_image(name: str, pairs: list[tuple]) -> dict:
    """pairs: (subject box, object name, object box, verb name)."""
    boxes, hois = [], []
    for sub_box, obj, obj_box, verb in pairs:
        boxes += [
            {"bbox": list(sub_box), "category_id": 1},
            {"bbox": list(obj_box), "category_id": COCO[obj]},
        ]
        hois.append({"subject_id": len(boxes) - 2, "object_id": len(boxes) - 1, "category_id": VERB[verb] + 1})
    return {"file_name": name, "annotations": boxes, "hoi_annotation": hois}


def pred_image(name: str, triplets: list[tuple]) -> dict:
    """triplets: (subject box, object name, object box, verb name, score)."""
    boxes, hois = [], []
    for sub_box, obj, obj_box, verb, score in triplets:
        boxes += [
            {"bbox": list(sub_box), "category_id": 1},
            {"bbox": list(obj_box), "category_id": COCO[obj]},
        ]
        hois.append(
            {
                "subject_id": len(boxes) - 2,
                "object_id": len(boxes) - 1,
                "category_id": VERB[verb] + 1,
                "score": score,
            }
        )
    return {"file_name": name, "predictions": boxes, "hoi_prediction": hois}


def evaluate(gt: list, preds: list, *, train: list | None = None, correspondence=None, max_hois: int = 100):
    ground_truth = parse_hoi_entries(gt, dataset="hico", kind="annotations", source="test_hico.json")
    predictions = parse_predictions(preds, "hico", ground_truth, source="preds.json")
    training = parse_hoi_entries(train if train is not None else gt, dataset="hico", kind="annotations", source="t")
    return evaluate_hico(
        predictions,
        ground_truth,
        correspondence=hico_correspondence() if correspondence is None else correspondence,
        train_counts=count_triplets(training),
        max_hois=max_hois,
    )


def ap_of(result, obj: str, verb: str, *, known_object: bool = False) -> float:
    index = result.triplets.index((0, OBJ[obj], VERB[verb]))
    return float((result.ap_known_object if known_object else result.ap)[index])


RIDE_HORSE = (PERSON_BOX, "horse", HORSE_BOX, "ride")


def test_perfect_predictions_give_100_everywhere():
    gt = [
        gt_image("a.jpg", [RIDE_HORSE, (PERSON_BOX, "horse", HORSE_BOX, "feed")]),
        gt_image("b.jpg", [(PERSON_BOX, "cup", CUP_BOX, "hold"), ([300, 0, 350, 80], "cup", CUP_BOX, "sip")]),
    ]
    preds = [
        pred_image(g["file_name"], [(*pair, 0.5) for pair in pairs])
        for g, pairs in zip(
            gt,
            [
                [RIDE_HORSE, (PERSON_BOX, "horse", HORSE_BOX, "feed")],
                [(PERSON_BOX, "cup", CUP_BOX, "hold"), ([300, 0, 350, 80], "cup", CUP_BOX, "sip")],
            ],
            strict=True,
        )
    ]
    # Training: ride horse 10 times (non-rare), the others once (rare): both splits are populated.
    train = [gt_image(f"t{i}.jpg", [RIDE_HORSE]) for i in range(10)] + gt
    summary = evaluate(gt, preds, train=train).summary()
    for split in ("default", "known_object"):
        assert summary[split] == pytest.approx({"full": 100.0, "rare": 100.0, "non_rare": 100.0})
    assert summary["mean_max_recall"] == pytest.approx(100.0)


def test_duplicate_of_a_true_positive_is_a_false_positive():
    gt = [gt_image("a.jpg", [RIDE_HORSE]), gt_image("b.jpg", [RIDE_HORSE])]
    preds = [
        pred_image("a.jpg", [(*RIDE_HORSE, 0.9), (*RIDE_HORSE, 0.8)]),  # the second is a duplicate
        pred_image("b.jpg", [(*RIDE_HORSE, 0.7)]),
    ]
    # Ranked TP, FP, TP: recall .5 .5 1, precision 1 .5 2/3 -> 11-point AP (6 * 1 + 5 * 2/3) / 11.
    assert ap_of(evaluate(gt, preds), "horse", "ride") == pytest.approx((6 + 5 * 2 / 3) / 11)
    without_duplicate = [pred_image("a.jpg", [(*RIDE_HORSE, 0.9)]), preds[1]]
    assert ap_of(evaluate(gt, without_duplicate), "horse", "ride") == pytest.approx(1.0)


def test_prediction_takes_its_best_ground_truth_and_does_not_fall_back_when_it_is_taken():
    # Two ground-truth "ride horse" of one person with two horse boxes (IoU 2/3 with each other).
    horse_1, horse_2 = [0, 0, 99, 99], [20, 0, 119, 99]
    gt = [gt_image("a.jpg", [(PERSON_BOX, "horse", horse_1, "ride"), (PERSON_BOX, "horse", horse_2, "ride")])]
    # Prediction 1 takes horse_1 (IoU 1 vs 2/3). Prediction 2 overlaps horse_1 best (0.905 vs 0.739):
    # horse_1 is taken, so it is a false positive although horse_2 is still free.
    preds = [
        pred_image(
            "a.jpg",
            [
                (PERSON_BOX, "horse", horse_1, "ride", 0.9),
                (PERSON_BOX, "horse", [5, 0, 104, 99], "ride", 0.8),
            ],
        )
    ]
    # TP, FP with 2 positives: recall .5 .5, precision 1 .5 -> points 0..0.5 have precision 1: 6/11.
    result = evaluate(gt, preds)
    assert ap_of(result, "horse", "ride") == pytest.approx(6 / 11)
    assert result.max_recall[0] == pytest.approx(0.5)


def test_prediction_beyond_the_top_100_does_not_count():
    gt = [gt_image("a.jpg", [RIDE_HORSE])]
    # 100 valid triplets of a class absent from the test ground truth outrank the true positive.
    others = [(PERSON_BOX, "cup", CUP_BOX, "hold", 0.9)] * 100
    preds = [pred_image("a.jpg", [*others, (*RIDE_HORSE, 0.5)])]
    assert ap_of(evaluate(gt, preds), "horse", "ride") == 0.0
    assert ap_of(evaluate(gt, preds, max_hois=101), "horse", "ride") == pytest.approx(1.0)


def test_invalid_verb_object_pairs_are_dropped_before_the_top_100_cut():
    gt = [gt_image("a.jpg", [RIDE_HORSE])]
    # "ride cup" is not a HICO-DET HOI: these 100 high-scoring triplets must not take top-100 places.
    invalid = [(PERSON_BOX, "cup", CUP_BOX, "ride", 0.9)] * 100
    preds = [pred_image("a.jpg", [*invalid, (*RIDE_HORSE, 0.5)])]
    assert ap_of(evaluate(gt, preds), "horse", "ride") == pytest.approx(1.0)


def test_an_invalid_pair_is_dropped_even_when_it_matches_ground_truth():
    gt = [gt_image("a.jpg", [(PERSON_BOX, "cup", CUP_BOX, "ride")])]
    preds = [pred_image("a.jpg", [(PERSON_BOX, "cup", CUP_BOX, "ride", 0.9)])]
    assert ap_of(evaluate(gt, preds), "cup", "ride") == 0.0
    everything_valid = np.ones((len(HICO_VERBS), len(OBJECT_NAMES)), dtype=bool)
    assert ap_of(evaluate(gt, preds, correspondence=everything_valid), "cup", "ride") == pytest.approx(1.0)


def test_rare_and_non_rare_split_follows_the_training_counts():
    feed_horse = (PERSON_BOX, "horse", HORSE_BOX, "feed")
    hold_cup = (PERSON_BOX, "cup", CUP_BOX, "hold")
    # Training: ride horse 10x (non-rare), feed horse 9x (rare), hold cup never (rare: 0 < 10).
    train = [gt_image(f"r{i}.jpg", [RIDE_HORSE]) for i in range(10)]
    train += [gt_image(f"f{i}.jpg", [feed_horse]) for i in range(9)]
    gt = [gt_image("a.jpg", [RIDE_HORSE, feed_horse, hold_cup])]
    preds = [pred_image("a.jpg", [(*RIDE_HORSE, 0.9), (*feed_horse, 0.8)])]  # hold cup missed: AP 0
    result = evaluate(gt, preds, train=train)
    rare = {result.triplets[i]: bool(r) for i, r in enumerate(result.rare)}
    assert rare == {
        (0, OBJ["horse"], VERB["ride"]): False,
        (0, OBJ["horse"], VERB["feed"]): True,
        (0, OBJ["cup"], VERB["hold"]): True,
    }
    assert result.default.full == pytest.approx(2 / 3)
    assert result.default.rare == pytest.approx(0.5)
    assert result.default.non_rare == pytest.approx(1.0)
    assert result.mean_max_recall == pytest.approx(2 / 3)


def test_known_object_drops_predictions_from_images_without_that_object():
    gt = [
        gt_image("ride.jpg", [RIDE_HORSE]),
        gt_image("feed.jpg", [(PERSON_BOX, "horse", HORSE_BOX, "feed")]),  # has a horse HOI
        gt_image("cup.jpg", [(PERSON_BOX, "cup", CUP_BOX, "hold")]),  # no horse HOI
    ]
    preds = [
        pred_image("ride.jpg", [(*RIDE_HORSE, 0.5)]),
        pred_image("feed.jpg", [(*RIDE_HORSE, 0.95)]),  # false positive, stays in Known-Object
        pred_image("cup.jpg", [(*RIDE_HORSE, 0.9)]),  # false positive, left out of Known-Object
    ]
    result = evaluate(gt, preds)
    # Default: FP, FP, TP -> precision 1/3 at recall 1. Known-Object: FP, TP -> 1/2.
    assert ap_of(result, "horse", "ride") == pytest.approx(1 / 3)
    assert ap_of(result, "horse", "ride", known_object=True) == pytest.approx(1 / 2)


def test_image_without_predictions_only_lowers_recall():
    gt = [gt_image("a.jpg", [RIDE_HORSE]), gt_image("b.jpg", [RIDE_HORSE])]
    preds = [pred_image("a.jpg", [(*RIDE_HORSE, 0.9)]), pred_image("b.jpg", [])]
    result = evaluate(gt, preds)
    assert ap_of(result, "horse", "ride") == pytest.approx(6 / 11)  # recall 0.5 at precision 1
    assert result.mean_max_recall == pytest.approx(0.5)


def test_partial_ap_of_a_hand_computed_precision_recall_curve():
    gt = [gt_image(f"{i}.jpg", [RIDE_HORSE]) for i in range(4)]
    far = ([300, 300, 350, 400], "horse", HORSE_BOX, "ride")  # subject IoU 0: a false positive
    preds = [
        pred_image("0.jpg", [(*RIDE_HORSE, 0.9), (*far, 0.8)]),
        pred_image("1.jpg", [(*RIDE_HORSE, 0.7), (*far, 0.6)]),
        pred_image("2.jpg", [(*RIDE_HORSE, 0.5)]),
        pred_image("3.jpg", []),
    ]
    # TP FP TP FP TP: recall .25 .25 .5 .5 .75, precision 1 .5 2/3 .5 .6.
    # Points 0, .1, .2 -> 1; .3, .4, .5 -> 2/3; .6, .7 -> .6; .8, .9, 1 -> 0.
    result = evaluate(gt, preds)
    assert ap_of(result, "horse", "ride") == pytest.approx((3 * 1 + 3 * 2 / 3 + 2 * 0.6) / 11)
    assert result.max_recall[0] == pytest.approx(0.75)
    # By name, in percent: what the demo and the ablation report for single triplets.
    assert result.ap_by_triplet() == {"ride horse": pytest.approx(100 * (3 * 1 + 3 * 2 / 3 + 2 * 0.6) / 11)}


def test_eleven_point_ap_uses_the_reference_recall_points():
    assert voc_ap_11_point(np.array([0.25, 0.5, 1.0]), np.array([1.0, 1.0, 0.5])) == pytest.approx(
        (6 * 1.0 + 5 * 0.5) / 11
    )
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004: a recall of exactly 0.3 does not reach it.
    assert RECALL_POINTS[3] > 0.3
    assert voc_ap_11_point(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11)


def test_iou_uses_plus_one_pixels_and_strict_overlap():
    a = np.array([[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 10, 10], [0, 0, 9, 9]], dtype=float)
    b = np.array([[0, 0, 9, 9], [0, 0, 4, 9], [10, 0, 20, 10], [5, 5, 14, 14]], dtype=float)
    # identical; half (50 of 100 px); touching edges -> 0 (strict test); 4 px wide overlap + 1 = 5x5.
    np.testing.assert_allclose(iou_touching_apart(a, b), [1.0, 0.5, 0.0, 25 / 175])


def test_iou_of_exactly_one_half_matches_and_object_class_must_agree():
    gt = [gt_image("a.jpg", [([0, 0, 9, 9], "horse", HORSE_BOX, "ride")])]
    half = [pred_image("a.jpg", [([0, 0, 4, 9], "horse", HORSE_BOX, "ride", 0.9)])]
    assert ap_of(evaluate(gt, half), "horse", "ride") == pytest.approx(1.0)
    # Same boxes, object called a "zebra" (ride zebra is valid): class-aware IoU -> no match.
    zebra = [pred_image("a.jpg", [([0, 0, 9, 9], "zebra", HORSE_BOX, "ride", 0.9)])]
    assert ap_of(evaluate(gt, zebra), "horse", "ride") == 0.0


def test_empty_split_gives_no_numbers_and_empty_predictions_give_zero():
    assert evaluate([], []).summary() == {
        "default": {"full": None, "rare": None, "non_rare": None},
        "known_object": {"full": None, "rare": None, "non_rare": None},
        "mean_max_recall": None,
    }
    gt = [gt_image("a.jpg", [RIDE_HORSE])]
    summary = evaluate(gt, [pred_image("a.jpg", [])]).summary()
    assert summary["default"]["full"] == 0.0
    assert summary["mean_max_recall"] == 0.0


def test_image_count_mismatch_and_bad_correspondence_are_errors(tmp_path):
    gt = parse_hoi_entries([gt_image("a.jpg", [RIDE_HORSE])], dataset="hico", kind="annotations", source="gt")
    other = parse_hoi_entries([], dataset="hico", kind="annotations", source="gt")
    with pytest.raises(EvaluationError, match="cover 0 images but the annotations have 1"):
        evaluate_hico(other, gt, correspondence=hico_correspondence(), train_counts={})
    with pytest.raises(EvaluationError, match="max_hois = 0: keep at least 1 triplet per image"):
        evaluate_hico(gt, gt, correspondence=hico_correspondence(), train_counts={}, max_hois=0)
    with pytest.raises(EvaluationError, match=r"shape \(80, 117\) is not"):
        evaluate_hico(gt, gt, correspondence=hico_correspondence().T, train_counts={})
    path = tmp_path / "corre_hico.npy"
    np.save(path, hico_correspondence().astype(np.float64))
    np.testing.assert_array_equal(load_correspondence(path), hico_correspondence())
    with pytest.raises(EvaluationError, match="no such file"):
        load_correspondence(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------------
# The protocol stated once more, as plain loops, and compared with the vectorised evaluator.


def _iou(a, b) -> float:
    left, right = max(a[1], b[1]), min(a[3], b[3])
    top, bottom = max(a[0], b[0]), min(a[2], b[2])
    if left >= right or top >= bottom:
        return 0.0
    inter = (right - left + 1) * (bottom - top + 1)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area - inter)


def _loop_triplets(gt: list) -> dict[tuple, int]:
    """Instances per (subject class, object class, verb) of ground-truth images."""
    index_of = {coco: i for i, coco in enumerate(COCO_OBJECT_IDS)}
    counts: dict[tuple, int] = {}
    for image in gt:
        boxes = image["annotations"]
        for h in image["hoi_annotation"]:
            t = (
                index_of[boxes[h["subject_id"]]["category_id"]],
                index_of[boxes[h["object_id"]]["category_id"]],
                h["category_id"] - 1,
            )
            counts[t] = counts.get(t, 0) + 1
    return counts


def _loop_ap(rows: list, positives: int) -> tuple[float, float]:
    """(11-point AP, max recall) of (score, hit) rows."""
    if not rows:
        return 0.0, 0.0
    rows = sorted(rows, key=lambda r: -r[0])
    tp = np.cumsum([r[1] for r in rows])
    fp = np.cumsum([not r[1] for r in rows])
    return voc_ap_11_point(tp / positives, tp / np.maximum(tp + fp, 1)), float(tp[-1] / positives)


def _loop_evaluate(gt: list, preds: list, correspondence: np.ndarray, max_hois: int) -> dict[tuple, tuple]:
    """Per test triplet class: (Default AP, Known-Object AP, max recall)."""
    index_of = {coco: i for i, coco in enumerate(COCO_OBJECT_IDS)}
    positives = _loop_triplets(gt)
    records: dict[tuple, list] = {t: [] for t in positives}
    known_object: dict[tuple, list] = {t: [] for t in positives}
    for image, pred in zip(gt, preds, strict=True):
        boxes = pred["predictions"]
        label = [index_of[b["category_id"]] for b in boxes]
        hois = [h for h in pred["hoi_prediction"] if correspondence[h["category_id"] - 1, label[h["object_id"]]]]
        hois = sorted(hois, key=lambda h: -h["score"])[:max_hois]
        gt_boxes, gt_hois = image["annotations"], image["hoi_annotation"]
        objects_here = {index_of[gt_boxes[g["object_id"]]["category_id"]] for g in gt_hois}
        taken = [False] * len(gt_hois)
        for h in hois:
            best, best_overlap = None, 0.0
            for g_index, g in enumerate(gt_hois):
                if g["category_id"] != h["category_id"]:
                    continue
                pairs = [(h["subject_id"], g["subject_id"]), (h["object_id"], g["object_id"])]
                if any(boxes[p]["category_id"] != gt_boxes[q]["category_id"] for p, q in pairs):
                    continue
                overlaps = [_iou(boxes[p]["bbox"], gt_boxes[q]["bbox"]) for p, q in pairs]
                if min(overlaps) >= 0.5 and min(overlaps) > best_overlap:
                    best, best_overlap = g_index, min(overlaps)
            t = (label[h["subject_id"]], label[h["object_id"]], h["category_id"] - 1)
            if t not in records:
                continue
            hit = best is not None and not taken[best]
            if hit:
                taken[best] = True
            records[t].append((h["score"], hit))
            if t[1] in objects_here:  # Known-Object: only images whose ground truth has this object
                known_object[t].append((h["score"], hit))
    result = {}
    for t, count in positives.items():
        ap, max_recall = _loop_ap(records[t], count)
        result[t] = (ap, _loop_ap(known_object[t], count)[0], max_recall)
    return result


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_evaluator_agrees_with_the_loop_statement_on_random_data(seed):
    rng = random.Random(seed)
    # Few positions, classes and verbs: many overlaps, duplicates and competing ground truths.
    positions = [
        [x, y, x + w, y + h]
        for x, y, w, h in [
            (0, 0, 40, 80),
            (5, 3, 40, 80),
            (30, 10, 50, 50),
            (100, 100, 60, 60),
            (110, 95, 60, 70),
            (0, 0, 9, 9),
            (0, 0, 40, 36),  # IoU 0.46 with (0, 0, 40, 80): just below the threshold
        ]
    ]
    objects, verbs = ["person", "horse", "cup"], ["hold", "ride", "feed", "carry"]
    correspondence = np.random.default_rng(seed).random((len(HICO_VERBS), len(OBJECT_NAMES))) < 0.8

    def random_image(kind: str) -> dict:
        boxes = [{"bbox": rng.choice(positions), "category_id": COCO[rng.choice(objects)]} for _ in range(6)]
        boxes[0]["category_id"] = boxes[1]["category_id"] = 1
        hois = []
        for _ in range(rng.randint(0, 8 if kind == "annotations" else 40)):
            hoi = {
                "subject_id": rng.randint(0, 1),
                "object_id": rng.randint(0, 5),
                "category_id": VERB[rng.choice(verbs)] + 1,
            }
            if kind == "predictions":
                hoi["score"] = round(rng.random(), 3)
            hois.append(hoi)
        keys = ("annotations", "hoi_annotation") if kind == "annotations" else ("predictions", "hoi_prediction")
        return {"file_name": "x.jpg", keys[0]: boxes, keys[1]: hois}

    gt = [random_image("annotations") for _ in range(25)]
    preds = [random_image("predictions") for _ in range(25)]
    # A training split of its own: 12 triplet classes over ~100 HOIs put some classes on each
    # side of the rare limit (fewer than 10 training instances), and leave some out of training.
    train = [random_image("annotations") for _ in range(25)]
    result = evaluate(gt, preds, train=train, correspondence=correspondence, max_hois=20)
    expected = _loop_evaluate(gt, preds, correspondence, max_hois=20)
    assert set(result.triplets) == set(expected)
    train_counts = _loop_triplets(train)
    rare = {t: train_counts.get(t, 0) < 10 for t in expected}
    assert dict(zip(result.triplets, result.rare.tolist(), strict=True)) == rare
    for name, values in (
        ("default", result.ap),
        ("known_object", result.ap_known_object),
        ("max_recall", result.max_recall),
    ):
        got = dict(zip(result.triplets, values.tolist(), strict=True))
        column = ("default", "known_object", "max_recall").index(name)
        for t, row in expected.items():
            assert got[t] == pytest.approx(row[column]), (name, t)

    def mean(column: int, classes: list) -> float:
        return float(np.mean([expected[t][column] for t in classes])) if classes else math.nan

    everything = list(expected)
    rare_classes = [t for t in everything if rare[t]]
    common_classes = [t for t in everything if not rare[t]]
    for split, column in ((result.default, 0), (result.known_object, 1)):
        assert split.full == pytest.approx(mean(column, everything))
        assert split.rare == pytest.approx(mean(column, rare_classes), nan_ok=True)
        assert split.non_rare == pytest.approx(mean(column, common_classes), nan_ok=True)
    assert result.mean_max_recall == pytest.approx(mean(2, everything))
    # Every seed exercises both sides of the split and a Known-Object AP unlike the Default one.
    assert rare_classes and common_classes
    assert any(expected[t][0] != pytest.approx(expected[t][1]) for t in everything)
    assert not math.isnan(result.default.full)
