"""``python -m student train``: train a student from a config file plus overrides.

    python -m student train --config student/configs/hico.yaml optim.lr=2e-4 schedule.epochs=90 \\
        --teacher grpc://teacher:50051 --output-dir runs/hico
    python -m student train --config student/configs/hico.yaml --resume          # continue runs/hico

What a run writes is described in ``student.training``; progress goes to the log, and the last
lines on stdout are the teacher's counters, the test metrics as JSON and where the outputs are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from student.commands.common import USER_ERRORS, report_error
from student.config import TrainConfig, load_config
from student.training import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``train``: a config file, ``key=value`` overrides, and a few run-level switches."""
    parser.add_argument("--config", type=Path, help="YAML recipe (student/configs/*.yaml); default: built-in defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=2e-4 schedule.epochs=90 data.root=/data/hico",
    )
    parser.add_argument(
        "--teacher",
        help="none | local | grpc://host:port | grpcs://host:port | triton://host:port (overrides teacher.source)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH|auto",
        help="continue from a checkpoint file or run directory; bare --resume = the run's own checkpoint",
    )
    parser.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (run.progress=false)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Config file + positional overrides + the flags that are shortcuts for overrides."""
    overrides = list(args.overrides or [])
    resume = getattr(args, "resume", None)
    if resume is not None and "=" in resume and not Path(resume).exists():
        # "--resume key=value": argparse gave the first override to the optional PATH of --resume.
        overrides.insert(0, resume)
        args.resume = "auto"
    if getattr(args, "teacher", None):
        overrides.append(f"teacher.source={args.teacher}")
    if getattr(args, "output_dir", None):
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "no_progress", False):
        overrides.append("run.progress=false")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student train``."""
    try:
        config = config_from_args(args)
        result = train(config, resume=args.resume)
    except USER_ERRORS as error:
        return report_error("train", error)
    if not result.is_main:
        return 0
    if result.teacher != "no teacher":
        stats = result.teacher_stats
        print(
            f"teacher scores, all ranks: {stats['pairs_scored']} (image, sentence) pairs fetched "
            f"({stats['cache_hits']} read from the Redis cache), {stats['memo_hits']} memo hits, "
            f"{stats['failed_batches']} failed batches"
        )
    if result.evaluation is not None:
        print(f"test: {json.dumps(result.evaluation.summary)}")
    print(f"done in {result.seconds:.1f} s; outputs in {result.output_dir}")
    return 0
