"""Command line of the student: ``python -m student COMMAND ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps names to modules, imported lazily so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("student.data.synthetic_cli", "write a synthetic HOI dataset in the HICO-DET format"),
    "train": ("student.train_cli", "train a student (config file plus overrides)"),
    "evaluate": ("student.evaluation.evaluate_cli", "run a checkpoint on a test split and write preds.json"),
    "eval-predictions": ("student.evaluation.cli", "compute HICO-DET or V-COCO metrics of a preds.json"),
    "prewarm": (
        "student.teacher.prewarm",
        "score every candidate sentence of every training image once (fills the cache)",
    ),
    "demo": ("student.demo", "the main job end to end on embedded defaults"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m student", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (and so only it pays for torch).
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
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
    sys.exit(main())
