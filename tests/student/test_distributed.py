"""Data-parallel training with 2 gloo ranks on CPU against the same run in one process."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from testkit import DEMO_CONFIG
from testkit.servers import free_port
from testkit.student import tiny_overrides, write_synthetic

from student.config import load_config
from student.distributed import (
    DistributedContext,
    DistributedEpochSampler,
    DistributedError,
    gather_entries,
    init_distributed,
    on_main,
    per_rank_batch_size,
    reduce_means,
    reduce_sums,
    shard_positions,
    shutdown,
    torchrun_environment,
    unwrap_model,
    wrap_model,
)
from student.engine import EpochSampler, StepInfo, train_one_epoch

torch.set_num_threads(1)
GLOBAL_BATCH = 4
EPOCHS = 2
# Loss of every step, 2 ranks (mean of the ranks) vs 1 process with the same global batch.
# Every loss term divides by counts averaged over the ranks (HOICriterion.num_pairs), and the
# images all have one size (so each rank pads its batch as the single process does): DDP then
# computes the single process's gradient, up to float rounding in a different order. Measured:
# the first step's terms agree to ~1e-6, the 6-step curve to ~1e-4 relative.
LOSS_RTOL = 1e-3
FIRST_STEP_RTOL = 1e-4
IMAGE_WIDTH = 72  # px: the synthetic widths are 64, 72 or 80 at image_size 64
TRAIN_IMAGES = 12


def tiny_run(root: Path, output: Path) -> list[str]:
    return tiny_overrides(
        root, output, "optim.lr=1e-3", "optim.backbone_lr=1e-3", "teacher.source=none", "run.progress=false"
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = write_synthetic(tmp_path_factory.mktemp("synthetic"), 6 * TRAIN_IMAGES, 2, seed=5)  # edited below
    # Keep TRAIN_IMAGES images of one width: padding is then the same however a batch is split.
    path = root / "annotations" / "trainval_hico.json"
    entries = json.loads(path.read_text())
    same = [e for e in entries if Image.open(root / "images" / "train" / e["file_name"]).width == IMAGE_WIDTH]
    assert len(same) >= TRAIN_IMAGES
    path.write_text(json.dumps(same[:TRAIN_IMAGES]))
    return root


def run_training(root: Path, output: Path, context: DistributedContext) -> tuple[list[dict[str, float]], list[float]]:
    """EPOCHS epochs with the global batch split over the ranks; (per-step loss terms, weight updates)."""
    from torch.utils.data import DataLoader

    from student.builders import build_loss, build_model, build_optimizer, build_train_dataset, seed_everything
    from student.data.collate import collate_fn
    from student.engine import SeededSamples

    torch.set_num_threads(1)
    config = load_config(DEMO_CONFIG, tiny_run(root, output))
    seed_everything(config.run.seed)
    model = wrap_model(build_model(config, context.device), context)
    optimizer = build_optimizer(unwrap_model(model), config)  # type: ignore[arg-type]
    loss_fn = build_loss(config, None)
    dataset = build_train_dataset(config)
    sampler = DistributedEpochSampler(len(dataset), config.run.seed, context.rank, context.world_size)
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=per_rank_batch_size(GLOBAL_BATCH, context),
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=0,
    )
    losses: list[dict[str, float]] = []
    initial = torch.cat([p.detach().flatten() for p in unwrap_model(model).parameters()]).clone()

    def record(info: StepInfo) -> None:
        losses.append(dict(info.terms))

    step = 0
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        result = train_one_epoch(
            model,
            loss_fn,
            optimizer,
            loader,
            device=context.device,
            epoch=epoch,
            global_step=step,
            hooks=[record],
            progress=False,
        )
        step = result.global_step
    final = torch.cat([p.detach().flatten() for p in unwrap_model(model).parameters()])
    return losses, (final - initial).tolist()


def rank_main(rank: int, world: int, port: int, root: str, output: str) -> None:
    """One rank of the spawned job: train, check the collectives, write what rank 0 saw."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    context = init_distributed("cpu", timeout_s=120)
    try:
        assert context.is_distributed and context.backend == "gloo"
        # The only buffers are frozen batch-norm statistics, equal everywhere: no re-broadcast per step.
        assert wrap_model(torch.nn.Linear(2, 2), context).broadcast_buffers is False
        # ...but once, when wrapping: DDP then leaves buffers out of its initial copy of rank 0's
        # state, and each rank calibrated its statistics on its own (seed + rank) random CNN.
        probe = torch.nn.BatchNorm1d(2)
        probe.running_mean.fill_(float(rank))
        with warnings.catch_warnings():  # and without torch's deprecation of broadcast_buffers
            warnings.simplefilter("error", FutureWarning)
            wrap_model(probe, context)
        assert probe.running_mean.tolist() == [0.0, 0.0]
        losses, parameters = run_training(Path(root), Path(output), context)
        # The ranks' step losses and parameters, each rank filling its own slot, merged on every rank.
        mine: list[dict[str, Any] | None] = [None] * world
        mine[rank] = {"losses": losses, "parameters": parameters}
        gathered = gather_entries(mine, context)
        means = reduce_means({"rank": float(rank), **({"only_rank0": 5.0} if rank == 0 else {})}, context)
        sums = reduce_sums({"one": 1.0}, context)

        def write() -> str:
            path = Path(output) / "result.json"
            path.write_text(json.dumps({"gathered": gathered, "means": means, "sums": sums, "world": world}))
            return str(path)

        written = on_main(context, write)
        assert (written is not None) == context.is_main
    finally:
        shutdown(context)


def test_two_gloo_ranks_follow_the_single_process_loss_curve(data_root: Path, tmp_path: Path) -> None:
    single_losses, single_parameters = run_training(data_root, tmp_path / "single", DistributedContext())
    output = tmp_path / "ddp"
    output.mkdir()
    mp.spawn(rank_main, args=(2, free_port(), str(data_root), str(output)), nprocs=2, join=True)
    result = json.loads((output / "result.json").read_text())
    ranks = result["gathered"]
    assert len(ranks) == 2 and all(r is not None for r in ranks)
    steps = len(single_losses)
    assert steps == EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == steps

    def curve(losses: list[dict[str, float]], key: str = "loss") -> np.ndarray:
        return np.array([step[key] for step in losses])

    ddp_losses = (curve(ranks[0]["losses"]) + curve(ranks[1]["losses"])) / 2
    np.testing.assert_allclose(ddp_losses, curve(single_losses), rtol=LOSS_RTOL)
    # First step: the same samples and weights, so every term (the mean over the ranks of terms
    # each normalised by the global counts) is the single process's term.
    for key, value in single_losses[0].items():
        if key.startswith("loss"):
            first = (ranks[0]["losses"][0][key] + ranks[1]["losses"][0][key]) / 2
            assert first == pytest.approx(value, rel=FIRST_STEP_RTOL), key
    # DDP keeps the ranks' weights identical, and they took the single process's steps.
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    ddp_update, single_update = np.array(ranks[0]["parameters"]), np.array(single_parameters)
    cosine = ddp_update @ single_update / (np.linalg.norm(ddp_update) * np.linalg.norm(single_update))
    assert cosine > 0.999
    assert result["means"] == {"only_rank0": 5.0, "rank": 0.5}
    assert result["sums"] == {"one": 2.0}
    assert sorted(p.name for p in output.iterdir()) == ["result.json"]


def test_shards_cover_the_global_order_and_batches_match() -> None:
    size, seed = 10, 3
    single = list(EpochSampler(size, seed))
    shards = [DistributedEpochSampler(size, seed, rank, 2) for rank in range(2)]
    for shard in shards:
        shard.set_epoch(0)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 5
    # Interleaved, the ranks walk the single-process order (seeds included).
    assert [x for pair in zip(a, b, strict=True) for x in pair] == single
    # Batch k of 2 ranks x 2 = batch k of one process x 4.
    assert set(a[2:4] + b[2:4]) == set(single[4:8])
    # An odd size pads by wrapping around: every rank runs the same number of steps.
    odd = [DistributedEpochSampler(5, seed, rank, 2) for rank in range(2)]
    assert [len(s) for s in odd] == [3, 3]
    assert set(list(odd[0]) + list(odd[1])) == set(EpochSampler(5, seed))
    # Another epoch, another order; a resume skips this rank's first samples.
    shards[0].set_epoch(1)
    epoch1 = list(shards[0])
    assert epoch1 != a
    shards[0].set_epoch(1, start=2)
    assert list(shards[0]) == epoch1[2:]
    with pytest.raises(DistributedError, match="start 9"):
        shards[0].set_epoch(0, start=9)
    with pytest.raises(DistributedError, match="rank 2"):
        DistributedEpochSampler(size, seed, 2, 2)


def test_single_process_helpers_are_identities() -> None:
    context = DistributedContext()
    assert context.is_main and not context.is_distributed
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, context) is model and unwrap_model(model) is model
    assert reduce_means({"a": 1.5}, context) == {"a": 1.5}
    assert gather_entries([None, 3], context) == [None, 3]
    assert on_main(context, lambda: 7) == 7
    assert shard_positions(5, DistributedContext(rank=1, world_size=2)) == [1, 3]
    assert per_rank_batch_size(8, DistributedContext(world_size=4)) == 2
    with pytest.raises(DistributedError, match="multiple of 3"):
        per_rank_batch_size(8, DistributedContext(world_size=3))


def test_torchrun_environment_is_parsed_and_checked() -> None:
    assert torchrun_environment({}) is None
    assert torchrun_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "0 <= RANK < WORLD_SIZE"),
    ]
    for env, message in bad:
        with pytest.raises(DistributedError, match=message):
            torchrun_environment(env)
