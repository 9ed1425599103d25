"""``python -m student eval-predictions``: HICO-DET or V-COCO metrics of a preds.json.

    python -m student eval-predictions --dataset hico --annotations test_hico.json \\
        --train-annotations trainval_hico.json --correspondence corre_hico.npy \\
        --predictions preds.json [--json]
    python -m student eval-predictions --dataset vcoco --annotations test_vcoco.json \\
        --predictions preds.json [--json]

Prints a table; with ``--json`` the last line is the metrics as JSON, in percent. Exit status 0 on
success, 2 when an input is malformed (the message names the file, image and field).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from student.evaluation.hico import MAX_HOIS
from student.evaluation.predictions import DATASETS, EvaluationError
from student.evaluation.report import evaluate_files, format_table
from student.evaluation.vcoco import GROUND_TRUTH_BOXES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``eval-predictions``."""
    parser.add_argument("--dataset", choices=DATASETS, required=True, help="protocol: HICO-DET mAP or V-COCO role AP")
    parser.add_argument(
        "--annotations", type=Path, required=True, help="test annotations (test_hico.json / test_vcoco.json)"
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        required=True,
        help="preds.json: one entry per test image, in annotation order",
    )
    parser.add_argument(
        "--train-annotations",
        type=Path,
        help="HICO-DET: training annotations (trainval_hico.json), for the Rare split",
    )
    parser.add_argument("--correspondence", type=Path, help="HICO-DET: verb x object validity matrix (corre_hico.npy)")
    parser.add_argument(
        "--max-hois",
        type=int,
        default=MAX_HOIS,
        help=f"HICO-DET: triplets kept per image (default {MAX_HOIS}, the protocol's)",
    )
    parser.add_argument(
        "--ground-truth-boxes",
        choices=GROUND_TRUTH_BOXES,
        default="detr",
        help="V-COCO: detr = the file stores x2 = x + w (the DETR-line test_vcoco.json), read as the official "
        "x + w - 1; official = the file already holds x + w - 1 (default detr)",
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON metrics (percent)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student eval-predictions``."""
    started = time.perf_counter()
    try:
        result = evaluate_files(
            args.dataset,
            args.annotations,
            args.predictions,
            train_annotations=args.train_annotations,
            correspondence=args.correspondence,
            max_hois=args.max_hois,
            ground_truth_boxes=args.ground_truth_boxes,
        )
    except EvaluationError as error:
        print(f"eval-predictions: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"({time.perf_counter() - started:.1f} s)")
    if args.json:
        print(json.dumps(result.summary()))
    return 0
