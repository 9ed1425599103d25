"""The deployed topology as real processes on loopback: Redis, ``teacher_server serve``, prewarm,
and a 2-rank ``torchrun`` student on synthetic data (what docker compose runs, without Docker)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from testkit import DEMO_CONFIG, REPO
from testkit.processes import TeacherProcess, clean_env, topology_overrides, torchrun_command

from student.config import load_config
from student.teacher.prewarm import plan_items

torch.set_num_threads(1)


def student(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "student", *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_prewarm_then_two_ranks_train_from_the_teachers_cache(
    teacher_process: TeacherProcess, data_root: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    config_args = ["--config", str(DEMO_CONFIG), "--teacher", teacher_process.endpoint]
    prewarm = student("prewarm", *config_args, "--no-progress", *topology_overrides(data_root, tmp_path / "prewarm"))
    assert '"failed_images": 0' in prewarm.stdout
    items = plan_items(load_config(DEMO_CONFIG, topology_overrides(data_root, output)))
    sentences = sum(len(item.sentences) for item in items)
    misses = teacher_process.metric("hoidistill_teacher_cache_misses_total")
    hits = teacher_process.metric("hoidistill_teacher_cache_hits_total")
    encoded = teacher_process.metric("hoidistill_teacher_images_encoded_total")
    # Digest-first: a first-time image misses once without its bytes, once more with them.
    assert misses == 2 * sentences and encoded == len(items)

    # The student's own memo is off, so both epochs ask the teacher; the cache answers all of it.
    # eval.batch_size=1: no padding, so the sharded evaluation below can be compared exactly.
    overrides = topology_overrides(
        data_root, output, "teacher.memo_entries=0", "teacher.deadline_s=60", "eval.batch_size=1"
    )
    run = subprocess.run(
        torchrun_command(2, "train", *config_args, "--no-progress", *overrides),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # Progress is logged on stderr, each line tagged with its rank; rank 1 logs warnings only.
    assert "[rank 0] INFO student.training: distributed: 2 ranks (gloo)" in run.stderr
    assert run.stderr.count("teacher: ") >= 1 and run.stderr.count("epoch 2/2") == 1  # rank 0 speaks alone
    assert "[rank 1] INFO" not in run.stderr
    assert teacher_process.metric("hoidistill_teacher_cache_misses_total") == misses
    assert teacher_process.metric("hoidistill_teacher_images_encoded_total") == encoded
    assert teacher_process.metric("hoidistill_teacher_cache_hits_total") - hits == 2 * sentences

    # Rank 0 wrote the run directory, one checkpoint, the logs of its own steps; no temporary files.
    # Rank 0 alone writes TensorBoard events: one file.
    names = sorted(p.name for p in output.iterdir())
    events = [name for name in names if name.startswith("events.out.tfevents.")]
    assert len(events) == 1, names
    assert sorted(set(names) - set(events)) == sorted(
        ["config.yaml", "checkpoint.pth", "train_log.csv", "epochs.csv", "preds.json", "metrics.json"]
    )
    epochs = read_rows(output / "epochs.csv")
    assert [int(row["global_step"]) for row in epochs] == [3, 6]  # 12 images / (2 ranks x 2)
    assert all(float(row["loss_itm"]) >= 0 for row in epochs)
    steps = read_rows(output / "train_log.csv")
    assert len(steps) == 6 and all(float(row["itm_terms"]) > 0 for row in steps)
    assert all(float(row["teacher_failed_batches"]) == 0 for row in steps)

    # The final evaluation ran sharded over the 2 ranks and was gathered on rank 0: it equals one
    # process evaluating the same checkpoint, prediction for prediction (images one at a time:
    # batches padded to another width would move boxes by ~0.05 px).
    single_preds = tmp_path / "single_preds.json"
    evaluated = student(
        "evaluate",
        "--checkpoint",
        str(output / "checkpoint.pth"),
        "--output",
        str(single_preds),
        "--json",
        "--no-progress",
    )
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == json.loads((output / "metrics.json").read_text())
    assert json.loads(single_preds.read_text()) == json.loads((output / "preds.json").read_text())
