"""Seconds per training step of the student at the paper's size (measured, random weights).

    python bench/student_step.py                        # ResNet-50, 6 + 6 layers, 256 wide, 64 queries,
                                                        # three-branch, 512 px, batch 2, 2 threads
    python bench/student_step.py --decoder single       # the QPIC-style decoder instead
    python bench/student_step.py --compare-single       # both decoders, interleaved, with their ratio
    python bench/student_step.py --tiny --steps 2       # the test-sized model, for a smoke run

A step is the trainer's own: forward, Hungarian matching and the HOI losses of every decoder
layer (``TrainingLoss``, the recipe's weights) on 3 random ground-truth pairs per image, backward,
gradient clipping at 0.1 and fused AdamW (lr 1e-4, CNN 1e-5; the backbone trains
``layer2``-``layer4`` as in the recipe). The distillation term is left out: its cost is the
teacher's, which ``bench/train_overhead.py`` measures. The first ``--warmup`` steps are not
timed. The last line printed is one JSON object:
``{"seconds_per_step": ..., "decoder": ..., ...}`` (with ``--compare-single`` also
``single_seconds_per_step`` and ``ratio_vs_single``). The machine's 1-minute load average is
printed with it: on a shared machine, a load above the thread count inflates every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.engine import backward_and_update, outputs_to_float
from student.losses import DistillSettings, HOICriterion, TrainingLoss
from student.model import DecoderConfig, HOIDetector, StudentModelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", choices=("single", "three-branch"), default="three-branch")
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config instead of the paper's")
    parser.add_argument(
        "--compare-single",
        action="store_true",
        help="also time the single decoder, interleaved step by step, and report the ratio",
    )
    return parser.parse_args(argv)


def random_targets(batch: int, pairs: int, num_verbs: int, generator: torch.Generator) -> list[dict]:
    """``pairs`` ground-truth pairs per image: cxcywh boxes inside the image, a class, 1-2 verbs."""

    def boxes() -> torch.Tensor:
        centre = 0.3 + 0.4 * torch.rand(pairs, 2, generator=generator)
        size = 0.1 + 0.3 * torch.rand(pairs, 2, generator=generator)
        return torch.cat([centre, size], dim=1)

    targets = []
    for _ in range(batch):
        verbs = torch.zeros(pairs, num_verbs)
        verbs[torch.arange(pairs), torch.randint(num_verbs, (pairs,), generator=generator)] = 1
        verbs[0, torch.randint(num_verbs, (1,), generator=generator)] = 1
        labels = torch.randint(80, (pairs,), generator=generator)
        targets.append({"obj_labels": labels, "verb_labels": verbs, "sub_boxes": boxes(), "obj_boxes": boxes()})
    return targets


class TrainingStep:
    """One model with its loss and AdamW, stepping on a fixed batch."""

    def __init__(self, model: HOIDetector, num_verbs: int) -> None:
        self.model = model
        self.loss = TrainingLoss(HOICriterion(num_verbs=num_verbs), DistillSettings())
        self.optimizer = torch.optim.AdamW(
            model.parameter_groups(1e-4, 1e-5, 1e-4), lr=1e-4, weight_decay=1e-4, fused=True
        )

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, targets: list[dict]) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
        outputs = self.model(images, masks)
        result = self.loss(outputs_to_float(outputs), targets)
        backward_and_update(result.total, self.model, self.optimizer, clip_max_norm=0.1)
        return time.perf_counter() - start


def build(decoder: str, args: argparse.Namespace) -> HOIDetector:
    torch.manual_seed(0)
    if args.tiny:
        config = StudentModelConfig.tiny(kind=decoder, num_queries=args.queries)
    else:
        config = StudentModelConfig(decoder=DecoderConfig(kind=decoder, num_queries=args.queries))
    model = HOIDetector(config).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model {decoder}: {total / 1e6:.1f} M parameters ({trainable / 1e6:.1f} M trainable)", flush=True)
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    decoders = [args.decoder]
    if args.compare_single and args.decoder != "single":
        decoders.append("single")
    models = {decoder: build(decoder, args) for decoder in decoders}
    num_verbs = next(iter(models.values())).config.num_verbs
    steps = {decoder: TrainingStep(model, num_verbs) for decoder, model in models.items()}
    targets = random_targets(args.batch, min(3, args.queries), num_verbs, torch.Generator().manual_seed(0))
    images = torch.randn(args.batch, 3, args.size, args.size)
    masks = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    # A realistic batch is padded: the second image is 3/4 as wide as the first.
    masks[1:, :, (3 * args.size) // 4 :] = True
    images[masks[:, None].expand_as(images)] = 0.0
    for index in range(args.warmup):
        for decoder in models:
            print(f"warm-up step {index + 1} {decoder}: {steps[decoder](images, masks, targets):.2f} s", flush=True)
    # Models alternate step by step, so a change in the machine's load hits both alike.
    times: dict[str, list[float]] = {decoder: [] for decoder in models}
    for index in range(args.steps):
        for decoder in models:
            times[decoder].append(steps[decoder](images, masks, targets))
            print(f"step {index + 1} {decoder}: {times[decoder][-1]:.2f} s", flush=True)
    main_times = times[args.decoder]
    result = {
        "seconds_per_step": round(statistics.median(main_times), 3),
        "decoder": args.decoder,
        "min_s": round(min(main_times), 3),
        "max_s": round(max(main_times), 3),
        "size": args.size,
        "batch": args.batch,
        "queries": args.queries,
        "threads": args.threads,
        "steps": args.steps,
        "tiny": args.tiny,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if "single" in times and args.decoder != "single":
        single = statistics.median(times["single"])
        result["single_seconds_per_step"] = round(single, 3)
        result["ratio_vs_single"] = round(statistics.median(main_times) / single, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
