"""Every command in the README and docs/ runs as written.

Each fenced ``bash`` or ``python`` block carries an explicit tag after the language:
``run`` (this test executes it, in a scratch copy of nothing but the repo's paths) or ``norun``
(long-running or needs a live server; another test covers it). An untagged block fails the test,
so new documentation cannot silently drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path) -> list[tuple[str, set[str], str, int]]:
    """(language, tags, body, line number) of every fenced block with a language."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((match.group(1), set(match.group(2).split()), match.group(3), line))
    return blocks


def runnable_blocks() -> list[tuple[Path, str, str, int]]:
    return [
        (path, language, body, line)
        for path in DOCS
        for language, tags, body, line in code_blocks(path)
        if language in {"bash", "python"} and "run" in tags
    ]


def test_every_shell_and_python_block_is_tagged() -> None:
    untagged = [
        f"{path.relative_to(REPO)}:{line}"
        for path in DOCS
        for language, tags, _, line in code_blocks(path)
        if language in {"bash", "python"} and not tags & {"run", "norun"}
    ]
    assert not untagged, f"tag these blocks `run` or `norun`: {untagged}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "language", "body", "line"),
    runnable_blocks(),
    ids=[f"{p.relative_to(REPO)}:{line}" for p, _, _, line in runnable_blocks()],
)
def test_documented_block_runs(path: Path, language: str, body: str, line: int, tmp_path: Path) -> None:
    # The docs say `.venv/bin/python`; run them with the interpreter running the tests.
    body = body.replace(".venv/bin/python", sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    command = ["bash", "-euo", "pipefail", "-c", body] if language == "bash" else [sys.executable, "-c", body]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    where = f"{path.relative_to(REPO)}:{line}"
    assert result.returncode == 0, (
        f"{where} failed ({result.returncode})\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
