"""The student's command line: the program name in usage lines, and the logging it sets up."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from testkit import REPO

from student.__main__ import main, program_name
from student.logs import PROJECT_LOGGERS, CurrentStderrHandler, process_rank, setup_logging


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """Leave the process's logging as it was (setup_logging changes global state)."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in PROJECT_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_program_name_follows_how_it_was_called() -> None:
    assert program_name("/opt/venv/bin/hoi-student") == "hoi-student"
    assert program_name(str(REPO / "student" / "__main__.py")) == "python -m student"


def test_usage_lines_name_the_console_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/hoi-student", "eval-predictions", "--help"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: hoi-student eval-predictions ")


def test_usage_lines_under_python_m_name_the_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "student", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m student ")
    assert "--log-level" in done.stdout


def test_rank_comes_from_torchrun() -> None:
    assert process_rank({"RANK": "3", "WORLD_SIZE": "4"}) == 3
    assert process_rank({}) == 0
    assert process_rank({"RANK": "x"}) == 0  # student.distributed names the bad variable itself


def test_rank_zero_logs_progress_and_other_ranks_only_warnings(
    clean_logging: None, capsys: pytest.CaptureFixture
) -> None:
    log = logging.getLogger("student.training")
    setup_logging(rank=0)
    log.info("epoch 1/2")
    setup_logging(rank=1)  # replaces the handler it installed: one line per record
    log.info("epoch 1/2 again")
    log.warning("scores late")
    logging.getLogger("teacher_server.client").warning("endpoint down")  # the teacher client, in this process
    logging.getLogger("some_library").info("chatter")  # third-party libraries stay at WARNING
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in err] == [
        "[rank 0] INFO student.training: epoch 1/2",
        "[rank 1] WARNING student.training: scores late",
        "[rank 1] WARNING teacher_server.client: endpoint down",
    ]
    assert sum(isinstance(h, CurrentStderrHandler) for h in logging.getLogger().handlers) == 1


def test_a_level_given_applies_to_every_rank(clean_logging: None, capsys: pytest.CaptureFixture) -> None:
    setup_logging("debug", rank=2)
    logging.getLogger("student.teacher.prefetch").debug("plan submitted")
    assert "[rank 2] DEBUG student.teacher.prefetch: plan submitted" in capsys.readouterr().err
