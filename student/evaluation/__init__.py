"""Evaluation: HICO-DET mAP and V-COCO role AP of preds.json files, and the model post-processing.

Importing this package pulls in numpy only, and no module of it imports model, loss or training
code (``tests/system/test_dependencies.py``): ``hico`` and ``vcoco`` (the protocols), ``boxes`` (their IoU
conventions), ``predictions`` (reading and writing preds.json), ``report`` (files in, a table
out). ``student.evaluation.postprocess`` (model outputs -> preds.json entries; it needs torch) is
imported on its own:

    from student.evaluation import evaluate_hico, load_annotations, parse_predictions
    from student.evaluation.postprocess import TripletNms, postprocess
"""

from student.evaluation.hico import HicoResult, SplitAp, count_triplets, evaluate_hico, load_correspondence
from student.evaluation.predictions import (
    EvaluationError,
    HoiSet,
    load_annotations,
    load_json,
    load_predictions,
    parse_hoi_entries,
    parse_predictions,
    save_predictions,
)
from student.evaluation.vcoco import VcocoResult, evaluate_vcoco

__all__ = [
    "EvaluationError",
    "HicoResult",
    "HoiSet",
    "SplitAp",
    "VcocoResult",
    "count_triplets",
    "evaluate_hico",
    "evaluate_vcoco",
    "load_annotations",
    "load_correspondence",
    "load_json",
    "load_predictions",
    "parse_hoi_entries",
    "parse_predictions",
    "save_predictions",
]
