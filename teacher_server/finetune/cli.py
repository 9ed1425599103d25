"""``python -m teacher_server finetune``: flags -> examples and settings -> ``finetune``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teacher_server.engine import DEFAULT_MODEL
from teacher_server.errors import TeacherError
from teacher_server.finetune.examples import examples_from_annotations, examples_from_jsonl
from teacher_server.finetune.settings import PRECISIONS, REGION_MODES, SCHEDULES, FinetuneSettings
from teacher_server.finetune.training import finetune
from teacher_server.hoi.annotations import BOX_POLICIES
from teacher_server.hoi.errors import DatasetError
from teacher_server.hoi.prompts import VARIANTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``finetune``; defaults suit BLIP-base on a GPU (see docs/teacher-quality.md)."""
    defaults = FinetuneSettings()
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotations", type=Path, help="HICO-DET / V-COCO annotation file (trainval_hico.json)")
    source.add_argument("--jsonl", type=Path, help='image-sentence pairs, one {"image", "sentence", "label"} per line')
    data.add_argument("--images", type=Path, required=True, help="directory the image paths are relative to")
    data.add_argument("--dataset", choices=["hico", "vcoco"], default="hico", help="annotation format (default hico)")
    data.add_argument(
        "--correspondence",
        type=Path,
        help="verb x object validity .npy (default: corre_<dataset>.npy beside --annotations; hico: built in)",
    )
    data.add_argument(
        "--box-policy",
        choices=BOX_POLICIES,
        default="clamp",
        help="--annotations: a box outside its image or inverted is an error, clamped into the image "
        "(dropped when that cannot mend it) or dropped, with its pairs (default clamp, as training)",
    )
    data.add_argument(
        "--prompt-variant",
        choices=list(VARIANTS),
        default=defaults.prompt_variant,
        help="sentence template: verb and object, verb only or object only (default full)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: hub id or save_pretrained directory (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (model, processor, finetune.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (start it when there is none)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default {defaults.epochs})")
    train.add_argument(
        "--batch-images",
        type=int,
        default=defaults.batch_images,
        help=f"images per step (default {defaults.batch_images})",
    )
    train.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"AdamW peak LR (default {defaults.lr}; tiny models: 3e-4)"
    )
    train.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help=f"(default {defaults.weight_decay})"
    )
    train.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help=f"(default {defaults.warmup_steps})"
    )
    train.add_argument(
        "--schedule", choices=SCHEDULES, default=defaults.schedule, help="after warm-up (default cosine)"
    )
    train.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help=f"max gradient norm, 0 = off (default {defaults.grad_clip})",
    )
    train.add_argument(
        "--same-object-negatives",
        type=int,
        default=defaults.same_object_negatives,
        help=f"(a) per positive: valid verbs of its object the image lacks (default {defaults.same_object_negatives})",
    )
    train.add_argument(
        "--seen-verb-negatives",
        type=int,
        default=defaults.seen_verb_negatives,
        help="(a') per positive: verbs of its object that other images of the file have and this one lacks "
        f"(default {defaults.seen_verb_negatives})",
    )
    train.add_argument(
        "--other-object-negatives",
        type=int,
        default=defaults.other_object_negatives,
        help=f"(b) per positive: sentences about objects not in the image (default {defaults.other_object_negatives})",
    )
    train.add_argument(
        "--swap-negatives",
        type=int,
        default=defaults.swap_negatives,
        help=f"(c) per positive: other images' positives from the batch (default {defaults.swap_negatives})",
    )
    train.add_argument(
        "--other-pair-negatives",
        type=int,
        default=defaults.other_pair_negatives,
        help="(d) --region crop|mask, per pair: verbs another pair of the image has with the same object class "
        f"and this pair lacks (default {defaults.other_pair_negatives})",
    )
    train.add_argument(
        "--region",
        choices=REGION_MODES,
        default=defaults.region,
        help="--annotations: train on whole images (the default), or one example per annotated pair, its region "
        "rendered as the engine renders it: the crop of the union box, or the image with the rest dimmed (mask)",
    )
    train.add_argument(
        "--region-margin",
        type=float,
        default=defaults.region_margin,
        help=f"crop: grow the union box by this share per side, as serve --region-margin (default "
        f"{defaults.region_margin})",
    )
    train.add_argument(
        "--region-dim",
        type=float,
        default=defaults.region_dim,
        help=f"mask: blend the rest towards grey, as serve --region-dim (default {defaults.region_dim})",
    )
    train.add_argument(
        "--itm-start-token",
        choices=["cls", "enc"],
        default=defaults.itm_start_token,
        help="token that starts the ITM text, as the engine will score it (default cls)",
    )
    train.add_argument(
        "--seed", type=int, default=defaults.seed, help="same seed + same data = same weights (default 0)"
    )
    run_group = parser.add_argument_group("execution")
    run_group.add_argument(
        "--device", default=defaults.device, help="auto (CUDA when present, the default), cpu, cuda, cuda:N"
    )
    run_group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto: bf16 (else fp16) autocast on CUDA, fp32 on CPU",
    )
    run_group.add_argument("--threads", type=int, default=defaults.num_threads, help="torch CPU threads, 0 = default")
    run_group.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help=f"steps between checkpoints, 0 = epoch ends only (default {defaults.checkpoint_every})",
    )
    run_group.add_argument("--max-steps", type=int, help="stop after this many steps in total; --resume continues")
    run_group.add_argument(
        "--image-cache-mb",
        type=float,
        default=defaults.image_cache_mb,
        help="decoded images kept in memory (default 4096)",
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """Map the flags onto ``FinetuneSettings`` (which validates them)."""
    return FinetuneSettings(
        epochs=args.epochs,
        batch_images=args.batch_images,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        grad_clip=args.grad_clip,
        same_object_negatives=args.same_object_negatives,
        seen_verb_negatives=args.seen_verb_negatives,
        other_object_negatives=args.other_object_negatives,
        swap_negatives=args.swap_negatives,
        other_pair_negatives=args.other_pair_negatives,
        region=args.region,
        region_margin=args.region_margin,
        region_dim=args.region_dim,
        prompt_variant=args.prompt_variant,
        itm_start_token=args.itm_start_token,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        num_threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps,
        image_cache_mb=args.image_cache_mb,
    )


def run(args: argparse.Namespace) -> int:
    """``finetune``: build the examples, train, print where the model went; 2 on bad input."""
    try:
        settings = settings_from_args(args)
        if args.jsonl is not None:
            if settings.region != "image":
                print(
                    f"finetune: --region {settings.region} needs --annotations (JSONL rows name no boxes)",
                    file=sys.stderr,
                )
                return 2
            examples = examples_from_jsonl(args.jsonl, args.images)
        else:
            examples = examples_from_annotations(
                args.annotations,
                args.images,
                dataset=args.dataset,
                correspondence=args.correspondence,
                prompt_variant=args.prompt_variant,
                box_policy=args.box_policy,
                regions=settings.region != "image",
            )
        finetune(
            args.model, args.out, examples, settings, resume=args.resume, progress=False if args.no_progress else None
        )
    except (TeacherError, DatasetError) as error:
        print(f"finetune: {error}", file=sys.stderr)
        return 2
    return 0
