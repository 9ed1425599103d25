"""``python -m student prewarm``: score every candidate sentence of every training image once.

    python -m student prewarm --config student/configs/hico.yaml --teacher grpc://teacher:50051 \\
        data.root=/data/hico_20160224_det

What is scored, in what order, and how a re-run resumes: ``student.teacher.prewarm``. The last two
lines on stdout are the summary and the result as JSON; the exit status is 1 when any image failed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from student.commands.common import USER_ERRORS, report_error
from student.config import load_config
from student.teacher.pool import EndpointPool
from student.teacher.prewarm import PREWARM_TIMEOUT_S, PrewarmError, plan_items, prewarm
from teacher_server.cache import open_score_cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``prewarm``: the training config (which images, which sentences) and the teacher."""
    parser.add_argument("--config", type=Path, help="YAML recipe the training run uses (student/configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for train (e.g. data.root=/data/hico)"
    )
    parser.add_argument(
        "--teacher",
        help="teacher endpoint(s): grpc://host:port[,grpc://host2:port] or triton://host:port "
        "(default: the config's teacher.source)",
    )
    parser.add_argument("--redis", metavar="URL", help="score cache to read: images it fully holds are skipped")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--images-per-request", type=int, default=8, help="images per request (default 8)")
    parser.add_argument(
        "--progress-file",
        type=Path,
        help="finished images are recorded here (default <run.output_dir>/prewarm_done.txt)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=PREWARM_TIMEOUT_S,
        help=f"seconds per request (default {PREWARM_TIMEOUT_S:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student prewarm``; the last line printed is the result as JSON."""
    try:
        config = load_config(args.config, list(args.overrides or []))
        endpoints = args.teacher or config.teacher.source
        if not endpoints.startswith(("grpc://", "grpcs://", "triton://")):
            raise PrewarmError(f"prewarm needs a teacher service (--teacher grpc://host:port), not {endpoints!r}")
        items = plan_items(config)
        progress_file = args.progress_file or Path(config.run.output_dir) / "prewarm_done.txt"
        token = os.environ.get(config.teacher.token_env) or None
        pool = EndpointPool(endpoints, token=token, timeout_s=args.timeout)
        cache = None
        if args.redis:
            cache = open_score_cache(args.redis)
        try:
            result = prewarm(
                items,
                pool,
                workers=args.workers,
                images_per_request=args.images_per_request,
                progress_file=progress_file,
                cache=cache,
                progress=False if args.no_progress else None,
            )
        finally:
            pool.close()
            if cache is not None:
                cache.close()
    except USER_ERRORS as error:
        return report_error("prewarm", error)
    print(result.describe())
    print(result.to_json())
    return 1 if result.failed_images else 0
