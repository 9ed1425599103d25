"""V-COCO role AP: hand-computed cases of vsrl_eval's rules, and a loop-based re-statement of them
that the vectorised evaluator must agree with on random data."""

from __future__ import annotations

import random

import numpy as np
import pytest

from student.evaluation.boxes import iou_touching_shared
from student.evaluation.predictions import EvaluationError, parse_hoi_entries, parse_predictions
from student.evaluation.vcoco import (
    evaluate_vcoco,
    role_classes,
    split_verb,
    voc_ap_all_points,
)
from teacher_server.hoi.classes import COCO_OBJECT_IDS, OBJECT_NAMES, VCOCO_VERBS

COCO = {name: COCO_OBJECT_IDS[i] for i, name in enumerate(OBJECT_NAMES)}
VERB = {name: i for i, name in enumerate(VCOCO_VERBS)}
P1, P2, P3 = [0, 0, 99, 199], [300, 0, 399, 199], [600, 0, 699, 199]
CUP, APPLE = [50, 50, 79, 79], [350, 50, 379, 79]


def gt_image(persons: list, objects: list, hois: list, name: str = "x.jpg") -> dict:
    """persons: boxes; objects: (name, box); hois: (person index, object index or -1, verb)."""
    boxes = [{"bbox": b, "category_id": 1} for b in persons]
    boxes += [{"bbox": b, "category_id": COCO[o]} for o, b in objects]
    return {
        "file_name": name,
        "annotations": boxes,
        "hoi_annotation": [
            {"subject_id": s, "object_id": -1 if o < 0 else len(persons) + o, "category_id": VERB[v]}
            for s, o, v in hois
        ],
    }


def pred_image(triplets: list, name: str = "x.jpg") -> dict:
    """triplets: (agent box, role box or None, verb, score)."""
    boxes, hois = [], []
    for agent, role, verb, score in triplets:
        boxes.append({"bbox": agent, "category_id": 1})
        subject = len(boxes) - 1
        if role is not None:
            boxes.append({"bbox": role, "category_id": COCO["cup"]})
        obj = len(boxes) - 1 if role is not None else -1
        hois.append({"subject_id": subject, "object_id": obj, "category_id": VERB[verb], "score": score})
    return {"file_name": name, "predictions": boxes, "hoi_prediction": hois}


def evaluate(gt: list, preds: list, **kwargs):
    ground_truth = parse_hoi_entries(gt, dataset="vcoco", kind="annotations", source="test_vcoco.json")
    return evaluate_vcoco(parse_predictions(preds, "vcoco", ground_truth), ground_truth, **kwargs)


def test_role_classes_are_the_25_verbs_with_a_role():
    classes = role_classes()
    assert len(classes) == 25
    assert {split_verb(v)[0] for v in VCOCO_VERBS if split_verb(v)[1] is None} == {
        "stand",
        "walk",
        "run",
        "smile",
    }
    assert split_verb("talk_on_phone_instr") == ("talk_on_phone", "instr")
    assert split_verb("work_on_computer_instr") == ("work_on_computer", "instr")
    assert ("eat", "obj") in {(c.action, c.role) for c in classes}


def test_perfect_predictions_give_100_in_both_scenarios():
    gt = [
        gt_image(
            [P1, P2],
            [("cup", CUP)],
            # P1 eats: both roles of "eat" are positives, even with no object for either.
            [
                (0, 0, "hold_obj"),
                (0, -1, "eat_obj"),
                (0, -1, "eat_instr"),
                (0, 0, "drink_instr"),
                (1, -1, "stand"),
            ],
        )
    ]
    preds = [
        pred_image(
            [
                (P1, CUP, "hold_obj", 0.9),
                (P1, None, "eat_obj", 0.8),
                (P1, None, "eat_instr", 0.8),
                (P1, CUP, "drink_instr", 0.7),
                (P2, None, "stand", 0.9),
            ]
        )
    ]
    result = evaluate(gt, preds)
    assert result.summary() == {"scenario_1": pytest.approx(100.0), "scenario_2": pytest.approx(100.0)}
    assert result.num_positives["hold_obj"] == 1 and result.num_positives["ride_instr"] == 0
    assert np.isnan(result.role_ap_1["ride_instr"])  # no ground truth: no AP, not in the mean
    assert "stand" not in result.role_ap_1


def test_ground_truth_without_role_object_separates_the_scenarios():
    gt = [gt_image([P1], [], [(0, -1, "eat_obj")])]
    with_box = evaluate(gt, [pred_image([(P1, CUP, "eat_obj", 0.9)])])
    assert with_box.role_ap_1["eat_obj"] == 0.0  # scenario 1: a role box where there is none is wrong
    assert with_box.role_ap_2["eat_obj"] == pytest.approx(1.0)  # scenario 2: the box does not matter
    empty = evaluate(gt, [pred_image([(P1, None, "eat_obj", 0.9)])])
    assert empty.role_ap_1["eat_obj"] == pytest.approx(1.0)
    assert empty.role_ap_2["eat_obj"] == pytest.approx(1.0)
    zeros = evaluate(gt, [pred_image([(P1, [0, 0, 0, 0], "eat_obj", 0.9)])])  # all-zero box = empty
    assert zeros.role_ap_1["eat_obj"] == pytest.approx(1.0)


def test_ground_truth_boxes_are_read_with_the_official_convention():
    # test_vcoco.json of the DETR-line codebases stores COCO's [x, y, w, h] as x2 = x + w; the
    # official vsrl_eval reads it as x2 = x + w - 1. The file's person [0, 0, 100, 100] is
    # officially [0, 0, 99, 99]: 100 x 100 = 10,000 px with the +1 pixel rule. A predicted agent
    # [0, 0, 99, 49.2] (100 x 50.2 = 5,020 px, inside it) has IoU 5020 / 10000 = 0.502
    # officially, and 5020 / 101^2 = 0.492 against the file's box as it stands.
    gt = [gt_image([[0, 0, 100, 100]], [], [(0, -1, "eat_obj")])]
    preds = [pred_image([([0, 0, 99, 49.2], None, "eat_obj", 0.9)])]
    assert evaluate(gt, preds).role_ap_1["eat_obj"] == pytest.approx(1.0)
    # A file whose boxes already follow the official convention is read as it is.
    assert evaluate(gt, preds, ground_truth_boxes="official").role_ap_1["eat_obj"] == 0.0
    with pytest.raises(EvaluationError, match="ground_truth_boxes = 'coco'"):
        evaluate(gt, preds, ground_truth_boxes="coco")


def test_role_box_must_overlap_the_ground_truth_role_in_both_scenarios():
    gt = [gt_image([P1], [("cup", CUP)], [(0, 0, "hold_obj")])]
    for role in (APPLE, None):
        result = evaluate(gt, [pred_image([(P1, role, "hold_obj", 0.9)])])
        assert result.role_ap_1["hold_obj"] == 0.0
        assert result.role_ap_2["hold_obj"] == 0.0


def test_action_without_this_role_counts_as_a_ground_truth_without_role_object():
    # The person eats an object; nothing is annotated as the instrument of eating.
    gt = [gt_image([P1], [("cup", CUP)], [(0, 0, "eat_obj")])]
    result = evaluate(gt, [pred_image([(P1, None, "eat_instr", 0.9)])])
    assert result.num_positives["eat_instr"] == 1
    assert result.role_ap_1["eat_instr"] == pytest.approx(1.0)


def test_agent_only_actions_take_no_part_in_role_ap():
    gt = [gt_image([P1, P2], [("cup", CUP)], [(0, 0, "hold_obj"), (1, -1, "stand"), (1, -1, "smile")])]
    base = [(P1, CUP, "hold_obj", 0.5)]
    agent_only = [(P2, None, "stand", 0.9), (P1, None, "walk", 0.95), (P1, None, "smile", 0.99)]
    for triplets in (base, base + agent_only):
        result = evaluate(gt, [pred_image(triplets)])
        assert result.scenario_1 == pytest.approx(1.0)
        assert set(result.role_ap_1) == {c.name for c in role_classes()}


def test_point_is_left_out_of_the_mean():
    gt = [gt_image([P1], [("cup", CUP)], [(0, 0, "hold_obj"), (0, 0, "point_instr")])]
    preds = [pred_image([(P1, CUP, "hold_obj", 0.9), (P1, APPLE, "point_instr", 0.9)])]
    result = evaluate(gt, preds)
    assert result.role_ap_1["point_instr"] == 0.0
    assert result.scenario_1 == pytest.approx(1.0)
    assert result.scenario_2 == pytest.approx(1.0)


def test_agent_goes_to_the_best_overlapping_person_even_if_another_has_the_action():
    # P1 holds the cup; P1b (annotated: it stands) overlaps the predicted agent more than P1 does.
    p1b = [0, 20, 99, 219]
    gt = [gt_image([P1, p1b], [("cup", CUP)], [(0, 0, "hold_obj"), (1, -1, "stand")])]
    agent = [0, 15, 99, 214]  # IoU with P1 (185/215 rows) ~ .86 < IoU with P1b (195/205 rows) ~ .95
    assert iou_touching_shared(np.array([agent] * 2, float), np.array([P1, p1b], float)).argmax() == 1
    assert evaluate(gt, [pred_image([(agent, CUP, "hold_obj", 0.9)])]).role_ap_1["hold_obj"] == 0.0
    assert evaluate(gt, [pred_image([(P1, CUP, "hold_obj", 0.9)])]).role_ap_1["hold_obj"] == pytest.approx(1.0)


def test_detection_matched_to_a_person_without_any_annotation_is_skipped_by_default():
    gt = [gt_image([P1, P3], [("cup", CUP)], [(0, 0, "hold_obj")])]  # P3: in the image, no HOI at all
    preds = [pred_image([(P3, CUP, "hold_obj", 0.9), (P1, CUP, "hold_obj", 0.5)])]
    assert evaluate(gt, preds).role_ap_1["hold_obj"] == pytest.approx(1.0)
    # Counting P3 as an annotated person: FP then TP -> recall 1 at precision 1/2 -> AP 0.5.
    counted = evaluate(gt, preds, ignore_persons_without_actions=False)
    assert counted.role_ap_1["hold_obj"] == pytest.approx(0.5)


def test_second_detection_of_a_covered_person_is_a_false_positive():
    gt = [
        gt_image([P1], [("cup", CUP)], [(0, 0, "hold_obj")], name="a.jpg"),
        gt_image([P1], [("cup", CUP)], [(0, 0, "hold_obj")], name="b.jpg"),
    ]
    preds = [
        pred_image([(P1, CUP, "hold_obj", 0.9), (P1, CUP, "hold_obj", 0.8)], name="a.jpg"),
        pred_image([(P1, CUP, "hold_obj", 0.7)], name="b.jpg"),
    ]
    # TP FP TP, 2 positives: recall .5 .5 1, precision 1 .5 2/3 -> area .5 * 1 + .5 * 2/3.
    assert evaluate(gt, preds).role_ap_1["hold_obj"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_all_point_ap_of_a_hand_computed_curve():
    recall = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.5, 0.6])
    # Envelope: 1 up to recall .25, 2/3 up to .5, .6 up to .75, nothing beyond.
    assert voc_ap_all_points(recall, precision) == pytest.approx(0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 0.6)
    assert voc_ap_all_points(np.array([]), np.array([])) == 0.0


def test_overlap_counts_touching_boxes_as_one_shared_pixel():
    a = np.array([[0, 0, 9, 9], [0, 0, 9, 9]], float)
    b = np.array([[0, 0, 9, 9], [9, 0, 18, 9]], float)
    np.testing.assert_allclose(iou_touching_shared(a, b), [1.0, 10 / 190])


# ------------------------------------------------------------------------------------------------
# vsrl_eval's rules stated once more as loops, compared with the vectorised evaluator.


def _overlap(a, b) -> float:
    if b is None:
        return 0.0
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - w * h
    return w * h / union


def _official(box: list) -> list:
    """A ground-truth box of the file (x2 = x + w) as vsrl_eval reads it (x2 = x + w - 1)."""
    x1, y1, x2, y2 = box
    return [x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)]


def _loop_role_ap(gt: list, preds: list, scenario: int, *, ignore_persons_without_actions: bool) -> dict[str, float]:
    result = {}
    for c in role_classes():
        npos, rows = 0, []
        for image, pred in zip(gt, preds, strict=True):
            boxes, hois = image["annotations"], image["hoi_annotation"]
            subjects = {h["subject_id"] for h in hois}
            persons = [i for i, b in enumerate(boxes) if b["category_id"] == 1 or i in subjects]
            has_action = {h["subject_id"] for h in hois if split_verb(VCOCO_VERBS[h["category_id"]])[0] == c.action}
            npos += len(has_action)
            roles = {
                i: [
                    _official(boxes[h["object_id"]]["bbox"])
                    for h in hois
                    if h["subject_id"] == i and h["category_id"] == c.verb and h["object_id"] >= 0
                ]
                for i in persons
            }
            dets = [
                (
                    pred["predictions"][h["subject_id"]]["bbox"],
                    None if h["object_id"] < 0 else pred["predictions"][h["object_id"]]["bbox"],
                    h["score"],
                )
                for h in pred["hoi_prediction"]
                if h["category_id"] == c.verb
            ]
            covered = set()
            for agent, role, score in sorted(dets, key=lambda d: -d[2]):
                if not persons:
                    rows.append((score, False))
                    continue
                overlaps = [_overlap(_official(boxes[p]["bbox"]), agent) for p in persons]
                j = persons[int(np.argmax(overlaps))]
                if j not in subjects and ignore_persons_without_actions:
                    continue  # a person without annotation: skipped (else a false positive below)
                if roles[j]:
                    role_overlap = max(_overlap(r, role) for r in roles[j])
                elif scenario == 2 or role is None or not any(role):
                    role_overlap = 1.0
                else:
                    role_overlap = 0.0
                hit = j in has_action and max(overlaps) >= 0.5 and role_overlap >= 0.5 and j not in covered
                if hit:
                    covered.add(j)
                rows.append((score, hit))
        if npos == 0:
            result[c.name] = float("nan")
            continue
        rows = sorted(rows, key=lambda r: -r[0])
        tp = np.cumsum([r[1] for r in rows])
        fp = np.cumsum([not r[1] for r in rows])
        result[c.name] = voc_ap_all_points(tp / npos, tp / np.maximum(tp + fp, 1e-12)) if rows else 0.0
    return result


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_evaluator_agrees_with_the_loop_statement_on_random_data(seed):
    rng = random.Random(seed)
    positions = [
        [x, y, x + w, y + h]
        for x, y, w, h in [
            (0, 0, 40, 80),
            (4, 3, 40, 80),
            (30, 10, 50, 50),
            (100, 100, 60, 60),
            (108, 95, 60, 70),
            (0, 0, 9, 9),
            (0, 0, 40, 36),  # IoU 0.46 with (0, 0, 40, 80): just below the threshold
        ]
    ]
    verbs = ["hold_obj", "eat_obj", "eat_instr", "cut_instr", "cut_obj", "stand", "point_instr"]

    def random_image(kind: str) -> dict:
        boxes = [{"bbox": rng.choice(positions), "category_id": rng.choice([1, 1, COCO["cup"]])} for _ in range(6)]
        hois = []
        for _ in range(rng.randint(0, 6 if kind == "annotations" else 30)):
            hoi = {
                "subject_id": rng.randint(0, 2),
                "object_id": rng.choice([-1, 3, 4, 5]),
                "category_id": VERB[rng.choice(verbs)],
            }
            if kind == "predictions":
                hoi["score"] = round(rng.random(), 3)
                if rng.random() < 0.1:
                    boxes[hoi["subject_id"]]["bbox"] = [0, 0, 0, 0] if hoi["object_id"] < 0 else boxes[0]["bbox"]
            hois.append(hoi)
        keys = ("annotations", "hoi_annotation") if kind == "annotations" else ("predictions", "hoi_prediction")
        return {"file_name": "x.jpg", keys[0]: boxes, keys[1]: hois}

    gt = [random_image("annotations") for _ in range(20)]
    preds = [random_image("predictions") for _ in range(20)]
    differs = False
    for ignore in (True, False):
        result = evaluate(gt, preds, ignore_persons_without_actions=ignore)
        for scenario, got in ((1, result.role_ap_1), (2, result.role_ap_2)):
            expected = _loop_role_ap(gt, preds, scenario, ignore_persons_without_actions=ignore)
            assert set(got) == set(expected)
            for name, ap in expected.items():
                if np.isnan(ap):
                    assert np.isnan(got[name]), name
                else:
                    assert got[name] == pytest.approx(ap), (ignore, scenario, name)
            if not ignore:
                skipped = _loop_role_ap(gt, preds, scenario, ignore_persons_without_actions=True)
                differs |= any(not np.isnan(ap) and ap != pytest.approx(skipped[n]) for n, ap in expected.items())
    assert differs  # the data has detections on persons without actions: the option matters
