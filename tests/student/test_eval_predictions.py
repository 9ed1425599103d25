"""Loading and validating preds.json and annotation files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from student.evaluation.predictions import (
    EvaluationError,
    join_on_keys,
    load_annotations,
    load_predictions,
    parse_hoi_entries,
    parse_predictions,
    save_predictions,
)

GT = [
    {
        "file_name": "HICO_test_1.jpg",
        "annotations": [
            {"bbox": [0, 0, 10, 20], "category_id": 1},
            {"bbox": [5, 5, 30, 30], "category_id": 19},
        ],
        "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": 77, "hoi_category_id": 1}],
    },
    {
        "file_name": "HICO_test_2.jpg",
        "annotations": [
            {"bbox": [1, 1, 5, 5], "category_id": 1},
            {"bbox": [2, 2, 6, 6], "category_id": 1},
            {"bbox": [0, 0, 50, 50], "category_id": 90},
        ],
        "hoi_annotation": [
            {"subject_id": 1, "object_id": 2, "category_id": 1},
            {"subject_id": 0, "object_id": 1, "category_id": 117},
        ],
    },
]
PREDS = [
    {
        "file_name": "HICO_test_1.jpg",
        "predictions": [
            {"bbox": [0.5, 0, 10, 20], "category_id": 1},
            {"bbox": [5, 5, 30, 30], "category_id": 19},
        ],
        "hoi_prediction": [
            {"subject_id": 0, "object_id": 1, "category_id": 77, "score": 0.9},
            {"subject_id": 0, "object_id": 1, "category_id": 88, "score": 0.25},
        ],
    },
    {"file_name": "HICO_test_2.jpg", "predictions": [], "hoi_prediction": []},
]


@pytest.fixture
def ground_truth():
    return parse_hoi_entries(GT, dataset="hico", kind="annotations", source="test_hico.json")


def parse(preds, ground_truth, dataset="hico"):
    return parse_predictions(preds, dataset, ground_truth, source="preds.json")


def broken(change) -> list:
    preds = copy.deepcopy(PREDS)
    change(preds)
    return preds


def test_annotations_become_flat_arrays_with_global_indices(ground_truth):
    assert ground_truth.file_names == ("HICO_test_1.jpg", "HICO_test_2.jpg")
    np.testing.assert_array_equal(ground_truth.box_offsets, [0, 2, 5])
    np.testing.assert_array_equal(ground_truth.labels, [0, 17, 0, 0, 79])  # COCO 19 = horse, 90 = toothbrush
    np.testing.assert_array_equal(ground_truth.subjects, [0, 3, 2])  # image 2's boxes start at 2
    np.testing.assert_array_equal(ground_truth.objects, [1, 4, 3])
    np.testing.assert_array_equal(ground_truth.verbs, [76, 0, 116])  # HICO verb ids are 1-based
    np.testing.assert_array_equal(ground_truth.hoi_image, [0, 1, 1])
    np.testing.assert_array_equal(ground_truth.box_image, [0, 0, 1, 1, 1])
    assert ground_truth.boxes.shape == (5, 4) and ground_truth.boxes.dtype == np.float64


def test_predictions_parse_with_scores(ground_truth):
    preds = parse(PREDS, ground_truth)
    np.testing.assert_allclose(preds.scores, [0.9, 0.25])
    np.testing.assert_allclose(preds.boxes[0], [0.5, 0, 10, 20])
    assert preds.num_images == 2


def test_file_round_trip(tmp_path, ground_truth):
    annotations, predictions = tmp_path / "test_hico.json", tmp_path / "preds.json"
    annotations.write_text(json.dumps(GT))
    save_predictions(PREDS, predictions)
    assert json.loads(predictions.read_text()) == PREDS
    loaded = load_predictions(predictions, "hico", load_annotations(annotations, "hico"))
    np.testing.assert_array_equal(loaded.verbs, parse(PREDS, ground_truth).verbs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p[1].pop("hoi_prediction"),
            r"preds.json: entry 1 \(HICO_test_2.jpg\): the key 'hoi_prediction' is missing",
        ),
        (lambda p: p[0].update(predictions={}), r"entry 0 \(HICO_test_1.jpg\): predictions is not a list"),
        (
            lambda p: p[0]["hoi_prediction"][1].pop("score"),
            r"entry 0 \(HICO_test_1.jpg\): hoi_prediction\[1\]: the key 'score' is missing",
        ),
        (
            lambda p: p[0]["hoi_prediction"][1].update(subject_id=2),
            r"entry 0 \(HICO_test_1.jpg\): hoi_prediction\[1\].subject_id = 2 is outside 0..1 "
            r"\(the entry has 2 predictions\)",
        ),
        (
            lambda p: p[0]["hoi_prediction"][0].update(object_id=-1),
            r"hoi_prediction\[0\].object_id = -1 is outside 0..1",
        ),
        (
            lambda p: p[0]["hoi_prediction"][1].update(score=float("nan")),
            r"entry 0 \(HICO_test_1.jpg\): hoi_prediction\[1\].score = nan is not a finite number",
        ),
        (
            lambda p: p[0]["hoi_prediction"][0].update(score="high"),
            r"hoi_prediction\[0\].score = 'high' is not a finite number",
        ),
        (
            lambda p: p[0]["hoi_prediction"][0].update(category_id=0),
            r"hoi_prediction\[0\].category_id = 0 is not a hico verb id \(1..117\)",
        ),
        (
            lambda p: p[0]["hoi_prediction"][0].update(category_id=118),
            r"category_id = 118 is not a hico verb id",
        ),
        (lambda p: p[0]["hoi_prediction"][0].update(subject_id=1.5), r"subject_id = 1.5 is not an integer"),
        (lambda p: p[0]["hoi_prediction"][0].update(subject_id="0"), r"subject_id = '0' is not an integer"),
        (
            lambda p: p[0]["predictions"][1].update(category_id=12),
            r"entry 0 \(HICO_test_1.jpg\): predictions\[1\].category_id = 12 "
            r"is not one of the 80 valid COCO ids",
        ),
        (
            lambda p: p[0]["predictions"][0].update(bbox=[0, 0, 10]),
            r"predictions\[0\].bbox = \[0, 0, 10\] is not \[x1, y1, x2, y2\] of 4 finite numbers",
        ),
        (lambda p: p[0]["predictions"][1].update(bbox=[0, 0, 10, float("inf")]), r"predictions\[1\].bbox = "),
        (
            lambda p: p[0]["hoi_prediction"].__setitem__(0, [0, 1, 77, 0.9]),
            r"hoi_prediction\[0\] is not an object",
        ),
        (lambda p: p.pop(), r"preds.json: has 1 entries but the annotations have 2 images"),
        (lambda p: p.append(p[0]), r"has 3 entries but the annotations have 2 images"),
        (
            lambda p: p.reverse(),
            r"entry 0 \(HICO_test_2.jpg\): file_name differs from the annotations' 'HICO_test_1.jpg'",
        ),
        (
            lambda p: p.__setitem__(0, "image"),
            r"entry 0: expected an object with 'predictions' and 'hoi_prediction'",
        ),
    ],
)
def test_malformed_predictions_name_image_and_field(ground_truth, change, message):
    with pytest.raises(EvaluationError, match=message):
        parse(broken(change), ground_truth)


def test_entry_without_file_name_is_named_after_the_annotation(ground_truth):
    preds = broken(lambda p: [p[0].pop("file_name"), p[0]["hoi_prediction"][0].update(subject_id=9)])
    with pytest.raises(EvaluationError, match=r"entry 0 \(HICO_test_1.jpg\): hoi_prediction\[0\].subject_id = 9"):
        parse(preds, ground_truth)
    fine = broken(lambda p: p[0].pop("file_name"))
    assert parse(fine, ground_truth).file_names == ground_truth.file_names


def test_not_a_list_and_empty_or_missing_files_are_errors(tmp_path, ground_truth):
    with pytest.raises(EvaluationError, match="expected a JSON list with one entry per image, got dict"):
        parse({"predictions": []}, ground_truth)
    empty = tmp_path / "preds.json"
    empty.write_text("")
    with pytest.raises(EvaluationError, match=r"preds.json: not valid JSON"):
        load_predictions(empty, "hico", ground_truth)
    with pytest.raises(EvaluationError, match=r"missing.json: no such file"):
        load_annotations(tmp_path / "missing.json", "hico")


def test_vcoco_allows_no_object_and_numbers_verbs_from_zero():
    gt = [
        {
            "file_name": "COCO_val2014_1.jpg",
            "annotations": [{"bbox": [0, 0, 10, 20], "category_id": 1}],
            "hoi_annotation": [{"subject_id": 0, "object_id": -1, "category_id": 0}],
        }
    ]
    parsed = parse_hoi_entries(gt, dataset="vcoco", kind="annotations", source="test_vcoco.json")
    np.testing.assert_array_equal(parsed.objects, [-1])
    np.testing.assert_array_equal(parsed.verbs, [0])
    with pytest.raises(EvaluationError, match=r"object_id = -1 is outside 0..0 \(the entry has 1 annotations\)$"):
        parse_hoi_entries(gt, dataset="hico", kind="annotations", source="test_hico.json")
    gt[0]["hoi_annotation"][0]["category_id"] = 29
    with pytest.raises(EvaluationError, match=r"category_id = 29 is not a vcoco verb id \(0..28\)"):
        parse_hoi_entries(gt, dataset="vcoco", kind="annotations", source="test_vcoco.json")


def test_unknown_dataset_is_an_error():
    with pytest.raises(EvaluationError, match="dataset 'coco' is unknown: use one of hico, vcoco"):
        parse_hoi_entries([], dataset="coco", kind="annotations", source="x")


def test_join_on_keys_finds_every_equal_pair():
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    i, j = join_on_keys(left, right)
    expected = sorted((a, b) for a in range(40) for b in range(30) if left[a] == right[b])
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == expected
    i, j = join_on_keys(np.array([], dtype=np.int64), right)
    assert len(i) == len(j) == 0
