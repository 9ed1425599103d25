"""Pictures of detections: human and object boxes, the line joining each pair, readable labels.

``draw_pairs`` draws on a copy of the original image, at its own size. Line width and font size
grow with the image (``PictureScale``) so that a label is legible on a 128 px synthetic image and
on a 1920 px photo alike. What is drawn, bottom to top:

1. the line joining the centres of each pair's two boxes;
2. each pair's label block (white text on black; on grey for a pair the teacher rejects; a red
   cross drawn before each crossed line): above the human box when there is room, else inside
   it, shifted down until it overlaps no earlier label;
3. the object boxes (orange), then the human boxes (blue), so that the boxes stay visible over
   labels and links. A rejected pair's boxes and link are grey and dashed.

Pillow only, no model code: ``student.predict`` decides what to draw, this module only draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image
Colour = tuple[int, int, int]

HUMAN_COLOUR: Colour = (33, 150, 243)  # blue
OBJECT_COLOUR: Colour = (255, 152, 0)  # orange
LINK_COLOUR: Colour = (0, 230, 118)  # green
REJECTED_COLOUR: Colour = (158, 158, 158)  # grey: boxes, link and label background of a rejected pair
CROSS_COLOUR: Colour = (244, 67, 54)  # red
LABEL_BACKGROUND: Colour = (0, 0, 0)
LABEL_TEXT: Colour = (255, 255, 255)

# Font size: a 24th of the shorter side, never under 10 px (the smallest size Pillow's default
# font stays readable at: "ride horse 0.91" is then 69 px wide, half of a 128 px image).
MIN_FONT_PX = 10
FONT_FRACTION = 1 / 24
# Line width: one pixel per 250 px of the shorter side (1 px up to 374 px, 4 px at 1080 px).
LINE_FRACTION = 1 / 250


@dataclass(frozen=True)
class PictureScale:
    """Line width and font size of a picture of ``width`` x ``height`` pixels."""

    line_width: int
    font_size: int

    @classmethod
    def of(cls, width: int, height: int) -> PictureScale:
        shorter = min(width, height)
        return cls(
            line_width=max(1, round(shorter * LINE_FRACTION)),
            font_size=max(MIN_FONT_PX, round(shorter * FONT_FRACTION)),
        )


@dataclass(frozen=True)
class LabelLine:
    """One line of a pair's label; ``crossed``: drawn after a red cross (the teacher says no)."""

    text: str
    crossed: bool = False


@dataclass(frozen=True)
class PairDrawing:
    """One human-object pair to draw: its boxes, its label lines, and whether the teacher rejects it
    (``rejected``: grey dashed boxes and link, grey label).

    ``object_box`` None: an action without object (V-COCO), drawn as the human box alone.
    """

    human_box: Box
    object_box: Box | None
    lines: tuple[LabelLine, ...]
    rejected: bool = False


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` rounded to whole pixels and clipped to the image: where its outline is drawn.

    The outline's outer edge is on these pixels (``ImageDraw.rectangle`` draws its width inward).
    """
    x1, y1, x2, y2 = (round(v) for v in box)
    x1, x2 = (min(max(x, 0), width - 1) for x in (x1, x2))
    y1, y2 = (min(max(y, 0), height - 1) for y in (y1, y2))
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def draw_pairs(image: Image.Image, pairs: Sequence[PairDrawing]) -> Image.Image:
    """A copy of ``image`` (RGB, same size) with ``pairs`` drawn on it (see the module docstring)."""
    picture = image.convert("RGB")  # always a new image, even from an RGB one
    width, height = picture.size
    scale = PictureScale.of(width, height)
    font = ImageFont.load_default(size=scale.font_size)
    draw = ImageDraw.Draw(picture)
    boxes = [
        (
            pixel_box(pair.human_box, width, height),
            None if pair.object_box is None else pixel_box(pair.object_box, width, height),
        )
        for pair in pairs
    ]
    for pair, (human, obj) in zip(pairs, boxes, strict=True):
        if obj is not None:
            colour = REJECTED_COLOUR if pair.rejected else LINK_COLOUR
            _line(draw, _centre(human), _centre(obj), colour, scale.line_width, dashed=pair.rejected)
    taken: list[tuple[int, int, int, int]] = []
    for pair, (human, _) in zip(pairs, boxes, strict=True):
        if pair.lines:
            taken.append(_label(draw, font, scale, human, pair, taken, width, height))
    for colour, index in ((OBJECT_COLOUR, 1), (HUMAN_COLOUR, 0)):
        for pair, both in zip(pairs, boxes, strict=True):
            box = both[index]
            if box is not None:
                _rectangle(draw, box, REJECTED_COLOUR if pair.rejected else colour, scale.line_width, pair.rejected)
    return picture


def _centre(box: tuple[int, int, int, int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _dash_length(line_width: int) -> int:
    return 4 * line_width + 2


def _line(
    draw: ImageDraw.ImageDraw,
    start: tuple[float, float],
    end: tuple[float, float],
    colour: Colour,
    line_width: int,
    *,
    dashed: bool,
) -> None:
    if not dashed:
        draw.line([start, end], fill=colour, width=line_width)
        return
    length = ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
    dash = _dash_length(line_width)
    steps = max(1, int(length // dash))
    for step in range(0, steps, 2):  # every other dash-long piece
        a, b = step / steps, min(step + 1, steps) / steps
        draw.line(
            [
                (start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1])),
                (start[0] + b * (end[0] - start[0]), start[1] + b * (end[1] - start[1])),
            ],
            fill=colour,
            width=line_width,
        )


def _rectangle(
    draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: Colour, line_width: int, dashed: bool
) -> None:
    if not dashed:
        draw.rectangle(box, outline=colour, width=line_width)
        return
    x1, y1, x2, y2 = box
    dash = _dash_length(line_width)
    inner = line_width - 1  # the solid outline's width is drawn inward: so are the dashes
    for start in range(x1, x2 + 1, 2 * dash):
        stop = min(start + dash - 1, x2)
        draw.rectangle((start, y1, stop, y1 + inner), fill=colour)
        draw.rectangle((start, y2 - inner, stop, y2), fill=colour)
    for start in range(y1, y2 + 1, 2 * dash):
        stop = min(start + dash - 1, y2)
        draw.rectangle((x1, start, x1 + inner, stop), fill=colour)
        draw.rectangle((x2 - inner, start, x2, stop), fill=colour)


def _label(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    scale: PictureScale,
    human: tuple[int, int, int, int],
    pair: PairDrawing,
    taken: Sequence[tuple[int, int, int, int]],
    width: int,
    height: int,
) -> tuple[int, int, int, int]:
    """Draw ``pair``'s label block near the human box; returns the rectangle it covers."""
    pad = max(1, scale.font_size // 5)
    line_height = scale.font_size + pad
    # Room for the cross before the text on every line, when one line has it: the text stays aligned.
    cross = scale.font_size if any(line.crossed for line in pair.lines) else 0
    text_width = max(round(draw.textlength(line.text, font=font)) for line in pair.lines)
    block_w = min(width, text_width + cross + 2 * pad)
    block_h = min(height, len(pair.lines) * line_height + pad)
    left = min(max(human[0], 0), width - block_w)
    top = human[1] - block_h if human[1] - block_h >= 0 else human[1]  # above the box, else inside
    # Shift down past earlier labels it would cover (then up from the bottom if it runs out).
    for _ in range(len(taken) + 1):
        rect = (left, top, left + block_w - 1, top + block_h - 1)
        blocking = [t for t in taken if _overlap(rect, t)]
        if not blocking:
            break
        top = max(t[3] for t in blocking) + 1
    top = min(max(top, 0), height - block_h)
    rect = (left, top, left + block_w - 1, top + block_h - 1)
    draw.rectangle(rect, fill=REJECTED_COLOUR if pair.rejected else LABEL_BACKGROUND)
    size = scale.font_size - 2 * pad
    stroke = max(1, scale.font_size // 8)
    for row, line in enumerate(pair.lines):
        y = top + pad + row * line_height
        if line.crossed:
            x, y_cross = left + pad, y + (line_height - pad - size) // 2
            draw.line([(x, y_cross), (x + size, y_cross + size)], fill=CROSS_COLOUR, width=stroke)
            draw.line([(x, y_cross + size), (x + size, y_cross)], fill=CROSS_COLOUR, width=stroke)
        draw.text((left + pad + cross, y), line.text, font=font, fill=LABEL_TEXT)
    return rect


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
