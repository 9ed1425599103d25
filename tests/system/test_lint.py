"""The code base stays ruff-clean: `make test` fails on a lint or formatting regression."""

from __future__ import annotations

import subprocess
import sys

from testkit import REPO


def tracked_python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=False)
    if listed.returncode != 0:  # not a git checkout (e.g. an sdist): lint what is there
        return ["."]
    return listed.stdout.split()


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ruff", *args, "--force-exclude", *tracked_python_files()]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


def test_ruff_check_is_clean() -> None:
    result = ruff("check")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_is_clean() -> None:
    result = ruff("format", "--check")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
