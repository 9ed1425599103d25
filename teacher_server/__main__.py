"""Command line of the teacher: ``python -m teacher_server COMMAND ...`` (installed as ``hoi-teacher``).

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps names to modules, which ``teacher_server.cli.dispatch`` imports lazily so that
``--help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from teacher_server.cli import dispatch

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
MODULE_PROG = "python -m teacher_server"
DESCRIPTION = "Command line of the teacher: score, serve, fine-tune and evaluate a BLIP ITM teacher."


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the chosen command, return its exit status.

    ``prog`` names the program in usage lines; by default the console script's name when called
    from the command line (``argv`` None), else ``python -m teacher_server``.
    """
    return dispatch(COMMANDS, module_prog=MODULE_PROG, description=DESCRIPTION, argv=argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
