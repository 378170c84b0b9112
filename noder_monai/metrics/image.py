"""Image-similarity metrics per batch item: NRMSE, PSNR and SSIM (the last two from MONAI)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.utils import convert_to_tensor

__all__ = ["nrmse", "psnr", "ssim"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor, spatial_dims: tuple[int, ...]) -> None:
    if not isinstance(target, torch.Tensor) or target.ndim - 2 not in spatial_dims:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(
            f"target must be a tensor of shape (B, C, *spatial) with {' or '.join(map(str, spatial_dims))} "
            f"spatial dimensions, got {shape}."
        )
    if not isinstance(pred, torch.Tensor) or pred.shape != target.shape:
        shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred must have the shape of target {tuple(target.shape)}, got {shape}.")


def _label(item: int, names: Sequence[str] | None) -> str:
    return f"target '{names[item]}'" if names is not None else f"target item {item}"


def _check_names(target: torch.Tensor, names: Sequence[str] | None) -> None:
    if names is not None and (isinstance(names, str) or len(names) != target.shape[0]):
        raise ValueError(f"names must give one name per batch item ({target.shape[0]}), got {names!r}.")


def _check_finite(target: torch.Tensor, names: Sequence[str] | None) -> None:
    finite = torch.isfinite(target.detach().flatten(1)).all(dim=1)
    if not bool(finite.all()):
        item = int((~finite).nonzero()[0])
        raise ValueError(f"{_label(item, names)} contains NaN or Inf voxels; metrics need finite images.")


def _data_ranges(target: torch.Tensor, data_range: float | None, names: Sequence[str] | None = None) -> list[float]:
    """One positive data range per batch item: ``data_range`` itself, or each item's ``max - min``."""
    _check_names(target, names)
    _check_finite(target, names)
    if data_range is not None:
        if isinstance(data_range, bool) or not isinstance(data_range, Real) or not math.isfinite(data_range) \
                or data_range <= 0:
            raise ValueError(f"data_range must be a finite number > 0 or None, got {data_range!r}.")
        return [float(data_range)] * target.shape[0]
    flat = target.detach().flatten(1)
    ranges = (flat.amax(dim=1) - flat.amin(dim=1)).tolist()
    for item, value in enumerate(ranges):
        if not value > 0:
            if names is not None:
                raise ValueError(
                    f"{_label(item, names)} is constant (every voxel {float(target[item].min()):g}): PSNR and SSIM "
                    f"are undefined for an image without contrast; check that file."
                )
            raise ValueError(
                f"data_range is None and target item {item} has max - min = {value} (a constant image); pass "
                f"data_range explicitly."
            )
    return ranges


def nrmse(pred: torch.Tensor, target: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
    """Normalized root-mean-square error ``||pred - target||_2 / ||target||_2`` per batch item.

    This is scikit-image's ``normalized_root_mse(target, pred, normalization="euclidean")``; 0 is a perfect
    match, 1 is the error of predicting zeros. An all-zero target gives ``inf`` (or ``nan`` if pred is zero too).

    Args:
        pred: predicted images, shape ``(B, C, *spatial)``.
        target: reference images, same shape.
        names: optional name of each target item (e.g. its file), used in error messages.

    Returns:
        Tensor of shape ``(B,)``, dimensionless.

    Raises:
        ValueError: if the shapes differ or have no spatial axis, or a target item has NaN/Inf voxels (named).
    """
    _check_pair(pred, target, (1, 2, 3))
    _check_names(target, names)
    _check_finite(target, names)
    error = torch.linalg.vector_norm((pred - target).flatten(1), dim=1)
    return error / torch.linalg.vector_norm(target.flatten(1), dim=1)


def psnr(
    pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None, names: Sequence[str] | None = None
) -> torch.Tensor:
    """Peak signal-to-noise ratio per batch item, ``20 log10(data_range) - 10 log10(MSE)``, by MONAI ``PSNRMetric``.

    Args:
        pred: predicted images, shape ``(B, C, *spatial)``.
        target: reference images, same shape.
        data_range: the intensity range (peak value) of the images, > 0; ``None`` (default) uses each target
            item's ``max - min``.
        names: optional name of each target item (e.g. the held-out scan's file), used in error messages.

    Returns:
        Tensor of shape ``(B,)`` in dB (``inf`` where ``pred`` equals ``target``).

    Raises:
        ValueError: if the shapes differ, ``data_range`` is not positive, or it is ``None`` and a target item is
            constant, or a target item has NaN/Inf voxels (items are named by ``names`` when given).
    """
    _check_pair(pred, target, (1, 2, 3))
    pred, target = convert_to_tensor(pred, track_meta=False), convert_to_tensor(target, track_meta=False)
    values = [
        PSNRMetric(max_val=value, reduction="none")(pred[item : item + 1], target[item : item + 1])
        for item, value in enumerate(_data_ranges(target, data_range, names))
    ]
    return torch.cat(values).reshape(-1)


def ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None, names: Sequence[str] | None = None
) -> torch.Tensor:
    """Structural similarity per batch item, by MONAI ``SSIMMetric`` (Gaussian window 11, sigma 1.5, no padding).

    ``spatial_dims`` is taken from ``target.ndim``; the SSIM map is averaged over channels and the voxels at
    least 5 voxels away from the border.

    Args:
        pred: predicted images, shape ``(B, C, *spatial)`` with 2 or 3 spatial axes of at least 11 voxels.
        target: reference images, same shape.
        data_range: the intensity range of the images, > 0; ``None`` (default) uses each target item's
            ``max - min``.
        names: optional name of each target item (e.g. the held-out scan's file), used in error messages.

    Returns:
        Tensor of shape ``(B,)``, at most 1 (identical images).

    Raises:
        ValueError: if the shapes differ, are not 2D/3D or shorter than 11 voxels, ``data_range`` is not positive,
            or it is ``None`` and a target item is
            constant, or a target item has NaN/Inf voxels (items are named by ``names`` when given).
    """
    _check_pair(pred, target, (2, 3))
    win_size = 11
    if min(target.shape[2:]) < win_size:
        raise ValueError(
            f"target must have at least {win_size} voxels along every spatial axis, got {tuple(target.shape)}."
        )
    pred, target = convert_to_tensor(pred, track_meta=False), convert_to_tensor(target, track_meta=False)
    spatial_dims = target.ndim - 2
    values = [
        SSIMMetric(spatial_dims=spatial_dims, data_range=value, win_size=win_size, reduction="none")(
            pred[item : item + 1], target[item : item + 1]
        )
        for item, value in enumerate(_data_ranges(target, data_range, names))
    ]
    return torch.cat(values).reshape(-1)
