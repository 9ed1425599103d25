"""Command line of the student: ``python -m student COMMAND ...`` (installed as ``hoi-student``).

Each command lives in its own module of ``student.commands`` exposing ``add_arguments(parser)``
and ``run(args) -> int``; this file only maps names to modules, imported lazily so that ``--help``
stays fast, and sets up logging once for the process.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from student.logs import LEVELS, setup_logging

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("student.commands.make_synthetic", "write a synthetic HOI dataset in the HICO-DET format"),
    "train": ("student.commands.train", "train a student (config file plus overrides)"),
    "evaluate": ("student.commands.evaluate", "run a checkpoint on a test split and write preds.json"),
    "eval-predictions": ("student.commands.eval_predictions", "compute HICO-DET or V-COCO metrics of a preds.json"),
    "prewarm": (
        "student.commands.prewarm",
        "score every candidate sentence of every training image once (fills the cache)",
    ),
    "demo": ("student.commands.demo", "the main job end to end on embedded defaults"),
}
MODULE_PROG = "python -m student"
DESCRIPTION = "The HOI student: make data, train, evaluate, prewarm the teacher's cache, run the demo."


def program_name(argv0: str) -> str:
    """How the user called us, for usage lines: the console script's name, or ``python -m student``.

    Under ``python -m`` ``argv0`` is the path of this file; under the ``hoi-student`` console
    script (or a copy a packager renamed) it is the script's own path.
    """
    name = Path(argv0).name
    return MODULE_PROG if not name or name.endswith(".py") else name


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen command, return its exit status.

    ``prog`` names the program in usage lines; by default the console script's name when called
    from the command line (``argv`` None), else ``python -m student``.
    """
    if prog is None:
        prog = program_name(sys.argv[0]) if argv is None else MODULE_PROG
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        help="level of every rank's log (default: info on rank 0, warning on the other ranks)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # The command is the first argument naming one (flags before it take choices, never a command name).
    wanted = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (and so only it pays for torch).
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    quiet_library_chatter()
    return int(args._run(args) or 0)


def quiet_library_chatter() -> None:
    """Keep the terminal for our own output: no per-file progress bars or backend notices."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the client-only install has no transformers
        return
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
