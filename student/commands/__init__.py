"""The command line of the student, one thin module per command of ``python -m student``.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status) and does
nothing else: it turns flags into a config and calls the builders, the training run or the
library functions that do the work. ``student.__main__`` maps command names to these modules.
"""
