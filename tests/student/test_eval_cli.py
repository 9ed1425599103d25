"""``python -m student eval-predictions`` run as a user runs it: a subprocess on files the test writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import REPO

from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_VERBS, OBJECT_NAMES, VCOCO_VERBS, hico_correspondence

HORSE = COCO_OBJECT_IDS[OBJECT_NAMES.index("horse")]
CUP = COCO_OBJECT_IDS[OBJECT_NAMES.index("cup")]
RIDE = HICO_VERBS.index("ride") + 1
PERSON_BOX, HORSE_BOX, CUP_BOX = [10, 10, 60, 110], [50, 60, 150, 160], [200, 20, 230, 60]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "student", "eval-predictions", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def hico_image(name: str, scores: list[float] | None) -> dict:
    boxes = [{"bbox": PERSON_BOX, "category_id": 1}, {"bbox": HORSE_BOX, "category_id": HORSE}]
    if scores is None:
        return {
            "file_name": name,
            "annotations": boxes,
            "hoi_annotation": [{"subject_id": 0, "object_id": 1, "category_id": RIDE}],
        }
    hois = [{"subject_id": 0, "object_id": 1, "category_id": RIDE, "score": s} for s in scores]
    return {"file_name": name, "predictions": boxes, "hoi_prediction": hois}


@pytest.fixture
def hico_files(tmp_path: Path) -> dict[str, str]:
    correspondence = tmp_path / "corre_hico.npy"
    np.save(correspondence, hico_correspondence().astype(np.float64))
    return {
        "--annotations": write(tmp_path / "test_hico.json", [hico_image("a.jpg", None), hico_image("b.jpg", None)]),
        "--train-annotations": write(tmp_path / "trainval_hico.json", [hico_image(f"{i}.jpg", None) for i in range(3)]),
        "--correspondence": str(correspondence),
    }


def flags(files: dict[str, str]) -> list[str]:
    return [item for pair in files.items() for item in pair]


def test_hico_json_line_has_every_metric_in_percent(tmp_path, hico_files):
    preds = write(tmp_path / "preds.json", [hico_image("a.jpg", [0.9, 0.8]), hico_image("b.jpg", [0.7])])
    done = run_cli("--dataset", "hico", *flags(hico_files), "--predictions", preds, "--json")
    assert done.returncode == 0, done.stderr
    assert "Known-Object" in done.stdout
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    # One rare class; TP, duplicate (FP), TP -> 11-point AP (6 + 5 * 2/3) / 11 in both settings.
    ap = 100 * (6 + 5 * 2 / 3) / 11
    assert metrics == {
        "default": {"full": pytest.approx(ap), "rare": pytest.approx(ap), "non_rare": None},
        "known_object": {"full": pytest.approx(ap), "rare": pytest.approx(ap), "non_rare": None},
        "mean_max_recall": pytest.approx(100.0),
    }


def test_vcoco_json_line_has_both_scenarios(tmp_path):
    verb = {name: i for i, name in enumerate(VCOCO_VERBS)}
    boxes = [{"bbox": PERSON_BOX, "category_id": 1}, {"bbox": CUP_BOX, "category_id": CUP}]
    gt = [
        {
            "file_name": "a.jpg",
            "annotations": boxes,
            "hoi_annotation": [
                {"subject_id": 0, "object_id": 1, "category_id": verb["hold_obj"]},
                {"subject_id": 0, "object_id": -1, "category_id": verb["eat_obj"]},
                {"subject_id": 0, "object_id": -1, "category_id": verb["eat_instr"]},
            ],
        }
    ]
    preds = [
        {
            "file_name": "a.jpg",
            "predictions": boxes,
            "hoi_prediction": [
                {"subject_id": 0, "object_id": 1, "category_id": verb["hold_obj"], "score": 0.9},
                {"subject_id": 0, "object_id": 1, "category_id": verb["eat_obj"], "score": 0.8},  # a box where none is
            ],
        }
    ]
    done = run_cli(
        "--dataset",
        "vcoco",
        "--annotations",
        write(tmp_path / "test_vcoco.json", gt),
        "--predictions",
        write(tmp_path / "preds.json", preds),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    # hold_obj 1 in both; eat_obj 0 in scenario 1, 1 in scenario 2; eat_instr 0 (not predicted).
    assert metrics == {"scenario_1": pytest.approx(100 / 3), "scenario_2": pytest.approx(200 / 3)}


def test_without_json_flag_only_the_table_is_printed(tmp_path, hico_files):
    preds = write(tmp_path / "preds.json", [hico_image("a.jpg", [0.9]), hico_image("b.jpg", [0.7])])
    done = run_cli("--dataset", "hico", *flags(hico_files), "--predictions", preds)
    assert done.returncode == 0, done.stderr
    assert "Default" in done.stdout and "100.00" in done.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.stdout.strip().splitlines()[-1])


def test_malformed_predictions_exit_2_naming_image_and_field(tmp_path, hico_files):
    bad = [hico_image("a.jpg", [0.9]), hico_image("b.jpg", [0.7])]
    bad[1]["hoi_prediction"][0]["subject_id"] = 5
    done = run_cli("--dataset", "hico", *flags(hico_files), "--predictions", write(tmp_path / "preds.json", bad))
    assert done.returncode == 2
    assert "entry 1 (b.jpg): hoi_prediction[0].subject_id = 5 is outside 0..1" in done.stderr
    assert "Traceback" not in done.stderr


def test_hico_needs_the_correspondence_and_training_files(tmp_path, hico_files):
    preds = write(tmp_path / "preds.json", [hico_image("a.jpg", [0.9]), hico_image("b.jpg", [0.7])])
    done = run_cli("--dataset", "hico", "--annotations", hico_files["--annotations"], "--predictions", preds)
    assert done.returncode == 2
    assert "--dataset hico needs --train-annotations and --correspondence" in done.stderr
