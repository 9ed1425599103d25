"""``python -m student make-synthetic``: write the synthetic HOI dataset (HICO-DET format)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``make-synthetic``."""
    parser.add_argument("--out", required=True, help="output directory (images/ and annotations/ are created)")
    parser.add_argument("--train", type=int, default=1000, help="number of training images (default 1000)")
    parser.add_argument("--test", type=int, default=300, help="number of test images (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="image height in pixels; widths vary up to 1.25x (default 128)",
    )
    parser.add_argument("--max-people", type=int, default=2, help="at most this many people per image (default 2)")
    parser.add_argument("--val", type=int, default=0, help="validation images, fully labelled, for tuning (default 0)")
    parser.add_argument(
        "--corpus",
        type=int,
        default=0,
        help="teacher-corpus images: balanced interactions, fully labelled, for the teacher's fine-tuning only "
        "(default 0)",
    )
    parser.add_argument("--corpus-seed", type=int, help="seed of the teacher corpus (default: --seed)")
    parser.add_argument(
        "--drop-cooccurring",
        type=float,
        default=0.0,
        metavar="RATE",
        help="training split: leave out co-occurring second verbs (sit_on / straddle beside ride, hold beside "
        "fly / drink_with) at this rate, as HICO-DET's missing labels (default 0)",
    )
    parser.add_argument(
        "--verb-label-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="training split: keep verb labels on this fraction of the pairs; the rest become "
        "pairs_without_verbs (default 1)",
    )
    parser.add_argument(
        "--two-person-rate",
        type=float,
        default=0.0,
        metavar="RATE",
        help="every split: draw this fraction of the images as ambiguous scenes, two people doing different "
        "things with two objects of one class, side by side (even with --max-people 1); synthetic.json lists "
        "them under two_person_images (default 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print a summary; returns the exit code."""
    from student.data.synthetic import write_synthetic_dataset

    try:
        summary = write_synthetic_dataset(
            args.out,
            args.train,
            args.test,
            seed=args.seed,
            image_size=args.image_size,
            max_people=args.max_people,
            progress=False if args.no_progress else None,
            val=args.val,
            corpus=args.corpus,
            corpus_seed=args.corpus_seed,
            drop_cooccurring=args.drop_cooccurring,
            verb_label_fraction=args.verb_label_fraction,
            two_person_rate=args.two_person_rate,
        )
    except ValueError as error:  # a size or a rate out of range, named by the message
        print(f"make-synthetic: {error}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0
