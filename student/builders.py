"""Builders: everything a training or evaluation run is made of, built from a ``TrainConfig``.

Datasets and loaders, the model (and its initialisation), the optimiser and schedule, mixed
precision, the teacher adapter and the loss; plus the device, seeding and RNG helpers they need.
The ``train``, ``evaluate`` and ``demo`` commands and the benches call these; none of them parses
arguments or runs a loop.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from student.config import ConfigError, TrainConfig
from student.distributed import DistributedContext, DistributedEpochSampler
from student.engine import AmpSettings, EpochSampler, SeededSamples
from student.losses import GROUND_TRUTH_VARIANTS, HOICriterion, TrainingLoss
from student.model import HOIDetector, load_detr_checkpoint
from student.teacher import TeacherPrefetcher, TeacherScores
from teacher_server.engine import resolve_device as resolve_torch_device
from teacher_server.errors import ModelLoadError
from teacher_server.hoi.classes import NO_INTERACTION_INDEX
from teacher_server.precision import Capability, PrecisionError, choose_dtype, device_capability

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a torch device, by the teacher's rule (``teacher_server.engine.resolve_device``).

    ``auto`` -> CUDA when available, else CPU; anything else as given (``cpu``, ``cuda:1``). A CUDA
    device always carries its index, so the capability check and the logs name one device. A
    device this machine does not have is a ``ConfigError`` naming ``run.device``.
    """
    try:
        return resolve_torch_device(name)
    except (ModelLoadError, RuntimeError) as error:  # RuntimeError: a device string torch cannot read
        raise ConfigError(f"run.device: {error}") from None


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


def build_test_transforms(config: TrainConfig) -> Any:
    """The model's test transform: shorter side to ``data.test_scale`` (default: the largest training
    scale), longer side at most ``data.max_size``; the test split and ``predict`` both use it."""
    from student.data.transforms import make_transforms

    data = config.data
    return make_transforms("test", [data.test_scale or max(data.scales)], data.max_size)


def build_test_dataset(config: TrainConfig) -> Any:
    """The test split, every image in annotation order, resized to the test scale."""
    from student.data.hoi_dataset import HOIDataset

    data = config.data
    return HOIDataset(
        data.path("test_images"),
        data.path("test_annotations"),
        data.dataset,
        build_test_transforms(config),
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


def build_model(config: TrainConfig, device: torch.device) -> HOIDetector:
    """The detector of ``config.model``, initialised from ``config.pretrained`` (DETR COCO) if set."""
    model = HOIDetector(config.model)
    if config.pretrained:
        report = load_detr_checkpoint(model, config.pretrained)
        log.info(report.summary())
    return model.to(device)


def build_initial_model(config: TrainConfig, device: torch.device, train_set: Any) -> HOIDetector:
    """The model training starts from: ``build_model``, then the batch-norm calibration if configured.

    Call after ``seed_everything(config.run.seed)`` to get the run's exact initialisation.
    """
    model = build_model(config, device)
    if config.calibrate_bn_images:
        images, masks = calibration_batch(train_set, config)
        layers = calibrate_frozen_batchnorm(model, images.to(device), masks.to(device))
        log.info("calibrated %d frozen batch-norm layers of the from-scratch CNN on %d images", layers, len(images))
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


def build_loss(config: TrainConfig, teacher: TeacherScores | TeacherPrefetcher | None) -> TrainingLoss:
    """``TrainingLoss`` of ``config.loss`` and ``config.distill``; HICO-DET's no_interaction verb is never a triplet."""
    criterion = HOICriterion(
        num_obj_classes=config.model.num_obj_classes,
        num_verbs=config.model.num_verbs,
        matcher=config.loss.matcher(),
        weights=config.loss.weights(),
        eos_coef=config.loss.eos_coef,
    )
    skip = (NO_INTERACTION_INDEX,) if config.data.dataset == "hico" else ()
    return TrainingLoss(criterion, config.distill.settings(), teacher, aux_loss=config.loss.aux_loss, skip_verbs=skip)


def with_prefetch(teacher: TeacherScores, config: TrainConfig) -> TeacherScores | TeacherPrefetcher:
    """A teacher service's scores fetched ``teacher.prefetch`` batches ahead (``kl`` and ``soft``:
    for ``margin`` the sentences depend on the step's own predictions)."""
    settings = config.teacher
    ahead = config.distill.variant in GROUND_TRUTH_VARIANTS
    if not (teacher.enabled and settings.is_service and settings.prefetch > 0 and ahead):
        return teacher
    return TeacherPrefetcher(teacher, deadline_s=settings.deadline_s, on_error=settings.on_error)


def isolated_rng(device: torch.device) -> Any:
    """A context in which drawing random numbers leaves the global RNGs (CPU and ``device``) as they were."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)
