"""Command line of the student: ``python -m student COMMAND ...`` (installed as ``hoi-student``).

Each command lives in its own module of ``student.commands`` exposing ``add_arguments(parser)``
and ``run(args) -> int``; this file only maps names to modules, which ``teacher_server.cli.dispatch``
imports lazily so that ``--help`` stays fast, and sets up logging once for the process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from student.logs import LEVELS, setup_logging
from teacher_server.cli import dispatch
from teacher_server.cli import program_name as _program_name

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("student.commands.make_synthetic", "write a synthetic HOI dataset in the HICO-DET format"),
    "train": ("student.commands.train", "train a student (config file plus overrides)"),
    "evaluate": ("student.commands.evaluate", "run a checkpoint on a test split and write preds.json"),
    "eval-predictions": ("student.commands.eval_predictions", "compute HICO-DET or V-COCO metrics of a preds.json"),
    "predict": ("student.commands.predict", "run a checkpoint on images and draw the triplets it detects"),
    "prewarm": (
        "student.commands.prewarm",
        "score every candidate sentence of every training image once (fills the cache)",
    ),
    "plot": ("student.commands.plot", "draw a run's loss terms and test mAP per epoch into one PNG"),
    "demo": ("student.commands.demo", "the main job end to end on embedded defaults"),
}
MODULE_PROG = "python -m student"
DESCRIPTION = "The HOI student: make data, train, evaluate, prewarm the teacher's cache, run the demo."


def program_name(argv0: str) -> str:
    """How the user called us, for usage lines: the console script's name, or ``python -m student``."""
    return _program_name(argv0, MODULE_PROG)


def add_global_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that come before the command: the log level."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        help="level of every rank's log (default: info on rank 0, warning on the other ranks)",
    )


def _setup_logging(args: argparse.Namespace) -> None:
    setup_logging(args.log_level)


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen command, return its exit status.

    ``prog`` names the program in usage lines; by default the console script's name when called
    from the command line (``argv`` None), else ``python -m student``. Logging is set up once for
    the process before the command runs.
    """
    return dispatch(
        COMMANDS,
        module_prog=MODULE_PROG,
        description=DESCRIPTION,
        argv=argv,
        prog=prog,
        add_global_arguments=add_global_arguments,
        before_run=_setup_logging,
    )


if __name__ == "__main__":
    sys.exit(main())
