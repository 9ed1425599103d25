"""The global random number generators' state, for checkpoints that resume exactly.

One place for what the student's checkpoints and the teacher's fine-tuning checkpoints both need:
Python's ``random``, numpy's legacy global generator, torch's CPU generator and, where CUDA is
present, every CUDA device's generator. States are tensors and plain numbers, so a checkpoint
holding them loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """The state of every global RNG, as tensors and plain numbers (``weights_only``-loadable)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored when CUDA is present.

    ``torch.set_rng_state``, ``torch.cuda.set_rng_state_all`` and ``.numpy()`` take CPU tensors
    only, so states loaded onto another device are copied to the CPU first.

    Raises:
        ValueError: the state holds CUDA generators of another number of devices than this
            process sees (restoring some of them would make the resume silently inexact).
    """
    python = state["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["words"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].cpu().numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"the RNG state holds {len(cuda_states)} CUDA generators, this process sees "
                f"{torch.cuda.device_count()} devices"
            )
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in cuda_states])
