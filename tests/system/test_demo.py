"""``python -m student demo`` end to end at reduced sizes: data, teacher, untrained eval, training, table, JSON."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from testkit.student import TINY_SIZES

from student.__main__ import main
from student.demo import prepare_data


def test_demo_runs_end_to_end_and_ends_with_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # No real teacher anywhere: the demo teaches a tiny BLIP on the synthetic teacher corpus.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    work = tmp_path / "demo"
    argv = ["demo", "--work-dir", str(work), "--train", "12", "--test", "4", "--epochs", "2", "--image-size", "64"]
    argv += ["--corpus", "16", "--teacher-epochs", "1"]
    code = main([*argv, "--no-progress", *TINY_SIZES])
    # capfd: the torchrun ranks write to the file descriptors, not to this process's sys.stdout.
    text, err = capfd.readouterr()
    assert code == 0, err + text
    # Progress goes to the log (stderr); the tables, the summary and the JSON to stdout.
    assert "co-occurring verb labels dropped (rate 1" in err, "HICO-DET's missing labels, by default"
    assert "teacher: a tiny BLIP fine-tuned on the 16 teacher-corpus images" in err
    assert "teacher: fine-tuned in" in err and (work / "teacher-finetuned" / "finetune.json").is_file()
    assert "random (its starting point)" in text and "fine-tuned on the corpus" in text
    assert "untrained student: mAP" in err
    # The real topology: Redis, the teacher as its own gRPC process, prewarm, 2 torchrun ranks.
    assert "score cache: Redis at redis://127.0.0.1:" in err
    assert "teacher service: grpc://127.0.0.1:" in err and "(its own process)" in err
    assert "prewarm: 12 images;" in err and "0 failed" in err
    assert "on 2 rank(s)" in err
    assert "[rank 0] INFO student.training: distributed: 2 ranks (gloo), 8 images per rank" in err
    assert "teacher scores, all ranks:" in text and "read from the Redis cache" in text
    assert "HICO-DET mAP (%) on the synthetic test split" in text
    assert "trained (soft distillation)" in text
    lines = text.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"map_trained", "map_untrained", "seconds", "teacher", "teacher_auc", "pictures"}
    # The pictures it names exist (the curves first; the predictions join when predict lands).
    assert result["pictures"][0] == str(work / "train" / "curves.png")
    assert lines[-2] == f"pictures: {', '.join(result['pictures'])}"
    assert all(Path(picture).stat().st_size > 0 for picture in result["pictures"])
    # The triplets the training labels never show get their own rows (untrained and trained AP).
    header = lines.index(next(line for line in lines if line.startswith("triplets the training labels leave out")))
    world = json.loads((work / "data" / "synthetic.json").read_text())
    rows = [line.split()[:2] for line in lines[header + 3 : header + 3 + len(world["dropped_triplets"])]]
    assert [" ".join(row) for row in rows] == world["dropped_triplets"]
    assert result["teacher"] == "tiny BLIP fine-tuned on the synthetic teacher corpus"
    # The AUC printed in the quality table is the one the JSON reports.
    tuned_row = next(line for line in lines if line.startswith("fine-tuned on the corpus"))
    assert float(tuned_row.split()[4]) == pytest.approx(result["teacher_auc"], abs=1e-3)
    assert_maps_are_the_predictions(work, lines, result, capfd)
    assert result["seconds"] > 0
    assert (work / "train" / "checkpoint.pth").is_file() and (work / "train" / "preds.json").is_file()
    scored = next(line for line in lines if line.startswith("teacher: tiny BLIP fine-tuned"))
    assert "scored 0 " not in scored  # the teacher really scored sentences
    # Prewarmed: training asked the teacher service for nothing new.
    assert "during training the teacher service ran 0 pairs through BLIP" in scored


def assert_maps_are_the_predictions(
    work: Path, lines: list[str], result: dict, capfd: pytest.CaptureFixture[str]
) -> None:
    """The JSON's mAPs are the table's, and the trained one is what ``eval-predictions`` computes
    from the run's preds.json, whose structure is checked here apart from the demo's own scoring."""
    trained_row = next(line for line in lines if line.startswith("trained (soft distillation)")).split()
    untrained_row = next(line for line in lines if line.startswith("untrained ")).split()
    assert trained_row[3] == f"{result['map_trained']:.2f}" and untrained_row[1] == f"{result['map_untrained']:.2f}"
    annotations = work / "data" / "annotations"
    predictions = json.loads((work / "train" / "preds.json").read_text())
    test_images = json.loads((annotations / "test_hico.json").read_text())
    # One entry per test image, in annotation order. The n queries (of model.decoder.num_queries=4)
    # that a kept HOI uses list their person boxes first (COCO id 1), then their object boxes
    # (every synthetic pair has an object); each HOI names its own query's two boxes and a HICO verb.
    assert [entry["file_name"] for entry in predictions] == [image["file_name"] for image in test_images]
    for entry in predictions:
        boxes, hois = entry["predictions"], entry["hoi_prediction"]
        assert hois, entry["file_name"]
        used = len({hoi["subject_id"] for hoi in hois})
        assert 1 <= used <= 4 and len(boxes) == 2 * used
        assert all(box["category_id"] == 1 for box in boxes[:used]) and all(len(box["bbox"]) == 4 for box in boxes)
        assert {hoi["subject_id"] for hoi in hois} == set(range(used))
        for hoi in hois:
            assert hoi["object_id"] == used + hoi["subject_id"], hoi
            assert 1 <= hoi["category_id"] <= 117 and 0 <= hoi["score"] <= 1, hoi
    capfd.readouterr()
    code = main(
        [
            "eval-predictions",
            "--dataset",
            "hico",
            "--annotations",
            str(annotations / "test_hico.json"),
            "--train-annotations",
            str(annotations / "trainval_hico.json"),
            "--correspondence",
            str(annotations / "corre_hico.npy"),
            "--predictions",
            str(work / "train" / "preds.json"),
            "--json",
        ]
    )
    out, err = capfd.readouterr()
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics == json.loads((work / "train" / "metrics.json").read_text())
    assert metrics["default"]["full"] == pytest.approx(result["map_trained"], abs=0.005)


def test_demo_data_is_written_once(tmp_path: Path) -> None:
    first = prepare_data(tmp_path, train=3, test=2, image_size=64, seed=0, corpus=2, progress=False)
    assert first.startswith(f"wrote {tmp_path}")
    again = prepare_data(tmp_path, train=3, test=2, image_size=64, seed=0, corpus=2, progress=False)
    assert again.startswith("synthetic data: reusing")
    changed = prepare_data(tmp_path, train=4, test=2, image_size=64, seed=0, corpus=2, progress=False)
    assert changed.startswith("wrote")
    noisier = prepare_data(tmp_path, train=4, test=2, image_size=64, seed=0, corpus=2, drop_cooccurring=0.5)
    assert noisier.startswith("wrote")


def test_demo_reuses_its_fine_tuned_teacher(tmp_path: Path) -> None:
    from teacher_server.demo import taught_tiny_teacher

    prepare_data(tmp_path / "data", train=2, test=2, image_size=64, seed=0, corpus=8, progress=False)
    corpus = (tmp_path / "data" / "annotations" / "corpus_hico.json", tmp_path / "data" / "images" / "corpus")
    first = taught_tiny_teacher(tmp_path, *corpus, epochs=1, say=lambda _: None)
    weights = (first.path / "model.safetensors").read_bytes()
    again = taught_tiny_teacher(tmp_path, *corpus, epochs=1, say=lambda _: None)
    assert not first.reused and again.reused
    assert (again.path / "model.safetensors").read_bytes() == weights
    # Other settings: the old teacher is replaced, not silently reused.
    other = taught_tiny_teacher(tmp_path, *corpus, epochs=2, say=lambda _: None)
    assert not other.reused and (other.path / "model.safetensors").read_bytes() != weights


def test_demo_reports_bad_overrides(tmp_path: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["demo", "--work-dir", str(tmp_path), "optim.batch_size=0"])
    assert code == 2 and "optim.batch_size" in err.getvalue()
