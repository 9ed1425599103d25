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
from teacher_server.hoi.prompts import SentenceTable
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
