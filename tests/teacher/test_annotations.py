"""Annotation loading and validation: good files parse, every kind of bad entry is named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teacher_server.hoi.annotations import (
    HOI,
    HOIPair,
    check_boxes_in_image,
    dataset_spec,
    load_annotations,
    load_correspondence,
    merge_pairs,
    read_annotations,
)
from teacher_server.hoi.classes import HICO_VERBS, OBJECT_NAMES, hico_correspondence
from teacher_server.hoi.errors import DatasetError

# Image 0: a person (COCO 1) riding (verb id 77) and straddling (99) a horse (COCO 19), and the
# same person holding (37) a cup (COCO 47). Image 1: no HOI.
GOOD_HICO = [
    {
        "file_name": "a.jpg",
        "annotations": [
            {"bbox": [10, 5, 40, 60], "category_id": 1},
            {"bbox": [5, 30, 70, 79], "category_id": 19},
            {"bbox": [40, 20, 50, 30], "category_id": 47},
        ],
        "hoi_annotation": [
            {"subject_id": 0, "object_id": 1, "category_id": 77, "hoi_category_id": 140},
            {"subject_id": 0, "object_id": 2, "category_id": 37, "hoi_category_id": 298},
            {"subject_id": 0, "object_id": 1, "category_id": 99},
        ],
    },
    {"file_name": "b.jpg", "annotations": [], "hoi_annotation": []},
]


def write(tmp_path: Path, entries, name: str = "trainval_hico.json", images: dict | None = None) -> Path:
    """Write the annotation file and 100x80 (w x h) images for it."""
    for file_name, size in (images or {"a.jpg": (100, 80), "b.jpg": (100, 80)}).items():
        Image.new("RGB", size, (128, 128, 128)).save(tmp_path / file_name)
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def test_good_hico_file(tmp_path):
    annotations = load_annotations(write(tmp_path, GOOD_HICO), "hico", image_root=tmp_path)
    assert [a.file_name for a in annotations] == ["a.jpg", "b.jpg"]
    first = annotations[0]
    assert first.index == 0 and first.image_size == (80, 100)
    np.testing.assert_array_equal(first.boxes, [[10, 5, 40, 60], [5, 30, 70, 79], [40, 20, 50, 30]])
    assert [OBJECT_NAMES[i] for i in first.labels] == ["person", "horse", "cup"]
    ride, straddle = HICO_VERBS.index("ride"), HICO_VERBS.index("straddle")
    assert first.hois[0] == HOI(0, 1, ride, 140)
    assert first.hois[2] == HOI(0, 1, straddle, 142), "a missing hoi_category_id is derived from (verb, object)"
    assert first.pairs() == [HOIPair(0, 1, (ride, straddle)), HOIPair(0, 2, (HICO_VERBS.index("hold"),))]
    assert first.raw == GOOD_HICO[0]
    assert annotations[1].hois == () and annotations[1].boxes.shape == (0, 4)


def test_pairs_without_verbs_are_pairs_whose_verbs_are_unknown(tmp_path):
    # A second person (box 3) next to the horse, annotated as a pair but without any verb.
    entries = copy.deepcopy(GOOD_HICO)
    entries[0]["annotations"].append({"bbox": [60, 10, 80, 70], "category_id": 1})
    entries[0]["pairs_without_verbs"] = [{"subject_id": 3, "object_id": 1}]
    entries[1]["pairs_without_verbs"] = []
    first, second = load_annotations(write(tmp_path, entries), "hico", image_root=tmp_path)
    assert first.pairs_without_verbs == ((3, 1),)
    assert first.pairs()[-1] == HOIPair(3, 1, (), verbs_known=False)
    assert all(pair.verbs_known for pair in first.pairs()[:-1])
    assert first.has_pairs and not second.has_pairs
    # An image whose only pair has no verbs still has a pair (training keeps it).
    entries[0]["hoi_annotation"] = []
    (only,) = load_annotations(write(tmp_path, entries[:1]), "hico", image_root=tmp_path)
    assert only.hois == () and only.has_pairs


def test_merge_pairs_keeps_first_appearance_order_and_dedups_verbs():
    hois = [HOI(0, 2, 5, None), HOI(1, 2, 3, None), HOI(0, 2, 1, None), HOI(0, 2, 5, None)]
    assert merge_pairs(hois) == [HOIPair(0, 2, (1, 5)), HOIPair(1, 2, (3,))]


def broken(mutate) -> list:
    entries = copy.deepcopy(GOOD_HICO)
    mutate(entries[0])
    return entries


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [
        (lambda e: e["hoi_annotation"][1].update(category_id=118), "hoi_annotation[1].category_id", "1..117"),
        (lambda e: e["hoi_annotation"][1].update(category_id=0), "hoi_annotation[1].category_id", "1..117"),
        (lambda e: e["hoi_annotation"][0].update(object_id=3), "hoi_annotation[0].object_id", "0..2"),
        (lambda e: e["hoi_annotation"][0].update(object_id=-1), "hoi_annotation[0].object_id", "0..2"),
        (lambda e: e["hoi_annotation"][0].update(subject_id=7), "hoi_annotation[0].subject_id", "0..2"),
        (
            lambda e: e["hoi_annotation"][0].update(subject_id=1),
            "hoi_annotation[0].subject_id",
            "expected a person",
        ),
        (lambda e: e["hoi_annotation"][0].update(hoi_category_id=601), "hoi_category_id", "1..600"),
        (
            lambda e: e["hoi_annotation"][0].update(hoi_category_id=1),
            "hoi_category_id = 1 means (board, airplane)",
            "(ride, horse)",
        ),
        (
            lambda e: e["hoi_annotation"][1].update(category_id=77, hoi_category_id=None),
            "hoi_annotation[1]",
            "(ride, cup)",
        ),
        (
            lambda e: e["annotations"][2].update(category_id=12),
            "annotations[2].category_id",
            "80 valid COCO ids",
        ),
        (lambda e: e["annotations"][2].update(bbox=[50, 20, 40, 30]), "annotations[2].bbox", "inverted"),
        (
            lambda e: e["annotations"][2].update(bbox=[40, 20, 50, 90]),
            "annotations[2].bbox",
            "outside the 100x80",
        ),
        (lambda e: e["annotations"][2].update(bbox=[40, 20, 50]), "annotations[2].bbox", "4 numbers"),
        (
            lambda e: e["annotations"][2].update(bbox=[40, 20, 50, float("nan")]),
            "annotations[2].bbox",
            "finite",
        ),
        (lambda e: e.update(file_name="missing.jpg"), "file_name", "does not exist"),
        (lambda e: e.pop("hoi_annotation"), "hoi_annotation", "expected a list"),
        (lambda e: e.pop("annotations"), "annotations", "expected a list"),
        (lambda e: e.update(pairs_without_verbs={"subject_id": 0}), "pairs_without_verbs", "expected a list"),
        (
            lambda e: e.update(pairs_without_verbs=[{"subject_id": 0, "object_id": 5}]),
            "pairs_without_verbs[0].object_id",
            "0..2",
        ),
        (
            lambda e: e.update(pairs_without_verbs=[{"subject_id": 2, "object_id": 1}]),
            "pairs_without_verbs[0].subject_id",
            "expected a person",
        ),
        (
            lambda e: e.update(pairs_without_verbs=[{"subject_id": 0, "object_id": 1}]),
            "pairs_without_verbs[0] = (0, 1)",
            "also has verbs in hoi_annotation",
        ),
        (
            lambda e: e.update(pairs_without_verbs=[{"subject_id": 0, "object_id": 0}] * 2),
            "pairs_without_verbs[1] = (0, 0)",
            "listed twice",
        ),
    ],
)
def test_bad_entries_are_named(tmp_path, mutate, field, hint):
    path = write(tmp_path, broken(mutate))
    with pytest.raises(DatasetError) as caught:
        load_annotations(path, "hico", image_root=tmp_path)
    message = str(caught.value)
    assert str(path) in message
    assert "entry 0 (" in message
    assert field in message
    assert hint in message


def test_entry_that_is_not_an_object(tmp_path):
    path = write(tmp_path, [GOOD_HICO[0], "oops"])
    with pytest.raises(DatasetError, match=r"entry 1: expected an object with file_name"):
        load_annotations(path, "hico")


def test_one_error_lists_many_problems(tmp_path):
    entries = [copy.deepcopy(GOOD_HICO[0]) for _ in range(30)]
    for entry in entries:
        entry["hoi_annotation"][0]["category_id"] = 500
    path = write(tmp_path, entries)
    with pytest.raises(DatasetError) as caught:
        load_annotations(path, "hico")
    message = str(caught.value)
    assert "30 problem(s)" in message
    assert "entry 0 (a.jpg)" in message and "entry 19 (a.jpg)" in message
    assert "... and 10 more" in message


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_annotations(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_annotations(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_annotations(tmp_path / "dict.json")
    with pytest.raises(DatasetError, match="unknown dataset 'coco'"):
        dataset_spec("coco")


def test_box_tolerance_clips_small_overshoot(tmp_path):
    path = write(tmp_path, broken(lambda e: e["annotations"][2].update(bbox=[-0.5, 20, 100.8, 30])))
    annotations = load_annotations(path, "hico", image_root=tmp_path)
    np.testing.assert_allclose(annotations[0].boxes[2], [0, 20, 100, 30])
    with pytest.raises(DatasetError, match="outside"):
        load_annotations(path, "hico", image_root=tmp_path, box_tolerance=0.0)


def _out_of_image_and_inverted() -> list:
    """GOOD_HICO's image a.jpg (100 x 80) with a horse box 4 px past the right edge (beyond the
    1 px tolerance), an inverted cup box, a second person paired with that cup (verbs unknown),
    and a second cup the first person holds."""
    entries = copy.deepcopy(GOOD_HICO)
    boxes = entries[0]["annotations"]
    boxes[1]["bbox"] = [5, 30, 104, 79]  # horse: x2 = 104 > 100 + 1
    boxes[2]["bbox"] = [50, 20, 40, 30]  # cup: x1 > x2
    boxes.append({"bbox": [60, 10, 80, 70], "category_id": 1})  # box 3: a person
    boxes.append({"bbox": [0, 0, 5, 5], "category_id": 47})  # box 4: another cup
    entries[0]["hoi_annotation"].append({"subject_id": 0, "object_id": 4, "category_id": 37})
    entries[0]["pairs_without_verbs"] = [{"subject_id": 3, "object_id": 2}]
    return entries


def test_box_policy_error_clamp_or_drop(tmp_path):
    path = write(tmp_path, _out_of_image_and_inverted())
    with pytest.raises(DatasetError, match=r"2 problem\(s\)(.|\n)*outside the 100x80(.|\n)*inverted"):
        load_annotations(path, "hico", image_root=tmp_path)  # box_policy="error", the default
    ride, straddle, hold = (HICO_VERBS.index(v) for v in ("ride", "straddle", "hold"))

    # clamp: the horse is clipped to the image; the inverted cup cannot be, so it goes with the
    # HOI and the verb-less pair that use it; box 4 becomes box 3.
    clamped = read_annotations(path, "hico", image_root=tmp_path, box_policy="clamp")
    first = clamped.images[0]
    np.testing.assert_array_equal(first.boxes, [[10, 5, 40, 60], [5, 30, 100, 79], [60, 10, 80, 70], [0, 0, 5, 5]])
    assert first.pairs() == [HOIPair(0, 1, (ride, straddle)), HOIPair(0, 3, (hold,))]
    assert first.pairs_without_verbs == ()
    assert first.raw == _out_of_image_and_inverted()[0]  # the entry as read, for the record
    fixes = clamped.fixes
    assert (fixes.boxes_clamped, fixes.boxes_dropped, fixes.hois_dropped, fixes.pairs_without_verbs_dropped) == (
        1,
        1,
        1,
        1,
    )
    assert (fixes.images_changed, fixes.images_left_without_pairs) == (1, 0)
    assert fixes.summary().startswith(f"{path}: box_policy=clamp: 1 box clamped into its image, 1 box dropped")
    assert "entry 0 (a.jpg): annotations[1].bbox [5, 30, 104, 79] clamped to [5, 30, 100, 79]" in fixes.summary()

    # drop: both bad boxes go, and every HOI that uses one of them.
    dropped = read_annotations(path, "hico", image_root=tmp_path, box_policy="drop")
    first = dropped.images[0]
    np.testing.assert_array_equal(first.boxes, [[10, 5, 40, 60], [60, 10, 80, 70], [0, 0, 5, 5]])
    assert first.pairs() == [HOIPair(0, 2, (hold,))]
    fixes = dropped.fixes
    assert (fixes.boxes_clamped, fixes.boxes_dropped, fixes.hois_dropped, fixes.pairs_without_verbs_dropped) == (
        0,
        2,
        3,
        1,
    )
    # An image that loses every pair is counted (training then leaves it out).
    only_horse = copy.deepcopy(GOOD_HICO)
    only_horse[0]["annotations"][1]["bbox"] = [5, 30, 104, 79]
    only_horse[0]["hoi_annotation"] = only_horse[0]["hoi_annotation"][:1]
    lost = read_annotations(write(tmp_path, only_horse), "hico", image_root=tmp_path, box_policy="drop")
    assert lost.fixes.images_left_without_pairs == 1 and not lost.images[0].has_pairs
    # Nothing to fix: nothing counted, an empty summary.
    clean = read_annotations(write(tmp_path, GOOD_HICO), "hico", image_root=tmp_path, box_policy="clamp")
    assert not clean.fixes.any and clean.fixes.summary() == ""
    with pytest.raises(DatasetError, match="box_policy = 'fix': expected one of error, clamp, drop"):
        read_annotations(path, "hico", box_policy="fix")


def test_without_image_root_boxes_are_checked_later(tmp_path):
    path = write(tmp_path, broken(lambda e: e["annotations"][2].update(bbox=[40, 20, 50, 90])))
    annotations = load_annotations(path, "hico")  # no image sizes: only the box itself is checked
    assert annotations[0].image_size is None
    with pytest.raises(DatasetError, match=r"entry 0 \(a.jpg\): annotations\[2\].bbox .* outside the 100x80"):
        check_boxes_in_image(annotations[0], (80, 100), source=str(path))
    np.testing.assert_allclose(check_boxes_in_image(annotations[1], (80, 100), source="x"), np.zeros((0, 4)))


def test_vcoco_zero_based_verbs_and_missing_objects(tmp_path):
    entries = [
        {
            "file_name": "a.jpg",
            "annotations": [
                {"bbox": [10, 5, 40, 60], "category_id": 1},
                {"bbox": [50, 5, 60, 15], "category_id": 37},
            ],
            "hoi_annotation": [
                {"subject_id": 0, "object_id": -1, "category_id": 1},  # stand
                {"subject_id": 0, "object_id": 1, "category_id": 0},  # hold_obj
                {"subject_id": 0, "object_id": 1, "category_id": 25},  # kick_obj
            ],
        }
    ]
    annotation = load_annotations(write(tmp_path, entries, "trainval_vcoco.json"), "vcoco", image_root=tmp_path)[0]
    assert annotation.pairs() == [HOIPair(0, -1, (1,)), HOIPair(0, 1, (0, 25))]
    assert all(h.hoi_id is None for h in annotation.hois)
    entries[0]["hoi_annotation"][0]["category_id"] = 29
    with pytest.raises(DatasetError, match=r"category_id = 29 is outside 0..28 \(vcoco verb id\)"):
        load_annotations(write(tmp_path, entries, "trainval_vcoco.json"), "vcoco")


def test_load_correspondence(tmp_path):
    np.save(tmp_path / "corre_hico.npy", hico_correspondence().astype(np.float64))
    loaded = load_correspondence(tmp_path / "corre_hico.npy", "hico")
    assert loaded.dtype == np.bool_ and (loaded == hico_correspondence()).all()
    with pytest.raises(DatasetError, match=r"shape \(117, 80\), expected \(29, 80\)"):
        load_correspondence(tmp_path / "corre_hico.npy", "vcoco")
    with pytest.raises(DatasetError, match="does not exist"):
        load_correspondence(tmp_path / "corre_vcoco.npy", "vcoco")


def test_hoi_in_an_image_without_boxes(tmp_path):
    entries = [
        {
            "file_name": "a.jpg",
            "annotations": [],
            "hoi_annotation": [{"subject_id": 0, "object_id": 0, "category_id": 37}],
        }
    ]
    with pytest.raises(DatasetError, match=r"subject_id = 0, expected a box index \(but the image has no boxes\)"):
        load_annotations(write(tmp_path, entries), "hico")
