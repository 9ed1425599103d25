"""Seconds per student training step with and without the teacher service, side by side in one run.

    python bench/train_overhead.py                 # demo-sized student, 24 images, 12 timed steps each
    python bench/train_overhead.py --steps 4 --images 8 --image-size 64    # a smoke run

Four ways, each on a fresh teacher process (cold caches) unless said:
  (a) ``none``      no teacher: the student alone;
  (b) ``sync``      online teacher asked inside the step, blocking (the paper's way);
  (c) ``prefetch``  online teacher, scores of the next batches requested in a background thread
                    while the current one trains (cold cache);
  (d) ``prewarmed`` ``student prewarm`` filled the cache first; the trainer reads Redis (or, with
                    no ``redis-server`` here, the teacher's in-process cache) with prefetch on.

The teacher runs as its own ``teacher_server serve`` process with ``OMP_NUM_THREADS`` =
``--teacher-threads`` (it plays the role of a separate GPU); the student uses ``--threads``.
The teacher model is the real BLIP when it is in the local Hugging Face cache, else a tiny random
one (its timings then understate the online modes). The first ``--warmup`` steps are not timed.
The last line is one JSON object with ``overhead_sync``, ``overhead_prefetch`` and
``overhead_prewarmed`` (each = seconds per step / seconds per step without a teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.config import load_config
from student.data.collate import collate_fn
from student.demo import DEMO_CONFIG, TeacherService, redis_process
from student.engine import SeededSamples, StepInfo, TrainingLoss, train_one_epoch
from student.prewarm import plan_items, prewarm
from student.teacher_prefetch import EndpointPool, PrefetchingLoader, ReadThroughBackend, TeacherPrefetcher
from student.teacher_scores import TeacherScores
from student.train_cli import build_loss, build_model, build_optimizer, build_train_dataset, correspondence_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic training images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="student torch threads")
    parser.add_argument("--teacher-threads", type=int, default=1, help="OMP_NUM_THREADS of the teacher process")
    parser.add_argument("--teacher-model", help="teacher model directory (default: resolved offline)")
    return parser.parse_args(argv)


def student_config(root: Path, args: argparse.Namespace) -> Any:
    size = args.image_size
    return load_config(
        DEMO_CONFIG,
        [
            f"data.root={root}",
            f"run.output_dir={root / 'run'}",
            f"data.scales=[{size}]",
            f"data.max_size={size * 2}",
            "data.crop=false",
            "data.num_workers=0",
            f"optim.batch_size={args.batch}",
            "teacher.source=local",  # the loss adds the ITM term (the backend is set per mode below)
        ],
    )


def time_steps(config: Any, dataset: Any, teacher: Any, prefetch: bool, args: argparse.Namespace) -> float:
    """Median seconds per step over ``args.steps`` steps after ``args.warmup``."""
    from torch.utils.data import DataLoader

    from student.engine import EpochSampler

    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"), say=lambda _: None)
    optimizer = build_optimizer(model, config)
    loss_fn: TrainingLoss = build_loss(config, teacher)
    sampler = EpochSampler(len(dataset), 0)
    loader: Any = DataLoader(SeededSamples(dataset), batch_size=args.batch, sampler=sampler, collate_fn=collate_fn)
    if prefetch:
        loader = PrefetchingLoader(loader, teacher, lead=2)
    seconds: list[float] = []

    def record(info: StepInfo) -> None:
        seconds.append(info.seconds)

    train_one_epoch(
        model,
        loss_fn,
        optimizer,
        loader,
        device=torch.device("cpu"),
        epoch=0,
        max_steps=args.warmup + args.steps,
        teacher=teacher,
        hooks=[record],
        progress=False,
    )
    return statistics.median(seconds[args.warmup :])


def scores_adapter(config: Any, backend: Any) -> TeacherScores:
    return TeacherScores(
        backend,
        verbs=build_train_dataset(config).verbs,
        correspondence=correspondence_of(config),
        image_root=config.data.path("train_images"),
        memo_entries=0,  # every step asks: what a first epoch (or a cache-less trainer) sees
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.teacher_threads)  # inherited by the teacher processes
    from student.data.synthetic import write_synthetic_dataset
    from teacher_server.demo import resolve_demo_model

    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    try:
        write_synthetic_dataset(work, args.images, 0, seed=0, image_size=args.image_size, progress=False)
        config = student_config(work, args)
        dataset = build_train_dataset(config)
        model = resolve_demo_model(args.teacher_model)
        print(model.note, file=sys.stderr)
        results: dict[str, float] = {}
        results["none"] = time_steps(config, dataset, None, False, args)
        for mode in ("sync", "prefetch"):
            with ExitStack() as stack:
                teacher = TeacherService(model.path, None)
                stack.callback(teacher.stop)
                scores = scores_adapter(config, ReadThroughBackend(EndpointPool(teacher.endpoint)))
                adapter: Any = scores if mode == "sync" else TeacherPrefetcher(scores, deadline_s=120)
                stack.callback(adapter.close)
                results[mode] = time_steps(config, dataset, adapter, mode == "prefetch", args)
        with redis_process(work) as redis_url, ExitStack() as stack:
            teacher = TeacherService(model.path, redis_url)
            stack.callback(teacher.stop)
            pool = EndpointPool(teacher.endpoint)
            warmed = prewarm(plan_items(config), pool, progress=False, say=lambda _: None)
            pool.close()
            cache = None
            if redis_url:
                from teacher_server.cache import open_score_cache

                cache = open_score_cache(redis_url)
            backend = ReadThroughBackend(EndpointPool(teacher.endpoint), cache)
            adapter = TeacherPrefetcher(scores_adapter(config, backend), deadline_s=120)
            stack.callback(adapter.close)
            results["prewarmed"] = time_steps(config, dataset, adapter, True, args)
        base = results["none"]
        for mode, value in results.items():
            print(f"{mode:>10}: {value:.3f} s/step ({value / base:.2f}x)")
        print(
            json.dumps(
                {
                    "seconds_per_step": {k: round(v, 4) for k, v in results.items()},
                    "overhead_sync": round(results["sync"] / base, 3),
                    "overhead_prefetch": round(results["prefetch"] / base, 3),
                    "overhead_prewarmed": round(results["prewarmed"] / base, 3),
                    "teacher": model.path if model.is_real else "tiny random BLIP",
                    "cache": "redis" if redis_url else "teacher in-process",
                    "prewarmed_sentences": warmed.sentences,
                    "steps": args.steps,
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
