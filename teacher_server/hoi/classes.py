"""Class names and ids of COCO objects, HICO-DET verbs and HOIs, and V-COCO verbs.

These lists are facts of the datasets (their order defines the class indices used everywhere):
- objects: the 80 COCO categories; object index = position of the COCO id in ``COCO_OBJECT_IDS``
  (ids run 1..90 with gaps), so person = 0 and V-COCO's "no object" is index 80;
- HICO-DET verbs: 117, alphabetical, 0-based in code (``no_interaction`` = 57, file id 58);
- HICO-DET HOIs: 600 (verb, object) pairs, HOI id = position + 1, grouped by object in HICO's
  own object order (the 20 PASCAL classes alphabetically, then the other 60 alphabetically);
- V-COCO verbs: the 29 role-split actions in the order the DETR-line HOI codebases use.

Only numpy is imported here: this module is imported by light-weight code (prompts, HTTP API).
"""

from __future__ import annotations

import numpy as np

from teacher_server.hoi.errors import DatasetError

# The 80 valid COCO category ids; index in this tuple = object class index.
COCO_OBJECT_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: Object index used for a V-COCO pair without an object (one past the 80 real classes).
NO_OBJECT_INDEX = 80

HICO_VERBS: tuple[str, ...] = (
    "adjust", "assemble", "block", "blow", "board", "break", "brush_with", "buy", "carry", "catch",
    "chase", "check", "clean", "control", "cook", "cut", "cut_with", "direct", "drag", "dribble",
    "drink_with", "drive", "dry", "eat", "eat_at", "exit", "feed", "fill", "flip", "flush", "fly",
    "greet", "grind", "groom", "herd", "hit", "hold", "hop_on", "hose", "hug", "hunt", "inspect",
    "install", "jump", "kick", "kiss", "lasso", "launch", "lick", "lie_on", "lift", "light", "load",
    "lose", "make", "milk", "move", "no_interaction", "open", "operate", "pack", "paint", "park",
    "pay", "peel", "pet", "pick", "pick_up", "point", "pour", "pull", "push", "race", "read",
    "release", "repair", "ride", "row", "run", "sail", "scratch", "serve", "set", "shear", "sign",
    "sip", "sit_at", "sit_on", "slide", "smell", "spin", "squeeze", "stab", "stand_on",
    "stand_under", "stick", "stir", "stop_at", "straddle", "swing", "tag", "talk_on", "teach",
    "text_on", "throw", "tie", "toast", "train", "turn", "type_on", "walk", "wash", "watch", "wave",
    "wear", "wield", "zip",
)  # fmt: skip

NO_INTERACTION_INDEX = 57

VCOCO_VERBS: tuple[str, ...] = (
    "hold_obj", "stand", "sit_instr", "ride_instr", "walk", "look_obj", "hit_instr", "hit_obj",
    "eat_obj", "eat_instr", "jump_instr", "lay_instr", "talk_on_phone_instr", "carry_obj",
    "throw_obj", "catch_obj", "cut_instr", "cut_obj", "run", "work_on_computer_instr", "ski_instr",
    "surf_instr", "skateboard_instr", "smile", "drink_instr", "kick_obj", "point_instr", "read_obj",
    "snowboard_instr",
)  # fmt: skip

# HICO-DET's 600 HOIs as (object, verbs in HOI-id order). Object names use COCO spelling; the
# verb order inside a group is HICO's (not always alphabetical: e.g. "chase" ends the cat group).
_HOI_GROUPS: tuple[tuple[str, str], ...] = (
    ("airplane", "board direct exit fly inspect load ride sit_on wash no_interaction"),
    (
        "bicycle",
        "carry hold inspect jump hop_on park push repair ride sit_on straddle walk wash no_interaction",
    ),
    ("bird", "chase feed hold pet release watch no_interaction"),
    (
        "boat",
        "board drive exit inspect jump launch repair ride row sail sit_on stand_on tie wash no_interaction",
    ),
    ("bottle", "carry drink_with hold inspect lick open pour no_interaction"),
    ("bus", "board direct drive exit inspect load ride sit_on wash wave no_interaction"),
    ("car", "board direct drive hose inspect jump load park ride wash no_interaction"),
    ("cat", "dry feed hold hug kiss pet scratch wash chase no_interaction"),
    ("chair", "carry hold lie_on sit_on stand_on no_interaction"),
    ("couch", "carry lie_on sit_on no_interaction"),
    ("cow", "feed herd hold hug kiss lasso milk pet ride walk no_interaction"),
    ("dining table", "clean eat_at sit_at no_interaction"),
    (
        "dog",
        "carry dry feed groom hold hose hug inspect kiss pet run scratch straddle train walk wash chase no_interaction",
    ),
    (
        "horse",
        "feed groom hold hug jump kiss load hop_on pet race ride run straddle train walk wash no_interaction",
    ),
    (
        "motorcycle",
        "hold inspect jump hop_on park push race ride sit_on straddle turn walk wash no_interaction",
    ),
    ("person", "carry greet hold hug kiss stab tag teach lick no_interaction"),
    ("potted plant", "carry hold hose no_interaction"),
    ("sheep", "carry feed herd hold hug kiss pet ride shear walk wash no_interaction"),
    ("train", "board drive exit load ride sit_on wash no_interaction"),
    ("tv", "control repair watch no_interaction"),
    ("apple", "buy cut eat hold inspect peel pick smell wash no_interaction"),
    ("backpack", "carry hold inspect open wear no_interaction"),
    ("banana", "buy carry cut eat hold inspect peel pick smell no_interaction"),
    ("baseball bat", "break carry hold sign swing throw wield no_interaction"),
    ("baseball glove", "hold wear no_interaction"),
    ("bear", "feed hunt watch no_interaction"),
    ("bed", "clean lie_on sit_on no_interaction"),
    ("bench", "inspect lie_on sit_on no_interaction"),
    ("book", "carry hold open read no_interaction"),
    ("bowl", "hold stir wash lick no_interaction"),
    ("broccoli", "cut eat hold smell stir wash no_interaction"),
    ("cake", "blow carry cut eat hold light make pick_up no_interaction"),
    ("carrot", "carry cook cut eat hold peel smell stir wash no_interaction"),
    ("cell phone", "carry hold read repair talk_on text_on no_interaction"),
    ("clock", "check hold repair set no_interaction"),
    ("cup", "carry drink_with hold inspect pour sip smell fill wash no_interaction"),
    ("donut", "buy carry eat hold make pick_up smell no_interaction"),
    ("elephant", "feed hold hose hug kiss hop_on pet ride walk wash watch no_interaction"),
    ("fire hydrant", "hug inspect open paint no_interaction"),
    ("fork", "hold lift stick lick wash no_interaction"),
    ("frisbee", "block catch hold spin throw no_interaction"),
    ("giraffe", "feed kiss pet ride watch no_interaction"),
    ("hair drier", "hold operate repair no_interaction"),
    ("handbag", "carry hold inspect no_interaction"),
    ("hot dog", "carry cook cut eat hold make no_interaction"),
    ("keyboard", "carry clean hold type_on no_interaction"),
    ("kite", "assemble carry fly hold inspect launch pull no_interaction"),
    ("knife", "cut_with hold stick wash wield lick no_interaction"),
    ("laptop", "hold open read repair type_on no_interaction"),
    ("microwave", "clean open operate no_interaction"),
    ("mouse", "control hold repair no_interaction"),
    ("orange", "buy cut eat hold inspect peel pick squeeze wash no_interaction"),
    ("oven", "clean hold inspect open repair operate no_interaction"),
    ("parking meter", "check pay repair no_interaction"),
    ("pizza", "buy carry cook cut eat hold make pick_up slide smell no_interaction"),
    ("refrigerator", "clean hold move open no_interaction"),
    ("remote", "hold point swing no_interaction"),
    ("sandwich", "carry cook cut eat hold make no_interaction"),
    ("scissors", "cut_with hold open no_interaction"),
    ("sink", "clean repair wash no_interaction"),
    ("skateboard", "carry flip grind hold jump pick_up ride sit_on stand_on no_interaction"),
    ("skis", "adjust carry hold inspect jump pick_up repair ride stand_on wear no_interaction"),
    ("snowboard", "adjust carry grind hold jump ride stand_on wear no_interaction"),
    ("spoon", "hold lick wash sip no_interaction"),
    (
        "sports ball",
        "block carry catch dribble hit hold inspect kick pick_up serve sign spin throw no_interaction",
    ),
    ("stop sign", "hold stand_under stop_at no_interaction"),
    ("suitcase", "carry drag hold hug load open pack pick_up zip no_interaction"),
    ("surfboard", "carry drag hold inspect jump lie_on load ride stand_on sit_on wash no_interaction"),
    ("teddy bear", "carry hold hug kiss no_interaction"),
    ("tennis racket", "carry hold inspect swing no_interaction"),
    ("tie", "adjust cut hold inspect pull tie wear no_interaction"),
    ("toaster", "hold operate repair no_interaction"),
    ("toilet", "clean flush open repair sit_on stand_on wash no_interaction"),
    ("toothbrush", "brush_with hold wash no_interaction"),
    ("traffic light", "install repair stand_under stop_at no_interaction"),
    ("truck", "direct drive inspect load repair ride sit_on wash no_interaction"),
    ("umbrella", "carry hold lose open repair set stand_under no_interaction"),
    ("vase", "hold make paint no_interaction"),
    ("wine glass", "fill hold sip toast lick wash no_interaction"),
    ("zebra", "feed hold pet watch no_interaction"),
)


def _build_hico_hois() -> tuple[tuple[int, int], ...]:
    verb_index = {name: i for i, name in enumerate(HICO_VERBS)}
    object_index = {name: i for i, name in enumerate(OBJECT_NAMES)}
    return tuple((verb_index[verb], object_index[obj]) for obj, verbs in _HOI_GROUPS for verb in verbs.split())


#: The 600 HICO-DET HOIs as (verb index, object index); HOI id (``hoi_category_id``) = position + 1.
HICO_HOIS: tuple[tuple[int, int], ...] = _build_hico_hois()

_COCO_ID_TO_INDEX = {coco_id: index for index, coco_id in enumerate(COCO_OBJECT_IDS)}
_HOI_TO_ID = {pair: position + 1 for position, pair in enumerate(HICO_HOIS)}


def coco_id_to_index(coco_id: int) -> int:
    """COCO category id (1..90 with gaps) -> object class index 0..79; person (id 1) -> 0.

    Raises:
        DatasetError: ``coco_id`` is not one of the 80 valid COCO ids.
    """
    try:
        return _COCO_ID_TO_INDEX[int(coco_id)]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(
            f"COCO category id {coco_id!r} is not one of the 80 valid COCO ids (1..90 without "
            "12, 26, 29, 30, 45, 66, 68, 69, 71, 83)"
        ) from None


def hico_hoi_id(verb_index: int, object_index: int) -> int:
    """(verb index, object index) -> HICO HOI id 1..600.

    Raises:
        DatasetError: the pair is not one of HICO-DET's 600 HOIs.
    """
    try:
        return _HOI_TO_ID[(int(verb_index), int(object_index))]
    except KeyError:
        names = ""
        if 0 <= verb_index < len(HICO_VERBS) and 0 <= object_index < len(OBJECT_NAMES):
            names = f" = ({HICO_VERBS[verb_index]}, {OBJECT_NAMES[object_index]})"
        raise DatasetError(
            f"(verb {verb_index}, object {object_index}){names} is not one of the 600 HICO-DET HOIs"
        ) from None


def hico_correspondence() -> np.ndarray:
    """Verb x object validity of HICO-DET: (117, 80) bool, True where (verb, object) is an HOI.

    Same content as the ``corre_hico.npy`` the HOI codebases ship. A fresh array on every call,
    so callers may modify it.
    """
    correspondence = np.zeros((len(HICO_VERBS), len(OBJECT_NAMES)), dtype=bool)
    for verb, obj in HICO_HOIS:
        correspondence[verb, obj] = True
    return correspondence
