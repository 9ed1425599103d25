"""Box IoU of the evaluation protocols: one function per convention, numpy, broadcasting.

Both conventions count pixels inclusively (the +1 pixel convention of the reference code): a box
``(x1, y1, x2, y2)`` covers ``(x2 - x1 + 1) * (y2 - y1 + 1)`` pixels. They differ on boxes that
only touch (``x2`` of one equals ``x1`` of the other):

- ``iou_touching_apart`` (HICO-DET's reference evaluator, ``compute_iou``): boxes whose intervals do
  not strictly overlap have IoU 0, so touching boxes share nothing;
- ``iou_touching_shared`` (V-COCO's ``vsrl_eval`` ``get_overlap`` and the reference triplet NMS):
  each intersection side is ``max(right - left + 1, 0)``, so touching boxes share one row of pixels.

Each evaluator keeps the convention of the code it reproduces: near IoU 0.5 the difference
decides matches. Both take ``(..., 4)`` arrays that broadcast against each other (``(K, 4)`` with
``(K, 4)`` element-wise, ``(Q, 1, 4)`` with ``(1, Q, 4)`` pairwise) and give 0 where the union is
empty or undefined (degenerate or NaN boxes).
"""

from __future__ import annotations

import numpy as np


def _sides(boxes1: np.ndarray, boxes2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection width, intersection height, union area before the intersection is taken off)."""
    width = np.minimum(boxes1[..., 2], boxes2[..., 2]) - np.maximum(boxes1[..., 0], boxes2[..., 0])
    height = np.minimum(boxes1[..., 3], boxes2[..., 3]) - np.maximum(boxes1[..., 1], boxes2[..., 1])
    area1 = (boxes1[..., 2] - boxes1[..., 0] + 1) * (boxes1[..., 3] - boxes1[..., 1] + 1)
    area2 = (boxes2[..., 2] - boxes2[..., 0] + 1) * (boxes2[..., 3] - boxes2[..., 1] + 1)
    return width, height, area1 + area2


def _ratio(inter: np.ndarray, areas: np.ndarray) -> np.ndarray:
    union = areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def iou_touching_apart(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes (..., 4), +1 pixel, touching boxes apart (IoU 0): HICO-DET's reference."""
    width, height, areas = _sides(np.asarray(boxes1), np.asarray(boxes2))
    overlaps = (width > 0) & (height > 0)
    return _ratio(np.where(overlaps, (width + 1) * (height + 1), 0.0), areas)


def iou_touching_shared(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes (..., 4), +1 pixel, touching boxes share a pixel row: ``vsrl_eval``'s, the NMS's."""
    width, height, areas = _sides(np.asarray(boxes1), np.asarray(boxes2))
    return _ratio(np.maximum(width + 1, 0) * np.maximum(height + 1, 0), areas)
