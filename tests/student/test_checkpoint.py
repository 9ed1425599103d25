"""Checkpoints: atomic writes, safe loading, RNG capture, and bit-exact resumption of training."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from testkit import DEMO_CONFIG
from testkit.servers import free_port
from torch import nn

from student.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainingPosition,
    capture_rng_state,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    restore_training,
    save_checkpoint,
)
from student.config import load_config
from student.training import train


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _parts() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], 0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_rng_states_round_trip() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = [_draws() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(state)
    assert [_draws() for _ in range(3)] == expected


def test_save_is_loadable_with_weights_only_and_restores_everything(tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts()
    path = save_checkpoint(
        tmp_path / CHECKPOINT_NAME,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position=TrainingPosition(epoch=3, batches_done=7, global_step=42),
        config={"optim": {"lr": 0.1}},
        extra={"note": "x"},
    )
    assert not path.with_name(path.name + ".tmp").exists()
    raw = torch.load(path, weights_only=True)  # the safe unpickler reads every part
    assert raw["config"] == {"optim": {"lr": 0.1}} and raw["extra"] == {"note": "x"}

    expected = _draws()
    _draws()  # move every RNG on; restoring must bring them back
    fresh_model, fresh_optimizer, fresh_scheduler = _parts()
    position = restore_training(
        load_checkpoint(path), model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler
    )
    assert position == TrainingPosition(3, 7, 42)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh_model.state_dict()[name])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert _draws() == expected


def test_rng_states_stay_on_the_cpu_whatever_the_map_location(tmp_path: Path) -> None:
    # A GPU run loads its checkpoint with map_location=cuda:N; torch.set_rng_state and .numpy()
    # only take CPU tensors, so RNG states must never follow map_location. 'meta' stands in
    # for a device that is not the CPU (there is no GPU here); weights do follow it.
    model, optimizer, scheduler = _parts()
    path = save_checkpoint(
        tmp_path / CHECKPOINT_NAME,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position=TrainingPosition(),
        config={},
    )
    expected = _draws()
    _draws()
    checkpoint = load_checkpoint(path, map_location="meta")
    assert {tensor.device.type for tensor in checkpoint["model"].values()} == {"meta"}
    restore_rng_state(checkpoint["rng"])
    assert _draws() == expected


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts()
    path = tmp_path / CHECKPOINT_NAME
    common = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "config": {}}
    save_checkpoint(path, position=TrainingPosition(1, 0, 10), **common)
    # A lock cannot be pickled: the same TypeError on every Python (a lambda's error type differs).
    with pytest.raises(TypeError, match=r"cannot pickle '_thread.lock' object"):
        save_checkpoint(path, position=TrainingPosition(2, 0, 20), extra={"bad": threading.Lock()}, **common)
    assert load_checkpoint(path)["position"]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_load_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    other = tmp_path / "other.pth"
    torch.save({"model": {}}, other)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(other)


def test_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"format_version": 1, "payload": Path("/etc/passwd")}, path)  # not a plain type
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_restoring_into_another_architecture_fails_clearly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _parts()
    path = save_checkpoint(
        tmp_path / CHECKPOINT_NAME,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position=TrainingPosition(),
        config={},
    )
    other = nn.Linear(3, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match="do not fit this model"):
        restore_training(
            load_checkpoint(path),
            model=other,
            optimizer=other_optimizer,
            scheduler=torch.optim.lr_scheduler.MultiStepLR(other_optimizer, [2]),
        )


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to continue yet: start fresh
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == tmp_path / CHECKPOINT_NAME
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == tmp_path / CHECKPOINT_NAME
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "missing.pth"), tmp_path)


# -- resuming a real training run --------------------------------------------------------------


@pytest.fixture(scope="module")
def six_images(synthetic_data) -> Path:
    return synthetic_data(6, 2, seed=5)


def _config(root: Path, output: Path, max_steps: int, *extra: str):
    return load_config(
        DEMO_CONFIG,
        [
            f"data.root={root}",
            f"run.output_dir={output}",
            "data.scales=[56, 64]",  # multi-scale, flip and crop: augmentation draws random numbers
            "data.max_size=96",
            "data.test_scale=64",
            "data.crop=true",
            "data.num_workers=0",
            "model.backbone.base_width=8",
            "model.transformer.d_model=32",
            "model.transformer.dim_feedforward=32",
            "model.transformer.dropout=0.2",  # dropout draws from torch's RNG in every step
            "model.transformer.num_encoder_layers=1",
            "model.decoder.num_queries=4",
            "optim.batch_size=2",  # 6 images: 3 batches per epoch
            "schedule.epochs=3",
            "schedule.lr_drop=[1]",  # the scheduler state matters after the first epoch
            f"schedule.max_steps={max_steps}",
            "teacher.source=none",
            "run.eval_at_end=false",
            "run.progress=false",
            "run.num_threads=1",
            "run.seed=7",
            *extra,
        ],
    )


@pytest.mark.parametrize("stop_at", [2, 3, 4], ids=["mid-epoch", "epoch-end", "mid-second-epoch"])
def test_resume_is_bit_exact(six_images: Path, tmp_path: Path, stop_at: int) -> None:
    total = 5
    # The straight run also evaluates after its first epoch: evaluation must not disturb training.
    straight = train(_config(six_images, tmp_path / "straight", total, "run.eval_every=1"))
    train(_config(six_images, tmp_path / "split", stop_at))
    stopped = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert stopped["position"]["global_step"] == stop_at
    assert stopped["position"] == {"epoch": stop_at // 3, "batches_done": stop_at % 3, "global_step": stop_at}

    # Stir every global RNG: resumption must not depend on the state of the process it runs in.
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    resumed = train(_config(six_images, tmp_path / "split", total), resume="auto")

    assert resumed.position == straight.position == TrainingPosition(1, 2, 5)
    assert straight.model is not None and resumed.model is not None
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    changed = [name for name in expected if not torch.equal(expected[name], stopped["model"][name])]
    assert changed, "training did not change the model: the comparison below would be vacuous"
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == []
    straight_ckpt = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    resumed_ckpt = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert straight_ckpt["scheduler"] == resumed_ckpt["scheduler"]
    for index, state in straight_ckpt["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed_ckpt["optimizer"]["state"][index]["exp_avg_sq"])


# -- per-rank random numbers under DDP ---------------------------------------------------------


def _resume_rank(rank: int, world: int, ports: list[int], root: str, output: str) -> None:
    """One of 2 gloo ranks: a straight 4-step run, a run stopped at step 3, its resume to step 4.

    After each, the rank writes its next Python, NumPy and torch draws: they show whose RNG
    state the rank continued from.
    """
    phases = (("straight", 4, None), ("split", 3, None), ("split", 4, "auto"))
    for number, ((name, steps, resume), port) in enumerate(zip(phases, ports, strict=True)):
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
        )
        # Stir every global RNG differently on each rank and phase: nothing may depend on it.
        random.seed(100 * number + rank)
        np.random.seed(100 * number + rank)
        torch.manual_seed(100 * number + rank)
        train(_config(Path(root), Path(output) / name, steps), resume=resume)
        (Path(output) / f"phase{number}-rank{rank}.json").write_text(json.dumps(_draws()))


def test_every_rank_has_its_own_random_numbers_and_resumes_them_exactly(six_images: Path, tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    mp.spawn(_resume_rank, args=(2, ports, str(six_images), str(tmp_path)), nprocs=2, join=True)

    def draws(phase: int, rank: int) -> list[float]:
        return json.loads((tmp_path / f"phase{phase}-rank{rank}.json").read_text())

    # seed + rank: the ranks draw different dropout masks (and everything else random).
    assert all(a != b for a, b in zip(draws(0, 0), draws(0, 1), strict=True))
    # Resumed at step 3, each rank goes on from its own saved state, as if it had never stopped.
    for rank in range(2):
        assert draws(2, rank) == draws(0, rank)
    checkpoint = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert len(checkpoint["rank_rng"]) == 2
    assert not torch.equal(checkpoint["rank_rng"][0]["torch"], checkpoint["rank_rng"][1]["torch"])
    straight = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert straight["position"] == checkpoint["position"] == {"epoch": 2, "batches_done": 0, "global_step": 4}
    weights, resumed = straight["model"], checkpoint["model"]
    assert [name for name in weights if not torch.equal(weights[name], resumed[name])] == []
