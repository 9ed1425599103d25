"""``python -m student train``: train a student from a config file plus overrides.

    python -m student train --config student/configs/hico.yaml optim.lr=2e-4 schedule.epochs=90 \\
        --teacher grpc://teacher:50051 --output-dir runs/hico
    python -m student train --config student/configs/hico.yaml --resume          # continue runs/hico

The run directory gets ``config.yaml`` (the resolved config), ``train_log.csv`` (loss terms
every ``run.log_every`` steps), ``epochs.csv`` (one row per epoch), ``checkpoint.pth`` (written
atomically after every epoch, and when ``schedule.max_steps`` stops a run) and, after the final
evaluation, ``preds.json`` and ``metrics.json``. This module also holds the builders (datasets,
loaders, model, optimiser, loss, teacher) that ``evaluate`` and ``demo`` reuse.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from student.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainingPosition,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_training,
    save_checkpoint,
)
from student.config import ConfigError, TrainConfig, load_config
from student.distributed import (
    DistributedContext,
    DistributedEpochSampler,
    DistributedError,
    gather_entries,
    gather_objects,
    init_distributed,
    main_only,
    on_main,
    reduce_means,
    reduce_sums,
    shard_positions,
    shutdown,
    wrap_model,
)
from student.engine import (
    AmpSettings,
    CsvLog,
    EpochResult,
    EpochSampler,
    EvalResult,
    EvalSettings,
    SeededSamples,
    StepHook,
    TrainingError,
    fill_missing_entries,
    predict,
    score_predictions,
    train_one_epoch,
)
from student.evaluation import save_predictions
from student.losses import GROUND_TRUTH_VARIANTS, HOICriterion, LossError, TrainingLoss
from student.model import HOIDetector, ModelError, load_detr_checkpoint
from student.teacher import PrefetchingLoader, TeacherPrefetcher, TeacherScores
from teacher_server.errors import TeacherError
from teacher_server.hoi.classes import NO_INTERACTION_INDEX
from teacher_server.hoi.errors import DatasetError
from teacher_server.precision import Capability, PrecisionError, choose_dtype, device_capability

# The errors a user can cause with a config, data or checkpoint: reported in one line, exit 2.
USER_ERRORS = (
    ConfigError,
    DatasetError,
    CheckpointError,
    TeacherError,
    ModelError,
    LossError,
    TrainingError,
    DistributedError,
)
Say = Callable[[str], None]


# -- builders ----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (``cpu``, ``cuda:1``).

    A CUDA device always carries its index (``cuda`` -> the current device, ``cuda:0`` unless
    changed), so the capability check and the logs name one device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {name!r} requested but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Under DDP each rank passes ``seed + rank``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def correspondence_of(config: TrainConfig) -> np.ndarray:
    """The (V, 80) verb x object validity matrix of the dataset."""
    from teacher_server.hoi.annotations import load_correspondence

    return load_correspondence(config.data.path("correspondence"), config.data.dataset)


def build_train_dataset(config: TrainConfig) -> Any:
    """The training split with DETR-style augmentation; images without any HOI are left out."""
    from student.data.hoi_dataset import HOIDataset
    from student.data.transforms import make_transforms

    data = config.data
    transforms = make_transforms("train", data.scales, data.max_size, crop=data.crop, color_jitter=data.color_jitter)
    return HOIDataset(
        data.path("train_images"),
        data.path("train_annotations"),
        data.dataset,
        transforms,
        max_pairs=data.max_pairs or config.model.decoder.num_queries,
        skip_empty=True,
        box_policy=data.box_policy,
    )


def build_test_dataset(config: TrainConfig) -> Any:
    """The test split, every image in annotation order, resized to the test scale."""
    from student.data.hoi_dataset import HOIDataset
    from student.data.transforms import make_transforms

    data = config.data
    scale = data.test_scale or max(data.scales)
    return HOIDataset(
        data.path("test_images"),
        data.path("test_annotations"),
        data.dataset,
        make_transforms("test", [scale], data.max_size),
        on_truncate="ignore",  # evaluation reads the annotation file itself, not these targets
        # Nor are its boxes scored from here: the evaluator reads the ground truth as the protocol
        # does (as written), so one odd box must not stop the test images from being predicted.
        box_policy=data.box_policy,
    )


def build_train_loader(
    dataset: Any, config: TrainConfig, context: DistributedContext | None = None
) -> tuple[DataLoader, EpochSampler]:
    """Loader whose order and augmentation depend on (seed, epoch, position) only (see ``engine``).

    Under torchrun each rank reads its shard of that order (``DistributedEpochSampler``);
    ``optim.batch_size`` is per process, so the global batch is ``batch_size * world_size``.
    """
    from student.data.collate import collate_fn

    if context is not None and context.is_distributed:
        sampler: EpochSampler = DistributedEpochSampler(len(dataset), config.run.seed, context.rank, context.world_size)
    else:
        sampler = EpochSampler(len(dataset), config.run.seed)
    device = context.device if context is not None else torch.device("cpu")
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=config.optim.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=config.data.num_workers,
        # A private generator: creating the iterator must not draw from torch's global RNG.
        generator=torch.Generator(),
        persistent_workers=False,
        pin_memory=device.type == "cuda",  # else a non_blocking copy to the GPU is synchronous
    )
    return loader, sampler


def build_test_loader(dataset: Any, config: TrainConfig, device: torch.device | None = None) -> DataLoader:
    """Test images in order, ``eval.batch_size`` at a time; pinned host memory for a CUDA ``device``."""
    from student.data.collate import collate_fn

    return DataLoader(
        dataset,
        batch_size=config.eval.batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=config.data.num_workers,
        generator=torch.Generator(),
        pin_memory=device is not None and device.type == "cuda",
    )


def configure_cuda_math(device: torch.device, *, tf32: bool) -> None:
    """On a CUDA ``device``: allow (or not) TF32 for fp32 matrix products and convolutions.

    TF32 runs fp32 products on the tensor cores (Ampere and later) with a 10-bit mantissa: the
    fp32 parts of training (losses, heads, anything autocast leaves in fp32) get several times
    faster at a precision far beyond what SGD notices. Nothing changes off CUDA.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def build_model(config: TrainConfig, device: torch.device, say: Say = print) -> HOIDetector:
    """The detector of ``config.model``, initialised from ``config.pretrained`` (DETR COCO) if set."""
    model = HOIDetector(config.model)
    if config.pretrained:
        report = load_detr_checkpoint(model, config.pretrained)
        say(report.summary())
    return model.to(device)


def build_initial_model(config: TrainConfig, device: torch.device, train_set: Any, say: Say = print) -> HOIDetector:
    """The model training starts from: ``build_model``, then the batch-norm calibration if configured.

    Call after ``seed_everything(config.run.seed)`` to get the run's exact initialisation.
    """
    model = build_model(config, device, say)
    if config.calibrate_bn_images:
        images, masks = calibration_batch(train_set, config)
        layers = calibrate_frozen_batchnorm(model, images.to(device), masks.to(device))
        say(f"calibrated {layers} frozen batch-norm layers of the from-scratch CNN on {len(images)} images")
    return model


@torch.no_grad()
def calibrate_frozen_batchnorm(model: HOIDetector, images: torch.Tensor, masks: torch.Tensor) -> int:
    """Data-dependent init of a from-scratch CNN: each frozen batch norm normalises its input on ``images``.

    With identity statistics a random ResNet is a ResNet without normalisation: activations grow
    block by block and the CNN trains slowly. Here every ``FrozenBatchNorm2d``, in forward
    order, gets ``running_mean`` / ``running_var`` of its own input over ``images`` (B, 3, H, W),
    so each one outputs zero-mean, unit-variance channels as a batch norm does at initialisation;
    afterwards the statistics stay frozen, as in DETR. Returns the number of layers calibrated.
    """
    from student.model.backbone import FrozenBatchNorm2d

    def set_statistics(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    layers = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [layer.register_forward_pre_hook(set_statistics) for layer in layers]
    try:
        model.backbone(images, masks)
    finally:
        for handle in handles:
            handle.remove()
    return len(layers)


def calibration_batch(train_set: Any, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``config.calibrate_bn_images`` augmented training images, chosen and augmented from the seed only."""
    from student.data.collate import collate_fn

    count = min(config.calibrate_bn_images, len(train_set))
    rng = np.random.default_rng([config.run.seed, 0xCA1])
    indices = rng.permutation(len(train_set))[:count]
    seeds = rng.integers(0, 2**62, size=count)
    samples = SeededSamples(train_set)
    images, masks, _ = collate_fn([samples[(int(i), int(seed))] for i, seed in zip(indices, seeds, strict=True)])
    return images, masks


def build_optimizer(model: HOIDetector, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: the trainable backbone at ``optim.backbone_lr``, everything else at ``optim.lr``."""
    optim = config.optim
    devices = {p.device.type for p in model.parameters()}
    return torch.optim.AdamW(
        model.parameter_groups(optim.lr, optim.backbone_lr, optim.weight_decay),
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        # One fused kernel instead of a loop over ~100 tensors: a third of the time on CPU.
        fused=devices <= {"cpu", "cuda"},
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """Step drop: lr *= lr_gamma after each epoch listed in ``schedule.lr_drop``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, config.schedule.lr_drop, config.schedule.lr_gamma)


def amp_settings(config: TrainConfig, device: torch.device, *, capability: Capability | None = None) -> AmpSettings:
    """Autocast on CUDA only, in ``optim.amp_dtype`` for ``device``'s compute ``capability``.

    ``auto``: bf16 from capability 8.0 (bf16 tensor cores), else fp16 with a gradient scaler;
    ``bf16`` below 8.0 is a ``ConfigError``. ``capability`` defaults to ``device``'s own.
    """
    if not (config.optim.amp and device.type == "cuda"):
        return AmpSettings(enabled=False)
    if capability is None:
        capability = device_capability(device)
    try:
        dtype = choose_dtype(config.optim.amp_dtype, capability, name="optim.amp_dtype")
    except PrecisionError as error:
        raise ConfigError(str(error)) from None
    if dtype is None:
        return AmpSettings(enabled=False)
    return AmpSettings(enabled=True, dtype=dtype, grad_scaler=dtype == torch.float16)


def build_amp(config: TrainConfig, device: torch.device) -> tuple[AmpSettings, torch.amp.GradScaler | None]:
    """``amp_settings`` and, for fp16, its gradient scaler."""
    amp = amp_settings(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp.grad_scaler else None
    return amp, scaler


def build_teacher(config: TrainConfig, *, model: str | Path | None = None) -> TeacherScores:
    """The teacher adapter of ``config.teacher`` (``none`` gives a disabled one)."""
    from teacher_server.hoi.annotations import dataset_spec

    return TeacherScores.from_config(
        config.teacher,
        verbs=dataset_spec(config.data.dataset).verbs,
        correspondence=correspondence_of(config),
        image_root=config.data.path("train_images"),
        prompt_variant=config.distill.prompt_variant,
        model=model,
    )


def build_loss(config: TrainConfig, teacher: TeacherScores | None) -> TrainingLoss:
    criterion = HOICriterion(
        num_obj_classes=config.model.num_obj_classes,
        num_verbs=config.model.num_verbs,
        matcher=config.loss.matcher(),
        weights=config.loss.weights(),
        eos_coef=config.loss.eos_coef,
    )
    skip = (NO_INTERACTION_INDEX,) if config.data.dataset == "hico" else ()
    return TrainingLoss(criterion, config.distill.settings(), teacher, aux_loss=config.loss.aux_loss, skip_verbs=skip)


def evaluate_model(
    model: HOIDetector,
    config: TrainConfig,
    device: torch.device,
    *,
    dataset: Any | None = None,
    progress: bool = False,
    context: DistributedContext | None = None,
) -> tuple[list[dict[str, Any]], EvalResult | None]:
    """Run ``model`` over the test split; returns the preds.json entries and the metrics.

    Under DDP (``context`` distributed) every rank must call it: each predicts its shard of the
    images (positions rank, rank + W, ...), rank 0 gathers the entries and scores them. The
    other ranks get ``([], None)``.
    """
    dataset = dataset if dataset is not None else build_test_dataset(config)
    distributed = context is not None and context.is_distributed
    is_hico = config.data.dataset == "hico"
    correspondence = correspondence_of(config) if is_hico else None
    settings = EvalSettings(
        dataset=config.data.dataset,
        correspondence=correspondence,
        top_k=config.eval.top_k,
        nms_threshold=config.eval.nms_threshold,
        nms_order=config.eval.nms_order,
        vcoco_no_object_role=config.eval.vcoco_no_object_role,
    )
    amp, _ = build_amp(config, device)
    images = Subset(dataset, shard_positions(len(dataset), context)) if distributed else dataset
    predicted = predict(
        model,
        build_test_loader(images, config, device),
        device=device,
        settings=settings,
        num_images=len(dataset.annotations),
        amp=amp,
        progress=progress,
    )
    if distributed:
        assert context is not None
        predicted = gather_entries(predicted, context)
        if not context.is_main:
            return [], None
    entries = fill_missing_entries(predicted)
    result = score_predictions(
        entries,
        dataset=config.data.dataset,
        test_annotations=config.data.path("test_annotations"),
        train_annotations=config.data.path("train_annotations") if is_hico else None,
        correspondence=correspondence,
    )
    return entries, result


# -- the training job --------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train`` did."""

    output_dir: Path
    position: TrainingPosition
    epochs: list[EpochResult] = field(default_factory=list)
    evaluation: EvalResult | None = None
    teacher: str = "no teacher"
    teacher_stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    model: HOIDetector | None = None
    is_main: bool = True  # False on the other ranks under torchrun (they print no summary)


@dataclass
class _RunParts:
    """Everything one training run is made of, built (and restored) by ``_start_run``."""

    device: torch.device
    train_set: Any
    model: HOIDetector
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    amp: AmpSettings
    scaler: torch.amp.GradScaler | None
    teacher: TeacherScores
    position: TrainingPosition
    resumed_from: Path | None


def _start_run(
    config: TrainConfig,
    resume: str | None,
    teacher_model: str | Path | None,
    say: Say,
    device: torch.device | None = None,
    rank: int = 0,
) -> _RunParts:
    """Seed, build the parts, and load the checkpoint to resume from (if any).

    Rank r seeds with ``run.seed + r``: its dropout masks differ from the other ranks' (its
    initial weights and batch-norm statistics do too, until ``wrap_model`` copies rank 0's to
    every rank, so the model starts the same everywhere).
    """
    device = device if device is not None else resolve_device(config.run.device)
    configure_cuda_math(device, tf32=config.run.tf32)
    checkpoint_path = resolve_resume(resume, config.run.output_dir)
    seed_everything(config.run.seed + rank)
    train_set = build_train_dataset(config)
    model = build_initial_model(config, device, train_set, say)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    amp, scaler = build_amp(config, device)
    # Built before the RNG states are restored, and on a forked RNG: loading a teacher (whose
    # construction may draw random numbers) changes neither the student's init nor a resume.
    with isolated_rng(device):
        teacher = build_teacher(config, model=teacher_model)
    position = TrainingPosition()
    if checkpoint_path is not None:
        try:
            checkpoint = load_checkpoint(checkpoint_path, map_location=device)
            position = restore_training(
                checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, rank=rank
            )
        except BaseException:
            teacher.close()
            raise
    return _RunParts(device, train_set, model, optimizer, scheduler, amp, scaler, teacher, position, checkpoint_path)


def isolated_rng(device: torch.device) -> Any:
    """A context in which drawing random numbers leaves the global RNGs (CPU and ``device``) as they were."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    teacher_model: str | Path | None = None,
    hooks: Sequence[StepHook] = (),
    say: Say = print,
) -> TrainResult:
    """Train (or continue) the run described by ``config``; see the module docstring for outputs.

    resume: None (start fresh), ``auto`` (continue from the run's checkpoint when there is one)
        or a checkpoint path / run directory.
    teacher_model: overrides ``config.teacher.model`` for a local teacher (the demo's resolved one).
    hooks: called after every optimiser step with a ``StepInfo`` (on rank 0 only under torchrun).

    Under ``torchrun`` (``student.distributed``): DDP over the ranks, each reading its shard of
    the data; rank 0 alone logs, writes the run directory and checkpoints, and evaluates.
    """
    context = init_distributed(config.run.device)
    try:
        return _train(config, context, resume, teacher_model, hooks, main_only(context, say))
    finally:
        shutdown(context)


def with_prefetch(teacher: TeacherScores, config: TrainConfig) -> TeacherScores | TeacherPrefetcher:
    """A teacher service's scores fetched ``teacher.prefetch`` batches ahead (``kl`` and ``soft``:
    for ``margin`` the sentences depend on the step's own predictions)."""
    settings = config.teacher
    ahead = config.distill.variant in GROUND_TRUTH_VARIANTS
    if not (teacher.enabled and settings.is_service and settings.prefetch > 0 and ahead):
        return teacher
    return TeacherPrefetcher(teacher, deadline_s=settings.deadline_s, on_error=settings.on_error)


def _train(
    config: TrainConfig,
    context: DistributedContext,
    resume: str | None,
    teacher_model: str | Path | None,
    hooks: Sequence[StepHook],
    say: Say,
) -> TrainResult:
    started = time.perf_counter()
    run = config.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    output_dir = Path(run.output_dir)
    main = context.is_main
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
    parts = _start_run(config, resume, teacher_model, say, device=context.device, rank=context.rank)
    teacher = with_prefetch(parts.teacher, config)
    model, device, position = wrap_model(parts.model, context), parts.device, parts.position
    say(f"teacher: {teacher.description}")
    if context.is_distributed:
        say(f"distributed: {context.world_size} ranks ({context.backend}), {config.optim.batch_size} images per rank")
    if parts.resumed_from is None and main:
        # A fresh run starts fresh logs (a resumed one appends to them).
        for name in ("train_log.csv", "epochs.csv"):
            (output_dir / name).unlink(missing_ok=True)
    else:
        say(
            f"resumed from {parts.resumed_from}: epoch {position.epoch}, batch {position.batches_done}, "
            f"step {position.global_step}"
        )
    loss_fn = build_loss(config, teacher)  # type: ignore[arg-type]
    loader, sampler = build_train_loader(parts.train_set, config, context)
    batches: Any = loader
    if isinstance(teacher, TeacherPrefetcher):
        batches = PrefetchingLoader(loader, teacher, lead=config.teacher.prefetch)
    step_hooks = [CsvLog(output_dir / "train_log.csv", every=run.log_every), *hooks] if main else []
    samples_per_epoch = getattr(sampler, "per_rank", len(parts.train_set))
    result = TrainResult(
        output_dir=output_dir, position=position, teacher=teacher.description, model=parts.model, is_main=main
    )
    try:
        for epoch in range(position.epoch, config.schedule.epochs):
            if config.schedule.max_steps is not None and position.global_step >= config.schedule.max_steps:
                break
            start = position.batches_done if epoch == position.epoch else 0
            sampler.set_epoch(epoch, min(start * config.optim.batch_size, samples_per_epoch))
            epoch_result = train_one_epoch(
                model,
                loss_fn,
                parts.optimizer,
                batches,
                device=device,
                epoch=epoch,
                start_batch=start,
                global_step=position.global_step,
                max_steps=config.schedule.max_steps,
                clip_max_norm=config.optim.clip_max_norm,
                amp=parts.amp,
                scaler=parts.scaler,
                teacher=teacher,  # type: ignore[arg-type]
                hooks=step_hooks,
                progress=run.progress and main,
            )
            epoch_result.means = reduce_means(epoch_result.means, context)
            result.epochs.append(epoch_result)
            if epoch_result.completed:
                parts.scheduler.step()
                position = TrainingPosition(epoch + 1, 0, epoch_result.global_step)
            else:
                position = TrainingPosition(epoch, epoch_result.batches_done, epoch_result.global_step)
            # Every rank's RNG states, so that each continues its own stream on resume.
            rank_rng = gather_objects(capture_rng_state(), context) if context.is_distributed else None
            on_main(
                context,
                functools.partial(
                    save_checkpoint,
                    output_dir / CHECKPOINT_NAME,
                    model=parts.model,
                    optimizer=parts.optimizer,
                    scheduler=parts.scheduler,
                    scaler=parts.scaler,
                    position=position,
                    config=config.to_dict(),
                    extra={"epoch_means": epoch_result.means},
                    rank_rng=rank_rng,
                ),
            )
            evaluation = None
            if epoch_result.completed and run.eval_every and (epoch + 1) % run.eval_every == 0:
                with isolated_rng(device):  # a resumed run does not repeat this evaluation
                    _, evaluation = evaluate_model(
                        parts.model, config, device, progress=run.progress and main, context=context
                    )
            if main:
                _write_epoch_row(output_dir / "epochs.csv", epoch_result, parts.optimizer, evaluation)
            say(_describe_epoch(epoch_result, config.schedule.epochs, teacher, evaluation))  # type: ignore[arg-type]
            if not epoch_result.completed:
                break
        result.position = position
        if run.eval_at_end:
            with isolated_rng(device):  # every rank predicts its shard of the test images
                entries, result.evaluation = evaluate_model(
                    parts.model, config, device, progress=run.progress and main, context=context
                )
            if result.evaluation is not None:
                save_predictions(entries, output_dir / "preds.json")
                (output_dir / "metrics.json").write_text(json.dumps(result.evaluation.summary, indent=2) + "\n")
    finally:
        teacher.close()
    stats = teacher.stats
    # Summed over the ranks (the collective also waits for rank 0's final evaluation).
    totals = reduce_sums(
        {
            "pairs_scored": stats.pairs_scored,
            "memo_hits": stats.memo_hits,
            "failed_batches": stats.failed_batches,
            # Of the pairs scored, those a remote teacher's client read from Redis itself.
            "cache_hits": getattr(parts.teacher.backend, "cache_hits", 0),
        },
        context,
    )
    result.teacher_stats = {key: int(value) for key, value in totals.items()}
    result.seconds = time.perf_counter() - started
    return result


def _describe_epoch(epoch: EpochResult, epochs: int, teacher: TeacherScores, evaluation: EvalResult | None) -> str:
    means = epoch.means
    text = f"epoch {epoch.epoch + 1}/{epochs}: {epoch.steps} steps in {epoch.seconds:.1f} s"
    if means:
        text += f", loss {means.get('loss', float('nan')):.4f} (hoi {means.get('loss_hoi', float('nan')):.4f}"
        if "loss_itm" in means:
            text += f", itm {means['loss_itm']:.4f} over {means.get('itm_terms', 0):.1f} pairs/step"
        text += ")"
    if teacher.enabled:
        s = teacher.stats
        text += f"; teacher: {s.pairs_scored} pairs scored, {s.memo_hits} memo hits, {s.failed_batches} failed batches"
    if evaluation is not None:
        text += f"; test mAP {evaluation.headline:.2f}"
    if not epoch.completed:
        text += f" (stopped at schedule.max_steps, batch {epoch.batches_done})"
    return text


def _write_epoch_row(
    path: Path, epoch: EpochResult, optimizer: torch.optim.Optimizer, evaluation: EvalResult | None
) -> None:
    columns = ("epoch", "steps", "global_step", "completed", "seconds", "lr", "loss", "loss_hoi", "loss_itm", "map")
    row = {
        "epoch": epoch.epoch,
        "steps": epoch.steps,
        "global_step": epoch.global_step,
        "completed": int(epoch.completed),
        "seconds": f"{epoch.seconds:.2f}",
        "lr": f"{optimizer.param_groups[0]['lr']:.3g}",
        "loss": epoch.means.get("loss"),
        "loss_hoi": epoch.means.get("loss_hoi"),
        "loss_itm": epoch.means.get("loss_itm"),
        "map": evaluation.headline if evaluation is not None else None,
    }
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerow(
            ["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in columns]
        )


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``train``: a config file, ``key=value`` overrides, and a few run-level switches."""
    parser.add_argument("--config", type=Path, help="YAML recipe (student/configs/*.yaml); default: built-in defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=2e-4 schedule.epochs=90 data.root=/data/hico",
    )
    parser.add_argument(
        "--teacher",
        help="none | local | grpc://host:port | grpcs://host:port | triton://host:port (overrides teacher.source)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH|auto",
        help="continue from a checkpoint file or run directory; bare --resume = the run's own checkpoint",
    )
    parser.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (run.progress=false)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Config file + positional overrides + the flags that are shortcuts for overrides."""
    overrides = list(args.overrides or [])
    resume = getattr(args, "resume", None)
    if resume is not None and "=" in resume and not Path(resume).exists():
        # "--resume key=value": argparse gave the first override to the optional PATH of --resume.
        overrides.insert(0, resume)
        args.resume = "auto"
    if getattr(args, "teacher", None):
        overrides.append(f"teacher.source={args.teacher}")
    if getattr(args, "output_dir", None):
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "no_progress", False):
        overrides.append("run.progress=false")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``python -m student train``."""
    try:
        config = config_from_args(args)
        result = train(config, resume=args.resume)
    except USER_ERRORS as error:
        print(f"train: {error}", file=sys.stderr)
        return 2
    if not result.is_main:
        return 0
    if result.teacher != "no teacher":
        stats = result.teacher_stats
        print(
            f"teacher scores, all ranks: {stats['pairs_scored']} (image, sentence) pairs fetched "
            f"({stats['cache_hits']} read from the Redis cache), {stats['memo_hits']} memo hits, "
            f"{stats['failed_batches']} failed batches"
        )
    if result.evaluation is not None:
        print(f"test: {json.dumps(result.evaluation.summary)}")
    print(f"done in {result.seconds:.1f} s; outputs in {result.output_dir}")
    return 0
