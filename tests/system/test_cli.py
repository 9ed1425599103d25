"""The command dispatcher (``teacher_server.cli``): usage lines name the program the way it was called.

The console scripts are the ones ``make setup`` installed next to the interpreter running the
tests (``.venv/bin/hoi-teacher``), run as real processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

from teacher_server.__main__ import main as teacher_main
from teacher_server.cli import program_name

ROOT = REPO
SCRIPTS = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def console_script(name: str) -> str:
    path = SCRIPTS / name
    assert path.exists(), f"{path} is missing: `make setup` installs the console scripts of pyproject.toml"
    return str(path)


def test_program_name_follows_how_it_was_called() -> None:
    assert program_name("/opt/venv/bin/hoi-teacher", "python -m teacher_server") == "hoi-teacher"
    assert program_name("hoi-teacher-2", "python -m teacher_server") == "hoi-teacher-2"  # a renamed copy
    main_file = str(ROOT / "teacher_server" / "__main__.py")
    assert program_name(main_file, "python -m teacher_server") == "python -m teacher_server"
    assert program_name("", "python -m teacher_server") == "python -m teacher_server"  # embedded interpreter


@pytest.mark.parametrize(
    ("script", "command", "usage"),
    [
        ("hoi-teacher", [], "usage: hoi-teacher [-h] COMMAND ..."),
        ("hoi-teacher", ["serve"], "usage: hoi-teacher serve [-h]"),
        ("hoi-student", [], "usage: hoi-student [-h] [--log-level"),
        ("hoi-student", ["eval-predictions"], "usage: hoi-student eval-predictions [-h]"),
    ],
)
def test_console_scripts_name_themselves(script: str, command: list[str], usage: str) -> None:
    done = run(console_script(script), *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]
    assert "python -m" not in done.stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("package", "command", "usage"),
    [
        ("teacher_server", [], "usage: python -m teacher_server [-h] COMMAND ..."),
        ("teacher_server", ["score"], "usage: python -m teacher_server score [-h]"),
        ("student", [], "usage: python -m student [-h] [--log-level"),
    ],
)
def test_python_m_names_the_module(package: str, command: list[str], usage: str) -> None:
    done = run(sys.executable, "-m", package, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]


def test_called_with_arguments_the_usage_names_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    # A caller that passes argv (a test, a notebook) did not come through a console script.
    with pytest.raises(SystemExit) as exited:
        teacher_main(["make-tiny-model", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m teacher_server make-tiny-model ")


def test_an_unknown_command_is_named_with_the_choices() -> None:
    done = run(console_script("hoi-teacher"), "sevre")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("usage: hoi-teacher ")
    assert "invalid choice: 'sevre'" in done.stderr and "'serve'" in done.stderr
