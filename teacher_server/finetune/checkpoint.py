"""Where a run stands and how it survives a stop: position, epoch sums, RNG states, atomic writes.

A checkpoint holds tensors and plain values only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from teacher_server.errors import FinetuneError

CHECKPOINT_NAME = "finetune_checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class Position:
    """Where a run stands. After epoch e's last step: ``epoch = e + 1, batches_done = 0``."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0


@dataclass
class EpochLog:
    """Running sums of one epoch (kept in the checkpoint, so a resumed epoch reports the same mean)."""

    loss_sum: float = 0.0
    steps: int = 0
    pairs: int = 0
    positives: int = 0
    seconds: float = 0.0

    def line(self, epoch: int, epochs: int) -> str:
        return (
            f"epoch {epoch + 1}/{epochs}: loss {self.mean_loss:.4f}, {self.pairs} pairs "
            f"({self.positives} positive), {self.steps} steps, {self.seconds:.1f} s"
        )

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)


def write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``<path>.tmp``, fsync'd, then renamed: readers see old or new, never half."""
    partial = path.with_name(path.name + ".tmp")
    try:
        with partial.open("wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A fine-tuning checkpoint, read with the safe unpickler (tensors and plain values only)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the safe unpickler refuses anything else, with varied types
        raise FinetuneError(
            f"{path}: not a readable fine-tuning checkpoint ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path}: not a fine-tuning checkpoint of format {CHECKPOINT_FORMAT}")
    return checkpoint
