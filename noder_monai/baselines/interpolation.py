"""Intensity baselines for image-sequence regression: the nearest observed scan and linear interpolation.

Neither moves anatomy: they answer "what would a reader predict without a deformation model". They are the floor
NODER and the geodesic baseline must beat, and between close, noisy visits linear interpolation (which averages two
scans) is a hard one to beat on NRMSE.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["nearest_scan", "linear_interpolation"]

TimesLike = Union[torch.Tensor, Sequence[float], float]


def _as_times(times: TimesLike, name: str) -> torch.Tensor:
    """Return ``times`` as a 1-D float64 CPU tensor of finite values (a scalar becomes one entry)."""
    t = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite numbers, got {t.tolist()}.")
    return t


def _check_sequence(images: torch.Tensor, times: TimesLike, min_scans: int = 1) -> torch.Tensor:
    """Validate an observed sequence and return its times as float64.

    Args:
        images: observed scans, shape ``(T, 1, *spatial)`` with 2 or 3 spatial dimensions.
        times: acquisition times, ``T`` finite numbers, strictly increasing.
        min_scans: smallest accepted ``T``.

    Returns:
        ``times`` as a 1-D float64 CPU tensor of length ``T``.

    Raises:
        ValueError: naming the argument and the value received when a shape or time is invalid.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (4, 5) or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (T, 1, *spatial) with 2 or 3 spatial dims, got {shape}.")
    t = _as_times(times, "times")
    if t.numel() != images.shape[0]:
        raise ValueError(f"times must have one entry per scan ({images.shape[0]}), got {t.numel()}: {t.tolist()}.")
    if t.numel() < min_scans:
        raise ValueError(f"images must hold at least {min_scans} scans, got {t.numel()}.")
    if (t[1:] <= t[:-1]).any():
        raise ValueError(f"times must be strictly increasing, got {t.tolist()}.")
    return t


def nearest_scan(images: torch.Tensor, times: TimesLike, query_times: TimesLike) -> torch.Tensor:
    """Predict each query time by the observed scan nearest to it in time.

    Args:
        images: observed scans, shape ``(T, 1, *spatial)``.
        times: their acquisition times, ``(T,)``, strictly increasing, in any unit.
        query_times: times to predict, ``(Q,)`` (or one number), same unit; any value, inside or outside the span.

    Returns:
        ``(Q, 1, *spatial)``, a copy of the nearest scan per query; a query exactly half-way between two scans
        takes the earlier one.

    Raises:
        ValueError: if ``images``, ``times`` or ``query_times`` is malformed (message names the argument).
    """
    t = _check_sequence(images, times, min_scans=1)
    q = _as_times(query_times, "query_times")
    right = torch.searchsorted(t, q).clamp(max=t.numel() - 1)
    left = (right - 1).clamp(min=0)
    index = torch.where((q - t[left]).abs() <= (t[right] - q).abs(), left, right)
    return images[index.to(images.device)].clone()


def linear_interpolation(images: torch.Tensor, times: TimesLike, query_times: TimesLike) -> torch.Tensor:
    """Predict each query time by linear intensity interpolation between the two scans that bracket it.

    Outside the observed span the nearest end scan is held constant (no linear extrapolation of intensities: it
    would leave the value range of the data and invent contrast no scanner produced).

    Args:
        images: observed scans, shape ``(T, 1, *spatial)``, ``T >= 2``.
        times: their acquisition times, ``(T,)``, strictly increasing, in any unit.
        query_times: times to predict, ``(Q,)`` (or one number), same unit.

    Returns:
        ``(Q, 1, *spatial)`` in the dtype and on the device of ``images``; a query equal to an observed time
        returns that scan exactly.

    Raises:
        ValueError: if ``images``, ``times`` or ``query_times`` is malformed (message names the argument).
    """
    t = _check_sequence(images, times, min_scans=2)
    q = _as_times(query_times, "query_times")
    left = (torch.searchsorted(t, q, right=True) - 1).clamp(0, t.numel() - 2)
    weight = ((q - t[left]) / (t[left + 1] - t[left])).clamp(0.0, 1.0)
    weight = weight.to(device=images.device, dtype=images.dtype).reshape((-1,) + (1,) * (images.ndim - 1))
    left = left.to(images.device)
    return torch.lerp(images[left], images[left + 1], weight)
