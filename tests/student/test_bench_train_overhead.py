"""Smoke test of ``bench/train_overhead.py``: a real tiny run of all four modes, then its JSON line.

Real parts throughout: ``teacher_server serve`` child processes, a ``redis-server`` the bench
starts, prewarm over gRPC, the trainer's prefetching client. It checks what the bench measured
(steps timed, scores read from Redis after the prewarm), never how fast.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

BENCH = REPO / "bench" / "train_overhead.py"
STEPS, REPS, BATCH = 2, 2, 2


def test_tiny_run_ends_with_the_measured_json(tiny_blip_dir: Path) -> None:
    smoke = ["--student", "demo", "--teacher-model", str(tiny_blip_dir), "--image-size", "64", "--images", "4"]
    smoke += ["--steps", str(STEPS), "--reps", str(REPS), "--batch", str(BATCH)]
    done = subprocess.run([sys.executable, str(BENCH), *smoke], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert [line.split(":")[0].strip() for line in lines[:-1]] == ["none", "sync", "prefetch", "prewarmed"]

    assert result["student"] == "demo" and result["cache"] == "redis"
    # --images 4 is raised so that one epoch holds the warm-up step and every timed step.
    assert result["timed_steps"] == {"none": STEPS * REPS, "sync": STEPS, "prefetch": STEPS, "prewarmed": STEPS * REPS}
    for key in ("overhead_sync", "overhead_prefetch", "overhead_prewarmed"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    seconds = result["seconds_per_step"]
    # The ratio is taken before the JSON rounds the seconds to 0.1 ms: they agree to that rounding.
    for mode in ("sync", "prefetch", "prewarmed"):
        assert result[f"overhead_{mode}"] == pytest.approx(seconds[mode] / seconds["none"], rel=0.01), mode
    # The prewarmed mode read every score of every step from Redis: the prewarm covered them all.
    assert result["prewarmed_sentences"] > 0
    steps_run = (1 + STEPS) * REPS  # the warm-up step of each rep asks too
    assert result["prewarmed_scores_read_from_redis"] >= steps_run * BATCH
