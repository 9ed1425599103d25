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

from student.evaluation.hico import (
    MAX_HOIS,
    HicoResult,
    count_triplets,
    evaluate_hico,
    load_correspondence,
)
from student.evaluation.predictions import DATASETS, EvaluationError, load_annotations, load_predictions
from student.evaluation.vcoco import GROUND_TRUTH_BOXES, VcocoResult, evaluate_vcoco


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


def evaluate_files(
    dataset: str,
    annotations: Path,
    predictions: Path,
    *,
    train_annotations: Path | None = None,
    correspondence: Path | None = None,
    max_hois: int = MAX_HOIS,
    ground_truth_boxes: str = "detr",
) -> HicoResult | VcocoResult:
    """Load the files and evaluate; raises :class:`EvaluationError` on a malformed or missing input."""
    if dataset == "hico" and (train_annotations is None or correspondence is None):
        raise EvaluationError("--dataset hico needs --train-annotations and --correspondence")
    ground_truth = load_annotations(annotations, dataset)
    preds = load_predictions(predictions, dataset, ground_truth)
    if dataset == "vcoco":
        return evaluate_vcoco(preds, ground_truth, ground_truth_boxes=ground_truth_boxes)
    train_counts = count_triplets(load_annotations(train_annotations, dataset))
    return evaluate_hico(
        preds,
        ground_truth,
        correspondence=load_correspondence(correspondence),
        train_counts=train_counts,
        max_hois=max_hois,
    )


def format_table(result: HicoResult | VcocoResult) -> str:
    """Human-readable summary of a result."""

    def cell(value: float | None) -> str:
        return f"{value:8.2f}" if value is not None else "       -"

    summary = result.summary()
    if isinstance(result, HicoResult):
        lines = [
            f"HICO-DET mAP (%): {len(result.triplets)} triplet classes in the test set, {int(result.rare.sum())} rare",
            f"{'':14}{'Full':>8}{'Rare':>8}{'Non-rare':>10}",
        ]
        for name, key in (("Default", "default"), ("Known-Object", "known_object")):
            split = summary[key]
            lines.append(f"{name:14}{cell(split['full'])}{cell(split['rare'])}  {cell(split['non_rare'])}")
        lines.append(f"Mean max recall (%): {cell(summary['mean_max_recall']).strip()}")
        return "\n".join(lines)
    lines = [f"V-COCO role AP (%), {'':10}{'S1':>8}{'S2':>8}{'#pos':>7}"]
    for name, ap1 in result.role_ap_1.items():
        lines.append(f"  {name:28}{cell(_pct(ap1))}{cell(_pct(result.role_ap_2[name]))}{result.num_positives[name]:7d}")
    lines.append(
        f"Mean role AP (without 'point'): scenario 1 {cell(summary['scenario_1']).strip()}, "
        f"scenario 2 {cell(summary['scenario_2']).strip()}"
    )
    return "\n".join(lines)


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


def _pct(value: float) -> float | None:
    return None if value != value else 100.0 * value  # NaN -> None
