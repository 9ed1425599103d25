"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds everything a run needs to continue exactly where it stopped: model,
optimizer, LR scheduler and grad-scaler states, the position in training (epoch, batches done in
that epoch, optimiser steps in total), the random-number-generator states of Python, NumPy and
torch (CPU and every CUDA device) of every rank, and the run's config as a plain dict. RNG states
are stored as tensors and plain numbers so that the safe ``weights_only`` unpickler reads them:
loading a checkpoint never executes pickled code.

Under DDP every rank draws its own random numbers (seeded ``seed + rank``: different dropout
masks per rank); rank 0 writes the checkpoint with the gathered states of all ranks
(``rank_rng``), and on resume rank r restores state r.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teacher_server.rng_state import capture_rng_state
from teacher_server.rng_state import restore_rng_state as _restore_rng_state

CHECKPOINT_NAME = "checkpoint.pth"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "position", "rng", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the run that loads it."""


@dataclass(frozen=True)
class TrainingPosition:
    """Where training stands: ``epoch`` in progress, ``batches_done`` of it, ``global_step`` in total.

    A checkpoint written at the end of epoch e stores ``epoch = e + 1, batches_done = 0``.
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "global_step": self.global_step}


# -- random number generators ------------------------------------------------------------------


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """``teacher_server.rng_state.restore_rng_state``; a CUDA device-count mismatch is a ``CheckpointError``."""
    try:
        _restore_rng_state(state)
    except ValueError as error:
        raise CheckpointError(f"checkpoint: {error}") from None


def rank_rng_state(checkpoint: Mapping[str, Any], rank: int = 0) -> Mapping[str, Any] | None:
    """The RNG states rank ``rank`` saved in ``checkpoint``; None when it saved none.

    A checkpoint of a single process (or written before per-rank states) holds one state, which
    every rank gets. Resumed with more ranks than it was written by, the extra ranks get None
    (they keep their ``seed + rank`` streams: the resume is then not exact, and neither is the
    data split, which depends on the number of ranks).
    """
    states = checkpoint.get("rank_rng")
    if not states:
        return checkpoint["rng"]
    return states[rank] if rank < len(states) else None


# -- save / load -------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: TrainingPosition,
    config: Mapping[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    extra: Mapping[str, Any] | None = None,
    rank_rng: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically: to ``<path>.tmp`` first, fsync'd, then ``os.replace``.

    A reader (or a crash) therefore sees either the previous complete file or the new one.
    ``extra``: small plain values to keep alongside (e.g. the last metrics). ``rank_rng``: under
    DDP, ``capture_rng_state()`` of every rank in rank order (``gather_objects``); None for a
    single process (its own state is ``rng``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "position": position.to_dict(),
        "rng": capture_rng_state(),
        "rank_rng": list(rank_rng) if rank_rng is not None else None,
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    partial = path.with_name(path.name + ".tmp")
    try:
        with partial.open("wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only left over when writing failed
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; raises ``CheckpointError`` naming what is wrong.

    Everything is read to the CPU; then the model weights (only) move to ``map_location``. RNG
    states must stay on the CPU (``torch.set_rng_state`` refuses CUDA tensors), and the
    optimizer's ``load_state_dict`` moves its state to each parameter's device by itself.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (missing {missing})")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {checkpoint['format_version']}, this code reads {FORMAT_VERSION}"
        )
    if torch.device(map_location).type != "cpu":
        checkpoint["model"] = {name: tensor.to(map_location) for name, tensor in checkpoint["model"].items()}
    return checkpoint


def restore_training(
    checkpoint: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> TrainingPosition:
    """Load every state of ``checkpoint`` into the run's objects; returns where to continue.

    ``rank``: under DDP, this process's rank: it restores the RNG states that rank saved.
    """
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint model weights do not fit this model: {error}") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint optimizer state does not fit this optimizer: {error}") from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    if restore_rng:
        state = rank_rng_state(checkpoint, rank)
        if state is not None:
            restore_rng_state(state)
    return TrainingPosition(**checkpoint["position"])


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``--resume`` value -> checkpoint path. ``auto``: the run's own checkpoint if it exists, else None."""
    if resume is None:
        return None
    if resume == "auto":
        candidate = Path(output_dir) / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path
