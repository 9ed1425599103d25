"""Training and evaluation loops of the student, in small named steps.

``train_one_epoch`` runs, per batch: ``to_device`` -> ``teacher.annotate`` (ITM scores of the
candidate sentences, ``kl``) -> ``forward`` -> ``TrainingLoss`` (``student.losses.total``) ->
``backward_and_update`` (AMP on CUDA only, gradient clipping) -> step hooks (e.g. ``CsvLog``).
``predict`` runs a model over a test split into preds.json entries and ``score_predictions``
scores them with the evaluation package (HICO-DET mAP or V-COCO role AP).

Exact resumption: the data order of epoch e is a function of (seed, e) (``EpochSampler``), and
each sample's augmentation draws from torch's RNG seeded by a per-sample seed of that order
(``SeededSamples``), so a run continued from a checkpoint at any batch sees the same batches and
the same augmentations as one that never stopped, with any number of loader workers.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from student.losses.distill import GROUND_TRUTH_VARIANTS
from student.losses.total import MAIN_TERMS, TrainingLoss
from student.teacher.scores import TeacherScores
from teacher_server.logs import show_progress

LOG_COLUMNS = (
    "epoch",
    "batch",
    "global_step",
    "lr",
    "backbone_lr",
    "loss",
    "loss_hoi",
    "loss_itm",
    *MAIN_TERMS,
    "obj_class_error",
    "itm_terms",
    "itm_skipped",
    "grad_norm",
    "teacher_failed_batches",
    "seconds_per_step",
)
# Terms that are running totals, logged as their latest value rather than a window mean.
_RUNNING_TOTALS = ("teacher_failed_batches",)
_PROGRESS_SHORT = {"loss_obj_ce": "obj", "loss_verb_ce": "verb", "loss_sub_bbox": "l1h", "loss_obj_bbox": "l1o"}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an inconsistent resume...); the message says where."""


# -- data order --------------------------------------------------------------------------------


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(dataset index, augmentation seed)`` in an order fixed by (seed, epoch).

    ``set_epoch(epoch, start)`` selects the epoch and skips its first ``start`` samples (a resume
    in the middle of an epoch) without touching any global RNG.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size <= 0:
            raise TrainingError(f"EpochSampler: the dataset is empty (size {size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.size:
            raise TrainingError(f"EpochSampler: start {start} outside 0..{self.size}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (N,), seeds (N,)) of ``epoch``: pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        indices = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        seeds = rng.integers(0, 2**62, size=self.size)
        return indices, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.order(self.epoch)
        for position in range(self.start, self.size):
            yield int(indices[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.size - self.start


class SeededSamples(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` drawn with torch's RNG seeded by ``seed``.

    The global RNG state around the call is restored, so sampling augmentations does not
    disturb the model's own randomness (dropout) in the main process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


# -- one training step -------------------------------------------------------------------------


@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision: used only when the device is CUDA and ``enabled``.

    ``grad_scaler``: the run needs a gradient scaler (fp16, whose range underflows small
    gradients; bf16 has fp32's range and needs none).
    """

    enabled: bool = False
    dtype: torch.dtype = torch.bfloat16
    grad_scaler: bool = False

    def context(self, device: torch.device) -> Any:
        if self.enabled and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return nullcontext()


def to_device(
    images: Tensor, masks: Tensor, targets: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Move a collated batch to ``device`` (tensors of the targets too; strings and ints stay)."""
    moved = [
        {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value for key, value in t.items()}
        for t in targets
    ]
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True), moved


def outputs_to_float(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Model outputs in fp32 (losses and matching stay in full precision under autocast)."""
    result: dict[str, Any] = {}
    for key, value in outputs.items():
        if key == "aux_outputs":
            result[key] = [outputs_to_float(aux) for aux in value]
        else:
            result[key] = value.float() if isinstance(value, Tensor) else value
    return result


def backward_and_update(
    loss: Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    clip_max_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Backward, optional gradient clipping, optimiser step; returns the gradient norm (NaN if unclipped)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = float("nan")
    if clip_max_norm > 0:
        parameters = [p for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip_max_norm))
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


# -- the epoch ---------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """What one optimiser step did, handed to every hook."""

    epoch: int
    batch: int  # index of the batch within the epoch
    global_step: int  # optimiser steps done, this one included
    lrs: dict[str, float]  # parameter group name -> lr
    terms: dict[str, float]
    grad_norm: float
    seconds: float


StepHook = Callable[[StepInfo], None]


@dataclass
class EpochResult:
    """Means of the loss terms over the steps run in this call, and where training stands."""

    epoch: int
    steps: int
    global_step: int
    batches_done: int  # batches of this epoch done in total (a resumed epoch counts earlier ones)
    completed: bool  # the epoch ran to its end (False: max_steps stopped it)
    means: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train_one_epoch(
    model: nn.Module,
    loss_fn: TrainingLoss,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    device: torch.device,
    epoch: int,
    start_batch: int = 0,
    global_step: int = 0,
    max_steps: int | None = None,
    clip_max_norm: float = 0.1,
    amp: AmpSettings | None = None,
    scaler: torch.amp.GradScaler | None = None,
    teacher: TeacherScores | None = None,
    hooks: Sequence[StepHook] = (),
    progress: bool | None = None,
) -> EpochResult:
    """Train over ``loader`` (already positioned at ``start_batch`` of ``epoch``).

    Stops early once ``global_step`` reaches ``max_steps``. ``teacher`` (``kl`` only) annotates
    each batch's targets with the teacher's margins before the forward pass. ``progress``: a tqdm
    bar; None = when stderr is a terminal (``show_progress``).
    """
    amp = amp or AmpSettings()
    model.train()
    sums: dict[str, float] = {}
    steps, batch = 0, start_batch
    started = time.perf_counter()
    annotate = teacher is not None and teacher.enabled and loss_fn.distill.variant in GROUND_TRUTH_VARIANTS
    bar = tqdm(
        loader,
        total=len(loader),
        initial=0,
        desc=f"epoch {epoch}",
        disable=not show_progress(progress),
        dynamic_ncols=True,
        leave=False,
    )
    for images, masks, targets in bar:
        if max_steps is not None and global_step >= max_steps:
            break
        step_start = time.perf_counter()
        images, masks, targets = to_device(images, masks, targets, device)
        if annotate:
            assert teacher is not None
            teacher.annotate(targets)
        with amp.context(device):
            outputs = model(images, masks)
        result = loss_fn(outputs_to_float(outputs), targets)
        if annotate:
            assert teacher is not None
            result.terms["teacher_failed_batches"] = float(teacher.stats.failed_batches)
        if not math.isfinite(result.terms["loss"]):
            raise TrainingError(
                f"epoch {epoch}, batch {batch}: loss is {result.terms['loss']}; terms {result.terms} "
                f"(images {[t['file_name'] for t in targets]})"
            )
        grad_norm = backward_and_update(result.total, model, optimizer, clip_max_norm=clip_max_norm, scaler=scaler)
        global_step += 1
        steps += 1
        batch += 1
        for key, value in result.terms.items():
            sums[key] = sums.get(key, 0.0) + value
        info = StepInfo(
            epoch=epoch,
            batch=batch - 1,
            global_step=global_step,
            lrs={group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)},
            terms=result.terms,
            grad_norm=grad_norm,
            seconds=time.perf_counter() - step_start,
        )
        for hook in hooks:
            hook(info)
        bar.set_postfix(_progress_postfix(result.terms), refresh=False)
        if max_steps is not None and global_step >= max_steps:
            break  # before fetching (and augmenting) a batch that will not be used
    bar.close()
    completed = steps == len(loader)
    means = {key: value / steps for key, value in sums.items()} if steps else {}
    return EpochResult(
        epoch=epoch,
        steps=steps,
        global_step=global_step,
        batches_done=batch,
        completed=completed,
        means=means,
        seconds=time.perf_counter() - started,
    )


def _progress_postfix(terms: Mapping[str, float]) -> dict[str, str]:
    shown = {"loss": f"{terms['loss']:.3f}"}
    for key, short in _PROGRESS_SHORT.items():
        if key in terms:
            shown[short] = f"{terms[key]:.3f}"
    if "loss_itm" in terms:
        shown["itm"] = f"{terms['loss_itm']:.3f}"
    return shown


# -- logging -----------------------------------------------------------------------------------


class StepWindow:
    """The means of the step terms over every ``every`` optimiser steps (what the logs write).

    ``add(info)`` returns the window's row at its last step (terms averaged, running totals as
    their latest value, plus epoch, batch, global_step and the learning rates), else None.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, info: StepInfo) -> dict[str, Any] | None:
        values = dict(info.terms, grad_norm=info.grad_norm, seconds_per_step=info.seconds)
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        if info.global_step % self.every:
            return None
        row: dict[str, Any] = {key: value / self._count for key, value in self._sums.items()}
        row.update({key: info.terms[key] for key in _RUNNING_TOTALS if key in info.terms})
        row.update(epoch=info.epoch, batch=info.batch, global_step=info.global_step)
        row["lr"] = info.lrs.get("transformer", next(iter(info.lrs.values()), None))
        row["backbone_lr"] = info.lrs.get("backbone")
        self._sums, self._count = {}, 0
        return row


class CsvLog:
    """Appends rows of fixed columns to a CSV file (header once); the averages of every ``every`` steps."""

    def __init__(self, path: str | Path, every: int = 20, columns: Sequence[str] = LOG_COLUMNS) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.window = StepWindow(every)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([_format(row.get(column)) for column in self.columns])

    def __call__(self, info: StepInfo) -> None:
        """A step hook: accumulate, and write the window's means every ``every`` steps."""
        row = self.window.add(info)
        if row is not None:
            self.write(row)


class TensorBoardLog:
    """TensorBoard event files of a run (``tensorboard --logdir RUN_DIR``), beside its CSV logs.

    Scalars, all against the global step so that the charts line up:
    ``train/<term>`` the means of every ``every`` steps (the rows of ``train_log.csv``: loss,
    loss_hoi, loss_itm, the six last-layer terms, grad_norm...), ``lr/<group>`` every parameter
    group's learning rate at those steps, ``epoch/<term>`` the epoch means (``epochs.csv``) and
    ``eval/map`` each evaluation's headline number (HICO-DET Default Full mAP or V-COCO
    scenario-1 role AP, in percent). Non-finite values are left out (a chart cannot draw them).

    ``purge_step``: a resumed run hides the events of the interrupted one from that step on
    (they were written after the checkpoint it resumes from, and are written again).
    Needs the ``tensorboard`` package (the student extra).
    """

    def __init__(self, log_dir: str | Path, every: int = 20, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.window = StepWindow(every)
        self._evaluated_at: int | None = None

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.writer.add_scalar(tag, float(value), step)

    def __call__(self, info: StepInfo) -> None:
        """A step hook: the window's means as ``train/*`` and the learning rates as ``lr/*``."""
        row = self.window.add(info)
        if row is None:
            return
        for key, value in row.items():
            if key not in ("epoch", "batch", "global_step", "lr", "backbone_lr"):
                self._scalar(f"train/{key}", value, info.global_step)
        for name, lr in info.lrs.items():
            self._scalar(f"lr/{name}", lr, info.global_step)

    def epoch(self, result: EpochResult) -> None:
        """The epoch's means as ``epoch/*``, at the global step where it ended."""
        for key, value in result.means.items():
            self._scalar(f"epoch/{key}", value, result.global_step)
        self.writer.flush()  # a run watched live shows each epoch as it ends

    def evaluation(self, result: EvalResult, global_step: int) -> None:
        """An evaluation's headline number as ``eval/map`` (once per step: the final evaluation of a
        run whose last epoch was evaluated too scores the same model again)."""
        if global_step == self._evaluated_at:
            return
        self._evaluated_at = global_step
        self._scalar("eval/map", result.headline, global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# -- evaluation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How model outputs become preds.json entries."""

    dataset: str = "hico"
    correspondence: np.ndarray | None = None  # (V, 80) bool; drops invalid triplets (HICO-DET)
    top_k: int = 100
    nms_threshold: float | None = None
    nms_order: str = "top_k_first"  # the reference order: top_k, then triplet NMS among them
    vcoco_no_object_role: bool = True


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    settings: EvalSettings,
    num_images: int,
    amp: AmpSettings | None = None,
    progress: bool | None = False,
) -> list[dict[str, Any] | None]:
    """preds.json entries of every image of the split, indexed by ``target["image_id"]``.

    ``num_images``: the annotation file's length. An image the loader did not yield (another
    rank's shard, under DDP) is None; ``fill_missing_entries`` turns the gathered list into
    preds.json entries.
    """
    from student.evaluation.postprocess import TripletNms, postprocess

    amp = amp or AmpSettings()
    nms = TripletNms(threshold=settings.nms_threshold) if settings.nms_threshold is not None else None
    was_training = model.training
    model.eval()
    entries: list[dict[str, Any] | None] = [None] * num_images
    try:
        for images, masks, targets in tqdm(loader, desc="evaluate", disable=not show_progress(progress), leave=False):
            with amp.context(device):
                outputs = model(images.to(device), masks.to(device))
            batch_entries = postprocess(
                outputs_to_float(outputs),
                torch.stack([t["orig_size"] for t in targets]),
                dataset=settings.dataset,
                correspondence=settings.correspondence,
                top_k=settings.top_k,
                nms=nms,
                nms_order=settings.nms_order,
                file_names=[t["file_name"] for t in targets],
                vcoco_no_object_role=settings.vcoco_no_object_role,
            )
            for target, entry in zip(targets, batch_entries, strict=True):
                entries[int(target["image_id"])] = entry
    finally:
        model.train(was_training)
    return entries


def fill_missing_entries(entries: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """preds.json entries with every None (an image nobody predicted) as an entry without predictions."""
    return [entry if entry is not None else {"predictions": [], "hoi_prediction": []} for entry in entries]


@dataclass(frozen=True)
class EvalResult:
    """The evaluator's result, its JSON summary, and the headline number in percent.

    Headline: HICO-DET Default Full mAP, or V-COCO scenario-1 role AP.
    """

    result: Any  # HicoResult | VcocoResult
    summary: dict[str, Any]
    headline: float


def score_predictions(
    entries: Sequence[Mapping[str, Any]],
    *,
    dataset: str,
    test_annotations: str | Path,
    train_annotations: str | Path | None = None,
    correspondence: np.ndarray | None = None,
) -> EvalResult:
    """Evaluate preds.json entries (in annotation order) against the test annotations."""
    from student.evaluation import (
        count_triplets,
        evaluate_hico,
        evaluate_vcoco,
        load_annotations,
        parse_predictions,
    )

    ground_truth = load_annotations(test_annotations, dataset)
    predictions = parse_predictions(list(entries), dataset, ground_truth)
    if dataset == "vcoco":
        result = evaluate_vcoco(predictions, ground_truth)
        summary = result.summary()
        headline = summary["scenario_1"]
    else:
        if train_annotations is None or correspondence is None:
            raise TrainingError("HICO-DET evaluation needs the training annotations and the correspondence")
        result = evaluate_hico(
            predictions,
            ground_truth,
            correspondence=correspondence,
            train_counts=count_triplets(load_annotations(train_annotations, dataset)),
        )
        summary = result.summary()
        headline = summary["default"]["full"]
    return EvalResult(result, summary, float(headline) if headline is not None else float("nan"))
