"""eval-itm: the metric functions on hand-made scores, the pair rules, and the command end to end."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_server.__main__ import main
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.hoi.annotations import load_annotations
from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, OBJECT_NAMES, hico_correspondence
from teacher_server.hoi.errors import DatasetError
from teacher_server.hoi.prompts import SentenceTable
from teacher_server.hoi.region import Region
from teacher_server.itm_eval import (
    ItmQuality,
    PairRanking,
    average_precision,
    completion_rates,
    evaluate_itm,
    plan_pairs,
    roc_auc,
    top1,
)

torch.set_num_threads(1)


# -- metric functions ---------------------------------------------------------------------------


def test_roc_auc_counts_pairs_and_half_ties() -> None:
    # Positives 0.9, 0.7 vs negatives 0.8, 0.6: 0.9 beats both, 0.7 beats 0.6 only -> 3 of 4 pairs.
    assert roc_auc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == 0.75
    # Positive 1.0 vs negatives 1.0 (tie: 1/2) and 0.0 (win: 1) -> 1.5 / 2.
    assert roc_auc([1.0, 1.0, 0.0], [1, 0, 0]) == 0.75
    # Everything tied: every pair counts 1/2.
    assert roc_auc([0.3] * 4, [1, 1, 0, 0]) == 0.5
    # Perfectly wrong order: no positive beats any negative.
    assert roc_auc([0.0, 0.1, 0.9], [1, 1, 0]) == 0.0
    # Average ranks with a tie inside the positives: positives 5, 5 vs negatives 5, 1 ->
    # (1/2 + 1) + (1/2 + 1) = 3 of 4 pairs.
    assert roc_auc([5, 5, 5, 1], [1, 1, 0, 0]) == 0.75
    assert roc_auc([0.5, 0.4], [1, 1]) is None  # no negatives
    assert roc_auc([0.5, 0.4], [0, 0]) is None  # no positives
    assert roc_auc([], []) is None


def test_average_precision_is_non_interpolated_and_tie_stable() -> None:
    # Positives at ranks 1 and 3: precision 1/1 and 2/3 -> (1 + 2/3) / 2 = 5/6.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # The only positive ranked last of 3: precision 1/3.
    assert average_precision([3, 2, 1], [0, 0, 1]) == pytest.approx(1 / 3)
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0
    # A positive tied with a negative at the top is one threshold: recall 1 at precision 1/2,
    # whichever of the two comes first.
    assert average_precision([1.0, 1.0, 0.0], [0, 1, 0]) == 0.5
    assert average_precision([1.0, 1.0, 0.0], [1, 0, 0]) == 0.5
    # Ranks 1 (alone), then {2, 3} tied with one positive: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision([9, 4, 4], [1, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.2, 0.1], [0, 0]) is None


def test_top1_and_a_tied_top() -> None:
    assert top1([0.2, 0.9, 0.5], [0, 1, 0]) == 1.0
    assert top1([0.2, 0.9, 0.5], [1, 0, 0]) == 0.0
    # Two tied at the top, one of them positive: a random pick among them is right half the time.
    assert top1([0.9, 0.9, 0.1], [1, 0, 0]) == 0.5
    assert top1([], []) is None


def test_completion_rates_count_beliefs_at_the_confidence() -> None:
    # sigmoid(s) >= 0.8 <=> s >= log 4 = 1.386: positives 3.0 and 2.0 believed, 0.0 not; of the
    # negatives only 1.5. precision: 2 of the 3 believed items are true.
    rates = completion_rates([3.0, 2.0, 0.0, 1.5, -2.0, 1.0], [1, 1, 1, 0, 0, 0], 0.8)
    assert rates == {
        "true_rate": pytest.approx(2 / 3),
        "false_rate": pytest.approx(1 / 3),
        "precision": pytest.approx(2 / 3),
    }
    # The threshold is the belief, not the margin: the same scores at 0.5 believe every s >= 0.
    assert completion_rates([3.0, 0.0, -0.1], [1, 0, 0], 0.5) == {"true_rate": 1.0, "false_rate": 0.5, "precision": 0.5}
    # A huge margin is not an overflow, and nothing believed leaves precision undefined.
    assert completion_rates([1e308, -1e308], [1, 0], 0.99)["true_rate"] == 1.0
    assert completion_rates([-5.0], [0], 0.8) == {"true_rate": None, "false_rate": 0.0, "precision": None}
    with pytest.raises(ValueError, match=re.escape("confidence = 1.0, expected 0 < confidence < 1")):
        completion_rates([1.0], [1], 1.0)


def ranking(scores: list[float], labels: list[int], rare: bool | None) -> PairRanking:
    return PairRanking("x.jpg", 17, tuple(range(len(scores))), np.array(scores, float), np.array(labels, bool), rare)


def test_summary_pools_auc_and_averages_pairs() -> None:
    # Pair 1 ranks right (5 > 4), pair 2 wrong (0 < 1). Pooled: positives {5, 0} vs negatives
    # {4, 1}: 5 beats both, 0 beats none -> AUC 2/4. AP: 1 and 1/2 -> mAP 3/4. top-1: 1, 0 -> 1/2.
    quality = ItmQuality([ranking([5, 4], [1, 0], True), ranking([1, 0], [0, 1], False)], 2, {}, True)
    summary = quality.summary()
    assert (summary["auc"], summary["verb_map"], summary["top1"]) == (0.5, 0.75, 0.5)
    assert (summary["pairs"], summary["sentences"]) == (2, 4)
    assert summary["rare"] == {"auc": 1.0, "verb_map": 1.0, "top1": 1.0, "pairs": 1}
    assert summary["non_rare"] == {"auc": 0.0, "verb_map": 0.5, "top1": 0.0, "pairs": 1}
    # Beliefs sigmoid(5), sigmoid(4) >= 0.8 (one true, one false); sigmoid(1) < 0.8.
    assert summary["completion"] == {"confidence": 0.8, "true_rate": 0.5, "false_rate": 0.5, "precision": 0.5}
    assert quality.summary(0.99)["completion"]["true_rate"] == 0.5  # sigmoid(5) = 0.9933
    assert "belief >= 0.8 (what soft distillation completes): 0.500 of true verbs" in quality.table()
    no_split = ItmQuality([ranking([5, 4], [1, 0], None)], 1, {}, False)
    assert no_split.summary()["rare"] is None and "no rare / non-rare split" in no_split.table()
    empty = ItmQuality([], 0, {}, False).summary()
    assert empty["auc"] is None and empty["pairs"] == 0 and empty["completion"] is None
    json.dumps(empty, allow_nan=False)  # nulls, never NaN


# -- which sentences of a pair count ------------------------------------------------------------


def hoi(verb: str, obj_box: int) -> dict:
    return {"subject_id": 0, "object_id": obj_box, "category_id": HICO_VERBS.index(verb) + 1}


def box(name: str) -> dict:
    return {"bbox": [1, 1, 20, 20], "category_id": COCO_OBJECT_IDS[OBJECT_NAMES.index(name)]}


def test_pair_rules(tmp_path: Path) -> None:
    # One person riding horse 1 and feeding horse 2; the same person with a kite (no_interaction)
    # and a cup whose verbs are unknown, plus a second cup held.
    entries = [
        {
            "file_name": "a.jpg",
            "annotations": [box("person"), box("horse"), box("horse"), box("kite"), box("cup"), box("cup")],
            "hoi_annotation": [
                hoi("ride", 1),
                hoi("straddle", 1),
                hoi("feed", 2),
                hoi("no_interaction", 3),
                hoi("hold", 5),
            ],
            "pairs_without_verbs": [{"subject_id": 0, "object_id": 4}],
        }
    ]
    path = tmp_path / "test_hico.json"
    path.write_text(json.dumps(entries))
    (annotation,) = load_annotations(path)
    table = SentenceTable(hico_correspondence(), HICO_VERBS)
    skipped: Counter = Counter()
    plans = plan_pairs(annotation, table, lambda verb, obj: HICO_VERBS[verb] == "feed", skipped)
    # ride/straddle horse and feed horse are evaluated; the kite pair has no positive, the known cup
    # pair no negative (its unknown neighbour makes every other cup verb unknown), one pair unknown.
    assert skipped == {"no_positive": 1, "no_negative": 1, "unknown_verbs": 1}
    ride, feed = plans
    positives = {s for (_, s), label in zip(ride.candidates, ride.labels, strict=True) if label}
    negatives = {s for (_, s), label in zip(ride.candidates, ride.labels, strict=True) if not label}
    assert positives == {"a person ride a horse", "a person straddle a horse"}
    # "feed" is true of the other horse: whole-image scoring cannot say it is false for this pair.
    assert "a person feed a horse" not in negatives and "a person groom a horse" in negatives
    assert len(negatives) == len(table.candidates(OBJECT_NAMES.index("horse"))) - 3
    assert (ride.rare, feed.rare) == (False, True)


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(synthetic_data) -> Path:
    return synthetic_data(24, 12, seed=1, max_people=1)


def eval_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["eval-itm", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_itm_end_to_end(tiny_blip_dir: Path, synthetic: Path, capsys) -> None:
    annotations, images = synthetic / "annotations" / "test_hico.json", synthetic / "images" / "test"
    code, out, err = eval_cli(
        capsys, "--model", tiny_blip_dir, "--annotations", annotations, "--images", images, "--device", "cpu", "--json"
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary) >= {"auc", "verb_map", "top1", "pairs", "sentences", "rare", "non_rare", "completion"}
    # Synthetic images have one person with one object; every pair but no_interaction is evaluated.
    entries = json.loads(annotations.read_text())
    no_interaction = HICO_VERBS.index("no_interaction") + 1
    expected = sum(any(h["category_id"] != no_interaction for h in e["hoi_annotation"]) for e in entries)
    assert summary["pairs"] == expected > 0
    assert summary["rare"]["pairs"] + summary["non_rare"]["pairs"] == expected  # trainval_hico.json beside
    for key in ("auc", "verb_map", "top1"):
        assert 0.0 <= summary[key] <= 1.0
    assert "verb mAP" in out and "rare" in out

    # The CLI's figures are the library's, and each pair's scores are the engine's own.
    engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu"))
    quality = evaluate_itm(engine, annotations, images, progress=False)
    assert quality.summary() == summary
    first = quality.pairs[0]
    image = engine.prepare_image((images / first.image).read_bytes())
    table = SentenceTable(hico_correspondence(), HICO_VERBS)
    sentences = [table.sentence(verb, first.object_index) for verb in first.verbs]
    (scores,) = engine.score([ImageSentences(image.digest, image, sentences)])
    np.testing.assert_allclose(first.scores, [score.match_logit for score in scores], atol=1e-6)


def test_eval_itm_without_training_annotations_and_limit(
    tiny_blip_dir: Path, synthetic: Path, tmp_path: Path, capsys
) -> None:
    alone = tmp_path / "test_hico.json"
    shutil.copy(synthetic / "annotations" / "test_hico.json", alone)
    code, out, err = eval_cli(
        capsys, "--model", tiny_blip_dir, "--annotations", alone, "--images", synthetic / "images" / "test",
        "--device", "cpu", "--limit", "5", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rare"] is None and summary["non_rare"] is None and summary["images"] == 5
    assert "no rare / non-rare split: no training annotations" in out


def test_eval_itm_errors_name_the_cause(tiny_blip_dir: Path, synthetic: Path, tmp_path: Path, capsys) -> None:
    entries = json.loads((synthetic / "annotations" / "test_hico.json").read_text())[:2]
    entries[1]["file_name"] = "missing.jpg"
    broken = tmp_path / "test_hico.json"
    broken.write_text(json.dumps(entries))
    images = synthetic / "images" / "test"
    code, _, err = eval_cli(capsys, "--model", tiny_blip_dir, "--annotations", broken, "--images", images)
    assert code == 2 and err.startswith("eval-itm: ") and "entry 1 (missing.jpg)" in err
    code, _, err = eval_cli(capsys, "--model", tmp_path / "nothing", "--annotations", broken, "--images", images)
    assert code == 2 and "eval-itm: model directory" in err
    code, _, err = eval_cli(capsys, "--annotations", broken, "--images", images, "--confidence", "1.5")
    assert code == 2 and err.strip() == "eval-itm: --confidence = 1.5, expected 0 < confidence < 1"


# -- regions: each pair scored on its own view ------------------------------------------------------


@pytest.fixture(scope="module")
def two_person(synthetic_data) -> Path:
    # Half the test images show two people with two objects of one class (synthetic.json lists them).
    return synthetic_data(0, 10, seed=3, two_person_rate=0.5)


def pairs_by_image(quality: ItmQuality) -> dict[str, list[PairRanking]]:
    grouped: dict[str, list[PairRanking]] = {}
    for pair in quality.pairs:
        grouped.setdefault(pair.image, []).append(pair)
    return grouped


def common_verb_scores(first: PairRanking, second: PairRanking) -> tuple[np.ndarray, np.ndarray]:
    """The two pairs' scores of the verbs both were scored on (same object class: same candidates)."""
    common = [verb for verb in first.verbs if verb in second.verbs]
    assert len(common) >= 2
    return (
        np.array([first.scores[first.verbs.index(v)] for v in common]),
        np.array([second.scores[second.verbs.index(v)] for v in common]),
    )


@pytest.mark.parametrize("policy", ["crop", "mask"])
def test_regions_score_each_pair_on_its_own_view(tiny_blip_dir: Path, two_person: Path, policy: str) -> None:
    annotations, images = two_person / "annotations" / "test_hico.json", two_person / "images" / "test"
    ambiguous = json.loads((two_person / "synthetic.json").read_text())["two_person_images"]["test"]
    assert 0 < len(ambiguous) < 10
    whole = evaluate_itm(
        ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu")),
        annotations,
        images,
        progress=False,
        labels="pair",
        only_images=set(ambiguous),
    )
    engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", region_policy=policy))
    regional = evaluate_itm(engine, annotations, images, progress=False, regions=True, only_images=set(ambiguous))
    assert regional.labels == "pair" and regional.region == engine.settings.region_description()
    assert {pair.image for pair in regional.pairs} == set(ambiguous) == {pair.image for pair in whole.pairs}
    by_image, whole_by_image = pairs_by_image(regional), pairs_by_image(whole)
    # (A person who ignores the other horse is a no_interaction pair: no positive, not evaluated.)
    both = {name: pairs for name, pairs in by_image.items() if len(pairs) == 2}
    assert both
    for name, (first, second) in both.items():
        # Two people, two objects of one class: whole-image scores are one list for both pairs...
        same = common_verb_scores(*whole_by_image[name])
        np.testing.assert_array_equal(*same)
        # ... region scores are each pair's own.
        ours = common_verb_scores(first, second)
        assert np.abs(ours[0] - ours[1]).max() > 1e-4, name
    # Each pair's scores are the engine's on its region, rendered from its annotated boxes.
    annotation = next(a for a in load_annotations(annotations, "hico") if a.file_name == regional.pairs[0].image)
    pair = annotation.pairs()[0]
    region = Region.from_values([*annotation.boxes[pair.subject], *annotation.boxes[pair.object]])
    view = engine.prepare_image((images / annotation.file_name).read_bytes(), region=region)
    table = SentenceTable(hico_correspondence(), HICO_VERBS)
    first = regional.pairs[0]
    sentences = [table.sentence(verb, first.object_index) for verb in first.verbs]
    (scores,) = engine.score([ImageSentences(view.digest, view, sentences, region=region)])
    np.testing.assert_allclose(first.scores, [score.match_logit for score in scores], atol=1e-6)


def test_pair_labels_make_the_other_pairs_verbs_negatives(tmp_path: Path) -> None:
    # One image, two people, two horses: ride (person 0, horse 1), hold (person 2, horse 3).
    entry = {
        "file_name": "two.jpg",
        "annotations": [box("person"), box("horse"), box("person"), box("horse")],
        "hoi_annotation": [hoi("ride", 1), {**hoi("hold", 3), "subject_id": 2}],
    }
    path = tmp_path / "test_hico.json"
    path.write_text(json.dumps([entry]))
    (annotation,) = load_annotations(path, "hico")
    table = SentenceTable(hico_correspondence(), HICO_VERBS)
    hold, ride = HICO_VERBS.index("hold"), HICO_VERBS.index("ride")
    image_rule = plan_pairs(annotation, table, None, Counter())
    pair_rule = plan_pairs(annotation, table, None, Counter(), labels="pair")
    verbs = [[verb for verb, _ in plan.candidates] for plan in image_rule]
    assert hold not in verbs[0] and ride not in verbs[1]  # neither right nor wrong of the image
    labelled = [dict(zip([v for v, _ in p.candidates], p.labels, strict=True)) for p in pair_rule]
    assert (labelled[0][ride], labelled[0][hold]) == (True, False)
    assert (labelled[1][hold], labelled[1][ride]) == (True, False)
    assert [plan.boxes for plan in pair_rule] == [(0, 1), (2, 3)]
    with pytest.raises(DatasetError, match="labels must be one of image, pair"):
        plan_pairs(annotation, table, None, Counter(), labels="pairs")


def test_eval_itm_cli_regions_and_two_person_selection(tiny_blip_dir: Path, two_person: Path, tmp_path, capsys) -> None:
    annotations, images = two_person / "annotations" / "test_hico.json", two_person / "images" / "test"
    common = ("--model", tiny_blip_dir, "--annotations", annotations, "--images", images, "--device", "cpu", "--json")
    ambiguous = json.loads((two_person / "synthetic.json").read_text())["two_person_images"]["test"]
    summaries = {}
    for region in ("image", "crop", "mask"):
        code, out, err = eval_cli(capsys, *common, "--region", region, "--only-two-person", "--labels", "pair")
        assert code == 0, err
        summaries[region] = json.loads(out.strip().splitlines()[-1])
        assert summaries[region]["images"] == len(ambiguous) and summaries[region]["labels"] == "pair"
    assert (
        summaries["image"]["region"] == "image"
        and "scored on: the whole image" in eval_cli(capsys, *common, "--limit", "1")[1]
    )
    assert summaries["crop"]["region"] == "crop:margin=0.1" and summaries["mask"]["region"] == "mask:dim=0.8"
    code, out, _ = eval_cli(capsys, *common, "--region", "crop", "--region-margin", "0.3", "--only-two-person")
    assert json.loads(out.strip().splitlines()[-1])["region"] == "crop:margin=0.3"
    assert "scored on: each pair region, crop:margin=0.3; negatives: every verb the pair lacks" in out
    # --images-from FILE:KEY is the general form of --only-two-person.
    listing = f"{two_person / 'synthetic.json'}:two_person_images"
    code, out, err = eval_cli(capsys, *common, "--region", "mask", "--labels", "pair", "--images-from", listing)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == summaries["mask"]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ambiguous[:1]))
    code, out, err = eval_cli(capsys, *common, "--images-from", listed)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["images"] == 1
    # Errors name the file and the key.
    code, _, err = eval_cli(capsys, *common, "--images-from", f"{listed}:nothing")
    assert code == 2 and "has no key 'nothing'" in err
    alone = tmp_path / "annotations"
    alone.mkdir()
    shutil.copy(annotations, alone / "test_hico.json")
    code, _, err = eval_cli(
        capsys, *common[:2], "--annotations", alone / "test_hico.json", "--images", images, "--only-two-person"
    )
    assert code == 2 and "synthetic.json does not exist" in err
