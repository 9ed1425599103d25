"""Faults in the real topology: the teacher killed and restarted, Redis restarted, a rank killed."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from testkit import DEMO_CONFIG, REPO
from testkit.processes import TeacherProcess, clean_env, topology_overrides, torchrun_command
from testkit.servers import RedisServer
from testkit.teacher import reference_engine, reference_scores

from teacher_server.cache import decode_score

torch.set_num_threads(1)
WAIT_S = 180


def steps_logged(path: Path) -> list[dict[str, float]]:
    """The complete rows of a growing train_log.csv, as numbers."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({key: float(value) if value else 0.0 for key, value in row.items()})
            except (TypeError, ValueError):  # the line being written
                break
    return rows


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the student exited ({process.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_student(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "student", "train", "--config", str(DEMO_CONFIG), "--no-progress", *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_teacher_killed_mid_epoch_training_goes_on_and_uses_it_again(
    teacher_process: TeacherProcess, data_root: Path, tmp_path: Path
) -> None:
    teacher = teacher_process
    log = tmp_path / "run" / "train_log.csv"
    overrides = topology_overrides(
        data_root,
        tmp_path / "run",
        "schedule.epochs=500",  # stopped by the test once recovery is seen
        "teacher.memo_entries=0",  # every batch asks the teacher
        "teacher.deadline_s=2",
        "teacher.timeout_s=2",
    )
    process = start_student("--teacher", teacher.endpoint, *overrides)
    try:
        wait_for(lambda: sum(r["itm_terms"] > 0 for r in steps_logged(log)) >= 3, process, "scored steps")
        teacher.kill()
        killed_at = len(steps_logged(log))
        wait_for(
            lambda: any(r["teacher_failed_batches"] >= 2 for r in steps_logged(log)[killed_at:]),
            process,
            "steps without the teacher",
        )
        skipped = steps_logged(log)
        assert any(r["itm_terms"] == 0 for r in skipped[killed_at:])  # trained on without the ITM term
        teacher.start()
        restarted_at = len(steps_logged(log))
        wait_for(
            lambda: any(r["itm_terms"] > 0 for r in steps_logged(log)[restarted_at + 1 :]),
            process,
            "scores again after the restart",
        )
        assert process.poll() is None  # training never stopped
        rows = steps_logged(log)
        failed = [r["teacher_failed_batches"] for r in rows]
        assert failed == sorted(failed) and failed[-1] >= 2  # counted, and the count stops growing
    finally:
        process.kill()
        process.wait(timeout=30)
        teacher.kill()


def redis_contents(url: str) -> dict[str, dict[bytes, bytes]]:
    """Every score key and its fields (sentence -> raw value)."""
    with redis.Redis.from_url(url) as client:
        return {key.decode(): client.hgetall(key) for key in client.scan_iter("hoidistill:score:*")}


def test_redis_restarted_mid_epoch_no_crash_and_no_wrong_scores(
    tiny_blip_dir: Path, persistent_redis: RedisServer, data_root: Path, tmp_path: Path
) -> None:
    private_redis = persistent_redis
    teacher = TeacherProcess(tiny_blip_dir, private_redis.url)
    teacher.start()
    log = tmp_path / "run" / "train_log.csv"
    overrides = topology_overrides(
        data_root,
        tmp_path / "run",
        "schedule.epochs=6",
        "teacher.memo_entries=0",
        f"teacher.redis_url={private_redis.url}",  # the student reads Redis too
        "teacher.deadline_s=30",
        "run.eval_at_end=false",
    )
    process = start_student("--teacher", teacher.endpoint, *overrides)
    try:
        wait_for(lambda: len(steps_logged(log)) >= 8, process, "steps with Redis up")
        before_outage = redis_contents(private_redis.url)
        private_redis.stop()
        down_at = len(steps_logged(log))
        wait_for(lambda: len(steps_logged(log)) >= down_at + 6, process, "steps with Redis down")
        private_redis.start()
        assert process.wait(timeout=WAIT_S) == 0, process.stdout.read() if process.stdout else ""
        after = redis_contents(private_redis.url)
        check_redis_scores(tiny_blip_dir, after, data_root)
    finally:
        if process.poll() is None:
            process.kill()
        teacher.kill()
    rows = steps_logged(log)
    assert len(rows) == 6 * 6 and all(r["teacher_failed_batches"] == 0 for r in rows)
    assert all(r["itm_terms"] > 0 for r in rows)  # the teacher scored through the outage
    # What was cached before the outage came back with Redis, byte for byte (nothing lost, nothing
    # rewritten); with check_redis_scores above, every pre-outage value equals the engine's.
    assert before_outage
    for key, fields in before_outage.items():
        assert key in after, key
        assert {field: after[key].get(field) for field in fields} == fields, key


def check_redis_scores(tiny_blip_dir: Path, contents: dict[str, dict[bytes, bytes]], data_root: Path) -> None:
    """Every cached score, from before the outage and after, equals the engine's own (both values)."""
    engine = reference_engine(tiny_blip_dir)
    images = {
        hashlib.sha256(p.read_bytes()).hexdigest(): p.read_bytes() for p in (data_root / "images" / "train").iterdir()
    }
    checked = 0
    for key, fields in contents.items():
        digest = key.rsplit("{", 1)[1].rstrip("}")
        expected = reference_scores(engine, images[digest], [f.decode() for f in fields])
        for (field, raw), score in zip(fields.items(), expected, strict=True):
            cached = decode_score(raw)
            assert cached is not None, (key, field)
            # float32 in Redis; the batch a pair was scored in changes the last bits only.
            assert cached.match_logit == pytest.approx(score.match_logit, abs=1e-5), (key, field)
            assert cached.match_prob == pytest.approx(score.match_prob, abs=1e-5), (key, field)
            checked += 1
    assert checked >= 2


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes(data_root: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    overrides = topology_overrides(data_root, output, "schedule.epochs=8", "run.eval_at_end=false")
    command = torchrun_command(
        2,
        "train",
        "--config",
        str(DEMO_CONFIG),
        "--teacher",
        "none",
        "--resume",
        "--no-progress",
        *overrides,
        max_restarts=1,
    )
    process = subprocess.Popen(
        command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: (output / "checkpoint.pth").is_file(), process, "the first checkpoint")
        workers = child_pids(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        out, _ = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "resumed from" in out
    resumed_epoch = int(out.split("resumed from", 1)[1].split("epoch ", 1)[1].split(",", 1)[0])
    assert resumed_epoch >= 1  # the checkpoint written before the kill was used, not lost
    checkpoint = torch.load(output / "checkpoint.pth", weights_only=True)
    assert checkpoint["position"]["epoch"] == 8 and checkpoint["position"]["global_step"] == 8 * 3
