"""Seconds per student training step with and without the teacher service, side by side in one run.

    python bench/train_overhead.py                     # the paper's student at 512 px, BLIP-base-shaped teacher
    python bench/train_overhead.py --student demo      # demo.yaml's CPU-sized student at 128 px
    python bench/train_overhead.py --student demo --teacher-size tiny --steps 4 --images 8 --image-size 64  # smoke

Four ways, each on a fresh teacher process (cold caches) unless said:
  (a) ``none``      no teacher: the student alone;
  (b) ``sync``      online teacher asked inside the step, blocking (the paper's way);
  (c) ``prefetch``  online teacher, scores of the next batches requested in a background thread
                    while the current one trains (cold cache);
  (d) ``prewarmed`` ``student prewarm`` filled the cache first; the trainer reads Redis (or, with
                    no ``redis-server`` here, the teacher's in-process cache) with prefetch on.

A step's time is the wall clock from the end of one optimiser step to the end of the next: it
includes loading the batch and any wait for the teacher, so it is what an epoch costs. The
trainer's in-process memo is off (every step asks for its scores, as a first epoch does). The
cheap modes, (a) and (d), run ``--reps`` times, alternating, and their medians are taken over all
their steps (this machine is shared; alternating spreads its noise over both).

The teacher runs as its own ``teacher_server serve`` process with ``OMP_NUM_THREADS`` =
``--teacher-threads`` (it plays the role of a separate GPU); the student uses ``--threads``.
The teacher is the real BLIP when it is in the local Hugging Face cache, else random weights in
BLIP-base shapes (``--teacher-size base``, the default: the real model's cost) or the tiny test
model (``tiny``: its timings understate the online modes). The first ``--warmup`` steps of each
run are not timed. The last line is one JSON object with ``overhead_sync``,
``overhead_prefetch`` and ``overhead_prewarmed`` (each = seconds per step / seconds per step
without a teacher).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.builders import build_loss, build_model, build_optimizer, build_train_dataset, correspondence_of
from student.config import load_config
from student.data.collate import collate_fn
from student.demo import DEMO_CONFIG, TeacherService, redis_process
from student.engine import SeededSamples, StepInfo, train_one_epoch
from student.losses import TrainingLoss
from student.teacher import EndpointPool, PrefetchingLoader, ReadThroughBackend, TeacherPrefetcher, TeacherScores
from student.teacher.prewarm import PREWARM_TIMEOUT_S, plan_items, prewarm

HICO_CONFIG = Path(__file__).resolve().parents[1] / "student" / "configs" / "hico.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--student",
        choices=("paper", "demo"),
        default="paper",
        help="paper: ResNet-50, 6 + 6 layers, three-branch, 64 queries at 512 px (hico.yaml, random init); "
        "demo: demo.yaml's CPU-sized student at 128 px",
    )
    parser.add_argument(
        "--images", type=int, default=24, help="synthetic training images (raised to batch x (warmup + steps))"
    )
    parser.add_argument("--image-size", type=int, help="synthetic image height (default: 512 paper, 128 demo)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (and per rep)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="student torch threads")
    parser.add_argument("--teacher-threads", type=int, default=1, help="OMP_NUM_THREADS of the teacher process")
    parser.add_argument("--reps", type=int, default=2, help="alternating runs of the none and prewarmed modes")
    parser.add_argument(
        "--teacher-size",
        choices=("base", "tiny"),
        default="base",
        help="random teacher when the real one is not cached: BLIP-base shapes or the tiny test model",
    )
    parser.add_argument("--teacher-model", help="teacher model directory (default: the real one if cached)")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 512 if args.student == "paper" else 128
    # One epoch must hold every step of a run (warm-up included).
    args.images = max(args.images, args.batch * (args.warmup + args.steps))
    return args


def student_config(root: Path, args: argparse.Namespace) -> Any:
    size = args.image_size
    recipe = HICO_CONFIG if args.student == "paper" else DEMO_CONFIG
    return load_config(
        recipe,
        [
            # Random init (no weight file here), the synthetic data's layout.
            *(["pretrained=null", "data.train_images=images/train"] if args.student == "paper" else []),
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


def time_steps(config: Any, dataset: Any, teacher: Any, prefetch: bool, args: argparse.Namespace) -> list[float]:
    """Wall-clock seconds of each of ``args.steps`` steps after ``args.warmup`` (data and teacher waits included)."""
    from torch.utils.data import DataLoader

    from student.engine import EpochSampler

    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"))
    optimizer = build_optimizer(model, config)
    loss_fn: TrainingLoss = build_loss(config, teacher)
    sampler = EpochSampler(len(dataset), 0)
    loader: Any = DataLoader(SeededSamples(dataset), batch_size=args.batch, sampler=sampler, collate_fn=collate_fn)
    if prefetch:
        loader = PrefetchingLoader(loader, teacher, lead=2)
    ends = [time.perf_counter()]

    def record(_: StepInfo) -> None:
        ends.append(time.perf_counter())

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
    seconds = [b - a for a, b in itertools.pairwise(ends)]
    return seconds[args.warmup :]


def scores_adapter(config: Any, backend: Any) -> TeacherScores:
    return TeacherScores(
        backend,
        verbs=build_train_dataset(config).verbs,
        correspondence=correspondence_of(config),
        image_root=config.data.path("train_images"),
        memo_entries=0,  # every step asks: what a first epoch (or a cache-less trainer) sees
    )


def teacher_model(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(model directory, its description): the real teacher when cached, else random weights."""
    from teacher_server.demo import resolve_demo_model
    from teacher_server.tiny_model import make_model_of_size

    if args.teacher_model:
        return args.teacher_model, args.teacher_model
    resolved = resolve_demo_model()
    if resolved.is_real:
        return resolved.path, resolved.path
    if args.teacher_size == "tiny":
        return resolved.path, "tiny random BLIP"
    return str(make_model_of_size("base", work / "blip-base-random")), "BLIP-base shapes, random weights"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.teacher_threads)  # inherited by the teacher processes
    from student.data.synthetic import write_synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    try:
        write_synthetic_dataset(work, args.images, 0, seed=0, image_size=args.image_size, progress=False)
        config = student_config(work, args)
        dataset = build_train_dataset(config)
        model_dir, model_name = teacher_model(args, work)
        print(f"teacher: {model_name}", file=sys.stderr)
        steps: dict[str, list[float]] = {"none": [], "sync": [], "prefetch": [], "prewarmed": []}
        for mode in ("sync", "prefetch"):  # cold: a fresh teacher process each
            with ExitStack() as stack:
                teacher = TeacherService(model_dir, None)
                stack.callback(teacher.stop)
                scores = scores_adapter(config, ReadThroughBackend(EndpointPool(teacher.endpoint)))
                adapter: Any = scores if mode == "sync" else TeacherPrefetcher(scores, deadline_s=600)
                stack.callback(adapter.close)
                steps[mode] = time_steps(config, dataset, adapter, mode == "prefetch", args)
                print(f"{mode:>10}: {statistics.median(steps[mode]):.3f} s/step", file=sys.stderr)
        with redis_process(work) as redis_url, ExitStack() as stack:
            teacher = TeacherService(model_dir, redis_url)
            stack.callback(teacher.stop)
            pool = EndpointPool(teacher.endpoint, timeout_s=PREWARM_TIMEOUT_S)
            warmed = prewarm(plan_items(config), pool, progress=False)
            pool.close()
            if warmed.failed_images:  # then (d) would measure online misses, not a prewarmed cache
                raise SystemExit(f"prewarm left {warmed.failed_images} images unscored: {warmed.describe()}")
            cache = None
            if redis_url:
                from teacher_server.cache import open_score_cache

                cache = open_score_cache(redis_url)
            backend = ReadThroughBackend(EndpointPool(teacher.endpoint), cache)
            adapter = TeacherPrefetcher(scores_adapter(config, backend), deadline_s=600)
            stack.callback(adapter.close)
            for _ in range(args.reps):  # alternating, so that the machine's noise hits both alike
                steps["none"] += time_steps(config, dataset, None, False, args)
                steps["prewarmed"] += time_steps(config, dataset, adapter, True, args)
            read_from_cache = backend.cache_hits
        results = {mode: statistics.median(values) for mode, values in steps.items()}
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
                    "student": args.student,
                    "teacher": model_name,
                    "cache": "redis" if redis_url else "teacher in-process",
                    "prewarmed_sentences": warmed.sentences,
                    "prewarmed_scores_read_from_redis": read_from_cache,
                    "timed_steps": {k: len(v) for k, v in steps.items()},
                    "load_average_1min": round(os.getloadavg()[0], 2),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
