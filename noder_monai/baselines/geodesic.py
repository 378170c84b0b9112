"""Geodesic regression baseline: one stationary velocity field, linear in time (SGR / FPSGR family).

Simple geodesic regression (Hong et al., WBIR 2012) replaces the joint geodesic fit of an image sequence by pairwise
registrations of the baseline scan to every later scan, followed by a linear regression of the registration
parameters against time. FPSGR (Ding et al., MedIA 2019) makes the registrations fast. Here each registration is a
log-domain diffeomorphic one: a stationary velocity field ``v_i`` whose exponential ``exp(v_i)`` (scaling and squaring,
MONAI ``DVF2DDF``) warps the baseline ``I_0`` onto ``I_i``. The velocities are regressed through the origin,

    v = sum_i (t_i - t_0) v_i / sum_i (t_i - t_0)^2,

and the prediction at any time ``t`` is ``I_0 ∘ exp((t - t_0) v)``. The dynamics are linear in time by construction:
this is the assumption NODER relaxes.

The registrations use the same ingredients as NODER so that the comparison isolates the dynamics model: local NCC
(window 21) + 0.05 * gradient smoothness, Adam, a velocity parameterised on a coarse grid (stride 4), upsampled
and box-smoothed (15 voxels), all time points in one batch. Two deliberate differences: the smoothness term acts on
the velocity (the quantity estimated, as in diffeomorphic VoxelMorph), and the NCC numerator constant is 0, not
1e-5: with ``smooth_nr > 0`` a window where both images are flat (zero background) scores
``smooth_nr / smooth_dr**2`` = 1e5 instead of 0, which rewards flattening the warped image where the target is flat.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

from noder_monai.baselines.interpolation import TimesLike, _as_times, _check_sequence
from noder_monai.functional import box_filter, check_odd_kernel_size, odd_window
from noder_monai.losses import GradientSmoothnessLoss, LocalNCCLoss

__all__ = ["GeodesicRegression"]


class GeodesicRegression:
    """Simple geodesic regression of an image sequence with log-domain diffeomorphic registrations.

    Images are assumed intensity-normalised by the caller to about ``[0, 1]`` (for example with
    :class:`noder_monai.data.IntensityMapping`): NCC is insensitive to the scale, but its stabilisers are absolute.

    Example::

        model = GeodesicRegression(spatial_dims=3).fit(images, times)   # images (T, 1, H, W, D), times (T,)
        predicted = model.predict([2.5, 4.0])                           # (2, 1, H, W, D)

    Args:
        spatial_dims: 2 or 3.
        iterations: Adam steps per pyramid level. Default 200.
        lr: Adam learning rate for the coarse velocity parameters (voxel units). Default 0.1.
        ncc_kernel_size: odd window of the local NCC similarity at full resolution. Default 21.
        smoothness_weight: weight of the gradient smoothness of the velocity field. Default 0.05.
        grid_stride: spacing, in voxels, of the coarse grid the velocity is parameterised on. Default 4.
        smoothing_kernel: odd width of the box filter applied to the upsampled velocity (1: none). Default 15.
        pyramid_levels: number of resolutions, coarse to fine, each halving the previous one; 1 registers at full
            resolution only. Windows (NCC, smoothing) shrink with the resolution. Default 1.
        integration_stride: spacing, in voxels, of the grid the scaling and squaring runs on; the displacement is
            upsampled (corner-aligned, linear) to the image grid. 2 is about 8x cheaper for the integration and
            loses little for box-smoothed velocities. Default 1 (integrate at image resolution).
        device: where the fit and the predictions run (``"cpu"``, ``"cuda"``, a ``torch.device``).

    Attributes:
        velocity: ``(1, D, *spatial)`` regressed velocity field, voxel units per unit time (the unit of ``times``).
        registration_velocities: ``(T - 1, D, *spatial)`` velocity of each registration ``I_0 -> I_i``, voxels.
        baseline: ``(1, 1, *spatial)`` the baseline scan ``I_0`` every prediction warps.
        time0: the baseline time ``t_0``.
        loss_history: total registration loss at every Adam step (before its update), all levels in order.
    """

    def __init__(
        self, spatial_dims: int = 3, iterations: int = 200, lr: float = 0.1, ncc_kernel_size: int = 21,
        smoothness_weight: float = 0.05, grid_stride: int = 4, smoothing_kernel: int = 15, pyramid_levels: int = 1,
        integration_stride: int = 1, device: Union[str, torch.device] = "cpu",
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if int(ncc_kernel_size) != ncc_kernel_size or ncc_kernel_size < 3 or ncc_kernel_size % 2 == 0:
            raise ValueError(f"ncc_kernel_size must be an odd integer >= 3, got {ncc_kernel_size}.")
        if not smoothness_weight >= 0:
            raise ValueError(f"smoothness_weight must be >= 0, got {smoothness_weight}.")
        if int(grid_stride) != grid_stride or grid_stride < 1:
            raise ValueError(f"grid_stride must be a positive integer, got {grid_stride}.")
        if int(pyramid_levels) != pyramid_levels or pyramid_levels < 1:
            raise ValueError(f"pyramid_levels must be a positive integer, got {pyramid_levels}.")
        if int(integration_stride) != integration_stride or integration_stride < 1:
            raise ValueError(f"integration_stride must be a positive integer, got {integration_stride}.")
        self.spatial_dims = spatial_dims
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.ncc_kernel_size = int(ncc_kernel_size)
        self.smoothness_weight = float(smoothness_weight)
        self.grid_stride = int(grid_stride)
        self.smoothing_kernel = check_odd_kernel_size(smoothing_kernel, "smoothing_kernel")
        self.pyramid_levels = int(pyramid_levels)
        self.integration_stride = int(integration_stride)
        self.device = torch.device(device)
        self._exp = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")
        self._warp = Warp(mode="bilinear", padding_mode="border")
        self.velocity: Optional[torch.Tensor] = None
        self.registration_velocities: Optional[torch.Tensor] = None
        self.baseline: Optional[torch.Tensor] = None
        self.time0: Optional[float] = None
        self.loss_history: list[float] = []

    @property
    def _interp_mode(self) -> str:
        return "trilinear" if self.spatial_dims == 3 else "bilinear"

    def _resize_field(self, field: torch.Tensor, size: Sequence[int], unit_size: Sequence[int]) -> torch.Tensor:
        """Resample a vector field to ``size`` voxels (corner-aligned grids spanning the same extent).

        Args:
            field: ``(N, D, *any)`` vector field in voxels of a grid of ``unit_size`` voxels.
            size: spatial size of the output grid.
            unit_size: spatial size of the grid whose voxels are the unit of ``field``.

        Returns:
            ``(N, D, *size)`` in voxels of the output grid.
        """
        out = F.interpolate(field, size=tuple(size), mode=self._interp_mode, align_corners=True)
        scale = [(s - 1) / max(u - 1, 1) for s, u in zip(size, unit_size)]
        return out * torch.tensor(scale, dtype=out.dtype, device=out.device).reshape((1, -1) + (1,) * len(size))

    def _velocity_field(self, coarse: torch.Tensor, full_size: Sequence[int], size: Sequence[int]) -> torch.Tensor:
        """Upsample coarse velocity parameters (full-resolution voxels) onto ``size`` voxels and box-smooth them.

        Returns:
            ``(N, D, *size)`` velocity in voxels of the ``size`` grid.
        """
        v = self._resize_field(coarse, size, full_size)
        kernel = odd_window(self.smoothing_kernel * (size[0] - 1) / max(full_size[0] - 1, 1))
        return box_filter(v, kernel, padding_mode="replicate") if kernel > 1 else v

    def _exponential(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement ``exp(v)`` of ``(N, D, *S)`` velocities by scaling and squaring on the integration grid."""
        size = list(velocity.shape[2:])
        small = [math.ceil((s - 1) / self.integration_stride) + 1 for s in size]
        if small == size:
            return self._exp(velocity)
        return self._resize_field(self._exp(self._resize_field(velocity, small, size)), size, small)

    def _level_sizes(self, full_size: Sequence[int]) -> list[list[int]]:
        """Spatial sizes of the pyramid, coarse to fine; raises if the coarsest is too small."""
        sizes = [[math.ceil(s / 2**level) for s in full_size] for level in range(self.pyramid_levels - 1, -1, -1)]
        if min(sizes[0]) < 4:
            raise ValueError(
                f"pyramid_levels={self.pyramid_levels} makes the coarsest level {sizes[0]} voxels (< 4 along an "
                f"axis) for images of spatial size {list(full_size)}."
            )
        return sizes

    def fit(self, images: torch.Tensor, times: TimesLike) -> "GeodesicRegression":
        """Register the baseline to every later scan and regress the velocities linearly in time.

        Args:
            images: observed scans ``(T, 1, *spatial)``, ``T >= 2``, intensity-normalised to about ``[0, 1]``;
                ``images[0]`` is the baseline every prediction warps.
            times: acquisition times ``(T,)``, strictly increasing, any unit (the velocity is per that unit).

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: if the images, times or their dimensionality do not match (names the argument).
        """
        t = _check_sequence(images, times, min_scans=2)
        if images.ndim - 2 != self.spatial_dims:
            raise ValueError(
                f"images must have {self.spatial_dims} spatial dims (spatial_dims), got shape {tuple(images.shape)}."
            )
        full_size = list(images.shape[2:])
        sizes = self._level_sizes(full_size)
        images = images.detach().to(device=self.device, dtype=torch.float32)
        baseline, targets = images[:1], images[1:]
        n = targets.shape[0]
        coarse_size = [math.ceil((s - 1) / self.grid_stride) + 1 for s in full_size]
        coarse = torch.zeros((n, self.spatial_dims, *coarse_size), device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([coarse], lr=self.lr)
        smoothness = GradientSmoothnessLoss()
        history = []
        for size in sizes:
            factor = (full_size[0] - 1) / max(size[0] - 1, 1)
            ncc = LocalNCCLoss(
                spatial_dims=self.spatial_dims, kernel_size=max(3, odd_window(self.ncc_kernel_size / factor)), smooth_nr=0.0
            )
            level_baseline, level_targets = (self._resample(x, size, factor) for x in (baseline, targets))
            for _ in range(self.iterations):
                optimizer.zero_grad(set_to_none=True)
                v = self._velocity_field(coarse, full_size, size)
                warped = self._warp(level_baseline.expand(n, *level_baseline.shape[1:]), self._exponential(v))
                loss = ncc(warped, level_targets) + self.smoothness_weight * smoothness(v)
                loss.backward()
                optimizer.step()
                history.append(loss.detach())
        dt = torch.as_tensor(t[1:] - t[0], dtype=torch.float32, device=self.device)
        # upsampling and smoothing are linear, so regressing the coarse parameters regresses the fields
        with torch.inference_mode():
            slope = torch.einsum("n,n...->...", dt, coarse.detach()).unsqueeze(0) / dt.square().sum()
            self.velocity = self._velocity_field(slope, full_size, full_size)
            self.registration_velocities = self._velocity_field(coarse.detach(), full_size, full_size)
        self.loss_history = torch.stack(history).tolist()
        self.baseline = baseline
        self.time0 = float(t[0])
        return self

    def _resample(self, x: torch.Tensor, size: Sequence[int], factor: float) -> torch.Tensor:
        """Anti-alias (box filter ~ ``factor``) and resample ``(N, 1, *spatial)`` images to ``size``, corner-aligned."""
        if list(x.shape[2:]) == list(size):
            return x
        x = box_filter(x, odd_window(2 * factor - 1), padding_mode="replicate")
        return F.interpolate(x, size=tuple(size), mode=self._interp_mode, align_corners=True)

    def _check_fitted(self) -> None:
        if self.velocity is None:
            raise RuntimeError("GeodesicRegression is not fitted: call fit(images, times) first.")

    def predict_ddf(self, query_times: TimesLike) -> torch.Tensor:
        """Displacement fields ``exp((t - t_0) v)`` at the query times.

        Args:
            query_times: ``(Q,)`` times (or one number) in the unit of the fitted ``times``; any value, also before
                the baseline (the inverse deformation) and after the last scan (extrapolation).

        Returns:
            ``(Q, D, *spatial)`` displacement fields in voxels, MONAI ``Warp`` convention, on ``self.device``.
        """
        self._check_fitted()
        q = _as_times(query_times, "query_times")
        dt = (q - self.time0).to(device=self.device, dtype=torch.float32)
        with torch.inference_mode():
            return self._exponential(dt.reshape((-1,) + (1,) * (self.spatial_dims + 1)) * self.velocity)

    def predict(self, query_times: TimesLike) -> torch.Tensor:
        """Images ``I_0 ∘ exp((t - t_0) v)`` at the query times.

        Args:
            query_times: ``(Q,)`` times (or one number) in the unit of the fitted ``times``.

        Returns:
            ``(Q, 1, *spatial)`` float32 images on ``self.device``, in the intensity unit of the fitted images.
        """
        ddf = self.predict_ddf(query_times)
        with torch.inference_mode():
            return self._warp(self.baseline.expand(ddf.shape[0], *self.baseline.shape[1:]), ddf)
