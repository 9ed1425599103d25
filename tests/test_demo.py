"""``python -m student demo`` end to end at reduced sizes: data, teacher, untrained eval, training, table, JSON."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from student.__main__ import main
from student.demo import prepare_data

TINY = [
    "data.scales=[64]",
    "data.max_size=96",
    "data.test_scale=64",
    "model.backbone.base_width=8",
    "model.transformer.d_model=32",
    "model.transformer.dim_feedforward=64",
    "model.transformer.num_encoder_layers=1",
    "model.decoder.num_queries=4",
    "run.num_threads=1",
]


def test_demo_runs_end_to_end_and_ends_with_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # No real teacher anywhere: the demo teaches a tiny BLIP on the synthetic teacher corpus.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    work = tmp_path / "demo"
    argv = ["demo", "--work-dir", str(work), "--train", "12", "--test", "4", "--epochs", "2", "--image-size", "64"]
    argv += ["--corpus", "16", "--teacher-epochs", "1"]
    code = main([*argv, "--no-progress", *TINY])
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
    assert set(result) == {"map_trained", "map_untrained", "seconds", "teacher", "teacher_auc"}
    # The triplets the training labels never show get their own rows (untrained and trained AP).
    header = lines.index(next(line for line in lines if line.startswith("triplets the training labels leave out")))
    world = json.loads((work / "data" / "synthetic.json").read_text())
    rows = [line.split()[:2] for line in lines[header + 3 : header + 3 + len(world["dropped_triplets"])]]
    assert [" ".join(row) for row in rows] == world["dropped_triplets"]
    assert result["teacher"] == "tiny BLIP fine-tuned on the synthetic teacher corpus"
    # The AUC printed in the quality table is the one the JSON reports.
    tuned_row = next(line for line in lines if line.startswith("fine-tuned on the corpus"))
    assert float(tuned_row.split()[4]) == pytest.approx(result["teacher_auc"], abs=1e-3)
    assert 0 <= result["map_untrained"] <= 100 and 0 <= result["map_trained"] <= 100
    assert result["seconds"] > 0
    assert (work / "train" / "checkpoint.pth").is_file() and (work / "train" / "preds.json").is_file()
    scored = next(line for line in lines if line.startswith("teacher: tiny BLIP fine-tuned"))
    assert "scored 0 " not in scored  # the teacher really scored sentences
    # Prewarmed: training asked the teacher service for nothing new.
    assert "during training the teacher service ran 0 pairs through BLIP" in scored


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
