"""Box conversions and overlaps, in one place.

Conventions: at the data boundary boxes are ``xyxy`` in absolute pixels; inside the model they
are ``cxcywh`` normalised by the image size. Every conversion between the two goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def normalize_xyxy(boxes: Tensor, width: float, height: float) -> Tensor:
    """Absolute-pixel xyxy (..., 4) -> normalised cxcywh (..., 4) for the model."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_xyxy_to_cxcywh(boxes / scale)


def denormalize_cxcywh(boxes: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """Normalised cxcywh (..., 4) -> absolute-pixel xyxy (..., 4).

    ``width``/``height`` may be tensors of shape (...,) to convert a batch of images at once.
    """
    if isinstance(width, Tensor):
        height = cast(Tensor, height)  # both tensors, or both numbers
        scale = torch.stack((width, height, width, height), dim=-1).to(boxes)
        while scale.dim() < boxes.dim():
            scale = scale.unsqueeze(-2)
    else:
        scale = boxes.new_tensor([width, height, width, height])
    return box_cxcywh_to_xyxy(boxes) * scale


def frame_to_original(
    boxes: Tensor, affine: Tensor | Sequence[float], orig_size: tuple[int, int] | None = None
) -> Tensor:
    """Absolute-pixel xyxy (..., 4) in an augmented frame -> xyxy in the original image's pixels.

    ``affine``: the target's ``frame_affine`` ``(a_x, b_x, a_y, b_y)``, with ``x = a_x * x_orig + b_x``
    (``student.data.transforms``); it is inverted here. A mirrored frame (``a_x < 0``) swaps the
    two x ends, so the result keeps x1 <= x2. ``orig_size`` (h, w): clamp into the original image
    (a predicted box may reach past the augmented image, or past a crop's edge).
    """
    a_x, b_x, a_y, b_y = (float(v) for v in (affine.tolist() if isinstance(affine, Tensor) else affine))
    if a_x == 0 or a_y == 0:
        raise ValueError(f"frame_affine {(a_x, b_x, a_y, b_y)}: a scale of 0 cannot be inverted")
    x1, y1, x2, y2 = boxes.unbind(-1)
    xa, xb = (x1 - b_x) / a_x, (x2 - b_x) / a_x
    ya, yb = (y1 - b_y) / a_y, (y2 - b_y) / a_y
    result = torch.stack(
        (torch.minimum(xa, xb), torch.minimum(ya, yb), torch.maximum(xa, xb), torch.maximum(ya, yb)), -1
    )
    if orig_size is not None:
        height, width = orig_size
        result = torch.minimum(result.clamp(min=0), result.new_tensor([width, height, width, height]))
    return result


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) xyxy -> (N,) area (continuous convention, no +1)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of (N, 4) and (M, 4) xyxy boxes -> ((N, M), (N, M))."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M), in [-1, 1]."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=1e-12)
