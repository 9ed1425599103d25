"""Triplet -> sentence: readable names, articles, variants, candidates."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_server.hoi.classes import (
    HICO_VERBS,
    NO_INTERACTION_INDEX,
    OBJECT_NAMES,
    VCOCO_VERBS,
    hico_correspondence,
)
from teacher_server.hoi.prompts import VARIANTS, candidate_sentences, readable_verb, triplet_sentence, with_article


@pytest.mark.parametrize(
    ("verb", "obj", "sentence"),
    [
        ("ride", "horse", "a person ride a horse"),
        ("hop_on", "airplane", "a person hop on an airplane"),
        ("kick", "sports_ball", "a person kick a sports ball"),
        ("kick", "sports ball", "a person kick a sports ball"),
        ("eat", "apple", "a person eat an apple"),
        ("hold", "umbrella", "a person hold an umbrella"),
        ("watch", "tv", "a person watch a tv"),
        ("wear", "skis", "a person wear skis"),
        ("cut_with", "scissors", "a person cut with scissors"),
        ("sit_instr", "chair", "a person sit on a chair"),
        ("look_obj", "tv", "a person look at a tv"),
        ("talk_on_phone_instr", "cell phone", "a person talk on a cell phone"),
    ],
)
def test_full_sentences(verb, obj, sentence):
    assert triplet_sentence(verb, obj) == sentence
    assert triplet_sentence(verb, obj, "full") == sentence


def test_variants_keep_only_the_verb_or_only_the_object():
    assert triplet_sentence("ride", "horse", "verb") == "a person ride something"
    assert triplet_sentence("ride", "horse", "object") == "a person and a horse"
    assert triplet_sentence("feed", "horse", "object") == triplet_sentence("ride", "horse", "object")
    assert triplet_sentence("ride", "elephant", "verb") == triplet_sentence("ride", "horse", "verb")


def test_no_interaction_has_no_sentence_in_any_variant():
    for variant in VARIANTS:
        assert triplet_sentence("no_interaction", "horse", variant) is None


def test_actions_without_object():
    assert triplet_sentence("walk", None) == "a person walk"
    assert triplet_sentence("stand", None, "verb") == "a person stand"
    assert triplet_sentence("stand", None, "object") is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        triplet_sentence("ride", "horse", "both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verb"):
        triplet_sentence("", "horse")


def test_every_name_is_readable():
    for verb in HICO_VERBS + VCOCO_VERBS:
        assert "_" not in readable_verb(verb)
    for name in OBJECT_NAMES:
        phrase = with_article(name)
        assert "_" not in phrase
        if name not in ("skis", "scissors"):
            assert phrase.startswith("an " if name[0] in "aeiou" else "a ")


def test_candidate_sentences_cover_every_valid_verb_but_no_interaction():
    correspondence = hico_correspondence()
    horse = OBJECT_NAMES.index("horse")
    candidates = candidate_sentences(horse, correspondence, HICO_VERBS)
    valid = [v for v in range(len(HICO_VERBS)) if correspondence[v, horse] and v != NO_INTERACTION_INDEX]
    assert [v for v, _ in candidates] == valid
    assert len(valid) == 16
    assert (HICO_VERBS.index("ride"), "a person ride a horse") in candidates
    for verb_index, sentence in candidates:
        assert sentence == triplet_sentence(HICO_VERBS[verb_index], "horse")


def test_candidate_sentences_variants():
    correspondence = hico_correspondence()
    cup = OBJECT_NAMES.index("cup")
    objects = {s for _, s in candidate_sentences(cup, correspondence, HICO_VERBS, "object")}
    assert objects == {"a person and a cup"}
    verbs = candidate_sentences(cup, correspondence, HICO_VERBS, "verb")
    assert all(s.endswith(" something") for _, s in verbs)


def test_candidate_sentences_for_a_pair_without_object():
    vcoco = np.ones((len(VCOCO_VERBS), 80), dtype=bool)
    assert candidate_sentences(80, vcoco, VCOCO_VERBS) == []
    with_no_object_column = np.zeros((len(VCOCO_VERBS), 81), dtype=bool)
    with_no_object_column[VCOCO_VERBS.index("walk"), 80] = True
    assert candidate_sentences(80, with_no_object_column, VCOCO_VERBS) == [(4, "a person walk")]


def test_candidate_sentences_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="verb rows"):
        candidate_sentences(0, hico_correspondence(), VCOCO_VERBS)
    with pytest.raises(ValueError, match="object_index"):
        candidate_sentences(81, hico_correspondence(), HICO_VERBS)
