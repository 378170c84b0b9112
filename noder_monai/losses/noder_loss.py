"""The NODER objective: image similarity plus field smoothness plus the boundary term."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from noder_monai.functional import SeparableField, check_ddf, check_odd_kernel_size, check_spatial_dims
from noder_monai.losses.lncc import LocalNCCLoss, _check_non_negative
from noder_monai.losses.regularizers import BoundaryLoss, GradientSmoothnessLoss

__all__ = ["NODERLoss"]


class NODERLoss(nn.Module):
    """``similarity_weight * LNCC + smoothness_weight * gradient smoothness + boundary_weight * boundary L2``.

    The paper's loss (NCC similarity, 0.05 x spatial-gradient smoothness, 1e-4 x L2 on the six boundary planes),
    with every term a mean over the batch of observed time points (all of them go through as one batch).

    Args:
        spatial_dims: number of spatial dimensions, 1, 2 or 3. Defaults to 3.
        ncc_kernel_size: window of the local NCC in voxels, a positive odd integer. Defaults to 21.
        similarity_weight: weight of :class:`LocalNCCLoss`, >= 0. Defaults to 1.0.
        smoothness_weight: weight of :class:`GradientSmoothnessLoss`, >= 0. Defaults to 0.05.
        boundary_weight: weight of :class:`BoundaryLoss`, >= 0. Defaults to 1e-4.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        ncc_kernel_size: int = 21,
        similarity_weight: float = 1.0,
        smoothness_weight: float = 0.05,
        boundary_weight: float = 1e-4,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.similarity_weight = _check_non_negative(similarity_weight, "similarity_weight")
        self.smoothness_weight = _check_non_negative(smoothness_weight, "smoothness_weight")
        self.boundary_weight = _check_non_negative(boundary_weight, "boundary_weight")
        kernel_size = check_odd_kernel_size(ncc_kernel_size, "ncc_kernel_size")
        self.ncc_kernel_size = kernel_size
        self.similarity = LocalNCCLoss(spatial_dims=self.spatial_dims, kernel_size=kernel_size)
        self.smoothness = GradientSmoothnessLoss()
        self.boundary = BoundaryLoss()

    def forward(
        self,
        warped: torch.Tensor,
        target: torch.Tensor,
        ddf: torch.Tensor | SeparableField,
        scored: Sequence[slice] | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            warped: the baseline warped to each time point, shape ``(B, 1, *spatial)``.
            target: the observed scans at those time points, shape ``(B, 1, *spatial)``.
            ddf: the displacement fields that produced ``warped``, shape ``(B, D, *spatial)``, voxel units; or a
                :class:`~noder_monai.functional.SeparableField` of that shape, whose regularisers are computed
                on its coarse grid. With a separable field, ``warped`` and ``target`` may cover a box of its grid
                only (the similarity is then that box's).
            scored: the similarity is averaged over this box of ``warped`` only (one slice per axis; see
                :class:`LocalNCCLoss`); None: over every voxel.

        Returns:
            Dict of scalar tensors ``"total"``, ``"similarity"``, ``"smoothness"``, ``"boundary"`` (unweighted
            terms; ``total`` is their weighted sum).

        Raises:
            ValueError: if the shapes do not match each other or ``spatial_dims``.
        """
        shape = tuple(ddf.shape)
        if isinstance(ddf, SeparableField):
            matches = len(shape) == warped.ndim and all(w <= s for w, s in zip(warped.shape[2:], shape[2:]))
        else:
            check_ddf(ddf, "ddf", min_size=3)
            matches = warped.ndim == ddf.ndim and warped.shape[2:] == ddf.shape[2:]
        if shape[1] != self.spatial_dims:
            raise ValueError(f"ddf must have {self.spatial_dims} spatial dimensions, got {shape}.")
        if not matches or warped.shape[0] != shape[0]:
            raise ValueError(
                f"warped must have the batch size and spatial shape of ddf {shape}, got {tuple(warped.shape)}."
            )
        similarity = self.similarity(warped, target, scored)
        smoothness = self.smoothness(ddf)
        boundary = self.boundary(ddf)
        total = (
            self.similarity_weight * similarity + self.smoothness_weight * smoothness + self.boundary_weight * boundary
        )
        return {"total": total, "similarity": similarity, "smoothness": smoothness, "boundary": boundary}
