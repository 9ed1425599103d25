"""Command line of the teacher: ``python -m teacher_server COMMAND ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps names to modules, imported lazily so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("teacher_server.score_cli", "score sentences against one image and print a ranked table"),
    "make-tiny-model": ("teacher_server.tiny_model", "write a tiny random BLIP ITM model for tests and demos"),
    "serve": ("teacher_server.serve_cli", "run the teacher service (gRPC native + KServe v2, HTTP)"),
    "demo": ("teacher_server.demo", "score the bundled example image against HOI sentences"),
    "finetune": (
        "teacher_server.finetune.cli",
        "fine-tune a BLIP ITM teacher on HOI annotations or image-sentence pairs",
    ),
    "eval-itm": ("teacher_server.itm_eval", "measure how well a teacher ranks the verbs of annotated pairs"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teacher_server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command pays for its imports (torch, grpc)
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
