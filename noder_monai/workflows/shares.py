"""Which process does which subjects: torchrun's ranks, their devices and threads, cost-balanced shares.

One subject is the unit of work (its own network and optimizer), so processes started by ``torchrun`` need no
gradient exchange: each rank takes a disjoint share of the subjects (:func:`partition_subjects`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.data import partition_dataset

from noder_monai.data import SubjectEntry
from noder_monai.utils import free_cores

__all__ = ["dist_env", "partition_subjects", "rank_device", "rank_threads"]


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
    ``(0, 1, 0)`` outside it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"dist_env: RANK={rank} and WORLD_SIZE={world} are inconsistent.")
    return rank, world, local


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available (or ``device`` is a plain ``"cuda"``),
    else ``device`` or the CPU. An explicit ``cuda:K`` or ``cpu`` is kept.

    A CUDA device is also made the process's current device (``torch.cuda.set_device``) when CUDA is available, so
    that what uses the current device (a CUDA context, ``torch.cuda.synchronize()`` without argument) does not
    touch ``cuda:0`` from every rank."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_env()[2] % max(1, torch.cuda.device_count()))
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(device)
    return device


def rank_threads(num_threads: int | None = None) -> int:
    """Torch CPU threads of this process: ``num_threads`` if given, else the idle cores
    (:func:`noder_monai.utils.free_cores`) divided among the ranks on this machine (``LOCAL_WORLD_SIZE``)."""
    if num_threads is not None:
        return num_threads
    return max(1, free_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def partition_subjects(
    subjects: Sequence[SubjectEntry],
    rank: int | None = None,
    world_size: int | None = None,
    costs: Sequence[float] | None = None,
) -> list[SubjectEntry]:
    """This rank's share of the subjects: MONAI's ``partition_dataset`` (round robin, no padding, no shuffle) over
    the subjects sorted by cost, largest first, so every rank gets about the same total cost; the share is in that
    order (largest first, which shortens the tail). The same on every rank for the same datalist and files.

    Args:
        subjects: the whole cohort.
        rank, world_size: default from :func:`dist_env`.
        costs: per subject; default :meth:`SubjectEntry.cost` (voxels x scans).
    """
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"partition_subjects: rank must be in [0, {world_size}), got {rank}.")
    subjects = list(subjects)
    costs = [s.cost() for s in subjects] if costs is None else list(costs)
    if len(costs) != len(subjects):
        raise ValueError(f"partition_subjects: {len(costs)} costs for {len(subjects)} subjects.")
    order = sorted(range(len(subjects)), key=lambda i: (-costs[i], subjects[i].id))
    if world_size == 1:
        return [subjects[i] for i in order]
    shares = partition_dataset(order, num_partitions=world_size, shuffle=False, even_divisible=False)
    return [subjects[i] for i in shares[rank]]
