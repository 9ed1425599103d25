"""Log output of the teacher service: text for people, or JSON lines for log collectors.

``--log-format json`` (``HOIDISTILL_LOG_FORMAT=json``) writes one JSON object per line to stderr:
``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``, then every field
the call passed in ``extra=`` (``log.info("...", extra={"grpc_port": 50051})``), and ``exception``
with the traceback when there is one. A message with line breaks stays one line (JSON escapes
them), so a collector never splits a record. uvicorn's and gRPC's records reach the same handler.

``show_progress`` decides, for both packages, whether a tqdm bar is drawn: by default only when
stderr is a terminal, so a log file gets the log lines and not thousands of bar redraws.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What every LogRecord carries by itself; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, logger, message, the ``extra`` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line of ``record`` (values JSON cannot hold are written as their ``str``)."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record of the process at ``level`` and above to ``stream`` (default stderr).

    ``log_format``: ``text`` (``TEXT_FORMAT``) or ``json`` (``JsonFormatter``). Replaces handlers
    set before, so calling it again switches the format.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler(stream)
    # The handler's own level too: a logger set lower elsewhere (the student's setup_logging sets
    # the project's loggers to INFO) must not let records under ``level`` through.
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Python's warnings as records too, so that a collector reading JSON sees no stray text line.
    logging.captureWarnings(True)


def show_progress(progress: bool | None, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: ``progress`` when given (an explicit ask wins), else whether
    ``stream`` (default: the current ``sys.stderr``, where tqdm writes) is a terminal.

    Not a terminal means a log file, a pipe or CI capture: each bar redraw would land there as a
    line ending in a carriage return, thousands per epoch, burying the one log line per epoch.
    """
    if progress is not None:
        return progress
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)  # a replaced sys.stderr may be any file-like object
    return bool(isatty is not None and isatty())
