"""``bench/gpu_check.py`` (``make gpu-check``): its CPU parts pass here, its CUDA parts are listed as skipped."""

from __future__ import annotations

import json
import subprocess
import sys

from testkit import REPO

SCRIPT = REPO / "bench" / "gpu_check.py"


def listed() -> dict[str, str]:
    """check name -> "CPU" or "CUDA", from ``--list``."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True)
    return dict(line.split() for line in done.stdout.splitlines())


def test_the_cpu_parts_pass_and_the_cuda_parts_are_skipped() -> None:
    kinds = listed()
    cpu = [name for name, kind in kinds.items() if kind == "CPU"]
    cuda = [name for name, kind in kinds.items() if kind == "CUDA"]
    assert len(cpu) >= 10 and {"engine_dtypes_vs_cpu_fp32", "teacher_oom_recovery", "nccl_2_ranks_equal_1_rank"} <= set(
        cuda
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-only", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["cuda"] is False
    assert result["passed"] == cpu, result["details"]
    assert result["failed"] == []
    assert result["skipped"] == cuda
    # One table row per check, in order, between the header and the JSON line.
    rows = [line.split()[:2] for line in lines if line.split()[:1] and line.split()[0] in kinds]
    assert rows == [[name, "passed"] for name in cpu] + [[name, "skipped"] for name in cuda]


def test_unknown_check_names_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "warp_drive"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "unknown check(s) ['warp_drive']" in done.stderr
