"""Precision choices: bf16 only from compute capability 8.0, fp32 layers under autocast, AMP plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student.builders import amp_settings
from student.config import ConfigError, load_config
from teacher_server.engine import resolve_dtype
from teacher_server.errors import ModelLoadError
from teacher_server.precision import BF16_MIN_CAPABILITY, PrecisionError, choose_dtype, fp32_linear

torch.set_num_threads(1)
# (major, minor) compute capabilities of real cards: V100, T4, A100, RTX 3090, H100.
V100, T4, A100, RTX3090, H100 = (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)


def test_auto_is_bf16_from_compute_capability_8_and_fp16_below() -> None:
    assert BF16_MIN_CAPABILITY == (8, 0)  # Ampere: the first bf16 tensor cores
    for capability in (V100, T4):
        assert choose_dtype("auto", capability, name="x") == torch.float16
    for capability in (A100, RTX3090, H100):
        assert choose_dtype("auto", capability, name="x") == torch.bfloat16
    assert choose_dtype("auto", None, name="x") is None  # not CUDA: fp32
    assert choose_dtype("fp32", H100, name="x") is None
    assert choose_dtype("fp16", H100, name="x") == torch.float16


def test_bf16_below_capability_8_is_refused_naming_the_setting_and_the_limit() -> None:
    with pytest.raises(PrecisionError, match=r"optim\.amp_dtype: bf16 needs compute capability >= 8\.0.*7\.5"):
        choose_dtype("bf16", T4, name="optim.amp_dtype")
    assert choose_dtype("bf16", A100, name="x") == torch.bfloat16
    with pytest.raises(PrecisionError, match="dtype 'fp64' is not one of"):
        choose_dtype("fp64", A100, name="dtype")


def test_the_students_amp_plan_follows_the_device() -> None:
    config = load_config(None)
    assert config.optim.amp_dtype == "auto"
    older = amp_settings(config, torch.device("cuda", 0), capability=V100)
    assert (older.enabled, older.dtype, older.grad_scaler) == (True, torch.float16, True)
    newer = amp_settings(config, torch.device("cuda", 0), capability=H100)
    assert (newer.enabled, newer.dtype, newer.grad_scaler) == (True, torch.bfloat16, False)
    cpu = amp_settings(config, torch.device("cpu"), capability=None)
    assert not cpu.enabled and not cpu.grad_scaler  # no autocast on the CPU, whatever the config says
    off = amp_settings(load_config(None, ["optim.amp=false"]), torch.device("cuda", 0), capability=H100)
    assert not off.enabled
    with pytest.raises(ConfigError, match=r"optim\.amp_dtype: bf16 needs compute capability >= 8\.0"):
        amp_settings(load_config(None, ["optim.amp_dtype=bf16"]), torch.device("cuda", 0), capability=V100)


def test_the_teacher_engine_dtype_follows_the_capability_of_its_own_device() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 1), capability=T4) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda", 1), capability=A100) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # the CPU runs bf16 (tests use it)
    with pytest.raises(ModelLoadError, match=r"bf16 needs compute capability >= 8\.0"):
        resolve_dtype("bf16", torch.device("cuda", 0), capability=V100)


def test_fp32_linear_ignores_autocast_and_the_layers_dtype() -> None:
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 2).to(torch.bfloat16)
    x = torch.randn(5, 16, generator=generator).to(torch.bfloat16)
    expected = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = fp32_linear(layer, x)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)
