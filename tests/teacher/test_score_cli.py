"""The ad-hoc scoring CLI and the tiny-model maker, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from teacher_server.__main__ import main
from teacher_server.demo import EXAMPLE_IMAGE
from teacher_server.engine import EngineSettings, ImageSentences, ItmEngine
from teacher_server.hoi.region import Region

SENTENCES = ["a person ride a horse", "a person hold a cup", "a person kick a sports ball"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "teacher_server", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_make_tiny_model_then_score_json_in_given_order(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    made = run_cli("make-tiny-model", str(model_dir), "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert "random weights" in made.stdout
    result = run_cli("score", "--model", str(model_dir), "--image", str(EXAMPLE_IMAGE), "--json", *SENTENCES)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["sentence"] for row in rows] == SENTENCES
    engine = ItmEngine.from_pretrained(model_dir, EngineSettings())
    image = engine.prepare_image(EXAMPLE_IMAGE.read_bytes())
    (expected,) = engine.score([ImageSentences(image.digest, image, SENTENCES)])
    for row, score in zip(rows, expected, strict=True):
        # Another process, maybe another thread count: float sums may differ in the last bits.
        assert row["match_prob"] == pytest.approx(score.match_prob, rel=1e-5, abs=1e-6)
        assert row["match_logit"] == pytest.approx(score.match_logit, rel=1e-5, abs=1e-6)


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_table_is_ranked_best_first(tiny_blip_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_in_process(
        capsys, "score", "--model", str(tiny_blip_dir), "--image", str(EXAMPLE_IMAGE), *SENTENCES
    )
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    probs = [float(row[1]) for row in rows]
    assert probs == sorted(probs, reverse=True)
    assert {" ".join(row[3:]) for row in rows} == set(SENTENCES)


def test_score_errors_name_the_input(tiny_blip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ("score", "--model", str(tiny_blip_dir))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    code, _, err = run_in_process(capsys, *model, "--image", str(text_file), "a person")
    assert code == 2 and f"--image {text_file}: not a decodable image file" in err
    code, _, err = run_in_process(capsys, *model, "--image", str(EXAMPLE_IMAGE), "ok", " ")
    assert code == 2 and "SENTENCE[1]: sentence is empty" in err
    code, _, err = run_in_process(capsys, *model, "--image", str(tmp_path / "x.jpg"), "a person")
    assert code == 2 and "cannot read --image" in err
    code, _, err = run_in_process(
        capsys, "score", "--model", str(tmp_path / "nope"), "--image", str(EXAMPLE_IMAGE), "a person"
    )
    assert code == 2 and "does not exist" in err


PAIR = ["10", "5", "60", "90", "30", "40", "120", "100"]


@pytest.mark.parametrize("policy", ["crop", "mask"])
def test_score_on_a_region_equals_the_engine_on_that_view(
    tiny_blip_dir: Path, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    code, out, err = run_in_process(
        capsys,
        "score",
        "--model",
        str(tiny_blip_dir),
        "--image",
        str(EXAMPLE_IMAGE),
        "--json",
        "--region",
        *PAIR,
        "--region-policy",
        policy,
        *SENTENCES,
    )
    assert code == 0, err
    rows = json.loads(out.strip().splitlines()[-1])
    engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(region_policy=policy))
    region = Region.from_values([float(v) for v in PAIR])
    view = engine.prepare_image(EXAMPLE_IMAGE.read_bytes(), region=region)
    whole = engine.prepare_image(EXAMPLE_IMAGE.read_bytes())
    (expected,) = engine.score([ImageSentences(view.digest, view, SENTENCES, region)])
    (image_scores,) = engine.score([ImageSentences(whole.digest, whole, SENTENCES)])
    assert [row["match_logit"] for row in rows] == pytest.approx([s.match_logit for s in expected], abs=1e-6)
    assert [row["match_logit"] for row in rows] != pytest.approx([s.match_logit for s in image_scores], abs=1e-4)


def test_score_refuses_a_region_outside_the_image(tiny_blip_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = [*PAIR[:6], "4000", PAIR[7]]  # the image is 320 x 240
    code, _, err = run_in_process(
        capsys, "score", "--model", str(tiny_blip_dir), "--image", str(EXAMPLE_IMAGE), "--region", *outside, "x y"
    )
    assert code == 2
    assert "--region[6]" in err and "outside the image" in err and "320x240" in err
