"""Benchmark of the evaluators at the size of the real test splits, on synthetic data.

    python bench/evaluation.py                      # HICO-DET: 9,658 images x 100 triplets
    python bench/evaluation.py --dataset vcoco      # V-COCO: 4,964 images
    python bench/evaluation.py --images 200 --write-dir /tmp/hoi-eval   # small files to try the CLI on

Writes a synthetic ground truth (and, for HICO-DET, a training set and ``corre_hico.npy``) plus
random predictions, half of them jittered copies of ground-truth pairs so that there are true
positives, then times what ``python -m student eval-predictions`` does, stage by stage: read and validate
every file, evaluate. Prints the timings; the last line is JSON ``{"images": N, "seconds": S}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.evaluation.hico import HicoResult, count_triplets, evaluate_hico, load_correspondence
from student.evaluation.predictions import load_annotations, load_json, parse_predictions, save_predictions
from student.evaluation.report import format_table
from student.evaluation.vcoco import VcocoResult, evaluate_vcoco, split_verb
from teacher_server.hoi.classes import COCO_OBJECT_IDS, HICO_HOIS, VCOCO_VERBS, hico_correspondence

SPLIT_SIZES = {"hico": (38118, 9658), "vcoco": (5400, 4964)}  # (train, test) images
WIDTH, HEIGHT = 640, 480
QUERIES = 64


def random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 4) xyxy boxes inside a WIDTH x HEIGHT image."""
    x1 = rng.uniform(0, WIDTH - 40, count)
    y1 = rng.uniform(0, HEIGHT - 40, count)
    w = rng.uniform(30, WIDTH / 2, count)
    h = rng.uniform(30, HEIGHT / 2, count)
    return np.stack((x1, y1, np.minimum(x1 + w, WIDTH - 1), np.minimum(y1 + h, HEIGHT - 1)), axis=1).round(1)


def pair_kinds(dataset: str) -> list[tuple[int, int]]:
    """(verb id in the file, object index or -1) of the HOIs a synthetic image may hold."""
    if dataset == "hico":
        return [(verb + 1, obj) for verb, obj in HICO_HOIS]
    kinds = []
    for verb, name in enumerate(VCOCO_VERBS):
        if split_verb(name)[1] is None:
            kinds.append((verb, -1))
        else:
            kinds += [(verb, obj) for obj in (39, 41, 56, 63, 67)] + [(verb, -1)]  # bottle, cup, chair, ...
    return kinds


def ground_truth_image(rng: np.random.Generator, kinds: list, name: str) -> dict:
    persons = random_boxes(rng, int(rng.integers(1, 4)))
    boxes = [{"bbox": b.tolist(), "category_id": 1} for b in persons]
    hois = []
    for _ in range(int(rng.integers(1, 6))):
        verb, obj = kinds[int(rng.integers(len(kinds)))]
        subject = int(rng.integers(len(persons)))
        object_id = -1
        if obj >= 0:
            boxes.append({"bbox": random_boxes(rng, 1)[0].tolist(), "category_id": COCO_OBJECT_IDS[obj]})
            object_id = len(boxes) - 1
        hois.append({"subject_id": subject, "object_id": object_id, "category_id": verb})
    return {"file_name": name, "annotations": boxes, "hoi_annotation": hois}


def prediction_image(rng: np.random.Generator, image: dict, kinds: list, triplets: int) -> dict:
    """QUERIES (subject, object) pairs, ``triplets`` HOIs over them; half copy a ground-truth pair."""
    gt_boxes = np.asarray([b["bbox"] for b in image["annotations"]])
    gt_categories = np.asarray([b["category_id"] for b in image["annotations"]])
    gt_hois = image["hoi_annotation"]
    gt_sub = np.asarray([h["subject_id"] for h in gt_hois])
    gt_obj = np.asarray([h["object_id"] if h["object_id"] >= 0 else h["subject_id"] for h in gt_hois])
    gt_verb = np.asarray([h["category_id"] for h in gt_hois])

    half = QUERIES // 2
    copied = rng.integers(len(gt_hois), size=half)  # even queries: jittered ground-truth pairs
    sub = np.empty((QUERIES, 4))
    obj = np.empty((QUERIES, 4))
    sub[0::2] = gt_boxes[gt_sub[copied]] + rng.normal(0, 4, (half, 4))
    obj[0::2] = gt_boxes[gt_obj[copied]] + rng.normal(0, 4, (half, 4))
    sub[1::2], obj[1::2] = random_boxes(rng, half), random_boxes(rng, half)
    categories = np.empty(QUERIES, dtype=np.int64)
    categories[0::2] = gt_categories[gt_obj[copied]]
    categories[1::2] = np.asarray(COCO_OBJECT_IDS)[rng.integers(80, size=half)]
    boxes = []
    for s, o, c in zip(sub.round(2).tolist(), obj.round(2).tolist(), categories.tolist(), strict=True):
        boxes += [{"bbox": s, "category_id": 1}, {"bbox": o, "category_id": c}]

    queries = rng.integers(QUERIES, size=triplets)
    verbs = np.asarray([k[0] for k in kinds])[rng.integers(len(kinds), size=triplets)]
    likely = (queries % 2 == 0) & (rng.random(triplets) < 0.5)  # often a verb the image has
    verbs[likely] = gt_verb[rng.integers(len(gt_hois), size=int(likely.sum()))]
    scores = rng.random(triplets).round(6)
    hois = [
        {"subject_id": 2 * q, "object_id": 2 * q + 1, "category_id": v, "score": p}
        for q, v, p in zip(queries.tolist(), verbs.tolist(), scores.tolist(), strict=True)
    ]
    return {"file_name": image["file_name"], "predictions": boxes, "hoi_prediction": hois}


def write_split(directory: Path, dataset: str, images: int, train_images: int, triplets: int, seed: int) -> dict:
    """Write the synthetic files; returns their paths (keys as the arguments of ``evaluate_files``)."""
    rng = np.random.default_rng(seed)
    kinds = pair_kinds(dataset)
    directory.mkdir(parents=True, exist_ok=True)
    test = [ground_truth_image(rng, kinds, f"synthetic_test_{i:06d}.jpg") for i in range(images)]
    preds = [prediction_image(rng, image, kinds, triplets) for image in test]
    paths = {"annotations": directory / f"test_{dataset}.json", "predictions": directory / "preds.json"}
    paths["annotations"].write_text(json.dumps(test))
    save_predictions(preds, paths["predictions"])
    if dataset == "hico":
        train = [ground_truth_image(rng, kinds, f"synthetic_train_{i:06d}.jpg") for i in range(train_images)]
        paths["train_annotations"] = directory / "trainval_hico.json"
        paths["train_annotations"].write_text(json.dumps(train))
        paths["correspondence"] = directory / "corre_hico.npy"
        np.save(paths["correspondence"], hico_correspondence().astype(np.float64))
    return paths


def timed_evaluation(dataset: str, paths: dict) -> tuple[HicoResult | VcocoResult, dict[str, float]]:
    """What ``evaluate_files`` does, stage by stage, with the seconds of each stage."""
    stages: dict[str, float] = {}

    def timed(name: str, function, *args, **kwargs):
        started = time.perf_counter()
        value = function(*args, **kwargs)
        stages[name] = time.perf_counter() - started
        return value

    ground_truth = timed("read test annotations", load_annotations, paths["annotations"], dataset)
    raw = timed("decode preds.json", load_json, paths["predictions"])
    predictions = timed("validate predictions", parse_predictions, raw, dataset, ground_truth)
    if dataset == "vcoco":
        return timed("evaluate", evaluate_vcoco, predictions, ground_truth), stages
    train = timed("read training annotations", load_annotations, paths["train_annotations"], dataset)
    correspondence = load_correspondence(paths["correspondence"])
    result = timed(
        "evaluate",
        evaluate_hico,
        predictions,
        ground_truth,
        correspondence=correspondence,
        train_counts=count_triplets(train),
    )
    return result, stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("hico", "vcoco"), default="hico")
    parser.add_argument("--images", type=int, help="test images (default: the real test split's size)")
    parser.add_argument("--train-images", type=int, help="HICO-DET training images (default: the real size)")
    parser.add_argument("--triplets", type=int, default=100, help="predicted triplets per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-dir", type=Path, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    train_images, images = SPLIT_SIZES[args.dataset]
    images = args.images if args.images is not None else images
    train_images = args.train_images if args.train_images is not None else train_images

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.write_dir or Path(scratch)
        started = time.perf_counter()
        paths = write_split(directory, args.dataset, images, train_images, args.triplets, args.seed)
        print(f"wrote synthetic {args.dataset} files to {directory} in {time.perf_counter() - started:.1f} s")
        result, stages = timed_evaluation(args.dataset, paths)
        seconds = sum(stages.values())
    print(format_table(result))
    print(", ".join(f"{name} {value:.2f} s" for name, value in stages.items()))
    print(f"load + evaluate: {seconds:.2f} s for {images} images x {args.triplets} triplets")
    print(json.dumps({"images": images, "seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
