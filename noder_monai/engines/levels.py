"""The resolution pyramid of a fit: images block-averaged and smoothed per level, and the NCC window per level.

A level ``L`` is ``L``^d image voxels per level voxel (``NODER.displacement``'s grid at that level); the fit runs
coarse to fine over ``FitConfig.levels``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

from noder_monai.functional import separable_filter
from noder_monai.networks import scale_window
from noder_monai.networks.autoencoder import pad_to_multiple

__all__ = [
    "FINEST_TIME_GROUPS",
    "IMAGE_SMOOTHING_SIGMA",
    "MIN_LEVEL_VOXELS",
    "SIMILARITY_VOXELS",
    "check_finest_time_groups",
    "check_image_smoothing_sigma",
    "check_similarity_voxels",
    "downsample_image",
    "level_image",
    "level_window",
    "similarity_box",
    "similarity_region_voxels",
]


def downsample_image(image: torch.Tensor, level: int) -> torch.Tensor:
    """Average ``level``^d blocks: (N, C, *S) -> (N, C, *ceil(S / level)), edge-replicated at the far border.

    Level voxel ``i`` covers image voxels ``[i * level, (i + 1) * level)``, the grid of ``NODER.displacement``.
    """
    if level == 1:
        return image
    pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
    return pool(pad_to_multiple(image, level, mode="replicate"), level)


#: Default Gaussian sigma (image voxels) of :func:`level_image`: the fit's images are smoothed this much.
IMAGE_SMOOTHING_SIGMA = 0.5


def check_image_smoothing_sigma(sigma: Any) -> float:
    """``sigma`` as a float; raises ValueError naming ``image_smoothing_sigma`` unless it is a finite number >= 0."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"image_smoothing_sigma must be a finite number >= 0 (image voxels), got {sigma!r}.")
    return value


def check_finest_time_groups(groups: Any) -> int:
    """``groups`` unchanged; raises ValueError naming ``finest_time_groups`` unless it is an integer >= 1."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"finest_time_groups must be an integer >= 1, got {groups!r}.")
    return groups


def level_image(image: torch.Tensor, level: int, sigma: float = IMAGE_SMOOTHING_SIGMA) -> torch.Tensor:
    """The image the fit uses at ``level``: :func:`downsample_image`, then a Gaussian of ``sigma / level`` level
    voxels (MONAI's ``gaussian_1d`` kernel, :func:`~noder_monai.functional.separable_filter`, border replicated;
    ``sigma`` in image voxels, so the same physical width at every level; 0 smooths nothing), as
    ``antsRegistration --smoothing-sigmas`` smooths its images per level.

    Why: warping a noisy source with linear interpolation averages its noise by an amount that depends on the
    sub-voxel shift (most at half a voxel), so the local NCC to a noisy target rises off the true alignment whatever
    the anatomy does; the fit then carries spurious sub-voxel motion. A source whose noise is already correlated
    over a voxel (smoothed) loses that bias; the targets are smoothed alike so that both stay equally sharp.

    Shapes: (N, C, *S) -> (N, C, *ceil(S / level)).

    Raises:
        ValueError: ``sigma`` negative or not finite.
    """
    sigma = check_image_smoothing_sigma(sigma)
    image = downsample_image(image, level)
    if sigma == 0:
        return image
    kernel = gaussian_1d(torch.tensor(sigma / level), truncated=4.0, approx="erf")
    return separable_filter(image, kernel, padding_mode="replicate")


#: Default ``finest_time_groups`` of :class:`NODERTrainer`: full-resolution epochs alternate between two halves of
#: the observed times.
FINEST_TIME_GROUPS = 2


#: The loss (smoothness and boundary terms, NCC windows) needs this many voxels along every axis at every level.
MIN_LEVEL_VOXELS = 3

#: Default ``similarity_voxels`` of :class:`NODERTrainer`: at most about 64^3 voxels scored by the similarity per
#: epoch (a fit at 64^3 or smaller scores every voxel).
SIMILARITY_VOXELS = 64**3


def check_similarity_voxels(voxels: Any) -> int | None:
    """``voxels`` unchanged; raises ValueError naming ``similarity_voxels`` unless it is None or an integer >= 1."""
    if voxels is not None and (isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 1):
        raise ValueError(f"similarity_voxels must be None or an integer >= 1, got {voxels!r}.")
    return voxels


def _scored_box_size(size: Sequence[int], voxels: int | None, radius: int) -> list[int] | None:
    """The size of :func:`similarity_box`'s scored box on a grid of ``size``, or None where it scores the whole
    grid (no random draw: the same for every epoch)."""
    total = math.prod(size)
    if voxels is None or voxels >= total:
        return None
    fraction = (voxels / total) ** (1 / len(size))
    inner = [min(n, max(1, round(n * fraction))) for n in size]
    if math.prod(min(n, c + 2 * radius) for n, c in zip(size, inner)) > total / 2:
        return None
    return inner


def similarity_region_voxels(size: Sequence[int], voxels: int | None, radius: int) -> int:
    """The most voxels on which one epoch computes the dense field, the warp and the similarity on a grid of
    ``size`` (arguments as :func:`similarity_box`): the whole grid, or the scored box widened by ``radius``."""
    inner = _scored_box_size(size, voxels, radius)
    if inner is None:
        return math.prod(size)
    return math.prod(min(n, c + 2 * radius) for n, c in zip(size, inner))


def similarity_box(
    size: Sequence[int], voxels: int | None, radius: int
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """A random box of a level grid on which one epoch's similarity is computed, or None for the whole grid.

    As ANTs and elastix sample their metric, an epoch need not score every voxel of a large image: the box holds
    about ``voxels`` scored voxels (the same fraction of every axis), centred on a voxel drawn uniformly from torch's
    global generator (so a seeded fit draws the same boxes) and clipped to the grid, so that every voxel is scored
    about equally often (voxels at the grid's edge half as often as the others). The field, the warp and the NCC
    windows are computed on the box widened by the window ``radius`` on every side that is not the grid's edge; the
    widening is not scored, so every scored voxel's window is the one it has in the whole grid (or reaches the
    grid's edge, where both are padded alike). None (score every voxel) when ``voxels`` is None or the widened box
    would hold more than half of the grid.

    Args:
        size: the level grid's size.
        voxels: about how many voxels to score, >= 1; None: all.
        radius: the NCC window's radius (``window // 2``).

    Returns:
        ``(region, scored)``: the computed box as one slice per axis of the grid, and the scored part as slices of
        the box; or None.
    """
    inner = _scored_box_size(size, voxels, radius)
    if inner is None:
        return None
    region, scored = [], []
    for n, c in zip(size, inner):
        start = int(torch.randint(n, ())) - c // 2
        first, stop = max(0, start), min(n, start + c)
        low, high = max(0, first - radius), min(n, stop + radius)
        region.append(slice(low, high))
        scored.append(slice(first - low, stop - low))
    return tuple(region), tuple(scored)


def level_window(kernel_size: int, level: int) -> int:
    """The NCC window at ``level``: ``scale_window`` clamped to at least 3 voxels (a 1-voxel window has zero local
    variance, so its similarity is 0 whatever the alignment and the fit would not move)."""
    return max(MIN_LEVEL_VOXELS, scale_window(kernel_size, level))
