"""Batch HOI samples: pad images to a common size and keep per-image targets as a list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def collate_fn(
    samples: Sequence[tuple[Tensor, dict[str, Any]]],
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """``[(image (3, H_i, W_i), target), ...]`` -> ``(images, masks, targets)``.

    Returns:
        images: (B, 3, H, W) float, each image in the top-left corner, zero-padded to the largest
            H and W of the batch (zero = the ImageNet mean after normalisation).
        masks: (B, H, W) bool, True on padding (DETR's convention).
        targets: the per-image target dicts, unchanged.
    """
    if not samples:
        raise ValueError("collate_fn needs at least one sample")
    images = [image for image, _ in samples]
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros((len(images), channels, height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, image in enumerate(images):
        _, h, w = image.shape
        batch[i, :, :h, :w] = image
        masks[i, :h, :w] = False
    return batch, masks, [target for _, target in samples]
