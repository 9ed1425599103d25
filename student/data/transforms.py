"""DETR-style augmentation for HOI samples, boxes kept consistent with the image.

Every transform is a callable ``(image, target) -> (image, target)``. Until the last two steps the
image is a PIL image and the target holds absolute-pixel ``xyxy`` boxes:

- ``sub_boxes, obj_boxes: FloatTensor (P, 4)`` xyxy pixels (``obj_boxes`` row is zeros and
  ``has_object`` False for a V-COCO pair without object: geometric transforms leave it alone);
- ``has_object: BoolTensor (P,)``, ``obj_labels: LongTensor (P,)``, ``verb_labels: FloatTensor (P, V)``,
  ``verb_known: BoolTensor (P,)`` (optional; False where a pair's verbs were never annotated);
- ``size: LongTensor (2,)`` (h, w), updated by every geometric transform;
- ``pair_regions_orig: FloatTensor (P, 8)`` (optional): each pair's human and object boxes in
  pixels of the ORIGINAL image file, never transformed: what the teacher scores a pair on. It is
  a per-pair key, so it stays aligned with ``obj_labels`` when a crop drops pairs;
- ``frame_affine: FloatTensor (4,)`` (optional) ``(a_x, b_x, a_y, b_y)``: the current frame from
  the original pixels, ``x = a_x * x_orig + b_x`` and ``y = a_y * y_orig + b_y``, updated by every
  geometric transform (a flip makes ``a_x`` negative). ``frame_to_original`` inverts it, so a box
  predicted on the augmented image can be named in the original file's pixels.

``ToTensor`` + ``Normalize`` turn the image into an ImageNet-normalised tensor and ``BoxesToCxcywh``
converts the boxes to ``cxcywh`` normalised by the final size (via ``student.box_ops``) and drops
``has_object``: the result is the per-image target of ``docs/contracts.md``.

Randomness comes from torch's global generator, which ``DataLoader`` seeds per worker; seed it
(``torch.manual_seed``) for reproducible augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from student.box_ops import normalize_xyxy

Target = dict[str, Any]
Transform = Callable[[Any, Target], tuple[Any, Target]]

#: Target entries with one row per HOI pair: filtered together when a crop drops pairs.
PAIR_KEYS = (
    "sub_boxes",
    "obj_boxes",
    "has_object",
    "obj_labels",
    "verb_labels",
    "verb_known",
    "pair_regions_orig",
)
AFFINE_KEY = "frame_affine"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DETR's multi-scale training sizes (shorter side) and its longer-side cap.
DETR_SCALES = tuple(range(480, 801, 32))
DETR_MAX_SIZE = 1333
#: Small sizes for the CPU demo on ~128-160 px synthetic images.
SMALL_SCALES = (112, 128, 144, 160)
SMALL_MAX_SIZE = 256


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, ()))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def _map_object_boxes(target: Target, fn: Callable[[Tensor], Tensor]) -> None:
    """Apply ``fn`` to the subject boxes and to the object boxes of pairs that have an object."""
    target["sub_boxes"] = fn(target["sub_boxes"])
    has_object = target["has_object"]
    obj_boxes = target["obj_boxes"].clone()
    if bool(has_object.any()):
        obj_boxes[has_object] = fn(obj_boxes[has_object])
    target["obj_boxes"] = obj_boxes


def _compose_affine(target: Target, scale_x: float, offset_x: float, scale_y: float, offset_y: float) -> None:
    """Follow a geometric step ``x' = scale_x * x + offset_x`` (y likewise) in ``frame_affine``, if present."""
    affine = target.get(AFFINE_KEY)
    if affine is None:
        return
    a_x, b_x, a_y, b_y = affine.tolist()
    target[AFFINE_KEY] = torch.tensor(
        [scale_x * a_x, scale_x * b_x + offset_x, scale_y * a_y, scale_y * b_y + offset_y], dtype=torch.float32
    )


def identity_affine() -> Tensor:
    """``frame_affine`` of an untransformed image: the frame is the original pixels."""
    return torch.tensor([1.0, 0.0, 1.0, 0.0])


class RandomHorizontalFlip:
    """Mirror image and boxes with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        if float(torch.rand(())) >= self.p:
            return image, target
        width = image.width
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = dict(target)

        def mirror(boxes: Tensor) -> Tensor:
            # x1' = W - x2, x2' = W - x1: the mirrored box keeps x1 <= x2.
            x1, y1, x2, y2 = boxes.unbind(-1)
            return torch.stack((width - x2, y1, width - x1, y2), dim=-1)

        _map_object_boxes(target, mirror)
        _compose_affine(target, -1.0, float(width), 1.0, 0.0)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resized_shape(height: int, width: int, shorter: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the shorter side ``shorter`` (aspect kept), reduced so the longer is <= max_size."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long * shorter / short > max_size:
        shorter = round(max_size * short / long)
    if width <= height:
        return round(shorter * height / width), shorter
    return shorter, round(shorter * width / height)


class RandomResize:
    """Resize so the shorter side is one of ``sizes`` (uniformly chosen), longer side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        shorter = self.sizes[_randint(0, len(self.sizes) - 1)]
        new_h, new_w = resized_shape(image.height, image.width, shorter, self.max_size)
        scale_x, scale_y = new_w / image.width, new_h / image.height
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        target = dict(target)
        _map_object_boxes(target, lambda b: b * b.new_tensor([scale_x, scale_y, scale_x, scale_y]))
        _compose_affine(target, scale_x, 0.0, scale_y, 0.0)
        target["size"] = torch.tensor([new_h, new_w])
        return image, target

    def __repr__(self) -> str:
        return f"RandomResize(sizes={list(self.sizes)}, max_size={self.max_size})"


def crop(image: Image.Image, target: Target, region: tuple[int, int, int, int]) -> tuple[Image.Image, Target]:
    """Crop ``region`` = (top, left, height, width); clip boxes to it and drop pairs that lost their
    human box or (when they have one) their object box."""
    top, left, height, width = region
    image = image.crop((left, top, left + width, top + height))
    target = dict(target)
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    offset = torch.tensor([left, top, left, top], dtype=torch.float32)
    _map_object_boxes(target, lambda b: torch.minimum((b - offset).clamp(min=0), limit))
    _compose_affine(target, 1.0, -float(left), 1.0, -float(top))

    def non_empty(boxes: Tensor) -> Tensor:
        return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    keep = non_empty(target["sub_boxes"]) & (non_empty(target["obj_boxes"]) | ~target["has_object"])
    for key in PAIR_KEYS:
        if key in target:  # verb_known is optional (targets built by hand may lack it)
            target[key] = target[key][keep]
    target["size"] = torch.tensor([height, width])
    return image, target


class RandomSizeCrop:
    """Crop a random region with each side in [min_size, max_size] (capped by the image).

    Pairs whose human box, or existing object box, ends up empty are dropped. A crop that would
    drop every pair of an image that has pairs is re-drawn up to ``max_tries`` times, then the
    image is left uncropped: an empty target teaches only "no interaction here".
    """

    def __init__(self, min_size: int, max_size: int, max_tries: int = 5) -> None:
        self.min_size, self.max_size, self.max_tries = min_size, max_size, max_tries

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        had_pairs = len(target["sub_boxes"]) > 0
        for _ in range(self.max_tries):
            width = _randint(min(self.min_size, image.width), min(image.width, self.max_size))
            height = _randint(min(self.min_size, image.height), min(image.height, self.max_size))
            top = _randint(0, image.height - height)
            left = _randint(0, image.width - width)
            cropped, cropped_target = crop(image, target, (top, left, height, width))
            if not had_pairs or len(cropped_target["sub_boxes"]) > 0:
                return cropped, cropped_target
        return image, target

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size}, max_tries={self.max_tries})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        if float(torch.rand(())) < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s] (boxes untouched)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4) -> None:
        self.strengths = (brightness, contrast, saturation)

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        for enhancer, strength in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), self.strengths, strict=True
        ):
            if strength > 0:
                image = enhancer(image).enhance(_uniform(max(0.0, 1 - strength), 1 + strength))
        return image, target

    def __repr__(self) -> str:
        return "ColorJitter(brightness={}, contrast={}, saturation={})".format(*self.strengths)


class ToTensor:
    """PIL RGB image -> FloatTensor (3, H, W) in [0, 1]."""

    def __call__(self, image: Image.Image, target: Target) -> tuple[Tensor, Target]:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return tensor, target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """Per-channel (x - mean) / std on a (3, H, W) tensor; ImageNet statistics by default."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        return (image - self.mean) / self.std, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class BoxesToCxcywh:
    """Absolute xyxy -> cxcywh normalised by the current image size; no-object rows stay zeros."""

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        target = dict(target)
        height, width = image.shape[-2:]
        has_object = target.pop("has_object")
        target["sub_boxes"] = normalize_xyxy(target["sub_boxes"], width, height)
        obj_boxes = normalize_xyxy(target["obj_boxes"], width, height)
        obj_boxes[~has_object] = 0.0
        target["obj_boxes"] = obj_boxes
        target["size"] = torch.tensor([height, width])
        return image, target

    def __repr__(self) -> str:
        return "BoxesToCxcywh()"


def make_transforms(
    split: Literal["train", "test"],
    scales: Sequence[int] | None = DETR_SCALES,
    max_size: int | None = DETR_MAX_SIZE,
    crop: bool = True,
    color_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The DETR / QPIC augmentation pipeline, scaled to ``scales``.

    train: flip, [color jitter], then either a multi-scale resize, or (with ``crop``, half of the
    time) resize to one of 0.5/0.625/0.75 x max(scales), random crop with sides in
    [0.48, 0.75] x max(scales) and a multi-scale resize (DETR's 400/500/600 and 384..600 at 800).
    test: resize the shorter side to max(scales). ``scales=None`` keeps the original size.
    Both end with ToTensor, Normalize and BoxesToCxcywh.

    ``make_transforms("train")`` is DETR's recipe; ``make_transforms("train", SMALL_SCALES,
    SMALL_MAX_SIZE)`` suits the ~128 px synthetic images of the demo.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    steps: list[Transform] = []
    if split == "train":
        steps.append(RandomHorizontalFlip())
        if color_jitter > 0:
            steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
        if scales:
            resize = RandomResize(scales, max_size)
            if crop:
                top = max(scales)
                pre_sizes = [round(top * f) for f in (0.5, 0.625, 0.75)]
                cropper = RandomSizeCrop(round(top * 0.48), round(top * 0.75))
                crop_step = Compose([RandomResize(pre_sizes), cropper, resize])
                steps.append(RandomSelect(resize, crop_step))
            else:
                steps.append(resize)
    elif scales:
        steps.append(RandomResize([max(scales)], max_size))
    steps += [ToTensor(), Normalize(mean, std), BoxesToCxcywh()]
    return Compose(steps)
