"""``python -m student plot RUN_DIR [--out FILE]``: the training curves of a run as one PNG.

    python -m student plot runs/hico                        # -> runs/hico/curves.png
    python -m student plot runs/hico --out hico-curves.png

What the picture shows is described in ``student.curves``; the last line on stdout is the path
of the PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from student.commands.common import report_error
from student.curves import CURVES_NAME, CurvesError, plot_training_curves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``plot``: the run directory and where the PNG goes."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run directory (run.output_dir)")
    parser.add_argument("--out", type=Path, help=f"the PNG to write (default: RUN_DIR/{CURVES_NAME})")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student plot``."""
    try:
        path = plot_training_curves(args.run_dir, args.out)
    except (CurvesError, OSError) as error:
        return report_error("plot", error)
    print(path)
    return 0
