"""``bench/evidence_maps.py`` at toy sizes: the real world, fine-tuning and evidence maps, the
box measures on hand-made grids, and the shape of what it reports (never how good the numbers are)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from testkit import REPO

BENCH = REPO / "bench" / "evidence_maps.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("evidence_maps", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()
TOY = ["--corpus", "12", "--test", "4", "--teacher-epochs", "1", "--threads", "1"]
RATES = ("mass_rate", "argmax_rate", "human_mass_rate", "human_argmax_rate")


def test_box_measures_on_hand_made_grids() -> None:
    # A 4 x 4 grid over a 40 x 40 image: 10 px patches. All the mass in the top-left patch.
    grid = np.zeros((4, 4))
    grid[0, 0] = 1.0
    measures = bench.box_measures(grid, (0, 0, 20, 20), 40, 40)
    assert measures == {"mass_inside": 1.0, "box_share": 0.25, "argmax_inside": 1.0, "argmax_chance": 0.25}
    # A box over half of that patch holds half its mass; no patch centre (5, 5) lies inside it.
    half = bench.box_measures(grid, (0, 0, 5, 10), 40, 40)
    assert half["mass_inside"] == pytest.approx(0.5) and half["argmax_inside"] == 0.0
    # An even map puts exactly the box's share inside it: never counted as "more than chance".
    even = bench.box_measures(np.ones((4, 4)), (0, 0, 20, 20), 40, 40)
    assert even["mass_inside"] == pytest.approx(even["box_share"])


def test_toy_run_reports_both_teachers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*TOY, "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pairs"] > 0 and result["layer"] == 0
    assert result["world"] == {"corpus": 12, "test": 4, "image_size": 64, "seed": 0}
    for teacher in ("finetuned", "random"):
        entry = result[teacher]
        assert entry["pairs"] == result["pairs"]
        for key in (*RATES, "mass_inside", "box_share", "argmax_chance"):
            assert 0.0 <= entry[key] <= 1.0, (teacher, key)
        assert 0.0 < entry["box_share"] < 1.0
    assert "object box" in out and "human box" in out
    # The last layer, on the teacher of the run above (reused, not fine-tuned again).
    assert bench.main([*TOY, "--work-dir", str(tmp_path), "--layer", "-1", "--quiet"]) == 0
    quiet = capsys.readouterr().out.strip().splitlines()
    assert len(quiet) == 1 and json.loads(quiet[0])["layer"] == 1
