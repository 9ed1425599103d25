"""A human-object pair inside an image: two boxes, their canonical form, and how BLIP is shown them.

A scoring item may name a ``Region`` (the human box and the object box, ``[x1, y1, x2, y2]`` in
absolute pixels of the original image). The teacher then scores its sentences on that pair, not
on the whole image, by one of the ``REGION_POLICIES``:

- ``crop``: the union of the two boxes, grown by ``margin`` (a fraction of the union's width and
  height on each side), clipped to the image; BLIP's processor then resizes it as usual;
- ``mask``: the whole image, with every pixel outside both boxes blended towards grey by
  ``dim`` (0 = untouched, 1 = flat grey): the pair stands out, the context stays.

Everything keyed by an image (the vision-embedding LRU, the engine's work, the score cache, the
trainer's memo) is keyed by a *view*: ``view_id(digest, region)`` is the digest itself for the
whole image and ``<digest>/<canonical region>`` for a pair. The canonical form rounds the boxes
to whole pixels, so a pair named by the same ground truth maps to the same key in every epoch,
and never to the whole image's or another pair's.

No torch, and Pillow only when rendering: the client-only install, the student's data loader and
the cache import this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from teacher_server.errors import InvalidInputError
from teacher_server.hoi.digest import is_digest

if TYPE_CHECKING:
    from PIL.Image import Image

RegionPolicy = Literal["crop", "mask"]
REGION_POLICIES: tuple[str, ...] = ("crop", "mask")
REGION_VALUES = 8  # human x1, y1, x2, y2, object x1, y1, x2, y2
# A box may reach past the image edge by this many pixels (rounding of mapped predictions).
EDGE_TOLERANCE_PX = 1.0
_CANONICAL = re.compile(r"-?\d+(,-?\d+){7}")
_GREY = (128, 128, 128)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A human box and an object box, ``(x1, y1, x2, y2)`` in pixels of the original image."""

    human: Box
    object: Box

    @classmethod
    def from_values(cls, values: Sequence[float], *, field: str = "region") -> Region:
        """Eight numbers (human box, then object box), checked: finite, non-negative, x1 < x2, y1 < y2.

        Raises ``InvalidInputError`` naming ``field`` (``field[5]`` for one value).
        """
        try:
            numbers = [float(value) for value in values]
        except (TypeError, ValueError):
            raise InvalidInputError(field, f"expected {REGION_VALUES} numbers, got {values!r:.80}") from None
        if len(numbers) != REGION_VALUES:
            raise InvalidInputError(
                field,
                f"expected {REGION_VALUES} numbers (human x1, y1, x2, y2, object x1, y1, x2, y2), got {len(numbers)}",
            )
        for index, value in enumerate(numbers):
            if not math.isfinite(value):
                raise InvalidInputError(f"{field}[{index}]", f"must be a finite number, got {value}")
            if value < -EDGE_TOLERANCE_PX:
                raise InvalidInputError(f"{field}[{index}]", f"is {value:g}: outside the image (below 0)")
        for name, offset in (("human", 0), ("object", 4)):
            x1, y1, x2, y2 = numbers[offset : offset + 4]
            if not (x1 < x2 and y1 < y2):
                raise InvalidInputError(
                    f"{field}[{offset}:{offset + 4}]",
                    f"the {name} box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty or inverted: "
                    "expected x1 < x2 and y1 < y2 (absolute pixels)",
                )
        return cls(human=_box(numbers[:4]), object=_box(numbers[4:]))

    def values(self) -> tuple[float, ...]:
        """The eight numbers, human box first."""
        return (*self.human, *self.object)

    def canonical(self) -> str:
        """Eight whole pixels joined by commas: the region's identity in keys and fingerprints."""
        return ",".join(str(round(value)) for value in self.values())

    def check_inside(self, width: int, height: int, *, field: str = "region") -> None:
        """Refuse a box that reaches outside a ``width`` x ``height`` image (beyond 1 px of rounding)."""
        limits = (width, height, width, height) * 2
        for index, (value, limit) in enumerate(zip(self.values(), limits, strict=True)):
            if value > limit + EDGE_TOLERANCE_PX:
                axis = "x" if index % 2 == 0 else "y"
                raise InvalidInputError(
                    f"{field}[{index}]",
                    f"is {value:g}: outside the image ({axis} must be at most {limit}, "
                    f"the image is {width}x{height} pixels)",
                )

    def clipped(self, width: int, height: int) -> Region:
        """The region with both boxes clipped to the image (after ``check_inside``: at most 1 px)."""
        return Region(human=_clip(self.human, width, height), object=_clip(self.object, width, height))

    def union(self) -> Box:
        h, o = self.human, self.object
        return (min(h[0], o[0]), min(h[1], o[1]), max(h[2], o[2]), max(h[3], o[3]))


def region_from_canonical(text: str) -> Region:
    """The region of a ``Region.canonical()`` string (a view id's tail)."""
    if not _CANONICAL.fullmatch(text):
        raise ValueError(f"{text!r} is not a canonical region (eight integers joined by commas)")
    values = [float(part) for part in text.split(",")]
    return Region(human=_box(values[:4]), object=_box(values[4:]))


def view_id(digest: str, region: Region | None) -> str:
    """The key of what the teacher sees: the digest (whole image) or ``<digest>/<canonical region>``."""
    return digest if region is None else f"{digest}/{region.canonical()}"


def split_view(view: str) -> tuple[str, str | None]:
    """``(digest, canonical region or None)`` of a view id; raises ``ValueError`` on anything else."""
    digest, slash, region = view.partition("/")
    if not is_digest(digest) or (slash and not _CANONICAL.fullmatch(region)):
        raise ValueError(
            f"{view[:120]!r} is not a view id (a SHA-256 hex digest, optionally '/' and a canonical region)"
        )
    return digest, (region if slash else None)


def is_view_id(text: object) -> bool:
    """Whether ``text`` is a digest or a digest with a canonical region."""
    if not isinstance(text, str):
        return False
    try:
        split_view(text)
    except ValueError:
        return False
    return True


def render_region(
    image: Image, region: Region, *, policy: str = "crop", margin: float = 0.1, dim: float = 0.8
) -> Image:
    """What BLIP is shown for ``region`` of the RGB ``image`` (before its processor resizes it).

    ``crop``: the union box grown by ``margin`` of its size on each side, clipped to the image.
    ``mask``: the whole image, pixels outside both boxes blended towards grey by ``dim``.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    width, height = image.size
    if policy == "crop":
        return image.crop(view_box(region, width, height, policy=policy, margin=margin))
    region = region.clipped(width, height)
    if policy == "mask":
        keep = PILImage.new("L", image.size, 0)
        draw = ImageDraw.Draw(keep)
        for x1, y1, x2, y2 in (region.human, region.object):
            # Pixel (i, j) covers [i, i+1): a box keeps every pixel it touches.
            draw.rectangle((math.floor(x1), math.floor(y1), math.ceil(x2) - 1, math.ceil(y2) - 1), fill=255)
        dimmed = PILImage.blend(image, PILImage.new("RGB", image.size, _GREY), dim)
        return PILImage.composite(image, dimmed, keep)
    raise ValueError(f"region policy must be one of {', '.join(REGION_POLICIES)}, got {policy!r}")


def view_box(
    region: Region | None, width: int, height: int, *, policy: str = "crop", margin: float = 0.1
) -> tuple[int, int, int, int]:
    """The pixels of a ``width`` x ``height`` image that BLIP is shown for ``region``, as
    ``(x1, y1, x2, y2)``: the grown, clipped union box under ``crop``; the whole image under
    ``mask`` or for no region. ``render_region`` crops this box; evidence maps are drawn back into it.
    """
    if region is None or policy != "crop":
        return (0, 0, width, height)
    x1, y1, x2, y2 = region.clipped(width, height).union()
    grow_x, grow_y = (x2 - x1) * margin, (y2 - y1) * margin
    box = (
        max(0, math.floor(x1 - grow_x)),
        max(0, math.floor(y1 - grow_y)),
        min(width, math.ceil(x2 + grow_x)),
        min(height, math.ceil(y2 + grow_y)),
    )
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:  # a sub-pixel pair at the very edge
        box = (min(box[0], width - 1), min(box[1], height - 1), max(box[2], box[0] + 1), max(box[3], box[1] + 1))
    return box


def _box(values: Sequence[float]) -> Box:
    return (float(values[0]), float(values[1]), float(values[2]), float(values[3]))


def _clip(box: Box, width: int, height: int) -> Box:
    x1, y1, x2, y2 = box
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return (x1, y1, max(x2, x1 + 1e-3), max(y2, y1 + 1e-3))
