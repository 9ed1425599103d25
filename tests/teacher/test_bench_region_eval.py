"""``bench/region_eval.py`` at toy sizes: the real worlds, fine-tunings and ``eval-itm`` runs, and
the shape of what it reports (never how good the numbers are)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from testkit import REPO

BENCH = REPO / "bench" / "region_eval.py"
POLICIES = ("image", "crop", "mask")


def load_bench():
    spec = importlib.util.spec_from_file_location("region_eval", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()
TOY = ["--corpus", "12", "--test", "4", "--image-size", "64", "--teacher-epochs", "1", "--threads", "1", "--quiet"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def check_metrics(entry: dict) -> None:
    assert set(entry) >= {"verb_map", "top1", "auc", "pairs"}
    assert entry["pairs"] > 0
    for key in ("verb_map", "top1", "auc"):
        assert 0.0 <= entry[key] <= 1.0


def test_fine_tuned_teachers_are_scored_under_every_policy(tmp_path: Path, capsys) -> None:
    assert bench.main([*TOY, "--work-dir", str(tmp_path), "--train-on", "image,crop"]) == 0
    out = capsys.readouterr().out
    result = last_json(out)
    for policy in POLICIES:
        check_metrics(result[policy])
    # Each policy by the teacher trained on it when there is one, else by the whole-image teacher.
    assert [result[p]["teacher"] for p in POLICIES] == ["image", "crop", "image"]
    assert set(result["cells"]) == {"image", "crop"} and all(
        set(row) == set(POLICIES) for row in result["cells"].values()
    )
    assert result["mask"]["verb_map"] == result["cells"]["image"]["mask"]["verb_map"]
    assert result["cells"]["crop"]["crop"]["region"] == "crop:margin=0.1"
    # Every cell evaluates the same pairs: the two-person test images, under per-pair labels.
    pairs = {cell["pairs"] for row in result["cells"].values() for cell in row.values()}
    assert len(pairs) == 1 and result["world"]["labels"] == "pair"
    written = json.loads((tmp_path / "test-world" / "synthetic.json").read_text())
    assert len(written["two_person_images"]["test"]) == 4  # rate 1: every test image
    assert "teacher trained on" in out and out.count("\n") >= 7  # the table: header + 6 cells


def test_a_given_teacher_is_evaluated_without_fine_tuning(tiny_blip_dir: Path, tmp_path: Path, capsys) -> None:
    assert (
        bench.main([*TOY, "--work-dir", str(tmp_path), "--teacher", str(tiny_blip_dir), "--policies", "image,mask"])
        == 0
    )
    result = last_json(capsys.readouterr().out)
    assert set(result) >= {"image", "mask", "cells"} and "crop" not in result
    assert result["image"]["teacher"] == result["mask"]["teacher"] == "given"
    check_metrics(result["image"])
    assert not (tmp_path / "teacher-image").exists()


def test_flags_are_checked() -> None:
    with pytest.raises(SystemExit, match="--policies: expected a comma-separated subset of image, crop, mask"):
        bench.parse_arguments(["--policies", "image,blur"])
