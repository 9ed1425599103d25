"""Logging of the student: set up once per process, with the rank in every record.

``python -m student`` calls ``setup_logging`` before it runs a command. One handler on the root
logger writes ``2025-01-01 12:00:00 [rank 1] WARNING student.teacher.scores: ...`` lines to
stderr; the student's and the teacher client's loggers report at INFO on rank 0 and at WARNING
on the other ranks, so that N ``torchrun`` ranks do not print N copies of every progress line
while each rank's warnings still show, tagged with the rank that had them. The rank is torchrun's
``RANK`` (0 without torchrun). Python warnings (e.g. the dataset's count of mended boxes) go
through the same handler.

Library code only logs (``logging.getLogger(__name__)``) and never configures logging: called
from Python without this set-up, it is quiet but for warnings. What a user or a script parses
(the tables and the last-line JSON of ``demo``, ``evaluate --json``, ``prewarm``) is printed on
stdout by the commands, not logged.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"
#: The loggers whose level the set-up chooses (third-party libraries stay at WARNING).
PROJECT_LOGGERS = ("student", "teacher_server")
LEVELS = ("debug", "info", "warning", "error")


class RankFilter(logging.Filter):
    """Stamps every record with ``rank`` (used by ``FORMAT``)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was at set-up.

    So a caller that redirects ``sys.stderr`` (``contextlib.redirect_stderr``, pytest's capture)
    gets the log lines too.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        return None  # always the current sys.stderr


def process_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise or when ``RANK`` is not a number."""
    text = (os.environ if env is None else env).get("RANK", "0")
    try:
        return int(text)
    except ValueError:  # student.distributed reports the malformed variable itself
        return 0


def setup_logging(level: str | int | None = None, *, rank: int | None = None) -> logging.Handler:
    """Send the project's log records to stderr, rank-stamped; returns the handler.

    level: for every rank (``"debug"``, ``"info"``, ...); default INFO on rank 0, WARNING elsewhere.
    rank: default ``process_rank()``. Calling it again replaces the handler it installed before.
    """
    rank = process_rank() if rank is None else rank
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    elif isinstance(level, str):
        level = level.upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, CurrentStderrHandler):
            root.removeHandler(handler)
    handler = CurrentStderrHandler()
    handler.addFilter(RankFilter(rank))
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    return handler
