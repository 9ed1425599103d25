"""The one command dispatcher behind ``python -m teacher_server`` and ``python -m student``.

A command is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``; a dispatcher
maps names to such modules and imports only the chosen one, so that ``--help`` stays fast and a
client-only install (no torch) can still list the commands. Usage lines name the program the way
it was called: the console script (``hoi-teacher``, ``hoi-student``) or ``python -m PACKAGE``.

This module imports only the standard library: the student's dispatcher uses it too, and the
teacher package imports nothing of the student's.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# name -> (module, one-line help)
Commands = Mapping[str, tuple[str, str]]


def program_name(argv0: str, module_prog: str) -> str:
    """How the user called us, for usage lines: the console script's name, or ``module_prog``.

    Under ``python -m`` ``argv0`` is the path of the package's ``__main__.py``; under a console
    script, or a copy a packager renamed, it is the script's own path, whose file name is the
    program's name.
    """
    name = Path(argv0).name
    return module_prog if not name or name.endswith(".py") else name


def dispatch(
    commands: Commands,
    *,
    module_prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    add_global_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    before_run: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen command, return its exit status.

    ``prog`` names the program in usage lines; by default the console script's name when called
    from the command line (``argv`` None), else ``module_prog``. ``add_global_arguments`` adds the
    options that come before the command; ``before_run`` sees the parsed arguments first (logging
    set-up). Library notices are silenced before the command runs (``quiet_library_chatter``).
    """
    if prog is None:
        prog = program_name(sys.argv[0], module_prog) if argv is None else module_prog
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if add_global_arguments is not None:
        add_global_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The command is the first argument naming one (global options take choices, never a command name).
    wanted = next((arg for arg in argv if arg in commands), None)
    for name, (module_name, help_text) in commands.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command pays for its imports (torch, grpc)
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if before_run is not None:
        before_run(args)
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
