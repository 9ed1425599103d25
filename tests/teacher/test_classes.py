"""Class lists are facts of the datasets: counts, order, known ids and invariants."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from teacher_server.hoi.classes import (
    COCO_OBJECT_IDS,
    HICO_HOIS,
    HICO_VERBS,
    NO_INTERACTION_INDEX,
    NO_OBJECT_INDEX,
    OBJECT_NAMES,
    VCOCO_VERBS,
    coco_id_to_index,
    hico_correspondence,
    hico_hoi_id,
)
from teacher_server.hoi.errors import DatasetError

COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def hoi(verb: str, obj: str) -> int:
    return hico_hoi_id(HICO_VERBS.index(verb), OBJECT_NAMES.index(obj))


def test_coco_ids_are_the_80_valid_ids_in_order():
    assert len(COCO_OBJECT_IDS) == 80
    assert list(COCO_OBJECT_IDS) == sorted(set(range(1, 91)) - COCO_GAPS)


def test_object_names():
    assert len(OBJECT_NAMES) == 80 and len(set(OBJECT_NAMES)) == 80
    assert OBJECT_NAMES[0] == "person"
    assert OBJECT_NAMES[coco_id_to_index(37)] == "sports ball"
    assert OBJECT_NAMES[coco_id_to_index(72)] == "tv"
    assert OBJECT_NAMES[coco_id_to_index(90)] == "toothbrush"
    assert NO_OBJECT_INDEX == 80


def test_hico_verbs_are_117_alphabetical_with_no_interaction_at_57():
    assert len(HICO_VERBS) == 117
    assert list(HICO_VERBS) == sorted(HICO_VERBS)
    assert len(set(HICO_VERBS)) == 117
    assert HICO_VERBS[0] == "adjust" and HICO_VERBS[-1] == "zip"
    assert HICO_VERBS[57] == "no_interaction" == HICO_VERBS[NO_INTERACTION_INDEX]


def test_vcoco_verbs():
    assert len(VCOCO_VERBS) == 29 and len(set(VCOCO_VERBS)) == 29
    assert VCOCO_VERBS[:4] == ("hold_obj", "stand", "sit_instr", "ride_instr")
    assert VCOCO_VERBS[17] == "cut_obj" and VCOCO_VERBS[-1] == "snowboard_instr"


def test_hico_hois_are_600_distinct_valid_pairs():
    assert len(HICO_HOIS) == 600 and len(set(HICO_HOIS)) == 600
    assert all(0 <= v < 117 and 0 <= o < 80 for v, o in HICO_HOIS)
    assert {v for v, _ in HICO_HOIS} == set(range(117)), "every verb appears in some HOI"
    assert {o for _, o in HICO_HOIS} == set(range(80)), "every object appears in some HOI"


def test_hico_hois_are_grouped_by_object_each_group_ending_with_no_interaction():
    objects = [o for _, o in HICO_HOIS]
    groups = [o for i, o in enumerate(objects) if i == 0 or objects[i - 1] != o]
    assert len(groups) == 80, "each object's HOIs are contiguous"
    for i, (verb, obj) in enumerate(HICO_HOIS):
        last_of_group = i == 599 or HICO_HOIS[i + 1][1] != obj
        assert (verb == NO_INTERACTION_INDEX) == last_of_group
    # HICO's object order: airplane 1-10, bicycle 11-24, ..., zebra last.
    assert {OBJECT_NAMES[o] for _, o in HICO_HOIS[:10]} == {"airplane"}
    assert {OBJECT_NAMES[o] for _, o in HICO_HOIS[10:24]} == {"bicycle"}
    assert OBJECT_NAMES[HICO_HOIS[24][1]] == "bird"


@pytest.mark.parametrize(
    ("verb", "obj", "hoi_id"),
    [
        ("board", "airplane", 1),
        ("no_interaction", "airplane", 10),
        ("hop_on", "bicycle", 15),
        ("chase", "cat", 85),
        ("ride", "horse", 140),
        ("watch", "tv", 197),
        ("drink_with", "cup", 297),
        ("fly", "kite", 371),
        ("kick", "sports ball", 496),
        ("sit_on", "surfboard", 526),
        ("no_interaction", "zebra", 600),
    ],
)
def test_known_hoi_ids(verb, obj, hoi_id):
    assert hoi(verb, obj) == hoi_id
    assert HICO_HOIS[hoi_id - 1] == (HICO_VERBS.index(verb), OBJECT_NAMES.index(obj))


def test_hico_hoi_id_rejects_a_pair_that_is_not_an_hoi():
    with pytest.raises(DatasetError, match=r"\(ride, cup\) is not one of the 600 HICO-DET HOIs"):
        hoi("ride", "cup")


def test_coco_id_to_index():
    assert coco_id_to_index(1) == 0
    assert coco_id_to_index(13) == 11  # after the gap at 12
    assert coco_id_to_index(90) == 79
    for bad in (0, 12, 83, 91, -1, "x", None):
        with pytest.raises(DatasetError, match="not one of the 80 valid COCO ids"):
            coco_id_to_index(bad)


def test_hico_correspondence():
    correspondence = hico_correspondence()
    assert correspondence.shape == (117, 80) and correspondence.dtype == np.bool_
    assert correspondence.sum() == 600
    assert correspondence[HICO_VERBS.index("ride"), OBJECT_NAMES.index("horse")]
    assert not correspondence[HICO_VERBS.index("ride"), OBJECT_NAMES.index("cup")]
    assert correspondence[NO_INTERACTION_INDEX].all(), "no_interaction is valid with every object"
    correspondence[:] = False
    assert hico_correspondence().sum() == 600, "each call returns a fresh array"


def test_class_lists_and_prompts_import_without_torch():
    code = (
        "import sys, student.data, teacher_server.hoi.classes, teacher_server.hoi.prompts, "
        "teacher_server.hoi.annotations; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
