"""The training run: ``train(config)`` builds the parts, runs the epochs, checkpoints and evaluates.

    result = train(load_config("student/configs/hico.yaml", ["optim.lr=2e-4"]), resume="auto")

The run directory gets ``config.yaml`` (the resolved config), ``train_log.csv`` (loss terms
every ``run.log_every`` steps), ``epochs.csv`` (one row per epoch: the loss terms' means, the
learning rate, the test mAP when evaluated), TensorBoard event files with the same numbers
(``events.out.tfevents.*``, unless ``run.tensorboard`` is false; ``engine.TensorBoardLog``),
``checkpoint.pth`` (written atomically after every epoch, and when ``schedule.max_steps`` stops a
run) and, after the final evaluation, ``preds.json`` and ``metrics.json``.
``python -m student plot RUN_DIR`` draws ``epochs.csv`` (``student.curves``). Under ``torchrun``
every rank calls ``train``; rank 0 alone writes the run directory (``student.distributed``).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from student.builders import (
    build_amp,
    build_initial_model,
    build_loss,
    build_optimizer,
    build_scheduler,
    build_teacher,
    build_train_dataset,
    build_train_loader,
    configure_cuda_math,
    isolated_rng,
    resolve_device,
    seed_everything,
    with_prefetch,
)
from student.checkpoint import (
    CHECKPOINT_NAME,
    TrainingPosition,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_training,
    save_checkpoint,
)
from student.config import TrainConfig
from student.distributed import (
    DistributedContext,
    gather_objects,
    init_distributed,
    on_main,
    reduce_means,
    reduce_sums,
    shutdown,
    wrap_model,
)
from student.engine import (
    AmpSettings,
    CsvLog,
    EpochResult,
    EvalResult,
    StepHook,
    TensorBoardLog,
    train_one_epoch,
)
from student.evaluation import save_predictions
from student.inference import evaluate_model
from student.losses.total import MAIN_TERMS
from student.model import HOIDetector
from student.teacher import PrefetchingLoader, TeacherPrefetcher, TeacherScores

log = logging.getLogger(__name__)
#: The columns of ``epochs.csv``: the totals first, the last-layer terms after (their epoch means).
EPOCH_COLUMNS = (
    "epoch",
    "steps",
    "global_step",
    "completed",
    "seconds",
    "lr",
    "loss",
    "loss_hoi",
    "loss_itm",
    "map",
    *MAIN_TERMS,
)
#: The names of TensorBoard's event files (``SummaryWriter``), removed when a fresh run starts.
TENSORBOARD_EVENTS = "events.out.tfevents.*"


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
    model = build_initial_model(config, device, train_set)
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


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    teacher_model: str | Path | None = None,
    hooks: Sequence[StepHook] = (),
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
        return _train(config, context, resume, teacher_model, hooks)
    finally:
        shutdown(context)


def _train(
    config: TrainConfig,
    context: DistributedContext,
    resume: str | None,
    teacher_model: str | Path | None,
    hooks: Sequence[StepHook],
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
    parts = _start_run(config, resume, teacher_model, device=context.device, rank=context.rank)
    teacher = with_prefetch(parts.teacher, config)
    model, device, position = wrap_model(parts.model, context), parts.device, parts.position
    log.info("teacher: %s", teacher.description)
    if context.is_distributed:
        log.info(
            "distributed: %d ranks (%s), %d images per rank",
            context.world_size,
            context.backend,
            config.optim.batch_size,
        )
    if parts.resumed_from is None and main:
        # A fresh run starts fresh logs (a resumed one appends to them).
        for name in ("train_log.csv", "epochs.csv"):
            (output_dir / name).unlink(missing_ok=True)
        for events in output_dir.glob(TENSORBOARD_EVENTS):
            events.unlink()
    else:
        log.info(
            "resumed from %s: epoch %d, batch %d, step %d",
            parts.resumed_from,
            position.epoch,
            position.batches_done,
            position.global_step,
        )
    loss_fn = build_loss(config, teacher)
    loader, sampler = build_train_loader(parts.train_set, config, context)
    batches: Any = loader
    if isinstance(teacher, TeacherPrefetcher):
        batches = PrefetchingLoader(loader, teacher, lead=config.teacher.prefetch)
    board = _open_tensorboard(output_dir, run.log_every, position.global_step) if main and run.tensorboard else None
    step_hooks: list[StepHook] = []
    if main:
        step_hooks = [CsvLog(output_dir / "train_log.csv", every=run.log_every), *([board] if board else []), *hooks]
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
                teacher=teacher,
                hooks=step_hooks,
                progress=run.tqdm_progress(main),
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
                        parts.model, config, device, progress=run.tqdm_progress(main), context=context
                    )
            if main:
                _write_epoch_row(output_dir / "epochs.csv", epoch_result, parts.optimizer, evaluation)
            if board is not None:
                board.epoch(epoch_result)
                if evaluation is not None:
                    board.evaluation(evaluation, epoch_result.global_step)
            log.info(_describe_epoch(epoch_result, config.schedule.epochs, teacher, evaluation))
            if not epoch_result.completed:
                break
        result.position = position
        if run.eval_at_end:
            with isolated_rng(device):  # every rank predicts its shard of the test images
                entries, result.evaluation = evaluate_model(
                    parts.model, config, device, progress=run.tqdm_progress(main), context=context
                )
            if result.evaluation is not None:
                save_predictions(entries, output_dir / "preds.json")
                (output_dir / "metrics.json").write_text(json.dumps(result.evaluation.summary, indent=2) + "\n")
                if board is not None:
                    board.evaluation(result.evaluation, position.global_step)
    finally:
        teacher.close()
        if board is not None:
            board.close()
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


def _open_tensorboard(output_dir: Path, every: int, global_step: int) -> TensorBoardLog | None:
    """The run's TensorBoard log, or None (with a warning) when the package is not installed.

    A resumed run (``global_step`` > 0) purges the events the interrupted run wrote after its
    checkpoint: this run writes those steps again.
    """
    try:
        return TensorBoardLog(output_dir, every=every, purge_step=global_step or None)
    except ImportError as error:
        # A missing optional package must not stop a run that is otherwise ready: the CSVs hold it all.
        log.warning(
            "run.tensorboard: %s; writing the CSV logs only (pip install tensorboard, or run.tensorboard=false)",
            error,
        )
        return None


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
        **{term: epoch.means.get(term) for term in MAIN_TERMS},
    }
    new = not path.exists() or path.stat().st_size == 0
    # A resumed run appends in the file's own columns (a run started before a column was added
    # keeps its header; the new column is left out rather than misaligning every later one).
    columns = EPOCH_COLUMNS if new else _header(path)
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerow([_cell(row.get(column)) for column in columns])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _header(path: Path) -> tuple[str, ...]:
    with path.open(newline="") as handle:
        return tuple(next(csv.reader(handle), EPOCH_COLUMNS))
