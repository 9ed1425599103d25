"""Numeric precision, one set of rules for the teacher and the student.

- Which reduced-precision dtype a device gets (``choose_dtype``): bf16 only where the CUDA device
  has bf16 tensor cores, compute capability >= 8.0 (Ampere and later) of *that* device; fp16
  below (trainers then need a gradient scaler: fp16's range is small). ``torch.cuda.
  is_bf16_supported()`` is not the test: it answers for the current device only, and it says
  yes on pre-Ampere cards, where bf16 runs emulated and several times slower than fp16.
- Layers whose outputs must keep full precision (``fp32_linear``, ``fp32_autocast_off``): box
  regression and the ITM head. Their inputs are cast to fp32 and autocast is off inside, so
  they compute as in an fp32 model whatever precision the layers before them ran in.

The student imports this module (the teacher never imports the student).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

#: Compute capability of the first CUDA devices with bf16 tensor cores (A100, RTX 30xx).
BF16_MIN_CAPABILITY = (8, 0)
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Capability = tuple[int, int]


class PrecisionError(ValueError):
    """A precision setting does not fit the device; the message names the setting and the limit."""


def device_capability(device: torch.device) -> Capability | None:
    """(major, minor) compute capability of a CUDA ``device`` (its own, not the current one's);
    None for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def choose_dtype(requested: str, capability: Capability | None, *, name: str) -> torch.dtype | None:
    """The reduced-precision dtype for the setting ``name`` = ``requested`` on a device of ``capability``.

    requested: ``auto``, ``bf16``, ``fp16`` or ``fp32``. capability: the CUDA device's
    (major, minor), None when the device is not CUDA. Returns None for fp32 (no autocast, no
    cast), else the dtype:

    - ``auto``: None off CUDA; bf16 from capability 8.0, fp16 below;
    - ``bf16`` on a CUDA device below 8.0: ``PrecisionError`` (it would run emulated);
    - otherwise as asked (off CUDA the caller decides whether it supports bf16 / fp16).
    """
    if requested == "auto":
        if capability is None:
            return None
        return torch.bfloat16 if tuple(capability) >= BF16_MIN_CAPABILITY else torch.float16
    if requested not in DTYPE_NAMES:
        raise PrecisionError(f"{name} {requested!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    if requested == "bf16" and capability is not None and tuple(capability) < BF16_MIN_CAPABILITY:
        major, minor = BF16_MIN_CAPABILITY
        raise PrecisionError(
            f"{name}: bf16 needs compute capability >= {major}.{minor} (bf16 tensor cores); this device has "
            f"{capability[0]}.{capability[1]}: use auto or fp16"
        )
    dtype = DTYPE_NAMES[requested]
    return None if dtype == torch.float32 else dtype


def fp32_autocast_off(x: Tensor) -> AbstractContextManager:
    """A context in which autocast is off for ``x``'s device type (ops run in their inputs' dtype)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def fp32_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` computed in fp32, whatever the autocast state and the dtype of ``layer`` and ``x``.

    x: (..., in) -> (..., out) float32. Gradients reach ``layer`` and ``x`` through the casts.
    """
    bias = None if layer.bias is None else layer.bias.float()
    with fp32_autocast_off(x):
        return nn.functional.linear(x.float(), layer.weight.float(), bias)
