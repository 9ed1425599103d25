"""The client-only install (``pip install .``, README "Install"): no torch, and the client works.

Two proofs, without installing anything at test time: the base dependencies of pyproject.toml,
followed through the installed distributions' own requirements, never reach torch or
transformers; and a process in which every module of a distribution outside that closure fails
to import (as it would where it is not installed) imports the client and scores against a real
teacher, getting the engine's scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from testkit import REPO
from testkit.teacher import RunningTeacher, png_bytes, reference_engine, reference_scores, running_teacher
from testkit.teacher import teacher_settings as make_teacher_settings

ROOT = REPO
PROJECT_PACKAGES = {"teacher_server", "student"}
HEAVY = {"torch", "transformers", "tritonclient", "fastapi", "scipy"}
SENTENCES = ["a person ride a horse", "a person hold a cup"]


def project_requirements(extra: str = "") -> list[str]:
    """The installed project's requirements for ``extra`` ('' for the base install), as pip sees them."""
    requirements = [Requirement(text) for text in metadata.requires("hoi-distill") or []]
    return [str(r) for r in requirements if (r.marker.evaluate({"extra": extra}) if r.marker else not extra)]


def _applies(marker: Marker | None, extras: Iterable[str]) -> bool:
    """Whether a requirement's marker holds here for the given extras of its parent ('' for none)."""
    if marker is None:
        return True
    return any(marker.evaluate({"extra": extra}) for extra in ("", *extras))


def dependency_closure(requirements: Iterable[str]) -> set[str]:
    """Canonical names of every distribution ``requirements`` pull in, read from installed metadata."""
    seen: set[str] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} (needed by the base install) is not installed: run `make setup`")
        for text in requires:
            child = Requirement(text)
            if _applies(child.marker, requirement.extras):
                pending.append(child)
    return seen


def base_closure() -> set[str]:
    return dependency_closure(project_requirements())


def blocked_modules(allowed: set[str]) -> list[str]:
    """Top-level import names installed here that belong only to distributions outside ``allowed``."""
    blocked = {
        module
        for module, distributions in metadata.packages_distributions().items()
        if not {canonicalize_name(d) for d in distributions} & allowed
    }
    return sorted(blocked - PROJECT_PACKAGES - set(sys.stdlib_module_names))


def test_the_base_install_pulls_neither_torch_nor_the_servers_libraries() -> None:
    closure = base_closure()
    assert {"grpcio", "protobuf"} <= closure  # the scan follows requirements at all
    assert not closure & HEAVY, f"the base install pulls {sorted(closure & HEAVY)}"
    # ... while the server and the trainer do need torch.
    assert "torch" in dependency_closure(project_requirements("teacher"))
    assert "torch" in dependency_closure(project_requirements("student"))


def test_the_import_blocker_covers_what_the_client_must_not_need() -> None:
    blocked = set(blocked_modules(base_closure()))
    assert {"torch", "transformers", "fastapi", "PIL", "tritonclient"} <= blocked
    assert not {"grpc", "google", "redis", "numpy"} & blocked


# The client-only world: a module of a distribution the base install lacks cannot be imported.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = frozenset(json.loads(sys.argv[1]))

    class ClientOnlyInstall(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (client-only install)", name=name)
            return None

    sys.meta_path.insert(0, ClientOnlyInstall())

    from teacher_server.cache import score_key
    from teacher_server.client import TeacherClient
    from teacher_server.hoi.digest import image_digest
    from teacher_server.hoi.prompts import triplet_sentence
    from teacher_server._proto.hoidistill.teacher.v1 import teacher_pb2

    target, image_path = sys.argv[2], sys.argv[3]
    sentences = [triplet_sentence("ride", "horse"), triplet_sentence("hold", "cup")]
    with TeacherClient(target, timeout_s=60) as teacher:
        info = teacher.model_info()
        scores = teacher.score([image_path], [sentences])[0]
    print(json.dumps({
        "sentences": sentences,
        "scores": [[s.match_logit, s.match_prob] for s in scores],
        "fingerprint": info.fingerprint,
        "key": score_key(info.fingerprint, image_digest(open(image_path, "rb").read())),
        "request_type": teacher_pb2.ScoreRequest.DESCRIPTOR.full_name,
        "loaded": sorted(name for name in ("torch", "transformers", "PIL", "fastapi") if name in sys.modules),
    }))
    """
)


@pytest.fixture(scope="module")
def teacher(tiny_blip_dir: Path) -> Iterator[RunningTeacher]:
    with running_teacher(make_teacher_settings(tiny_blip_dir)) as running:
        yield running


def run_client_only(*args: str) -> subprocess.CompletedProcess[str]:
    blocked = json.dumps(blocked_modules(base_closure()))
    command = [sys.executable, "-c", CLIENT_SCRIPT, blocked, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_client_scores_against_a_real_teacher_without_torch(
    teacher: RunningTeacher, tiny_blip_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "horse.png"
    image.write_bytes(png_bytes(5))
    done = run_client_only(teacher.target, str(image))
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["sentences"] == SENTENCES
    assert answer["loaded"] == []
    assert answer["request_type"] == "hoidistill.teacher.v1.ScoreRequest"
    assert answer["fingerprint"] == teacher.service.fingerprint
    assert answer["key"].startswith("hoidistill:")
    expected = reference_scores(reference_engine(tiny_blip_dir), png_bytes(5), SENTENCES)
    assert [logit for logit, _ in answer["scores"]] == pytest.approx([e.match_logit for e in expected], abs=1e-6)
    assert [prob for _, prob in answer["scores"]] == pytest.approx([e.match_prob for e in expected], abs=1e-6)


def test_the_blocker_really_blocks() -> None:
    # The same script fails at once where the client would need a blocked module.
    script = CLIENT_SCRIPT.replace("from teacher_server.cache", "import torch\nfrom teacher_server.cache", 1)
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(blocked_modules(base_closure())), "127.0.0.1:1", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "No module named 'torch' (client-only install)" in done.stderr


def test_the_command_line_lists_its_commands_without_torch() -> None:
    script = CLIENT_SCRIPT.split("from teacher_server.cache")[0] + (
        "import runpy\nsys.argv = ['hoi-teacher', '--help']\nrunpy.run_module('teacher_server', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(blocked_modules(base_closure()))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "serve" in done.stdout and "score" in done.stdout
