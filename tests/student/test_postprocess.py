"""Post-processing: model outputs -> preds.json entries (score, boxes, ids, correspondence, top-k, NMS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student.box_ops import box_xyxy_to_cxcywh
from student.evaluation.hico import count_triplets, evaluate_hico
from student.evaluation.postprocess import TripletNms, postprocess
from student.evaluation.predictions import EvaluationError, parse_hoi_entries, parse_predictions
from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, OBJECT_NAMES, VCOCO_VERBS, hico_correspondence

torch.set_num_threads(1)
OBJ = {name: i for i, name in enumerate(OBJECT_NAMES)}
VERB = {name: i for i, name in enumerate(HICO_VERBS)}
NO_OBJECT = len(OBJECT_NAMES)


def make_outputs(obj_logits, verb_logits, sub_boxes, obj_boxes) -> dict:
    return {
        "pred_obj_logits": torch.as_tensor(obj_logits, dtype=torch.float32),
        "pred_verb_logits": torch.as_tensor(verb_logits, dtype=torch.float32),
        "pred_sub_boxes": torch.as_tensor(sub_boxes, dtype=torch.float32),
        "pred_obj_boxes": torch.as_tensor(obj_boxes, dtype=torch.float32),
        "aux_outputs": [],
    }


def two_query_outputs(num_verbs: int = len(HICO_VERBS)) -> dict:
    """Query 0: no-object most likely, horse the best real class; query 1: a cup."""
    obj = torch.zeros(1, 2, NO_OBJECT + 1)
    obj[0, 0, NO_OBJECT], obj[0, 0, OBJ["horse"]] = 5.0, 2.0
    obj[0, 1, OBJ["cup"]] = 4.0
    verbs = torch.full((1, 2, num_verbs), -10.0)
    sub = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.1, 0.1]]])
    objb = torch.tensor([[[0.6, 0.6, 0.2, 0.2], [0.75, 0.5, 0.5, 1.0]]])
    return make_outputs(obj, verbs, sub, objb)


def test_score_is_verb_sigmoid_times_best_real_object_probability_and_boxes_are_pixels():
    outputs = two_query_outputs()
    outputs["pred_verb_logits"][0, 0, VERB["ride"]] = 2.0
    outputs["pred_verb_logits"][0, 1, VERB["hold"]] = 1.0
    sizes = torch.tensor([[100, 200]])  # (h, w)
    [entry] = postprocess(outputs, sizes, top_k=2, file_names=["a.jpg"])

    prob = outputs["pred_obj_logits"].softmax(-1)[0]
    horse = float(prob[0, OBJ["horse"]])  # the no-object class (more likely) is left out
    cup = float(prob[1, OBJ["cup"]])
    assert entry["file_name"] == "a.jpg"
    assert entry["predictions"] == [
        {"bbox": [80.0, 30.0, 120.0, 70.0], "category_id": 1},  # subject of query 0
        {"bbox": [40.0, 20.0, 60.0, 30.0], "category_id": 1},  # subject of query 1
        {"bbox": [100.0, 50.0, 140.0, 70.0], "category_id": COCO_OBJECT_IDS[OBJ["horse"]]},
        {"bbox": [100.0, 0.0, 200.0, 100.0], "category_id": COCO_OBJECT_IDS[OBJ["cup"]]},
    ]
    hold, ride = entry["hoi_prediction"]
    assert (hold["subject_id"], hold["object_id"], hold["category_id"]) == (1, 3, VERB["hold"] + 1)
    assert hold["score"] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item() * cup, rel=1e-5)
    assert (ride["subject_id"], ride["object_id"], ride["category_id"]) == (0, 2, VERB["ride"] + 1)
    assert ride["score"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item() * horse, rel=1e-5)


def test_top_k_keeps_the_best_triplets_in_descending_order():
    outputs = two_query_outputs()
    outputs["pred_verb_logits"] = torch.randn(1, 2, len(HICO_VERBS), generator=torch.Generator().manual_seed(0))
    [entry] = postprocess(outputs, [[100, 100]], top_k=7)
    scores = [h["score"] for h in entry["hoi_prediction"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    [everything] = postprocess(outputs, [[100, 100]], top_k=None)
    assert len(everything["hoi_prediction"]) == 2 * len(HICO_VERBS)
    assert sorted(h["score"] for h in everything["hoi_prediction"])[-7:] == sorted(scores)


def test_invalid_pairs_are_dropped_before_the_top_k_cut():
    outputs = two_query_outputs()
    outputs["pred_verb_logits"][0, 1, VERB["ride"]] = 5.0  # "ride cup": not a HICO-DET HOI
    outputs["pred_verb_logits"][0, 1, VERB["hold"]] = 0.0
    [unfiltered] = postprocess(outputs, [[100, 100]], top_k=1)
    assert unfiltered["hoi_prediction"][0]["category_id"] == VERB["ride"] + 1
    [filtered] = postprocess(outputs, [[100, 100]], top_k=1, correspondence=hico_correspondence())
    assert filtered["hoi_prediction"][0]["category_id"] == VERB["hold"] + 1
    # Only the boxes of kept triplets are listed: one subject, one object.
    assert [p["category_id"] for p in filtered["predictions"]] == [1, COCO_OBJECT_IDS[OBJ["cup"]]]


def test_triplet_nms_suppresses_overlapping_pairs_of_the_same_class_only():
    obj = torch.zeros(1, 4, NO_OBJECT + 1)
    for q, name in enumerate(["horse", "horse", "horse", "cow"]):
        obj[0, q, OBJ[name]] = 8.0
    verbs = torch.full((1, 4, len(HICO_VERBS)), -10.0)
    verbs[0, :, VERB["ride"]] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    sub = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4]]])
    objb = torch.tensor([[[0.6, 0.6, 0.2, 0.2], [0.6, 0.61, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]])
    outputs = make_outputs(obj, verbs, sub, objb)
    [plain] = postprocess(outputs, [[200, 200]], top_k=4)
    [nms] = postprocess(outputs, [[200, 200]], top_k=4, nms=TripletNms(threshold=0.7))

    def kept(entry):  # (object category, subject x1) of the ride triplets
        boxes = entry["predictions"]
        return sorted(
            (boxes[h["object_id"]]["category_id"], boxes[h["subject_id"]]["bbox"][0])
            for h in entry["hoi_prediction"]
            if h["category_id"] == VERB["ride"] + 1
        )

    horse, cow = COCO_OBJECT_IDS[OBJ["horse"]], COCO_OBJECT_IDS[OBJ["cow"]]
    assert kept(plain) == [(horse, 10.0), (horse, 80.0), (horse, 82.0), (cow, 80.0)]
    # Query 1 overlaps query 0 (same class) and scores lower: suppressed. Query 2 is elsewhere,
    # query 3 is a cow: both stay.
    assert kept(nms) == [(horse, 10.0), (horse, 80.0), (cow, 80.0)]


def test_triplet_nms_runs_on_the_top_k_as_the_reference_codebases_do():
    # The reference post-processing keeps the top k triplets and then applies triplet NMS to them
    # (so fewer than k may remain); NMS first would let lower triplets move up into freed places.
    obj = torch.zeros(1, 3, NO_OBJECT + 1)
    obj[0, :, OBJ["horse"]] = 8.0
    verbs = torch.full((1, 3, len(HICO_VERBS)), -10.0)
    verbs[0, :, VERB["ride"]] = torch.tensor([3.0, 2.0, 1.0])
    sub = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.51, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    objb = torch.tensor([[[0.6, 0.6, 0.2, 0.2], [0.6, 0.61, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]])
    outputs = make_outputs(obj, verbs, sub, objb)
    nms = TripletNms(threshold=0.7)  # query 1 overlaps query 0 (same class, lower score)

    def subjects(entry):  # subject x1 of each kept triplet, best first
        return [entry["predictions"][h["subject_id"]]["bbox"][0] for h in entry["hoi_prediction"]]

    [default] = postprocess(outputs, [[200, 200]], top_k=2, nms=nms)
    assert subjects(default) == [80.0]  # top 2 = queries 0 and 1; NMS then removes query 1
    [nms_first] = postprocess(outputs, [[200, 200]], top_k=2, nms=nms, nms_order="nms_first")
    assert subjects(nms_first) == [80.0, 10.0]
    with pytest.raises(EvaluationError, match="nms_order = 'later'"):
        postprocess(outputs, [[200, 200]], top_k=2, nms=nms, nms_order="later")


def _loop_nms(sub, obj, classes, scores, valid, nms: TripletNms) -> np.ndarray:
    def iou(a, b):
        w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
        h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
        union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - w * h
        return w * h / union

    keep = np.zeros_like(valid)
    for verb in range(scores.shape[1]):
        for cls in set(classes.tolist()):
            order = [q for q in np.argsort(-scores[:, verb], kind="stable") if classes[q] == cls and valid[q, verb]]
            while order:
                best, order = order[0], order[1:]
                keep[best, verb] = True
                order = [
                    q
                    for q in order
                    if iou(sub[best], sub[q]) ** nms.alpha * iou(obj[best], obj[q]) ** nms.beta <= nms.threshold
                ]
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_nms_equals_greedy_nms_per_class_and_verb(seed):
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 30, (12, 2)).astype(float)
    sub = np.concatenate((corners, corners + rng.integers(5, 40, (12, 2))), axis=1)
    corners = rng.integers(0, 30, (12, 2)).astype(float)
    obj = np.concatenate((corners, corners + rng.integers(5, 40, (12, 2))), axis=1)
    classes = rng.integers(0, 3, 12)
    scores = rng.random((12, 5))
    valid = rng.random((12, 5)) < 0.8
    nms = TripletNms(threshold=0.3, alpha=1.0, beta=0.5)
    np.testing.assert_array_equal(
        nms.keep(sub, obj, classes, scores, valid), _loop_nms(sub, obj, classes, scores, valid, nms)
    )


def test_vcoco_ids_and_the_no_object_role_option():
    outputs = two_query_outputs(num_verbs=len(VCOCO_VERBS))
    eat_obj = VCOCO_VERBS.index("eat_obj")
    outputs["pred_verb_logits"][0, 0, eat_obj] = 3.0  # query 0: no-object is its most likely class
    [plain] = postprocess(outputs, [[100, 100]], dataset="vcoco", top_k=1)
    assert plain["hoi_prediction"][0]["category_id"] == eat_obj  # V-COCO verb ids start at 0
    assert plain["hoi_prediction"][0]["object_id"] == 1  # a horse box, as the brief's score says

    [option] = postprocess(outputs, [[100, 100]], dataset="vcoco", top_k=1, vcoco_no_object_role=True)
    [hoi] = option["hoi_prediction"]
    assert hoi["object_id"] == -1
    assert option["predictions"] == [{"bbox": [40.0, 30.0, 60.0, 70.0], "category_id": 1}]
    no_object = float(outputs["pred_obj_logits"].softmax(-1)[0, 0, NO_OBJECT])
    assert hoi["score"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item() * no_object, rel=1e-5)


def test_bad_outputs_are_errors():
    outputs = two_query_outputs()
    with pytest.raises(EvaluationError, match="pred_obj_logits has 80 classes, expected 80 \\+ no-object"):
        postprocess({**outputs, "pred_obj_logits": outputs["pred_obj_logits"][..., :80]}, [[1, 1]])
    with pytest.raises(EvaluationError, match=r"pred_verb_logits has shape \(1, 2, 117\), expected \(1, 2, 29\)"):
        postprocess(outputs, [[1, 1]], dataset="vcoco")
    with pytest.raises(EvaluationError, match=r"orig_sizes has shape \(2, 2\), expected \(batch, 2\) = \(1, 2\)"):
        postprocess(outputs, [[1, 1], [1, 1]])
    with pytest.raises(EvaluationError, match="model outputs lack 'pred_sub_boxes'"):
        postprocess({k: v for k, v in outputs.items() if k != "pred_sub_boxes"}, [[1, 1]])
    with pytest.raises(ValueError, match=r"threshold = 1.5 is outside 0..1"):
        TripletNms(threshold=1.5)


def test_perfect_model_outputs_evaluate_to_100():
    """Outputs that reproduce the ground truth, through postprocess and the evaluator, give 100 mAP."""
    gt = [
        {
            "file_name": "a.jpg",
            "size": (480, 640),
            "pairs": [
                ([10, 20, 110, 300], "horse", [90, 150, 400, 420], "ride"),
                ([10, 20, 110, 300], "horse", [90, 150, 400, 420], "feed"),
            ],
        },
        {"file_name": "b.jpg", "size": (300, 200), "pairs": [([0, 0, 100, 250], "cup", [50, 60, 80, 90], "hold")]},
    ]
    annotations, queries = [], 4
    obj = torch.full((2, queries, NO_OBJECT + 1), 0.0)
    obj[..., NO_OBJECT] = 10.0
    verbs = torch.full((2, queries, len(HICO_VERBS)), -10.0)
    sub = torch.full((2, queries, 4), 0.5)
    objb = torch.full((2, queries, 4), 0.5)
    for b, image in enumerate(gt):
        h, w = image["size"]
        boxes, hois = [], []
        # one query per distinct (subject, object) pair, verbs merged as the data loader does
        pairs: dict = {}
        for sub_box, name, obj_box, verb in image["pairs"]:
            pairs.setdefault((tuple(sub_box), name, tuple(obj_box)), []).append(verb)
            boxes += [{"bbox": sub_box, "category_id": 1}, {"bbox": obj_box, "category_id": COCO_OBJECT_IDS[OBJ[name]]}]
            hois.append({"subject_id": len(boxes) - 2, "object_id": len(boxes) - 1, "category_id": VERB[verb] + 1})
        for q, ((sub_box, name, obj_box), pair_verbs) in enumerate(pairs.items()):
            obj[b, q, NO_OBJECT], obj[b, q, OBJ[name]] = 0.0, 10.0
            for verb in pair_verbs:
                verbs[b, q, VERB[verb]] = 10.0
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            sub[b, q] = box_xyxy_to_cxcywh(torch.tensor(sub_box, dtype=torch.float32) / scale)
            objb[b, q] = box_xyxy_to_cxcywh(torch.tensor(obj_box, dtype=torch.float32) / scale)
        annotations.append({"file_name": image["file_name"], "annotations": boxes, "hoi_annotation": hois})

    outputs = {k: v.to(torch.bfloat16) for k, v in make_outputs(obj, verbs, sub, objb).items() if k != "aux_outputs"}
    sizes = torch.tensor([image["size"] for image in gt])
    entries = postprocess(
        outputs,
        sizes,
        correspondence=hico_correspondence(),
        nms=TripletNms(),
        file_names=[image["file_name"] for image in gt],
    )
    ground_truth = parse_hoi_entries(annotations, dataset="hico", kind="annotations", source="gt")
    result = evaluate_hico(
        parse_predictions(entries, "hico", ground_truth),
        ground_truth,
        correspondence=hico_correspondence(),
        train_counts=count_triplets(ground_truth),
    )
    assert result.summary()["default"]["full"] == pytest.approx(100.0)
    assert result.summary()["known_object"]["full"] == pytest.approx(100.0)
