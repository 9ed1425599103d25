"""HOI triplet -> sentence for the image-text-matching teacher.

``triplet_sentence("ride", "horse")`` -> ``"a person ride a horse"``. The verb stays in its base
form (as the VLM-HOI paper's prompts), names are made readable (``hop_on`` -> "hop on",
``sports_ball`` -> "sports ball") and the article follows the object ("an airplane", plural
objects "skis"/"scissors" take none). V-COCO's role-split verbs read as phrases
(``sit_instr`` -> "sit on", ``look_obj`` -> "look at", ``talk_on_phone_instr`` -> "talk on");
verbs without an object (V-COCO "stand", "walk", ...) give "a person walk".

Variants, for the paper's ablation of what the text tells the teacher:
- ``"full"``: verb and object: "a person ride a horse".
- ``"verb"``: only the verb is informative; the object is replaced by the neutral "something":
  "a person ride something". The teacher then judges the action regardless of the object class.
- ``"object"``: only the object is informative; the verb is replaced by the neutral "and":
  "a person and a horse". The teacher then judges co-occurrence, so every verb of one object
  gets the same sentence (and the same score).

``no_interaction`` has no sentence in any variant (None): "a person not interact with a horse"
is a negation, which ITM models score poorly.

``SentenceTable`` holds the sentences and candidates of one dataset's verbs, computed once; the
teacher's fine-tuning and ``eval-itm`` read every sentence from it, so the teacher is trained and
evaluated on the text the student asks it about.

Torch-free (class lists and numpy only): the teacher's HTTP API imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeAlias

from teacher_server.hoi.classes import OBJECT_NAMES

if TYPE_CHECKING:
    import numpy as np

# (V, 80 or 81) bool verb x object validity: nested sequences or a numpy array.
Correspondence: TypeAlias = "Sequence[Sequence[bool]] | np.ndarray"

Variant = Literal["full", "verb", "object"]
VARIANTS: tuple[Variant, ...] = ("full", "verb", "object")

NO_INTERACTION = "no_interaction"
SUBJECT = "a person"
NEUTRAL_OBJECT = "something"
NEUTRAL_VERB = "and"

# V-COCO's role-split names read better as verb phrases: the role suffix says whether the object
# is the thing acted on (_obj) or the instrument (_instr), which English marks with a preposition.
_VCOCO_PHRASES: dict[str, str] = {
    "hold_obj": "hold",
    "sit_instr": "sit on",
    "ride_instr": "ride",
    "look_obj": "look at",
    "hit_instr": "hit with",
    "hit_obj": "hit",
    "eat_obj": "eat",
    "eat_instr": "eat with",
    "jump_instr": "jump on",
    "lay_instr": "lay on",
    "talk_on_phone_instr": "talk on",
    "carry_obj": "carry",
    "throw_obj": "throw",
    "catch_obj": "catch",
    "cut_instr": "cut with",
    "cut_obj": "cut",
    "work_on_computer_instr": "work on",
    "ski_instr": "ski on",
    "surf_instr": "surf on",
    "skateboard_instr": "skateboard on",
    "drink_instr": "drink with",
    "kick_obj": "kick",
    "point_instr": "point",
    "read_obj": "read",
    "snowboard_instr": "snowboard on",
}

# Objects named in the plural take no article.
_PLURAL_OBJECTS = frozenset({"skis", "scissors"})


def readable_verb(verb: str) -> str:
    """Dataset verb name -> words: ``hop_on`` -> "hop on", ``sit_instr`` -> "sit on"."""
    if verb in _VCOCO_PHRASES:
        return _VCOCO_PHRASES[verb]
    return verb.replace("_", " ").strip()


def readable_object(obj: str) -> str:
    """Object name -> words: ``sports_ball`` -> "sports ball"."""
    return obj.replace("_", " ").strip()


def with_article(noun: str) -> str:
    """ "horse" -> "a horse", "airplane" -> "an airplane", "skis" -> "skis".

    A vowel letter stands for a vowel sound in all 80 COCO names, so the first letter decides.
    """
    if noun in _PLURAL_OBJECTS:
        return noun
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def triplet_sentence(verb: str, obj: str | None, variant: Variant = "full") -> str | None:
    """The sentence of (person, ``verb``, ``obj``) for the teacher, or None for no_interaction.

    Args:
        verb: a verb name of HICO-DET or V-COCO (``"ride"``, ``"hop_on"``, ``"sit_instr"``).
        obj: an object name (``"horse"``, ``"sports ball"`` or ``"sports_ball"``); None for an
            action without object (V-COCO), which gives "a person walk".
        variant: ``"full"``, ``"verb"`` or ``"object"`` (see the module docstring).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not verb or not isinstance(verb, str):
        raise ValueError(f"verb must be a non-empty string, got {verb!r}")
    if verb == NO_INTERACTION:
        return None
    verb_words = readable_verb(verb)
    if obj is None:
        # Nothing to leave out on the object side; the "object" variant has nothing to say.
        return None if variant == "object" else f"{SUBJECT} {verb_words}"
    object_words = with_article(readable_object(obj))
    if variant == "verb":
        return f"{SUBJECT} {verb_words} {NEUTRAL_OBJECT}"
    if variant == "object":
        return f"{SUBJECT} {NEUTRAL_VERB} {object_words}"
    return f"{SUBJECT} {verb_words} {object_words}"


def candidate_sentences(
    object_index: int,
    correspondence: Correspondence,
    verbs: Sequence[str],
    variant: Variant = "full",
) -> list[tuple[int, str]]:
    """Every verb valid with the object and its sentence: ``[(verb index, sentence), ...]``.

    Args:
        object_index: object class 0..79; 80 (a V-COCO pair without object) has candidates only
            when ``correspondence`` has an 81st, no-object column.
        correspondence: (V, 80 or 81) bool verb x object validity (``hico_correspondence()``).
        verbs: the V verb names (``HICO_VERBS`` or ``VCOCO_VERBS``).
        variant: as ``triplet_sentence``.

    Verbs without a sentence (no_interaction) are left out. Ordered by verb index.
    """
    if len(correspondence) != len(verbs):
        raise ValueError(f"correspondence has {len(correspondence)} verb rows but {len(verbs)} verbs were given")
    columns = len(correspondence[0]) if len(correspondence) else 0
    if object_index < 0 or object_index > len(OBJECT_NAMES):
        raise ValueError(f"object_index {object_index} is outside 0..{len(OBJECT_NAMES)}")
    if object_index >= columns:
        return []
    obj = OBJECT_NAMES[object_index] if object_index < len(OBJECT_NAMES) else None
    result = []
    for verb_index, verb in enumerate(verbs):
        if not correspondence[verb_index][object_index]:
            continue
        sentence = triplet_sentence(verb, obj, variant)
        if sentence is not None:
            result.append((verb_index, sentence))
    return result


class SentenceTable:
    """Sentences of (verb, object) triplets and the candidates of each object, computed once.

    Every sentence comes from ``triplet_sentence`` / ``candidate_sentences``, the project's one
    sentence function.

    Args:
        correspondence: (V, 80 or 81) bool verb x object validity.
        verbs: the V verb names of the dataset.
        variant: the prompt variant (``VARIANTS``); ValueError naming ``prompt_variant`` otherwise.
    """

    def __init__(self, correspondence: Correspondence, verbs: Sequence[str], variant: str = "full") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"prompt_variant must be one of {list(VARIANTS)}, not {variant!r}")
        self.correspondence = correspondence
        self.verbs = tuple(verbs)
        self.variant: Variant = variant  # checked against VARIANTS above
        self._candidates: dict[int, tuple[tuple[int, str], ...]] = {}

    def candidates(self, obj: int) -> tuple[tuple[int, str], ...]:
        """``(verb index, sentence)`` of every verb valid with object class ``obj`` (none for no_interaction)."""
        if obj not in self._candidates:
            self._candidates[obj] = tuple(candidate_sentences(obj, self.correspondence, self.verbs, self.variant))
        return self._candidates[obj]

    def sentence(self, verb: int, obj: int) -> str | None:
        """The sentence of (person, verb, object); None for no_interaction."""
        name = OBJECT_NAMES[obj] if obj < len(OBJECT_NAMES) else None
        return triplet_sentence(self.verbs[verb], name, self.variant)
