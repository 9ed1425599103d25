"""The evaluation's box IoUs: one per +1-pixel convention, and where the two part ways."""

from __future__ import annotations

import numpy as np
import pytest

from student.evaluation.boxes import iou_touching_apart, iou_touching_shared

# 10 x 10 px boxes (inclusive ends: 0..9 is 10 pixels).
BOX = [0, 0, 9, 9]
TOUCHING_RIGHT = [9, 0, 18, 9]  # shares the column x = 9
TOUCHING_CORNER = [9, 9, 18, 18]  # shares the pixel (9, 9)
APART = [10, 0, 19, 9]  # next column: no pixel in common under either convention


def test_touching_boxes_are_apart_for_hico_and_share_a_row_for_vcoco_and_nms() -> None:
    a = np.array([BOX, BOX, BOX], float)
    b = np.array([TOUCHING_RIGHT, TOUCHING_CORNER, APART], float)
    # HICO-DET's reference: boxes that do not strictly overlap have IoU 0.
    np.testing.assert_array_equal(iou_touching_apart(a, b), [0.0, 0.0, 0.0])
    # vsrl_eval: the shared column is 1 x 10 pixels of a 100 + 100 - 10 pixel union; the shared
    # corner is 1 pixel of 199; the box one column further shares nothing.
    np.testing.assert_allclose(iou_touching_shared(a, b), [10 / 190, 1 / 199, 0.0])


@pytest.mark.parametrize("iou", [iou_touching_apart, iou_touching_shared])
def test_overlapping_boxes_agree_under_both_conventions(iou) -> None:
    a = np.array([BOX, BOX, BOX], float)
    b = np.array([BOX, [0, 0, 4, 9], [5, 5, 14, 14]], float)
    # identical; the left half (50 of 100 px); 5 x 5 px of 100 + 100 - 25.
    np.testing.assert_allclose(iou(a, b), [1.0, 0.5, 25 / 175])


@pytest.mark.parametrize("iou", [iou_touching_apart, iou_touching_shared])
def test_pairwise_by_broadcasting_equals_element_wise(iou) -> None:
    boxes = np.array([BOX, TOUCHING_RIGHT, [3, 2, 12, 15], APART], float)
    pairwise = iou(boxes[:, None], boxes[None])
    assert pairwise.shape == (4, 4)
    for i in range(4):
        np.testing.assert_allclose(pairwise[i], iou(np.repeat(boxes[i : i + 1], 4, axis=0), boxes))
    np.testing.assert_allclose(pairwise, pairwise.T)


@pytest.mark.parametrize("iou", [iou_touching_apart, iou_touching_shared])
def test_nan_and_degenerate_boxes_give_zero(iou) -> None:
    # A NaN box (V-COCO: a role without object), and a pair of boxes one pixel short of a pixel
    # (x2 = x1 - 1: no pixels at all), whose union is empty: 0 / 0 would be NaN.
    a = np.array([[np.nan] * 4, [5, 5, 4, 4]], float)
    b = np.array([BOX, [5, 5, 4, 4]], float)
    np.testing.assert_array_equal(iou(a, b), [0.0, 0.0])
