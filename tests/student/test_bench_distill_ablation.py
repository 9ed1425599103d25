"""``bench/distill_ablation.py``: its statistics on hand-made results, and one tiny real run.

The tiny run drives the real parts (the synthetic world, ``teacher_server finetune``, ``eval-itm``,
``student train`` subprocesses with a local teacher) and checks what the bench computed from them
(paired gains, per-seed values, the dropped triplets), never how good the numbers are.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

BENCH = REPO / "bench" / "distill_ablation.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("distill_ablation", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def result(cell: str, seed: int, full: float, rare: float | None = 10.0) -> object:
    metrics = {"full": full, "rare": rare, "non_rare": full, "dropped": None}
    return bench.RunResult(cell, seed, metrics, seconds=1.0)


def test_cells_run_none_once_then_every_teacher_and_variant() -> None:
    cells = bench.cells_of(["finetuned", "random"], ["none", "default", "kl"])
    assert [c.name for c in cells] == ["none", "finetuned/default", "finetuned/kl", "random/default", "random/kl"]
    assert [c.directory for c in cells][1] == "finetuned-default"


def test_gains_are_paired_by_seed_with_their_standard_error() -> None:
    cells = bench.cells_of(["finetuned"], ["none", "soft"])
    results = [
        result("none", 0, 20.0),
        result("none", 1, 30.0),
        result("none", 2, 40.0),
        result("finetuned/soft", 0, 23.0),
        result("finetuned/soft", 1, 31.0),
        result("finetuned/soft", 2, 45.0, rare=None),
    ]
    summary = bench.summarise(results, cells)
    soft = summary["finetuned/soft"]
    # Paired differences 3, 1, 5: mean 3, sample sd 2, SE 2 / sqrt(3) = 1.155. Unpaired, the cell
    # means (33.0 vs 30.0) differ by the same 3, but their sds (11.1, 10.0) would hide it.
    assert soft["gain_full"] == 3.0 and soft["gain_full_se"] == round(2 / math.sqrt(3), 2)
    assert soft["full_per_seed"] == [23.0, 31.0, 45.0] and soft["full"] == 33.0
    assert soft["full_sd"] == round(statistics.stdev([23.0, 31.0, 45.0]), 2)
    # A metric undefined for one seed is paired over the seeds that have it.
    assert soft["rare_per_seed"] == [10.0, 10.0] and soft["gain_rare"] == 0.0
    assert soft["gain_dropped"] is None and soft["dropped"] is None
    assert "gain_full" not in summary["none"]
    table = bench.format_table(summary)
    assert "+3.00 ± 1.15" in table and "33.00 ± 11.14" in table


def test_the_region_axis_names_its_cells_and_sets_the_teachers_region(tmp_path: Path) -> None:
    cells = bench.cells_of(["finetuned"], ["none", "kl"], ["image", "pair"])
    # image keeps the names (and run directories) of the ablations made before regions existed.
    assert [c.name for c in cells] == ["none", "finetuned/kl", "finetuned/kl/pair"]
    assert [c.directory for c in cells] == ["none", "finetuned-kl", "finetuned-kl-pair"]
    args = bench.parse_arguments(["--regions", "image,pair", "--two-person-rate", "0.5"])
    assert args.regions == ["image", "pair"] and args.two_person_rate == 0.5
    assert bench.parse_arguments([]).regions == ["image"]
    with pytest.raises(SystemExit, match="--regions"):
        bench.parse_arguments(["--regions", "image,box"])
    teachers = {"finetuned": tmp_path / "teacher"}
    image, pair = (bench.student_overrides(c, 0, tmp_path, teachers, args) for c in cells[1:])
    assert "teacher.region=pair" in pair and not any(o.startswith("teacher.region") for o in image)
    assert [o for o in pair if o != "teacher.region=pair"] == image
    # With a teacher fine-tuned on pair crops, the pair cell asks that one; the image cell does not.
    teachers["finetuned/pair"] = tmp_path / "teacher-pair"
    image, pair = (bench.student_overrides(c, 0, tmp_path, teachers, args) for c in cells[1:])
    assert f"teacher.model={tmp_path / 'teacher-pair'}" in pair
    assert f"teacher.model={tmp_path / 'teacher'}" in image
    summary = bench.summarise([result(c.name, 0, 20.0) for c in cells], cells)
    assert [summary[c.name]["region"] for c in cells] == [None, "image", "pair"]
    table = bench.format_table(summary).splitlines()
    assert "region" in table[1]
    assert table[3].split()[:2] == ["none", "-"] and table[4].split()[:2] == ["finetuned/kl", "image"]
    assert table[6].split()[:2] == ["finetuned/kl/pair", "pair"]


def test_the_world_is_rewritten_when_its_two_person_rate_changes(tmp_path: Path) -> None:
    tiny = {"train": 2, "val": 1, "test": 1, "corpus": 2}
    plain = bench.prepare_world(tmp_path, 1, bench.World(**tiny), 64)
    assert plain["arguments"]["two_person_rate"] == 0.0 and not plain["two_person_images"].get("train")
    ambiguous = bench.prepare_world(tmp_path, 1, bench.World(**tiny, two_person_rate=1.0), 64)
    assert ambiguous["arguments"]["two_person_rate"] == 1.0
    assert len(ambiguous["two_person_images"]["train"]) == 2  # every training image, at rate 1
    again = bench.prepare_world(tmp_path, 1, bench.World(**tiny, two_person_rate=1.0), 64)
    assert again == ambiguous


def test_one_seed_has_no_standard_error() -> None:
    mean, se = bench.mean_and_se([2.5])
    assert mean == 2.5 and se is None


@pytest.mark.slow
def test_tiny_ablation_runs_every_cell_and_ends_with_json(tmp_path: Path) -> None:
    tiny = [
        "data.scales=[64]",
        "data.max_size=96",
        "data.test_scale=64",
        "model.backbone.base_width=8",
        "model.transformer.d_model=32",
        "model.transformer.dim_feedforward=64",
        "model.transformer.num_encoder_layers=1",
        "model.decoder.num_queries=2",
        "optim.batch_size=4",
        "calibrate_bn_images=4",
    ]
    argv = ["--seeds", "2", "--first-seed", "3", "--epochs", "1", "--teacher-epochs", "1", "--jobs", "1"]
    argv += ["--train", "8", "--val", "4", "--test", "6", "--corpus", "8", "--image-size", "64"]
    argv += ["--variants", "none,soft", "--teachers", "finetuned,random", "--work-dir", str(tmp_path)]
    # pair regions end to end (image is the default path, its cell names a unit test above checks);
    # one region keeps the run count, and the test's time, where it was.
    argv += ["--regions", "pair", "--two-person-rate", "0.5"]
    argv += [item for override in tiny for item in ("--override", override)]
    done = subprocess.run(
        [sys.executable, str(BENCH), *argv], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    distilled = ("finetuned/soft/pair", "random/soft/pair")
    assert set(report["cells"]) == {"none", *distilled}
    assert report["seeds"] == [3, 4] and report["eval_split"] == "test"
    assert report["regions"] == ["pair"]
    for name, cell in report["cells"].items():
        assert cell["seeds"] == [3, 4], name
        assert len(cell["full_per_seed"]) == 2
    for name in distilled:
        cell, none = report["cells"][name], report["cells"]["none"]
        paired = [a - b for a, b in zip(cell["full_per_seed"], none["full_per_seed"], strict=True)]
        assert cell["gain_full"] == pytest.approx(statistics.fmean(paired), abs=0.011)
    # Each seed has its own world, teachers and runs; the student ran against its local teacher.
    for seed in (3, 4):
        seed_dir = tmp_path / f"seed{seed}"
        world = json.loads((seed_dir / "data" / "synthetic.json").read_text())
        assert world["arguments"]["seed"] == seed and world["dropped_triplets"]
        assert world["arguments"]["two_person_rate"] == 0.5
        assert (seed_dir / "teacher-finetuned" / "finetune.json").is_file()
        config = (seed_dir / "finetuned-soft-pair" / "config.yaml").read_text()
        # The pair cell's teacher is the one fine-tuned on the corpus pairs' crops.
        assert (seed_dir / "teacher-pair" / "teacher-finetuned" / "finetune.json").is_file()
        assert "variant: soft" in config and str(seed_dir / "teacher-pair" / "teacher-finetuned") in config
        assert "source: none" in (seed_dir / "none" / "config.yaml").read_text()
        assert "region: pair" in config
    assert set(report["teachers"]) == {"finetuned", "random", "finetuned/pair"}
    for teacher in report["teachers"].values():  # soft's completions as eval-itm measured them, per seed
        rates = [seed["completion"]["true_rate"] for seed in teacher["per_seed"].values()]
        assert teacher["completed_true"] == pytest.approx(100 * statistics.fmean(rates), abs=0.011)
    # A second run reuses every finished run (same settings) instead of training again.
    again = subprocess.run(
        [sys.executable, str(BENCH), *argv], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["cells"] == report["cells"]
    assert again.stderr.count("(reused)") == 6
    # The validation split: the same trainings, evaluated on other images.
    val = subprocess.run(
        [sys.executable, str(BENCH), *argv, "--eval-split", "val"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert val.returncode == 0 and val.stderr.count("(reused)") == 6, val.stderr[-2000:]
    assert json.loads(val.stdout.strip().splitlines()[-1])["eval_split"] == "val"
    assert (tmp_path / "seed3" / "none" / "preds-val.json").is_file()
    assert (tmp_path / "seed3" / "none" / "preds-test.json").is_file()
