"""The ``## HTTP API`` examples of docs/teacher.md run as written against live teachers.

Blocks tagged ``http`` run against a teacher without a token, ``http-auth`` against one that
requires ``HOIDISTILL_AUTH_TOKEN``; ``TEACHER`` holds the server's address, as the docs say.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit import REPO
from testkit.http import RunningHttp, running_http
from testkit.teacher import teacher_settings

DOC = REPO / "docs" / "teacher.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
TOKEN = "docs-token"


def http_section() -> str:
    text = DOC.read_text()
    start = text.index("\n## HTTP API\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def blocks(tag: str) -> list[tuple[str, str]]:
    """(language, body) of the section's fenced blocks carrying ``tag``."""
    return [(m.group(1), m.group(3)) for m in FENCE.finditer(http_section()) if tag in m.group(2).split()]


def run_block(language: str, body: str, teacher: RunningHttp, **env: str) -> str:
    body = body.replace(".venv/bin/python", sys.executable)
    command = ["bash", "-euo", "pipefail", "-c", body] if language == "bash" else [sys.executable, "-c", body]
    environment = {**os.environ, "TEACHER": teacher.url, **env}
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{language} block failed ({done.returncode}):\n{body}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningHttp]:
    with running_http(teacher_settings(tiny_blip_dir)) as running:
        yield running


def test_the_section_has_curl_and_python_examples() -> None:
    languages = [language for language, _ in blocks("http")]
    assert languages.count("bash") >= 1 and languages.count("python") >= 1
    assert all("curl" in body for language, body in blocks("http") if language == "bash")
    assert len(blocks("http-auth")) == 1


def test_curl_examples(teacher: RunningHttp) -> None:
    outputs = "".join(run_block(language, body, teacher) for language, body in blocks("http") if language == "bash")
    assert '"sentence":"a person ride a horse"' in outputs
    assert '"sentence":"a person hop on an airplane"' in outputs
    assert f'"fingerprint":"{teacher.service.fingerprint}"' in outputs
    assert '{"ready":true}' in outputs
    assert '"region":{"human_box":[100.0,20.0,200.0,150.0],"object_box":[60.0,80.0,300.0,230.0]}' in outputs
    assert 'hoidistill_teacher_requests_total{code="200",method="HTTP POST /v1/score"} 2.0' in outputs


def test_python_example(teacher: RunningHttp) -> None:
    (body,) = [body for language, body in blocks("http") if language == "python"]
    lines = run_block("python", body, teacher).splitlines()
    rows = [line.split(" ", 2) for line in lines[:3]]
    assert {sentence for _, _, sentence in rows} == {
        "a person ride a horse",
        "a person feed a horse",
        "a person hold a cup",
    }
    assert {origin for _, origin, _ in rows} <= {"new", "cached"}
    probabilities = [float(probability) for probability, _, _ in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert lines[3].startswith("422 sentences[1] sentences[1]: sentence is ")
    assert "over the limit of 64 tokens" in lines[3]


def test_token_example(tiny_blip_dir: Path) -> None:
    ((language, body),) = blocks("http-auth")
    with running_http(teacher_settings(tiny_blip_dir, auth_token=TOKEN)) as teacher:
        output = run_block(language, body, teacher, HOIDISTILL_AUTH_TOKEN=TOKEN)
        assert f'"fingerprint":"{teacher.service.fingerprint}"' in output
        with pytest.raises(AssertionError, match="block failed"):  # the token is what lets it through
            run_block(language, body, teacher, HOIDISTILL_AUTH_TOKEN="wrong")
