"""What the commands share: the errors a user can cause, reported in one line with exit status 2."""

from __future__ import annotations

import sys

from student.checkpoint import CheckpointError
from student.config import ConfigError
from student.distributed import DistributedError
from student.engine import TrainingError
from student.losses import LossError
from student.model import ModelError
from teacher_server.errors import TeacherError
from teacher_server.hoi.errors import DatasetError

# The errors a user can cause with a config, data, checkpoint or teacher: one line, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    CheckpointError,
    TeacherError,
    ModelError,
    LossError,
    TrainingError,
    DistributedError,
)


def report_error(command: str, error: Exception) -> int:
    """Print ``command: error`` on stderr (the message names the key, file or field) and return 2."""
    print(f"{command}: {error}", file=sys.stderr)
    return 2
