"""Local normalized cross-correlation with running-sum box filters."""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch.nn.modules.loss import _Loss

from noder_monai.functional import box_filter, check_odd_kernel_size, check_spatial_dims

__all__ = ["LocalNCCLoss"]


def _check_non_negative(value: float, name: str, strict: bool = False) -> float:
    """Return ``value`` as a float after checking that it is a finite number >= 0 (> 0 if ``strict``)."""
    is_number = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}.")
    return float(value)


class LocalNCCLoss(_Loss):
    """Negative mean local squared normalized cross-correlation over a cubic window (rectangular kernel).

    The value is that of MONAI ``LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size,
    kernel_type="rectangular", reduction="mean", smooth_nr, smooth_dr)``: at every voxel, with window sums
    ``S`` over ``kernel_size ** spatial_dims`` voxels (zero padding),
    ``ncc = (cross ** 2 + smooth_nr) / (max(var_t, smooth_dr) * max(var_p, smooth_dr))`` where
    ``cross = S[t p] - S[t] S[p] / V``, ``var_t = S[t^2] - S[t]^2 / V``; the loss is ``-mean(ncc)`` over batch,
    channels and voxels, about -1 for images that match up to a local affine intensity change and about 0 for
    unrelated ones. Each voxel's ncc is clipped at 1, its Cauchy-Schwarz bound: in flat windows the running sums
    leave rounding residues of ~1e-7 that the variance floor ``smooth_dr`` would otherwise amplify past 1.

    Why not MONAI's class: it sums each window with separable convolutions of ``kernel_size`` taps, which made it
    the most expensive piece of a fit. Here the window sums come from :func:`noder_monai.functional.box_filter`
    (running sums, cost independent of the window); same float32 values, timings in ``benchmarks/README.md``.

    Args:
        spatial_dims: number of spatial dimensions of the images, 1, 2 or 3. Defaults to 3.
        kernel_size: window width in voxels, a positive odd integer. Defaults to 21.
        smooth_nr: constant added to the squared cross term, >= 0. Defaults to 0.0 (MONAI's default): any positive
            value makes a window where both images are flat score ``smooth_nr / smooth_dr**2`` (1e5 for 1e-5), which
            dwarfs every real window and which an optimiser exploits.
        smooth_dr: lower bound of each local variance, > 0 (0 would divide by zero in flat windows).
            Defaults to 1e-5.
    """

    def __init__(
        self, spatial_dims: int = 3, kernel_size: int = 21, smooth_nr: float = 0.0, smooth_dr: float = 1e-5
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.kernel_size = check_odd_kernel_size(kernel_size)
        self.smooth_nr = _check_non_negative(smooth_nr, "smooth_nr")
        self.smooth_dr = _check_non_negative(smooth_dr, "smooth_dr", strict=True)
        self._target_cache: tuple | None = None

    def _target_statistics(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window mean and floored window variance (times the window volume) of ``target``.

        Cached while the same, unmodified tensor that needs no gradient comes back: the fixed targets of a fit, whose
        two box filters would otherwise be recomputed every epoch.
        """
        cached = self._target_cache
        if cached is not None and cached[0] is target and cached[1] == target._version:
            return cached[2], cached[3]
        volume = float(self.kernel_size**self.spatial_dims)
        t_mean = box_filter(target, self.kernel_size)
        t_var = torch.clamp(volume * (box_filter(target * target, self.kernel_size) - t_mean * t_mean), min=self.smooth_dr)
        self._target_cache = None if target.requires_grad else (target, target._version, t_mean, t_var)
        return t_mean, t_var

    def forward(self, pred: torch.Tensor, target: torch.Tensor, scored: Sequence[slice] | None = None) -> torch.Tensor:
        """
        Args:
            pred: image of shape ``(N, C, *spatial)`` with ``spatial_dims`` spatial axes, e.g. the warped scan.
            target: image of the same shape as ``pred``.
            scored: one ``slice`` per spatial axis: the mean is taken over this box only (e.g. the voxels of a crop
                whose whole window lies inside it); None: every voxel.

        Returns:
            Scalar tensor, ``-mean(local ncc)``, in [-1, 0] up to the smoothing constants.

        Raises:
            ValueError: if ``pred`` does not have ``spatial_dims`` spatial axes, ``target`` differs in shape, or
                ``scored`` is not one non-empty slice per spatial axis.
        """
        if pred.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"pred must have shape (N, C, *spatial) with {self.spatial_dims} spatial dimensions, "
                f"got {tuple(pred.shape)}."
            )
        if target.shape != pred.shape:
            raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}.")
        volume = float(self.kernel_size**self.spatial_dims)
        t_mean, t_var = self._target_statistics(target)
        p_mean, p2_mean, tp_mean = (box_filter(x, self.kernel_size) for x in (pred, pred * pred, target * pred))
        cross = volume * (tp_mean - t_mean * p_mean)
        p_var = torch.clamp(volume * (p2_mean - p_mean * p_mean), min=self.smooth_dr)
        ncc = (cross * cross + self.smooth_nr) / (t_var * p_var)
        if scored is not None:
            scored = tuple(scored)
            if len(scored) != self.spatial_dims or any(
                    len(range(*s.indices(n))) == 0 for s, n in zip(scored, ncc.shape[2:])):
                raise ValueError(f"scored must be one non-empty slice per spatial axis, got {scored}.")
            ncc = ncc[(slice(None), slice(None), *scored)]
        return -torch.mean(ncc.clamp(max=1.0))
