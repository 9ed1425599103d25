"""Metrics of prediction files, and the table the commands print: numpy only.

``evaluate_files`` loads preds.json and the annotation files and evaluates them (HICO-DET mAP or
V-COCO role AP); ``format_table`` is the human-readable summary of a result.
"""

from __future__ import annotations

from pathlib import Path

from student.evaluation.hico import (
    MAX_HOIS,
    HicoResult,
    count_triplets,
    evaluate_hico,
    load_correspondence,
)
from student.evaluation.predictions import EvaluationError, load_annotations, load_predictions
from student.evaluation.vcoco import VcocoResult, evaluate_vcoco


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
    assert train_annotations is not None and correspondence is not None  # checked above for hico
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


def _pct(value: float) -> float | None:
    return None if value != value else 100.0 * value  # NaN -> None
