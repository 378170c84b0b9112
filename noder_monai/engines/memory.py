"""Memory of a fit: its peak estimated from the image size and the number of scans, and the memory free for it.

:func:`check_fit_memory` refuses a fit whose estimate exceeds the free memory before anything is allocated, with a
message that names the size, the estimate, the free memory and what to change; a fit that would not fit is then
stopped with a clear error instead of being killed by the operating system. The estimate is linear in voxels x
scans, voxels, and the voxels on which an epoch computes the dense field and the similarity (the whole grid, or the
similarity's box on a large one), fitted to the peaks of CPU fits from 64^3 to 182x218x182 with 3 and 6 scans and
rounded up; with ``source="auto"`` the larger of that and the peak of choosing the appearance after the fit (every
observed scan's field and inverse field at full resolution at once), linear in voxels x scans
(``benchmarks/README.md``, "Memory guard"). On CUDA the same model is used for the device's memory.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

__all__ = ["FIT_BYTES_PER_VOXEL_SCAN", "FIT_BYTES_PER_VOXEL", "FIT_BYTES_PER_SIMILARITY_VOXEL", "FIT_BYTES_FIXED",
           "CHOICE_BYTES_PER_VOXEL_SCAN", "CHOICE_BYTES_FIXED", "fit_memory_estimate", "free_memory",
           "check_fit_memory"]

#: Bytes per voxel and scan of a fit's peak above the memory in use when it starts (the scans' working copies, the
#: level images, the decoder's activations and the template's inverse maps; measured, ``benchmarks/README.md``).
FIT_BYTES_PER_VOXEL_SCAN = 24.0
#: Bytes per voxel of the peak that do not grow with the number of scans (one inverse map's working memory).
FIT_BYTES_PER_VOXEL = 72.0
#: Bytes per voxel on which an epoch computes the dense field, the warp and the similarity, forward and backward
#: (:func:`~noder_monai.engines.levels.similarity_region_voxels`).
FIT_BYTES_PER_SIMILARITY_VOXEL = 740.0
#: Bytes of the peak that grow with none of these (the network, the solver).
FIT_BYTES_FIXED = 64 * 2**20
#: Bytes per voxel and scan of the peak while ``source="auto"`` chooses the appearance after the fit
#: (:func:`~noder_monai.model.appearance.select_source`).
CHOICE_BYTES_PER_VOXEL_SCAN = 96.0
#: Bytes of that peak that do not grow with the image.
CHOICE_BYTES_FIXED = 192 * 2**20
#: The estimate is multiplied by this before it is compared with the free memory.
SAFETY_FACTOR = 1.2


def fit_memory_estimate(
    spatial_size: Sequence[int], scans: int, similarity_voxels: int | None = None, source: str = "auto"
) -> int:
    """The peak memory, in bytes, that a default fit of ``scans`` scans of ``spatial_size`` adds to what is in use
    when it starts: ``voxels * (FIT_BYTES_PER_VOXEL_SCAN * scans + FIT_BYTES_PER_VOXEL) + similarity_voxels *
    FIT_BYTES_PER_SIMILARITY_VOXEL + FIT_BYTES_FIXED``; with ``source="auto"`` at least
    ``voxels * scans * CHOICE_BYTES_PER_VOXEL_SCAN + CHOICE_BYTES_FIXED``.

    Args:
        spatial_size: the scans' grid (2 or 3 sizes; a 2D image counts as one slice).
        scans: the number of observed scans (>= 2).
        similarity_voxels: the voxels on which an epoch computes the dense field and the similarity
            (:func:`~noder_monai.engines.levels.similarity_region_voxels`); None: the whole grid.
        source: the fit's ``FitConfig.source``.

    Raises:
        ValueError: for a size that is not 2 or 3 positive integers or fewer than 2 scans.
    """
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in (2, 3) or min(size) < 1:
        raise ValueError(f"spatial_size must be 2 or 3 positive integers, got {tuple(spatial_size)}.")
    if int(scans) < 2:
        raise ValueError(f"scans must be >= 2, got {scans!r}.")
    voxels = math.prod(size)
    region = voxels if similarity_voxels is None else min(voxels, int(similarity_voxels))
    fit = voxels * (FIT_BYTES_PER_VOXEL_SCAN * int(scans) + FIT_BYTES_PER_VOXEL)
    fit += region * FIT_BYTES_PER_SIMILARITY_VOXEL + FIT_BYTES_FIXED
    if source != "auto":
        return int(fit)
    return int(max(fit, voxels * int(scans) * CHOICE_BYTES_PER_VOXEL_SCAN + CHOICE_BYTES_FIXED))


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file or line)."""
    try:
        with open(path, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(folder: str = "/sys/fs/cgroup") -> int | None:
    """What the cgroup v2 memory limit of this process leaves (``memory.max`` minus ``memory.current``), in bytes;
    None without a limit."""
    try:
        with open(os.path.join(folder, "memory.max"), encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(folder, "memory.current"), encoding="ascii") as handle:
            return max(0, int(limit) - int(handle.read().strip()))
    except (OSError, ValueError):
        return None


def free_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes free for a fit on ``device``: on CUDA ``torch.cuda.mem_get_info``'s free memory; on the CPU the
    operating system's available memory (Linux ``/proc/meminfo`` ``MemAvailable``, lowered to what a cgroup memory
    limit leaves). None where it cannot be read (another operating system), and then nothing is refused."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    values = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(values) if values else None


def check_fit_memory(spatial_size: Sequence[int], scans: int, device: str | torch.device = "cpu",
                     subject: str = "subject", similarity_voxels: int | None = None, source: str = "auto") -> None:
    """Refuse a fit whose estimated peak (:func:`fit_memory_estimate`, times a safety factor of 1.2) exceeds the
    memory free on ``device`` (:func:`free_memory`), before anything is allocated.

    Raises:
        ValueError: naming the subject, the size and number of scans, the estimate, the free memory and the options.
    """
    free = free_memory(device)
    if free is None:
        return
    estimate = fit_memory_estimate(spatial_size, scans, similarity_voxels, source)
    if estimate * SAFETY_FACTOR <= free:
        return
    size = "x".join(str(int(s)) for s in spatial_size)
    per_scan = math.prod(int(s) for s in spatial_size) * FIT_BYTES_PER_VOXEL_SCAN
    raise ValueError(
        f"subject '{subject}': a fit of {scans} scans of {size} voxels needs about {estimate / 2**30:.1f} GB of memory "
        f"(estimate, plus {SAFETY_FACTOR - 1:.0%} margin), but only {free / 2**30:.1f} GB is free on "
        f"{torch.device(device)}. Options: fit fewer scans at once (about {per_scan / 2**30:.2f} GB less per scan; "
        f"split the subject's scans into overlapping runs), a coarser finest level (resample the scans: half the "
        f"resolution needs about 1/8 of the memory per voxel), or free memory / use a device with more."
    )
