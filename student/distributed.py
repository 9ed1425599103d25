"""Data-parallel training under ``torchrun``: process group, data sharding, reductions, rank-0 duties.

    torchrun --nproc_per_node=2 -m student train --config student/configs/hico.yaml
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        --nproc_per_node=4 -m student train ...

``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): NCCL and ``cuda:LOCAL_RANK`` on CUDA, gloo on CPU. Without
that environment (plain ``python -m student train``) it returns a single-process context and every
helper below degrades to the identity, so the trainer has one code path.

Data: ``DistributedEpochSampler`` shards the trainer's epoch order (a function of (seed, epoch),
``student.engine.EpochSampler``): rank r takes positions r, r + W, r + 2W, ... of the same global
permutation, with the per-sample augmentation seeds of the single-process run. With a per-rank
batch of B / W, step k of the W ranks together sees exactly the B samples of step k of one process
with batch B; every HOI loss term divides by counts averaged over the ranks (pairs, verb
positives, object class weights: ``HOICriterion.num_pairs``), so DDP's gradient average is the
single-process gradient up to float rounding and padding (``docs/distributed.md``).

Evaluation: every rank predicts its shard of the test images (``shard_positions``) and rank 0
gathers the entries (``gather_entries``) and scores them.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from student.engine import EpochSampler

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
CPU = torch.device("cpu")


class DistributedError(RuntimeError):
    """The distributed environment is inconsistent; the message names the variable and the value."""


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is in the job, and where it computes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def _env_int(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer") from None


def torchrun_environment(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables, or None when not launched by it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise DistributedError(f"WORLD_SIZE is set but {', '.join(missing)} is not (launch with torchrun)")
    rank, world, local = (_env_int(env, name) for name in TORCHRUN_VARIABLES)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistributedContext:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a single-process context otherwise.

    ``device``: the run's ``run.device`` (``auto``, ``cpu``, ``cuda``); under torchrun a CUDA
    process uses ``cuda:LOCAL_RANK``. ``timeout_s`` bounds collective operations (a rank that
    died is noticed instead of hanging forever).
    """
    found = torchrun_environment()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if found is None or found[1] == 1:
        rank, world, local = found or (0, 1, 0)
        chosen = torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
        return DistributedContext(rank, world, local, chosen, None)
    rank, world, local = found
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        chosen, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(chosen)
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend, store=_attempt_store(rank, world, timeout), rank=rank, world_size=world, timeout=timeout
        )
    return DistributedContext(rank, world, local, chosen, backend)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's key-value store, under a prefix of this restart attempt.

    torchrun keeps one store across the restarts of its workers (``--max_restarts``). Without
    the prefix, restarted workers read the peer addresses the dead attempt published and gloo
    fails with "connectFullMesh ... Connection refused". torchrun's agent hosts the store
    (``TORCHELASTIC_USE_AGENT_STORE``); launched otherwise, rank 0 hosts it.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT")
    if port is None:
        raise DistributedError("MASTER_PORT is not set (launch with torchrun)")
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(address, int(port), world, is_master=rank == 0 and not hosted_by_agent, timeout=timeout)
    return dist.PrefixStore(f"hoi-distill/attempt-{attempt}", store)


def shutdown(context: DistributedContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if context.is_distributed and dist.is_initialized():
        # Free what may still hold the group (the DDP reducer, finished work handles) while the
        # interpreter is fully alive: gloo threads that outlive it abort the process at exit.
        gc.collect()
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


# -- the model -----------------------------------------------------------------------------------


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when distributed, else ``model`` itself.

    Buffers go from rank 0 to every rank once, at wrapping, and never before a forward: the
    detector's only buffers are frozen batch-norm statistics, which never change, so re-sending
    them every step would be wasted traffic; but each rank seeds with ``seed + rank``, and
    statistics calibrated on its own random CNN would otherwise differ from rank to rank for the
    whole run. torch >= 2.13 says this as ``forward_sync_buffers=False`` (``broadcast_buffers`` is
    deprecated there); older versions' ``broadcast_buffers=False`` also skips the initial copy,
    so the buffers are sent here.
    """
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=device_ids, forward_sync_buffers=False)
    wrapped = ddp(model, device_ids=device_ids, broadcast_buffers=False)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return wrapped


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (what checkpoints store and evaluation runs)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- data ----------------------------------------------------------------------------------------


class DistributedEpochSampler(EpochSampler):
    """This rank's share of ``EpochSampler``'s order: positions ``rank, rank + W, ...``.

    The order is padded by repeating its start to a multiple of ``world_size`` (as torch's
    ``DistributedSampler``), so every rank runs the same number of steps. ``set_epoch(epoch,
    start)`` skips this rank's first ``start`` samples (a resume in the middle of an epoch).
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int, shuffle: bool = True) -> None:
        super().__init__(size, seed, shuffle)
        if not 0 <= rank < world_size:
            raise DistributedError(f"rank {rank} outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise DistributedError(f"DistributedEpochSampler: start {start} outside 0..{self.per_rank}")
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, seeds) of this rank in ``epoch`` (``per_rank`` each)."""
        indices, seeds = self.order(epoch)
        total = self.per_rank * self.world_size
        repeat = np.resize(np.arange(self.size), total)  # positions, wrapping around to pad
        mine = repeat[self.rank :: self.world_size]
        return indices[mine], seeds[mine]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.shard(self.epoch)
        for position in range(self.start, self.per_rank):
            yield int(indices[position]), int(seeds[position])

    def __len__(self) -> int:
        return self.per_rank - self.start


def per_rank_batch_size(global_batch: int, context: DistributedContext) -> int:
    """``global_batch / world_size``; ``DistributedError`` when it does not divide evenly."""
    if global_batch % context.world_size:
        raise DistributedError(
            f"a global batch of {global_batch} does not split over {context.world_size} ranks; "
            f"use a multiple of {context.world_size}"
        )
    return global_batch // context.world_size


def shard_positions(size: int, context: DistributedContext) -> list[int]:
    """Evaluation: positions ``rank, rank + W, ...`` of ``range(size)``, no padding (no duplicates)."""
    return list(range(context.rank, size, context.world_size))


# -- reductions ----------------------------------------------------------------------------------


def reduce_means(values: Mapping[str, float], context: DistributedContext) -> dict[str, float]:
    """Mean of each value over the ranks that have it (NaN values are left out).

    Ranks may report different keys (e.g. ``loss_itm`` only where the teacher answered); the
    union of keys is agreed first, so the collective calls match on every rank.
    """
    if not context.is_distributed:
        return dict(values)
    keys = sorted({key for keys in gather_objects(sorted(values), context) for key in keys})
    numbers = [float(values.get(key, math.nan)) for key in keys]
    totals = torch.tensor(
        [[0.0 if math.isnan(v) else v for v in numbers], [0.0 if math.isnan(v) else 1.0 for v in numbers]],
        dtype=torch.float64,
        device=context.device,
    )
    dist.all_reduce(totals)
    return {key: float(totals[0, i] / totals[1, i]) if totals[1, i] > 0 else math.nan for i, key in enumerate(keys)}


def reduce_sums(values: Mapping[str, float], context: DistributedContext) -> dict[str, float]:
    """Sum of each value over the ranks (counters: failed teacher batches, pairs scored...).

    Every rank must pass the same keys.
    """
    if not context.is_distributed:
        return dict(values)
    keys = sorted(values)
    totals = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=context.device)
    dist.all_reduce(totals)
    return {key: float(totals[i]) for i, key in enumerate(keys)}


def gather_objects(value: T, context: DistributedContext) -> list[T]:
    """``value`` of every rank, in rank order (any picklable object)."""
    if not context.is_distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_entries(entries: Sequence[T | None], context: DistributedContext) -> list[T | None]:
    """Merge per-rank lists indexed alike (e.g. preds.json entries by ``image_id``), each rank
    filling its own positions; a position no rank filled stays None."""
    merged: list[T | None] = list(entries)
    for other in gather_objects(list(entries), context):
        if len(other) != len(merged):
            raise DistributedError(f"ranks gathered lists of {len(merged)} and {len(other)} entries")
        for index, entry in enumerate(other):
            if merged[index] is None and entry is not None:
                merged[index] = entry
    return merged


# -- rank-0 duties -------------------------------------------------------------------------------


def on_main(context: DistributedContext, action: Callable[[], T]) -> T | None:
    """Run ``action`` on rank 0 only (e.g. write a checkpoint), then wait for it on every rank.

    The barrier makes a checkpoint complete before any rank goes on (a rank killed right after
    cannot leave the job with a half-written file, which ``save_checkpoint`` writes atomically).
    """
    result = action() if context.is_main else None
    barrier(context)
    return result
