"""A synthetic HOI dataset in exactly the HICO-DET format, learnable on a CPU in minutes.

Each ~128 px image shows one or two stick-figure people, each interacting with (or ignoring) one
object. Objects are real HICO-DET classes with a fixed look (orange ball, green bicycle, brown
horse, red kite, cyan cup, grey tv); verbs are visible from geometry alone:

- ride (+ sit_on / straddle): the person sits on top of the bicycle or horse;
- hold: the object touches the hand of an extended arm;
- kick: the ball touches the foot of a raised leg;
- fly (+ hold): a raised hand holds a string up to a kite high in the air;
- drink_with (+ hold): the cup touches the face;
- inspect / watch: the object stands apart and the head (eye and nose) faces it;
- no_interaction: the object stands apart and the head faces away.

Interactions are sampled with skewed weights, so with ~1000 training images a few triplets have
fewer than 10 training instances: the HICO-DET rare / non-rare split is not trivial.

The world also has HICO-DET's other weaknesses, on request, in the training split only (the
validation and test splits stay fully labelled):

- ``drop_cooccurring``: the co-occurring second verb of a two-verb interaction (``sit_on`` and
  ``straddle`` beside ``ride``, ``hold`` beside ``fly`` and ``drink_with``) is left out of the
  annotation at this rate: annotators who mark "fly kite" but forget "hold kite";
- ``verb_label_fraction``: only this fraction of the pairs keeps its verb labels; the others are
  written as ``pairs_without_verbs`` (boxes and object known, verbs unknown);
- a ``corpus`` split with balanced interactions, fully labelled, drawn from its own seed: it
  stands for the web-scale data a vision-language teacher learned from, and only the teacher's
  fine-tuning reads it.

And, in every split, ambiguity on request: ``two_person_rate`` of the images show two people
doing different things with two objects of the same class (one rides a horse, the other holds
or ignores another horse), side by side and far enough apart that each pair's union box, grown
by 10 %, holds nothing of the other pair. Scoring a sentence on the whole image then differs from
scoring it on one human-object pair; ``synthetic.json`` lists these images per split
(``two_person_images``) for an evaluation to select them.

Everything is drawn from ``numpy.random.default_rng([seed, split, image index])``; the label
noise from a second stream ``[seed, split, image index, 1]``, so the images are the same bytes
whatever the noise settings; whether an image is a two-person one from a third,
``[seed, split, image index, 2]``, so the other images are the same bytes whatever the rate. The
same arguments write the same bytes, independently of order. ``synthetic.json`` at the root
records the arguments, what the label noise did and which images are two-person ones.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from teacher_server.hoi.classes import (
    COCO_OBJECT_IDS,
    HICO_HOIS,
    HICO_VERBS,
    OBJECT_NAMES,
    hico_correspondence,
    hico_hoi_id,
)
from teacher_server.logs import show_progress

Point = tuple[float, float]
Color = tuple[int, int, int]

# The order fixes each split's random stream (its index): new splits go at the end.
SPLITS = ("train", "test", "val", "corpus")
ANNOTATION_FILES = {
    "train": "trainval_hico.json",
    "test": "test_hico.json",
    "val": "val_hico.json",
    "corpus": "corpus_hico.json",
}
RARE_THRESHOLD = 10  # HICO-DET: a triplet with fewer training instances is "rare"
SUMMARY_FILE = "synthetic.json"


@dataclass(frozen=True)
class Interaction:
    """One kind of (person, verbs, object) scene the generator draws."""

    object_name: str  # COCO name
    verbs: tuple[str, ...]  # HICO verbs annotated for the pair (all valid HOIs with the object)
    pose: str  # geometry: ride, hold, kick, fly, drink, look, ignore
    weight: float  # relative sampling frequency

    @property
    def name(self) -> str:
        return f"{'+'.join(self.verbs)} {self.object_name}"


# Weights: 1.0 common, 0.4 medium, 0.04 rare (about 5 instances per 1000 training images).
INTERACTIONS: tuple[Interaction, ...] = (
    Interaction("bicycle", ("ride", "sit_on"), "ride", 1.0),
    Interaction("bicycle", ("hold",), "hold", 0.4),
    Interaction("bicycle", ("inspect",), "look", 0.04),
    Interaction("bicycle", ("no_interaction",), "ignore", 0.4),
    Interaction("horse", ("ride", "straddle"), "ride", 1.0),
    Interaction("horse", ("hold",), "hold", 0.04),
    Interaction("horse", ("no_interaction",), "ignore", 0.4),
    Interaction("sports ball", ("kick",), "kick", 1.0),
    Interaction("sports ball", ("hold",), "hold", 1.0),
    Interaction("sports ball", ("inspect",), "look", 0.4),
    Interaction("sports ball", ("no_interaction",), "ignore", 0.04),
    Interaction("kite", ("fly", "hold"), "fly", 1.0),
    Interaction("kite", ("hold",), "hold", 0.4),
    Interaction("kite", ("no_interaction",), "ignore", 0.04),
    Interaction("cup", ("drink_with", "hold"), "drink", 1.0),
    Interaction("cup", ("hold",), "hold", 1.0),
    Interaction("cup", ("inspect",), "look", 0.04),
    Interaction("tv", ("watch",), "look", 1.0),
    Interaction("tv", ("no_interaction",), "ignore", 0.4),
)

SYNTHETIC_OBJECTS: tuple[str, ...] = tuple(dict.fromkeys(i.object_name for i in INTERACTIONS))
_BIG_OBJECTS = frozenset({"bicycle", "horse", "tv"})

# Colours: objects have fixed, saturated colours that no clothing or background uses.
_SKIN: tuple[Color, ...] = ((241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36))
_SHIRTS: tuple[Color, ...] = ((40, 70, 160), (90, 60, 140), (60, 60, 70), (20, 110, 120), (150, 40, 90))
_PANTS: tuple[Color, ...] = ((30, 30, 50), (50, 40, 30), (70, 70, 80))
_BALL, _BALL_LINE = (255, 130, 0), (120, 50, 0)
_BIKE_FRAME, _WHEEL = (20, 170, 40), (15, 15, 15)
_HORSE, _HORSE_DARK = (135, 80, 35), (80, 45, 20)
_KITE, _KITE_TAIL, _STRING = (230, 20, 40), (250, 220, 0), (40, 40, 40)
_CUP = (0, 200, 220)
_TV, _SCREEN = (70, 70, 70), (120, 190, 255)
_FACE = (20, 20, 20)


def _check_interactions() -> None:
    # Every triplet must be a real HICO-DET HOI: hico_hoi_id raises DatasetError otherwise.
    for interaction in INTERACTIONS:
        obj = OBJECT_NAMES.index(interaction.object_name)
        for verb in interaction.verbs:
            hico_hoi_id(HICO_VERBS.index(verb), obj)
    # A two-person ambiguous image may draw any object class and needs a second verb set for it.
    for name in dict.fromkeys(i.object_name for i in INTERACTIONS):
        if len({i.verbs for i in INTERACTIONS if i.object_name == name}) < 2:
            raise ValueError(f"INTERACTIONS: {name!r} needs two interactions with different verbs")


_check_interactions()


# -- drawing with box recording -----------------------------------------------------------------


class Recorder:
    """Draws primitives shifted by ``origin`` and records their joint extent (the entity's box).

    With ``draw=None`` it only measures, which the layout uses before anything is drawn.
    """

    def __init__(self, draw: ImageDraw.ImageDraw | None = None, origin: Point = (0.0, 0.0)) -> None:
        self.draw, self.origin = draw, origin
        self.box = [math.inf, math.inf, -math.inf, -math.inf]

    def _shift(self, points: Iterable[Point]) -> list[Point]:
        ox, oy = self.origin
        return [(x + ox, y + oy) for x, y in points]

    def _extend(self, points: list[Point], pad: float = 0.0) -> None:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        box = self.box
        box[0], box[1] = min(box[0], min(xs) - pad), min(box[1], min(ys) - pad)
        box[2], box[3] = max(box[2], max(xs) + pad), max(box[3], max(ys) + pad)

    def line(self, points: list[Point], color: Color, width: float, record: bool = True) -> None:
        shifted = self._shift(points)
        if record:
            self._extend(shifted, width / 2)
        if self.draw is not None:
            self.draw.line(shifted, fill=color, width=max(1, round(width)), joint="curve")
            for x, y in (shifted[0], shifted[-1]):  # round caps, so limbs join cleanly
                self.draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=color)

    def circle(self, center: Point, radius: float, color: Color, outline: Color | None = None) -> None:
        ((x, y),) = self._shift([center])
        self._extend([(x - radius, y - radius), (x + radius, y + radius)])
        if self.draw is not None:
            self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color, outline=outline)

    def ring(self, center: Point, radius: float, color: Color, width: float) -> None:
        ((x, y),) = self._shift([center])
        self._extend([(x - radius, y - radius), (x + radius, y + radius)])
        if self.draw is not None:
            box = (x - radius, y - radius, x + radius, y + radius)
            self.draw.ellipse(box, outline=color, width=max(1, round(width)))

    def polygon(self, points: list[Point], color: Color) -> None:
        shifted = self._shift(points)
        self._extend(shifted)
        if self.draw is not None:
            self.draw.polygon(shifted, fill=color)

    def rect(self, x1: float, y1: float, x2: float, y2: float, color: Color) -> None:
        self.polygon([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color)


# -- entities (local coordinates: x = 0 at the anchor, y = 0 on the ground, up is negative) ------


@dataclass
class Skeleton:
    """A stick figure; ``facing`` = +1 looks right, -1 left."""

    height: float
    facing: int
    head: Point
    neck: Point
    hip: Point
    arms: list[list[Point]]
    legs: list[list[Point]]
    skin: Color = _SKIN[0]
    shirt: Color = _SHIRTS[0]
    pants: Color = _PANTS[0]

    @property
    def head_radius(self) -> float:
        return 0.11 * self.height

    def hand(self, index: int = 0) -> Point:
        return self.arms[index][-1]


def standing(height: float, facing: int) -> Skeleton:
    """Upright, arms down; feet on the ground around x = 0."""
    h, d = height, facing
    r = 0.11 * h
    neck, hip = (0.0, -h + 2 * r), (0.0, -0.45 * h)
    shoulder = (0.0, neck[1] + 0.05 * h)
    return Skeleton(
        h,
        d,
        head=(0.0, -h + r),
        neck=neck,
        hip=hip,
        arms=[[shoulder, (d * 0.12 * h, -0.42 * h)], [shoulder, (-d * 0.1 * h, -0.42 * h)]],
        legs=[[hip, (d * 0.1 * h, -0.03 * h)], [hip, (-d * 0.1 * h, -0.03 * h)]],
    )


def draw_person(rec: Recorder, s: Skeleton) -> None:
    h, d = s.height, s.facing
    limb, torso = max(2.0, 0.075 * h), max(3.0, 0.15 * h)
    for leg in s.legs:
        rec.line(leg, s.pants, limb)
    rec.line([s.neck, s.hip], s.shirt, torso)
    for arm in s.arms:
        rec.line(arm, s.shirt, limb * 0.9)
        rec.circle(arm[-1], limb * 0.6, s.skin)
    r = s.head_radius
    hx, hy = s.head
    rec.circle(s.head, r, s.skin)
    # The face says where the person looks: a nose sticking out and an eye on the facing side.
    rec.polygon(
        [
            (hx + d * 0.7 * r, hy - 0.35 * r),
            (hx + d * 1.45 * r, hy + 0.15 * r),
            (hx + d * 0.7 * r, hy + 0.4 * r),
        ],
        s.skin,
    )
    rec.circle((hx + d * 0.45 * r, hy - 0.2 * r), max(0.8, 0.22 * r), _FACE)


def draw_ball(rec: Recorder, center: Point, radius: float) -> None:
    rec.circle(center, radius, _BALL, outline=_BALL_LINE)


def draw_cup(rec: Recorder, center: Point, size: float, facing: int) -> None:
    cx, cy = center
    w, h = 0.75 * size, size
    rec.polygon(
        [
            (cx - w / 2, cy - h / 2),
            (cx + w / 2, cy - h / 2),
            (cx + 0.38 * w, cy + h / 2),
            (cx - 0.38 * w, cy + h / 2),
        ],
        _CUP,
    )
    # Handle away from the drinker's face side, so the cup reads as held.
    rec.ring((cx - facing * 0.55 * w, cy), 0.22 * h, _CUP, max(1.0, 0.12 * size))


def draw_kite(rec: Recorder, center: Point, size: float) -> None:
    cx, cy = center
    rec.polygon([(cx, cy - 0.6 * size), (cx + 0.4 * size, cy), (cx, cy + 0.6 * size), (cx - 0.4 * size, cy)], _KITE)
    tail = [(cx, cy + 0.6 * size), (cx - 0.15 * size, cy + 0.9 * size), (cx + 0.1 * size, cy + 1.2 * size)]
    rec.line(tail, _KITE_TAIL, max(1.5, 0.1 * size))


def draw_bicycle(rec: Recorder, x: float, width: float, facing: int) -> None:
    """Wheels on the ground at x +- width/2 - r; ``facing`` = where the handlebar is."""
    r = 0.24 * width
    back, front = (x - facing * (width / 2 - r), -r), (x + facing * (width / 2 - r), -r)
    spoke = max(1.5, 0.05 * width)
    rec.ring(back, r, _WHEEL, spoke)
    rec.ring(front, r, _WHEEL, spoke)
    seat = (x - facing * 0.12 * width, -2.0 * r)
    bar = (x + facing * 0.28 * width, -2.4 * r)
    frame = max(2.0, 0.06 * width)
    rec.line([back, seat, (x + facing * 0.2 * width, -r * 1.9), front], _BIKE_FRAME, frame)
    rec.line([seat, (x, -r), back], _BIKE_FRAME, frame)
    rec.line(
        [(x + facing * 0.2 * width, -r * 1.9), bar, (bar[0] - facing * 0.06 * width, bar[1])],
        _BIKE_FRAME,
        frame,
    )
    rec.line(
        [(seat[0] - 0.06 * width, seat[1] - 0.02 * width), (seat[0] + 0.06 * width, seat[1] - 0.02 * width)],
        _WHEEL,
        frame,
    )


def bicycle_points(x: float, width: float, facing: int) -> tuple[Point, Point]:
    """(saddle, handlebar) of ``draw_bicycle`` with the same arguments."""
    r = 0.24 * width
    return (x - facing * 0.12 * width, -2.0 * r - 0.02 * width), (x + facing * 0.25 * width, -2.4 * r)


def draw_horse(rec: Recorder, x: float, width: float, facing: int) -> None:
    """Four legs on the ground, body at ~0.45 width high, head on the ``facing`` side."""
    leg = max(2.0, 0.07 * width)
    body_y, body_h = -0.42 * width, 0.26 * width
    for dx in (-0.36, -0.24, 0.22, 0.34):
        rec.line([(x + facing * dx * width, body_y), (x + facing * dx * width, 0.0)], _HORSE_DARK, leg)
    rec.polygon(
        [
            (x - 0.45 * width, body_y - body_h / 2),
            (x + 0.45 * width, body_y - body_h / 2),
            (x + 0.45 * width, body_y + body_h / 2),
            (x - 0.45 * width, body_y + body_h / 2),
        ],
        _HORSE,
    )
    neck_base = (x + facing * 0.38 * width, body_y - body_h / 3)
    head = (x + facing * 0.55 * width, body_y - 0.45 * width)
    rec.line([neck_base, head], _HORSE, 0.14 * width)
    rec.polygon(
        [
            head,
            (head[0] + facing * 0.16 * width, head[1] + 0.1 * width),
            (head[0] + facing * 0.1 * width, head[1] + 0.16 * width),
            (head[0], head[1] + 0.08 * width),
        ],
        _HORSE_DARK,
    )
    rec.line(
        [
            (x - facing * 0.45 * width, body_y - body_h / 3),
            (x - facing * 0.56 * width, body_y + 0.15 * width),
        ],
        _HORSE_DARK,
        leg,
    )


def horse_points(x: float, width: float, facing: int) -> tuple[Point, Point]:
    """(back where a rider sits, neck where hands go) of ``draw_horse``."""
    body_y, body_h = -0.42 * width, 0.26 * width
    return (x - facing * 0.05 * width, body_y - body_h / 2), (x + facing * 0.4 * width, body_y - 0.3 * width)


def draw_tv(rec: Recorder, x: float, width: float) -> None:
    height = 0.7 * width
    stand = 0.45 * width
    rec.line([(x, -stand), (x, 0.0)], _TV, max(2.0, 0.08 * width))
    rec.line([(x - 0.25 * width, 0.0), (x + 0.25 * width, 0.0)], _TV, max(2.0, 0.08 * width))
    rec.rect(x - width / 2, -stand - height, x + width / 2, -stand, _TV)
    rec.rect(x - 0.42 * width, -stand - 0.88 * height, x + 0.42 * width, -stand - 0.12 * height, _SCREEN)


# -- scenes --------------------------------------------------------------------------------------


def draw_object(rec: Recorder, name: str, anchor: Point, size: float, facing: int) -> None:
    """Draw object ``name``; ``anchor`` is the centre of small objects, (x, ground) of big ones."""
    if name == "bicycle":
        draw_bicycle(rec, anchor[0], size, facing)
    elif name == "horse":
        draw_horse(rec, anchor[0], size, facing)
    elif name == "tv":
        draw_tv(rec, anchor[0], size)
    elif name == "sports ball":
        draw_ball(rec, anchor, size)
    elif name == "kite":
        draw_kite(rec, anchor, size)
    elif name == "cup":
        draw_cup(rec, anchor, size, facing)
    else:
        raise ValueError(f"the synthetic generator cannot draw {name!r}")


@dataclass
class Group:
    """One person and their object in local coordinates (x = 0 at the person, y = 0 on the ground)."""

    interaction: Interaction
    person: Skeleton
    anchor: Point  # where the object is (see draw_object)
    size: float
    object_facing: int
    extras: list[tuple[list[Point], Color, float]] = field(default_factory=list)  # e.g. the kite string
    object_first: bool = True  # draw the object under the person (ride) or over the hand (hold)

    def draw_object(self, rec: Recorder) -> None:
        draw_object(rec, self.interaction.object_name, self.anchor, self.size, self.object_facing)


def _object_size(name: str, h: float) -> float:
    return {
        "bicycle": 0.95 * h,
        "horse": 1.0 * h,
        "tv": 0.55 * h,
        "sports ball": 0.1 * h,
        "kite": 0.26 * h,
        "cup": 0.16 * h,
    }[name]


def make_group(interaction: Interaction, height: float, facing: int, rng: np.random.Generator) -> Group:
    """Pose the person and place the object according to the interaction's geometry."""
    h, d, name, pose = height, facing, interaction.object_name, interaction.pose
    size = _object_size(name, h)
    person = standing(h, d)
    shoulder = person.arms[0][0]
    extras: list[tuple[list[Point], Color, float]] = []
    object_first = True

    if pose == "ride":
        # Seated: hip on the saddle, torso up, legs down over the side, hands forward to the grip.
        points = bicycle_points if name == "bicycle" else horse_points
        hip, grip = points(0.0, size, d)
        neck = (hip[0] + d * 0.06 * h, hip[1] - 0.33 * h)
        shoulder = (neck[0], neck[1] + 0.05 * h)
        knee = (hip[0] + d * 0.13 * h, hip[1] + 0.13 * h)
        foot = (hip[0] + d * 0.08 * h, hip[1] + 0.3 * h)
        person = Skeleton(
            h,
            d,
            head=(neck[0], neck[1] - 0.11 * h),
            neck=neck,
            hip=hip,
            arms=[[shoulder, grip], [shoulder, (grip[0] - d * 0.04 * h, grip[1] + 0.03 * h)]],
            legs=[[hip, knee, foot], [hip, (knee[0] - d * 0.04 * h, knee[1]), foot]],
        )
        return Group(interaction, person, (0.0, 0.0), size, d)

    if pose == "hold" and name in _BIG_OBJECTS:
        # Beside the object, which faces the person, a hand on its handlebar / neck.
        if name == "bicycle":
            anchor = (d * (0.3 * h + 0.25 * size), 0.0)
            _, grip = bicycle_points(anchor[0], size, -d)
        else:
            anchor = (d * (0.35 * h + 0.4 * size), 0.0)
            _, grip = horse_points(anchor[0], size, -d)
        person.arms[0] = [shoulder, grip]
        return Group(interaction, person, anchor, size, -d)

    object_facing = d
    if pose == "hold":
        hand = (d * 0.34 * h, shoulder[1] + float(rng.uniform(0.05, 0.2)) * h)
        person.arms[0] = [shoulder, hand]
        half_width = {"sports ball": 1.0, "cup": 0.375, "kite": 0.4}[name] * size
        anchor = (hand[0] + d * 0.8 * half_width, hand[1])
        object_first = False
    elif pose == "kick":
        foot = (d * 0.3 * h, -0.13 * h)
        person.legs[0] = [person.hip, foot]
        person.arms = [[shoulder, (-d * 0.2 * h, -0.5 * h)], [shoulder, (d * 0.15 * h, -0.52 * h)]]
        anchor = (foot[0] + d * (size + 0.03 * h), -size)
    elif pose == "fly":
        hand = (d * 0.22 * h, -1.02 * h)
        person.arms[0] = [shoulder, (d * 0.12 * h, shoulder[1] - 0.08 * h), hand]
        anchor = (d * float(rng.uniform(0.65, 1.0)) * h, -float(rng.uniform(1.45, 1.7)) * h)
        extras.append(([hand, (anchor[0], anchor[1] + 0.6 * size)], _STRING, 1.0))
    elif pose == "drink":
        head_x, head_y = person.head
        anchor = (head_x + d * (0.11 * h + 0.35 * size), head_y + 0.05 * h)
        elbow = (d * 0.16 * h, shoulder[1] + 0.2 * h)
        person.arms[0] = [shoulder, elbow, (anchor[0], anchor[1] + 0.4 * size)]
        object_first = False
    elif pose in ("look", "ignore"):
        # The object stands apart; a horse turns its head to the person.
        x = d * (0.2 * h + float(rng.uniform(0.45, 0.9)) * h + size / 2)
        height_above_ground = 0.0 if name in _BIG_OBJECTS else (1.3 if name == "kite" else 1.0) * size
        anchor = (x, -height_above_ground)
        object_facing = -d if name == "horse" else d
        if pose == "ignore":
            # Same scene, but the person faces away from the object.
            person = standing(h, -d)
    else:
        raise ValueError(f"unknown pose {pose!r}")
    return Group(interaction, person, anchor, size, object_facing, extras, object_first)


def _measure(group: Group) -> tuple[list[float], list[float]]:
    """Local (person box, object box) of a group, without drawing."""
    person, obj = Recorder(), Recorder()
    draw_person(person, group.person)
    group.draw_object(obj)
    return person.box, obj.box


@dataclass
class RenderedImage:
    """A drawn scene and its HICO-format annotation (without ``file_name``)."""

    image: Image.Image
    annotations: list[dict[str, Any]]
    hoi_annotation: list[dict[str, Any]]
    interactions: list[Interaction]


def _background(rng: np.random.Generator, width: int, height: int, ground: float) -> Image.Image:
    sky = rng.uniform(185, 235, size=3)
    soil = rng.uniform(150, 200, size=3) * np.array([1.0, 0.95, 0.8])
    rows = np.arange(height, dtype=np.float32)[:, None]
    blend = np.clip((rows - ground + 4) / 8, 0, 1)
    canvas = (1 - blend)[..., None] * sky + blend[..., None] * soil
    canvas = np.broadcast_to(canvas, (height, width, 3)) + rng.normal(0, 5, size=(height, width, 3))
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _sample_interaction(
    rng: np.random.Generator, balanced: bool = False, among: tuple[Interaction, ...] = INTERACTIONS
) -> Interaction:
    weights = np.ones(len(among)) if balanced else np.array([i.weight for i in among])
    return among[int(rng.choice(len(among), p=weights / weights.sum()))]


def sample_ambiguous_pair(rng: np.random.Generator, balanced: bool = False) -> tuple[Interaction, Interaction]:
    """Two interactions with the same object class and different verb sets, in random order.

    The first is drawn like any interaction (long-tailed, or uniform when ``balanced``), the
    second among the other interactions with its object, by the same weights.
    """
    first = _sample_interaction(rng, balanced)
    others = tuple(i for i in INTERACTIONS if i.object_name == first.object_name and i.verbs != first.verbs)
    second = _sample_interaction(rng, balanced, others)
    # Random order, so which side holds the more common interaction says nothing.
    return (first, second) if rng.random() < 0.5 else (second, first)


def cooccurring_triplets() -> list[tuple[str, str]]:
    """(verb, object) of every co-occurring second verb (``drop_cooccurring`` removes these labels)."""
    found = {(verb, i.object_name) for i in INTERACTIONS for verb in i.verbs[1:]}
    return sorted(found)


_WIDTH_FACTORS = (1.0, 1.125, 1.25)  # image width / height
_MARGIN = 2.0  # px kept free at the image border and between groups

Extent = tuple[float, float, float]  # (left, right, top) of a group in its local coordinates


def _extent(group: Group) -> Extent:
    """(left, right, top) of what a group draws: the x range of its human-object union box."""
    person_box, obj_box = _measure(group)
    return min(person_box[0], obj_box[0]), max(person_box[2], obj_box[2]), min(person_box[1], obj_box[1])


def _total_width(extents: list[Extent], gap: float) -> float:
    """Width the groups need side by side: margins at both borders and ``gap`` between groups."""
    # The plain layout's sum plus a term that is exactly 0.0 when gap == margin: the ordinary
    # scenes' floats, hence their pixels, stay bit for bit what they were without ``gap``.
    plain = sum(right - left for left, right, _ in extents) + _MARGIN * (len(extents) + 1)
    return plain + (gap - _MARGIN) * (len(extents) - 1)


def _fits(extents: list[Extent], width: int, height: int, gap: float) -> bool:
    ground_max = height - _MARGIN
    return _total_width(extents, gap) <= width and all(-top + 2 * _MARGIN <= ground_max for _, _, top in extents)


def _fit_groups(
    rng: np.random.Generator, width: int, height: int, max_people: int, balanced: bool
) -> tuple[list[Group], list[Extent]]:
    """Independent groups (1..max_people) that fit side by side in ``width`` x ``height``."""
    want = 1 if max_people < 2 or rng.random() < 0.55 else int(rng.integers(2, max_people + 1))
    # Try the requested number of people; shrink or drop people until the groups fit side by side.
    for attempt in range(12):
        count = max(1, want - attempt // 4)
        scale = 1.0 - 0.12 * (attempt % 4)
        groups, extents = [], []
        for _ in range(count):
            interaction = _sample_interaction(rng, balanced)
            person_h = float(rng.uniform(0.34, 0.46)) * height * scale / (1 + 0.25 * (count - 1))
            group = make_group(interaction, person_h, int(rng.choice([-1, 1])), rng)
            groups.append(group)
            extents.append(_extent(group))
        if _fits(extents, width, height, _MARGIN):
            return groups, extents
    # The last attempt (one small person) always fits at 128 px.
    raise RuntimeError("synthetic layout failed; image_size too small")  # pragma: no cover


def _two_person_gap(extents: list[Extent]) -> float:
    """Space between the two groups of an ambiguous image.

    A pair's union box grown by 10 % of its width on each side must not reach the other pair:
    10 % of the wider group, plus two margins for the rounding of boxes to whole pixels.
    """
    return 0.1 * max(right - left for left, right, _ in extents) + 2 * _MARGIN


def _fit_two_person(
    rng: np.random.Generator, width: int, height: int, balanced: bool
) -> tuple[list[Group], list[Extent], int, float]:
    """(groups, extents, width, gap) of an ambiguous image: two people, two objects of one class.

    Unlike ``_fit_groups`` it never drops a person: it widens the image to the widest of
    ``_WIDTH_FACTORS``, then shrinks both people until they fit.
    """
    pair = sample_ambiguous_pair(rng, balanced)
    for attempt in range(8):
        scale = 1.0 - 0.08 * attempt
        groups, extents = [], []
        # Every pose puts the object on the person's facing side (a rider sits on it), so the left
        # person faces right and the right one left: each object lies between its person and the
        # other pair, and a person is always nearer their own object than the other one.
        for interaction, facing in zip(pair, (1, -1), strict=True):
            person_h = float(rng.uniform(0.34, 0.46)) * height * scale / 1.25
            group = make_group(interaction, person_h, facing, rng)
            groups.append(group)
            extents.append(_extent(group))
        gap = _two_person_gap(extents)
        if _fits(extents, width, height, gap):
            return groups, extents, width, gap
        width = max(width, int(height * _WIDTH_FACTORS[-1]))  # widen first, then shrink
    raise RuntimeError("synthetic two-person layout failed; image_size too small")  # pragma: no cover


def render_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    max_people: int = 2,
    *,
    balanced: bool = False,
    two_person: bool = False,
) -> RenderedImage:
    """Draw one random scene: 1..max_people people, each with one object, side by side.

    ``balanced``: every interaction equally likely (the teacher corpus), instead of the long tail.
    ``two_person``: an ambiguous scene instead, whatever ``max_people``: two people doing
    different things (different verb sets) with two instances of one object class, left and
    right, far enough apart that each pair's union box grown by 10 % holds nothing of the other
    pair (``sample_ambiguous_pair``).
    """
    height = image_size
    width = int(image_size * float(rng.choice(list(_WIDTH_FACTORS))))
    if two_person:
        groups, extents, width, gap = _fit_two_person(rng, width, height, balanced)
    else:
        groups, extents = _fit_groups(rng, width, height, max_people, balanced)
        gap = _MARGIN
    return _draw_groups(rng, width, height, groups, extents, gap)


def _draw_groups(
    rng: np.random.Generator, width: int, height: int, groups: list[Group], extents: list[Extent], gap: float
) -> RenderedImage:
    """Draw the background and the groups left to right, and write their HICO annotation."""
    count, margin = len(groups), _MARGIN
    total = _total_width(extents, gap)
    ground_max = height - margin
    # Spread the free width randomly between and around the groups.
    free = width - total
    cuts = np.sort(rng.uniform(0, free, size=count))
    ground_line = float(rng.uniform(max(-top + 2 * margin for _, _, top in extents), ground_max))
    image = _background(rng, width, height, ground_line)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # muted clutter the model must learn to ignore
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, ground_line), rng.uniform(3, 8)
        shade = tuple(int(v) for v in rng.uniform(140, 200, size=3))
        draw.rectangle((cx - r, cy - r * 0.6, cx + r, cy + r * 0.6), fill=shade)

    annotations: list[dict[str, Any]] = []
    hois: list[dict[str, Any]] = []
    cursor = margin
    for k, (group, (left, right, top)) in enumerate(zip(groups, extents, strict=True)):
        x0 = cursor + float(cuts[k]) - float(cuts[k - 1] if k else 0.0)
        cursor = x0 + (right - left) + gap
        ground = min(ground_max, max(-top + margin, ground_line + float(rng.uniform(-3, 3))))
        origin = (x0 - left, ground)
        shirt_rng = rng.integers(0, 1 << 30, size=3)
        group.person.skin = _SKIN[shirt_rng[0] % len(_SKIN)]
        group.person.shirt = _SHIRTS[shirt_rng[1] % len(_SHIRTS)]
        group.person.pants = _PANTS[shirt_rng[2] % len(_PANTS)]
        person_rec, obj_rec = Recorder(draw, origin), Recorder(draw, origin)
        if group.object_first:
            group.draw_object(obj_rec)
        for points, color, line_width in group.extras:
            person_rec.line(points, color, line_width, record=False)
        draw_person(person_rec, group.person)
        if not group.object_first:
            group.draw_object(obj_rec)
        subject_id = len(annotations)
        object_index = OBJECT_NAMES.index(group.interaction.object_name)
        annotations.append({"bbox": _pixel_box(person_rec.box, width, height), "category_id": 1})
        annotations.append(
            {"bbox": _pixel_box(obj_rec.box, width, height), "category_id": COCO_OBJECT_IDS[object_index]}
        )
        for verb in group.interaction.verbs:
            verb_index = HICO_VERBS.index(verb)
            hois.append(
                {
                    "subject_id": subject_id,
                    "object_id": subject_id + 1,
                    "category_id": verb_index + 1,
                    "hoi_category_id": hico_hoi_id(verb_index, object_index),
                }
            )
    return RenderedImage(image, annotations, hois, [g.interaction for g in groups])


def _pixel_box(box: list[float], width: int, height: int) -> list[int]:
    """Recorded float extent -> integer [x1, y1, x2, y2] enclosing every drawn pixel, in the image."""
    x1, y1, x2, y2 = box
    return [
        max(0, math.floor(x1)),
        max(0, math.floor(y1)),
        min(width, math.ceil(x2) + 1),
        min(height, math.ceil(y2) + 1),
    ]


# -- writing a dataset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelNoise:
    """What the training split's annotation leaves out, as HICO-DET's annotators did.

    drop_cooccurring: probability that a co-occurring second verb (``cooccurring_triplets``) is
        left out of its pair's labels, independently per label.
    verb_label_fraction: probability that a pair keeps its verb labels at all; the others are
        written as ``pairs_without_verbs`` (their verbs unknown).
    """

    drop_cooccurring: float = 0.0
    verb_label_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_cooccurring <= 1.0:
            raise ValueError(f"drop_cooccurring must be in [0, 1], got {self.drop_cooccurring}")
        if not 0.0 <= self.verb_label_fraction <= 1.0:
            raise ValueError(f"verb_label_fraction must be in [0, 1], got {self.verb_label_fraction}")

    @property
    def active(self) -> bool:
        return self.drop_cooccurring > 0 or self.verb_label_fraction < 1


@dataclass
class NoiseCounts:
    """What ``LabelNoise`` did to one split."""

    labels_dropped: int = 0
    pairs_without_verbs: int = 0


def apply_label_noise(
    hois: list[dict[str, Any]], rng: np.random.Generator, noise: LabelNoise, counts: NoiseCounts
) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """(kept hoi_annotation entries, pairs_without_verbs) of one image; ``counts`` is updated.

    Pairs are visited in order of first appearance; each draws whether it keeps its verbs, then
    each of its co-occurring second verbs whether it is dropped, so the draws of an image do not
    depend on the rates.
    """
    second_verbs = {(HICO_VERBS.index(v), OBJECT_NAMES.index(o)) for v, o in cooccurring_triplets()}
    pairs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for hoi in hois:
        pairs.setdefault((hoi["subject_id"], hoi["object_id"]), []).append(hoi)
    kept: list[dict[str, Any]] = []
    unlabelled: list[dict[str, int]] = []
    for (subject, obj), pair_hois in pairs.items():
        keep_verbs = rng.random() < noise.verb_label_fraction
        drops = rng.random(len(pair_hois)) < noise.drop_cooccurring
        if not keep_verbs:
            unlabelled.append({"subject_id": subject, "object_id": obj})
            counts.pairs_without_verbs += 1
            continue
        for hoi, drop in zip(pair_hois, drops, strict=True):
            verb = hoi["category_id"] - 1
            object_index = HICO_HOIS[hoi["hoi_category_id"] - 1][1]
            if drop and (verb, object_index) in second_verbs and len(pair_hois) > 1:
                counts.labels_dropped += 1
            else:
                kept.append(hoi)
    return kept, unlabelled


@dataclass
class SyntheticSummary:
    """What ``write_synthetic_dataset`` wrote."""

    root: Path
    images: dict[str, int]
    pairs: dict[str, int]
    triplets: dict[str, Counter]  # split -> Counter of "verb object" names
    rare_triplets: list[str]  # in training: fewer than RARE_THRESHOLD instances (and > 0)
    noise: LabelNoise = field(default_factory=LabelNoise)
    noise_counts: NoiseCounts = field(default_factory=NoiseCounts)
    two_person_rate: float = 0.0
    two_person_images: dict[str, list[str]] = field(default_factory=dict)  # split -> ambiguous file names

    @property
    def dropped_triplets(self) -> list[str]:
        """ "verb object" names of the triplets whose training labels ``drop_cooccurring`` thins."""
        if self.noise.drop_cooccurring <= 0:
            return []
        return [f"{verb} {obj}" for verb, obj in cooccurring_triplets()]

    def describe(self) -> str:
        lines = [f"wrote {self.root}"]
        for split in self.images:
            ambiguous = ""
            if self.two_person_rate > 0:
                ambiguous = f", {len(self.two_person_images.get(split, []))} two-person (ambiguous) images"
            lines.append(
                f"  {split}: {self.images[split]} images, {self.pairs[split]} HOI pairs, "
                f"{len(self.triplets[split])} distinct triplets{ambiguous}"
            )
        lines.append(f"  rare triplets (< {RARE_THRESHOLD} training instances): {len(self.rare_triplets)}")
        if self.noise.active:
            lines.append(
                f"  training labels: {self.noise_counts.labels_dropped} co-occurring verb labels dropped "
                f"(rate {self.noise.drop_cooccurring:g}: {', '.join(self.dropped_triplets) or 'none'}), "
                f"{self.noise_counts.pairs_without_verbs} pairs without verbs "
                f"(verb labels kept on a fraction {self.noise.verb_label_fraction:g} of the pairs)"
            )
        return "\n".join(lines)

    def to_json(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``synthetic.json``: the arguments that wrote the data, what the label noise did and
        which images are two-person ambiguous ones (``two_person_images``: split -> file names)."""
        return {
            "arguments": arguments,
            "images": self.images,
            "pairs": self.pairs,
            "rare_triplets": self.rare_triplets,
            "dropped_triplets": self.dropped_triplets,
            "labels_dropped": self.noise_counts.labels_dropped,
            "pairs_without_verbs": self.noise_counts.pairs_without_verbs,
            "two_person_images": self.two_person_images,
        }


def _split_code(split: str) -> int:
    return SPLITS.index(split)


def _check_rate(name: str, flag: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} ({flag}) must be in [0, 1], got {value}")


def is_two_person_image(seed: int, split: str, index: int, rate: float) -> bool:
    """Whether image ``index`` of ``split`` is a two-person ambiguous image at ``rate``.

    Drawn from its own stream ``[seed, split, index, 2]``: the decision takes nothing from the
    image's stream, so every other image is the same bytes whatever the rate, and one uniform draw
    compared to the rate makes the ambiguous images at a lower rate a subset of those at a higher.
    """
    if rate <= 0:
        return False
    return bool(np.random.default_rng([seed, _split_code(split), index, 2]).random() < rate)


def write_split(
    root: Path,
    split: str,
    count: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    max_people: int = 2,
    jpeg_quality: int = 90,
    progress: bool | None = None,
    balanced: bool = False,
    noise: LabelNoise | None = None,
    noise_counts: NoiseCounts | None = None,
    two_person_rate: float = 0.0,
    two_person_images: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Render ``count`` images into ``root/images/<split>/`` and return their annotation entries.

    ``balanced``: interactions drawn uniformly (the teacher corpus). ``noise``: label noise applied
    to the entries (the images are unchanged by it); ``noise_counts`` collects what it did.
    ``two_person_rate``: the fraction of images drawn as two-person ambiguous scenes
    (``is_two_person_image``); ``two_person_images`` collects their file names.
    """
    _check_rate("two_person_rate", "--two-person-rate", two_person_rate)
    from tqdm import tqdm

    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    # By default a bar only for splits long enough to wait for, and only on a terminal.
    show = (count >= 200 and show_progress(None)) if progress is None else progress
    for index in tqdm(range(count), desc=f"synthetic {split}", unit="img", disable=not show):
        rng = np.random.default_rng([seed, _split_code(split), index])
        two_person = is_two_person_image(seed, split, index, two_person_rate)
        scene = render_scene(
            rng, image_size=image_size, max_people=max_people, balanced=balanced, two_person=two_person
        )
        file_name = f"synth_{split}_{index:06d}.jpg"
        if two_person and two_person_images is not None:
            two_person_images.append(file_name)
        scene.image.save(image_dir / file_name, format="JPEG", quality=jpeg_quality)
        entry: dict[str, Any] = {
            "file_name": file_name,
            "annotations": scene.annotations,
            "hoi_annotation": scene.hoi_annotation,
        }
        if noise is not None and noise.active:
            noise_rng = np.random.default_rng([seed, _split_code(split), index, 1])
            kept, unlabelled = apply_label_noise(
                scene.hoi_annotation, noise_rng, noise, noise_counts if noise_counts is not None else NoiseCounts()
            )
            entry["hoi_annotation"] = kept
            if unlabelled:
                entry["pairs_without_verbs"] = unlabelled
        entries.append(entry)
    return entries


def _triplets(entries: list[dict[str, Any]]) -> Counter:
    counts: Counter = Counter()
    for entry in entries:
        for hoi in entry["hoi_annotation"]:
            obj = entry["annotations"][hoi["object_id"]]["category_id"]
            counts[f"{HICO_VERBS[hoi['category_id'] - 1]} {OBJECT_NAMES[COCO_OBJECT_IDS.index(obj)]}"] += 1
    return counts


def _pair_count(entry: dict[str, Any]) -> int:
    labelled = {(h["subject_id"], h["object_id"]) for h in entry["hoi_annotation"]}
    return len(labelled) + len(entry.get("pairs_without_verbs", ()))


def write_synthetic_dataset(
    out: str | Path,
    train: int,
    test: int,
    *,
    seed: int = 0,
    image_size: int = 128,
    max_people: int = 2,
    progress: bool | None = None,
    val: int = 0,
    corpus: int = 0,
    corpus_seed: int | None = None,
    drop_cooccurring: float = 0.0,
    verb_label_fraction: float = 1.0,
    two_person_rate: float = 0.0,
) -> SyntheticSummary:
    """Write a HICO-format dataset: ``images/{train,test}/*.jpg``, ``annotations/trainval_hico.json``,
    ``annotations/test_hico.json`` and ``annotations/corre_hico.npy`` (the real 117 x 80 table);
    with ``val`` / ``corpus`` images also ``images/val``, ``annotations/val_hico.json`` (a
    validation split for tuning, fully labelled) and ``images/corpus``,
    ``annotations/corpus_hico.json`` (the teacher's corpus: balanced interactions, fully labelled,
    drawn from ``corpus_seed``, default ``seed``). ``drop_cooccurring`` and ``verb_label_fraction``
    thin the training split's labels (``LabelNoise``). ``two_person_rate``: this fraction of the
    images of every split shows two people doing different things with two objects of one class
    (``render_scene(two_person=True)``); ``synthetic.json`` lists them under ``two_person_images``.
    ``synthetic.json`` records all of it.

    Same arguments, same bytes. ``progress``: tqdm bar (default: for splits of 200+ images, on a terminal).
    """
    counts = {"train": train, "test": test, "val": val, "corpus": corpus}
    for name, count in counts.items():
        if count < 0:
            raise ValueError(f"image counts must be >= 0, got {name}={count}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 px for the figures to fit, got {image_size}")
    _check_rate("two_person_rate", "--two-person-rate", two_person_rate)
    noise = LabelNoise(drop_cooccurring, verb_label_fraction)
    noise_counts = NoiseCounts()
    root = Path(out)
    annotation_dir = root / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    splits = [split for split in SPLITS if split in ("train", "test") or counts[split] > 0]
    entries = {}
    two_person_images: dict[str, list[str]] = {split: [] for split in splits}
    for split in splits:
        entries[split] = write_split(
            root,
            split,
            counts[split],
            seed=corpus_seed if split == "corpus" and corpus_seed is not None else seed,
            image_size=image_size,
            max_people=max_people,
            progress=progress,
            balanced=split == "corpus",
            noise=noise if split == "train" else None,
            noise_counts=noise_counts,
            two_person_rate=two_person_rate,
            two_person_images=two_person_images[split],
        )
        with (annotation_dir / ANNOTATION_FILES[split]).open("w") as handle:
            json.dump(entries[split], handle, separators=(",", ":"))
    np.save(annotation_dir / "corre_hico.npy", hico_correspondence())
    triplets = {split: _triplets(entries[split]) for split in splits}
    pairs = {split: sum(_pair_count(e) for e in entries[split]) for split in splits}
    rare = sorted(name for name, n in triplets["train"].items() if n < RARE_THRESHOLD)
    summary = SyntheticSummary(
        root,
        {s: len(entries[s]) for s in splits},
        pairs,
        triplets,
        rare,
        noise,
        noise_counts,
        two_person_rate,
        two_person_images,
    )
    arguments = {
        "train": train,
        "test": test,
        "val": val,
        "corpus": corpus,
        "seed": seed,
        "corpus_seed": corpus_seed,
        "image_size": image_size,
        "max_people": max_people,
        "drop_cooccurring": drop_cooccurring,
        "verb_label_fraction": verb_label_fraction,
        "two_person_rate": two_person_rate,
    }
    (root / SUMMARY_FILE).write_text(json.dumps(summary.to_json(arguments), indent=1) + "\n")
    return summary
