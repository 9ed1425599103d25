"""Smoke test of ``bench/teacher_load.py``: short real runs (tiny model, Redis, ``serve`` as a child
process, client processes), then the shape and the sanity of the JSON line; never how fast."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from typing import Any

import pytest
from PIL import Image
from testkit import REPO
from testkit.processes import clean_env

BENCH = REPO / "bench" / "teacher_load.py"
SMALL = [
    "--tiny",
    "--no-progress",
    "--clients", "1",
    "--warm-clients", "1",
    "--warm-rate", "4",
    "--warm-images", "3",
    "--warm-sentences", "3",
    "--cold-sentences", "4",
    "--threads", "1",
]  # fmt: skip
KEYS = {
    "pairs_per_s_saturated", "warm_p99_ms_saturated", "errors_other", "rss_growth_pct", "phases", "capacity",
    "server_counters",
}  # fmt: skip
PHASE_KEYS = {
    "phase", "offered_rps", "served_rps", "offered_pairs_per_s", "served_pairs_per_s", "warm_p50_ms",
    "warm_p95_ms", "warm_p99_ms", "cold_p50_ms", "cold_p95_ms", "cold_p99_ms", "errors", "rss_start_mb",
    "rss_end_mb",
}  # fmt: skip


def run_bench(*args: str) -> tuple[dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, str(BENCH), *SMALL, *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    *table, last = done.stdout.strip().splitlines()
    return json.loads(last), "\n".join(table)


def check_sane(result: dict[str, Any]) -> None:
    assert result.keys() >= KEYS
    assert result["pairs_per_s_saturated"] > 0
    assert result["warm_p99_ms_saturated"] > 0
    assert isinstance(result["errors_other"], int) and result["errors_other"] >= 0
    assert isinstance(result["rss_growth_pct"], float)
    assert result["rss_mb"]["before_load"] > 0 and result["rss_mb"]["after_load"] > 0
    # What "warm" and "cold" mean held: the warm set was cached before the load, no cold answer
    # came from the cache. (A warm answer may miss: a Redis command slower than redis_timeout_s
    # on a busy machine turns the cache off for a back-off window; the bench counts those.)
    assert result["checks"]["warm_set_not_cached"] == 0
    assert result["checks"]["cold_answers_cached"] == 0
    assert result["checks"]["warm_answers_not_cached"] >= 0
    for row in result["phases"]:
        assert row.keys() >= PHASE_KEYS
        assert row["offered_cold_rps"] > 0 and row["offered_warm_rps"] > 0
        assert row["sent"] + row["skipped"] > 0
        assert row["ok"] + sum(row["errors"].values()) == row["sent"]
        assert row["rss_start_mb"] > 0 and row["rss_end_mb"] > 0
        assert set(row["doors"]) <= {
            f"{kind}_{door}" for kind in ("warm", "cold") for door in ("stream", "score", "http")
        }
        assert sum(door["ok"] + door["failed"] for door in row["doors"].values()) == row["sent"]


@pytest.mark.slow
def test_ramp_reports_every_phase_and_the_saturated_figures() -> None:
    result, table = run_bench("--duration", "14", "--phases", "0.5,2", "--calib-clients", "2")
    check_sane(result)
    assert result["mode"] == "ramp"
    assert [row["phase"] for row in result["phases"]] == ["0.5x", "2x"]
    assert result["phases"][1]["offered_cold_rps"] > result["phases"][0]["offered_cold_rps"]
    assert result["capacity"]["requests"] > 0
    assert "0.5x" in table and "2x" in table


@pytest.mark.slow
def test_soak_samples_rss_over_one_saturated_phase() -> None:
    # --capacity skips the calibration: 9 s of soak at 2 x 5 cold requests/s.
    result, _ = run_bench("--soak", "0.15", "--capacity", "5", "--rss-every", "1", "--soak-warmup", "3")
    check_sane(result)
    assert result["mode"] == "soak"
    assert [row["phase"] for row in result["phases"]] == ["soak"]
    assert result["rss_mb"]["samples"] >= 5  # one a second over 9 s, and at the ends
    assert result["rss_mb"]["warmup_s"] == 3
    assert 0 < len(result["rss_mb"]["trace"]) <= 30


def test_unique_jpeg_keeps_the_pixels_and_changes_the_digest() -> None:
    sys.path.insert(0, str(REPO))
    from bench.teacher_load import unique_jpeg

    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 90)).save(buffer, "JPEG")
    base = buffer.getvalue()
    tagged = [unique_jpeg(base, f"0-{n}") for n in range(3)]
    assert len({hashlib.sha256(blob).hexdigest() for blob in [base, *tagged]}) == 4
    for blob in tagged:
        assert Image.open(io.BytesIO(blob)).tobytes() == Image.open(io.BytesIO(base)).tobytes()
    with pytest.raises(ValueError, match="JPEG"):
        unique_jpeg(b"\x89PNG....", "x")
