"""Multi-process helpers: this process's rank from ``torchrun``'s environment, process groups, shards, reductions.

``torchrun --standalone --nproc_per_node=N -m crfasrnn train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` then joins the group (nccl on CUDA, gloo on CPU). Without those variables everything runs as a single
process and the reductions are no-ops.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "ShardSampler",
    "all_reduce_sum",
    "process_rank",
    "setup",
    "shard",
    "shard_indices",
    "teardown",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from the ``RANK`` and ``WORLD_SIZE`` variables torchrun sets; ``(0, 1)`` without them.

    Raises:
        ValueError: malformed values.
    """
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE must be integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return rank, world


def shard(items: Iterable[T], rank: int, world_size: int) -> list[T]:
    """The items process ``rank`` of ``world_size`` takes: every ``world_size``-th from ``rank`` (balanced).

    Example:
        >>> [shard(range(7), r, 3) for r in range(3)]
        [[0, 3, 6], [1, 4], [2, 5]]
    """
    return list(items)[rank::world_size]


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by ``torchrun`` and choose this process's device.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; under torchrun with
    CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    rank, world = process_rank()
    info = DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if info.enabled:
            dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("process %d of %d joined the %s group on %s", info.rank, info.world_size, backend, dev)
    return info, dev


def teardown(*, wait: bool = True) -> None:
    """Leave the process group. ``gc.collect()`` first: it removed a gloo teardown crash seen about 1 run in 6.

    ``wait``: meet the other processes at a barrier first (the normal end); pass False after an error, when they may
    never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place; returned for convenience). A no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard_indices(length: int, rank: int, world_size: int) -> list[int]:
    """This process's share of ``range(length)`` for evaluation (:func:`shard`): no padding, so each sample is counted
    exactly once over all processes."""
    return shard(range(length), rank, world_size)


class ShardSampler(Sampler[int]):
    """Shuffled, sharded training order that depends only on (seed, epoch), like ``DistributedSampler``.

    Each epoch takes ``torch.randperm(length)`` from a generator seeded with ``seed + epoch``, keeps the first
    ``steps_per_epoch · batch_size · world_size`` indices (incomplete global batches are dropped), and gives process
    ``rank`` every ``world_size``-th of them. So global batch k holds the same samples whatever the number of
    processes (with ``batch_size · world_size`` fixed), and ``skip_batches`` resumes an epoch in the middle.
    """

    def __init__(self, length: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.length, self.batch_size, self.rank, self.world_size, self.seed = length, batch_size, rank, world_size, seed
        self.steps_per_epoch = length // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {length} samples, fewer than one global batch "
                f"(batch size {batch_size} x {world_size} processes)"
            )
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.length, generator=g)[: self.steps_per_epoch * self.batch_size * self.world_size]
        return perm[self.rank :: self.world_size].tolist()[self.skip_batches * self.batch_size :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.skip_batches) * self.batch_size
