"""The teacher's log output: text for people, one JSON object per line for log collectors."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from teacher_server.logs import configure_logging
from teacher_server.settings import ServerSettings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def records(stream: io.StringIO) -> list[dict]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]  # every line must be one JSON object


def test_json_lines_carry_time_level_logger_message_and_extras(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("teacher_server.test")
    before = datetime.now(timezone.utc)
    log.debug("not written: below INFO")
    log.info("ready on port %d\nsecond line", 50051, extra={"grpc_port": 50051, "devices": ["cuda:0"]})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("scoring failed", extra={"batch": 3})
    log.warning("odd value", extra={"path": object()})  # not JSON-able: written as its str

    ready, failed, odd = records(stream)
    assert ready["level"] == "INFO" and ready["logger"] == "teacher_server.test"
    assert ready["message"] == "ready on port 50051\nsecond line"  # one line on the wire, all of the text
    assert ready["grpc_port"] == 50051 and ready["devices"] == ["cuda:0"]
    stamp = datetime.fromisoformat(ready["time"])
    assert stamp.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= stamp <= datetime.now(timezone.utc)
    assert set(ready) == {"time", "level", "logger", "message", "grpc_port", "devices"}  # no LogRecord internals
    assert failed["level"] == "ERROR" and failed["batch"] == 3
    assert "ValueError: boom" in failed["exception"] and "Traceback" in failed["exception"]
    assert odd["path"].startswith("<object object at")


def test_text_is_the_default_and_warnings_become_records(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("WARNING", stream=stream)
    logging.getLogger("teacher_server.test").info("below WARNING")
    logging.getLogger("teacher_server.test").warning("redis down", extra={"redis": "redis://x"})
    # Only this test's logger: in a full run, threads of earlier tests (a Redis probe, a batcher)
    # may still log to the root handler.
    (line,) = [line for line in stream.getvalue().splitlines() if "teacher_server.test" in line]
    assert line.endswith(" WARNING teacher_server.test: redis down")

    configure_logging("INFO", "json", stream=(json_stream := io.StringIO()))
    warnings.warn("a library complains", UserWarning, stacklevel=1)
    (record,) = [record for record in records(json_stream) if record["logger"] == "py.warnings"]
    assert "a library complains" in record["message"]


def test_the_format_is_a_setting() -> None:
    assert ServerSettings().log_format == "text" and ServerSettings().log_level == "INFO"
    settings = ServerSettings.from_env({"HOIDISTILL_LOG_FORMAT": "json", "HOIDISTILL_LOG_LEVEL": "debug"})
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    with pytest.raises(ValueError, match="HOIDISTILL_LOG_FORMAT: Input should be 'text' or 'json'"):
        ServerSettings.from_env({"HOIDISTILL_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="log_format must be 'text' or 'json'"):
        configure_logging("INFO", "xml")
