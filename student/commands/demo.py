"""``python -m student demo``: the main job end to end, on a CPU, in minutes, as the real topology.

    python -m student demo [--train 400 --test 100 --epochs 4] [--ranks 1 --teacher local]

The steps (synthetic data, the teacher, the untrained student, training on ``torchrun`` ranks
with prewarm and the teacher as its own service, the table, the pictures) are described in
``student.demo``, which holds them; this module turns the flags into them. The line before the
last names the picture files; the last line on stdout is one JSON object:
``{"map_trained", "map_untrained", "seconds", "teacher", "teacher_auc", "pictures"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from student.builders import build_initial_model, build_train_dataset, resolve_device, seed_everything
from student.commands.common import USER_ERRORS, report_error
from student.config import ConfigError, load_config
from student.data.synthetic import SUMMARY_FILE
from student.demo import (
    DEMO_CONFIG,
    DEMO_DROP_COOCCURRING,
    DEMO_MAX_PEOPLE,
    DEMO_RANKS,
    draw_pictures,
    dropped_table,
    prepare_data,
    prepare_teacher,
    result_table,
    run_topology,
)
from student.inference import evaluate_model
from student.training import train
from teacher_server.logs import show_progress

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``demo``: sizes to trade time for accuracy, plus config overrides."""
    parser.add_argument("--work-dir", type=Path, default=Path("runs/demo"), help="where data and the run go")
    parser.add_argument("--train", type=int, default=1000, help="synthetic training images (default 1000)")
    parser.add_argument("--test", type=int, default=300, help="synthetic test images (default 300)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: demo.yaml's)")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic image height in px (default 128)")
    parser.add_argument(
        "--max-people",
        type=int,
        default=DEMO_MAX_PEOPLE,
        help=f"at most this many people (and HOI pairs) per synthetic image (default {DEMO_MAX_PEOPLE})",
    )
    parser.add_argument(
        "--corpus",
        type=int,
        default=1000,
        help="teacher-corpus images the tiny teacher learns from (default 1000)",
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=10, help="fine-tuning epochs of the tiny teacher (default 10)"
    )
    parser.add_argument(
        "--drop-cooccurring",
        type=float,
        default=DEMO_DROP_COOCCURRING,
        metavar="RATE",
        help=f"training labels: co-occurring second verbs left out at this rate (default {DEMO_DROP_COOCCURRING})",
    )
    parser.add_argument(
        "--verb-label-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="training labels: verbs kept on this fraction of the pairs (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the teacher and the run (default 0)")
    parser.add_argument(
        "--teacher",
        default="serve",
        help="serve (start a teacher_server process; default) | grpc://host:port (a running service) | "
        "local (in-process engine, one rank) | none (no distillation)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        default=DEMO_RANKS,
        help=f"torchrun processes of the student, sharing demo.yaml's global batch (default {DEMO_RANKS})",
    )
    parser.add_argument("--teacher-model", help="teacher model directory or hub id (default: resolved offline)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="student config (default: demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-3")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (there are none when stderr is not a terminal)"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student demo``."""
    started = time.perf_counter()
    # Bars only for a person watching: a log file or CI output gets the lines, not every redraw.
    progress = show_progress(False if args.no_progress else None)
    work_dir = args.work_dir
    data_root = work_dir / "data"
    run_dir = work_dir / "train"
    service = args.teacher == "serve"
    source = "local" if service else args.teacher
    overrides = [
        f"data.root={data_root}",
        f"run.output_dir={run_dir}",
        f"run.seed={args.seed}",
        f"teacher.source={source}",
        f"run.progress={'true' if progress else 'false'}",
    ]
    if args.epochs is not None:
        overrides.append(f"schedule.epochs={args.epochs}")
    overrides += list(args.overrides or [])
    try:
        config = load_config(args.config, overrides)
        if args.ranks < 1 or config.optim.batch_size % args.ranks:
            raise ConfigError(
                f"--ranks {args.ranks}: must be >= 1 and divide optim.batch_size={config.optim.batch_size}"
            )
        teaches = config.teacher.source == "local" and not args.teacher_model
        try:
            described = prepare_data(
                data_root,
                train=args.train,
                test=args.test,
                image_size=args.image_size,
                seed=args.seed,
                max_people=args.max_people,
                corpus=args.corpus if teaches else 0,
                drop_cooccurring=args.drop_cooccurring,
                verb_label_fraction=args.verb_label_fraction,
                progress=progress,
            )
        except ValueError as error:  # sizes and rates out of range
            raise ConfigError(str(error)) from None
        log.info(described)
        teacher_model, teacher_name, teacher_auc = None, "none", None
        if config.teacher.source == "local":
            teacher_model, teacher_name, teacher_auc = prepare_teacher(args, data_root, progress)
        elif config.teacher.enabled:
            teacher_name = config.teacher.source
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)

        device = resolve_device(config.run.device)
        seed_everything(config.run.seed)  # the same initialisation train() starts from
        untrained = build_initial_model(config, device, build_train_dataset(config))
        _, before = evaluate_model(untrained, config, device, progress=progress)
        assert before is not None  # one process: always scored
        log.info("untrained student: mAP %.2f", before.headline)
        del untrained

        log.info(
            "training %d epochs (%s, %s decoder, d_model %d, ResNet-%d) on %d rank(s) ...",
            config.schedule.epochs,
            config.data.dataset,
            config.model.decoder.kind,
            config.model.transformer.d_model,
            config.model.backbone.depth,
            args.ranks,
        )
        if service or config.teacher.is_service or args.ranks > 1:
            scored_line, after = run_topology(args, config, overrides, teacher_model, service, progress)
        else:
            result = train(config, teacher_model=teacher_model)
            assert result.evaluation is not None  # demo.yaml evaluates at the end
            after = result.evaluation
            scored_line = (
                f"scored {result.teacher_stats.get('pairs_scored', 0)} (image, sentence) pairs, "
                f"{result.teacher_stats.get('failed_batches', 0)} failed batches"
            )
        pictures = draw_pictures(config)
    except USER_ERRORS as error:
        return report_error("demo", error)
    seconds = time.perf_counter() - started
    distill = f"{config.distill.variant} distillation" if config.teacher.enabled else "no distillation"
    print()
    rows = [("untrained", before), (f"trained ({distill})", after)]
    print(result_table(rows))
    dropped = json.loads((data_root / SUMMARY_FILE).read_text()).get("dropped_triplets", [])
    if dropped and config.data.dataset == "hico":
        print(dropped_table(dropped, rows))
    print(f"teacher: {teacher_name}; {scored_line}")
    print(f"run directory: {run_dir} (checkpoint.pth, preds.json, train_log.csv); total {seconds:.1f} s")
    print(f"pictures: {', '.join(str(path) for path in pictures)}")
    print(
        json.dumps(
            {
                "map_trained": round(after.headline, 2),
                "map_untrained": round(before.headline, 2),
                "seconds": round(seconds, 1),
                "teacher": teacher_name,
                "teacher_auc": round(teacher_auc, 3) if teacher_auc is not None else None,
                "pictures": [str(path) for path in pictures],
            }
        )
    )
    return 0
