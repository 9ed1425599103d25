"""``python -m student predict``: run a trained student on images and draw what it detects.

    python -m student predict --checkpoint runs/demo/train/checkpoint.pth IMAGE_OR_DIR... [--out DIR]
        [--threshold 0.3] [--top 10] [--nms 0.7] [--device auto] [--teacher grpc://host:port] [--json]

Writes ``DIR/<image stem>.png`` per image (the original image, its size, with the kept triplets'
boxes, links and labels; ``student.drawing``), prints one line per image, and with ``--json`` ends
with one line of JSON (``student/schemas/predictions.schema.json``). The work is
``student.predict.predict_files``; see docs/pictures.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from student.commands.common import USER_ERRORS, report_error
from student.predict import (
    DEFAULT_NMS_THRESHOLD,
    DEFAULT_TEACHER_THRESHOLD,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    PredictError,
    Predictor,
    PredictSettings,
    image_files,
    predict_files,
    predictions_document,
)

if TYPE_CHECKING:
    from teacher_server.client import TeacherClient

# A user's mistake in an image, a flag or the output directory is one line too, exit status 2.
ERRORS: tuple[type[Exception], ...] = (*USER_ERRORS, PredictError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``predict``."""
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint.pth written by train (or its run directory)"
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or directories of images")
    parser.add_argument(
        "--out", type=Path, default=Path("predictions"), help="where the pictures go (default: %(default)s)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="keep triplets scoring at least this (default: %(default)s)",
    )
    parser.add_argument(
        "--top", type=int, default=DEFAULT_TOP_K, help="at most this many triplets per image (default: %(default)s)"
    )
    parser.add_argument(
        "--nms",
        type=float,
        default=DEFAULT_NMS_THRESHOLD,
        help="triplet NMS threshold: one box pair per verb and object (1 = off; default: %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument(
        "--teacher",
        metavar="ENDPOINT",
        help="score each triplet's sentence on its pair with this teacher service (grpc://host:port, grpcs://...)",
    )
    parser.add_argument(
        "--teacher-threshold",
        type=float,
        default=DEFAULT_TEACHER_THRESHOLD,
        help="the teacher rejects a triplet below this match probability (default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-timeout", type=float, default=30.0, help="seconds per teacher call (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON: every image's triplets")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none off a terminal anyway)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student predict``."""
    try:
        settings = PredictSettings(
            threshold=args.threshold, top_k=args.top, teacher_threshold=args.teacher_threshold, nms_threshold=args.nms
        )
        files = image_files(args.images)
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, settings=settings)
        teacher = _teacher_client(args.teacher, predictor, args.teacher_timeout) if args.teacher else None
        bar = tqdm(total=len(files), desc="predict", unit="img", disable=args.no_progress or not sys.stderr.isatty())
        try:
            results = predict_files(predictor, files, args.out, teacher=teacher, on_image=lambda _: bar.update())
        finally:
            bar.close()
            if teacher is not None:
                teacher.close()
    except ERRORS as error:
        return report_error("predict", error)
    for result in results:
        print(f"{result.file}: {len(result.triplets)} triplets -> {result.picture}")
        for triplet in result.triplets:
            teacher_says = "" if triplet.teacher is None else f" (teacher {triplet.teacher:.2f})"
            print(f"  {triplet.label()}{teacher_says}")
    if args.json:
        print(json.dumps(predictions_document(results)))
    return 0


def _teacher_client(endpoint: str, predictor: Predictor, timeout_s: float) -> TeacherClient:
    """A ``TeacherClient`` of ``endpoint``; the bearer token from the checkpoint's ``teacher.token_env``."""
    from teacher_server.client import TeacherClient

    token = os.environ.get(predictor.config.teacher.token_env) or None
    try:
        return TeacherClient(endpoint, token=token, timeout_s=timeout_s)
    except ValueError as error:
        raise PredictError(f"--teacher {endpoint}: {error}") from None
