"""Regularizers of a displacement field: gradient smoothness and the boundary L2 term."""

from __future__ import annotations

import torch
from monai.losses import DiffusionLoss
from torch.nn.modules.loss import _Loss

from noder_monai.functional import SeparableField, check_ddf

__all__ = ["BoundaryLoss", "GradientSmoothnessLoss"]


class GradientSmoothnessLoss(DiffusionLoss):
    """Mean squared spatial gradient of a displacement field: MONAI ``DiffusionLoss`` (no normalization, mean).

    With central differences ``g_ij = (u_i(x + e_j) - u_i(x - e_j)) / 2`` on the interior voxels (every spatial
    axis cropped by one voxel at each end), the value is ``mean over (n, i, x) of sum_j g_ij(x) ** 2``: the
    squared Frobenius norm of the displacement Jacobian divided by ``D``, averaged over the interior. A constant
    field gives 0; ``u_0 = a * x_0`` (other components 0) gives ``a ** 2 / D``. Units: voxel^2 / voxel^2.

    A :class:`~noder_monai.functional.SeparableField` (NODER's upsampled fields) gives the same value from its
    coarse grid (:meth:`~noder_monai.functional.SeparableField.smoothness`), without the dense field.
    """

    def __init__(self) -> None:
        super().__init__(normalize=False, reduction="mean")

    def forward(self, ddf: torch.Tensor | SeparableField) -> torch.Tensor:
        """
        Args:
            ddf: displacement field of shape ``(N, D, *spatial)`` in voxels, at least 3 voxels along each axis, or
                a :class:`~noder_monai.functional.SeparableField` of that shape.

        Returns:
            Scalar tensor.

        Raises:
            ValueError: if ``ddf`` is not of that shape.
        """
        if isinstance(ddf, SeparableField):
            _check_field_shape(ddf, min_size=3)
            return ddf.smoothness()
        check_ddf(ddf, "ddf", min_size=3)
        return super().forward(ddf)


class BoundaryLoss(_Loss):
    """Mean squared displacement on the ``2 * D`` boundary planes of the field (NODER's boundary term).

    Each of the planes ``x_j = 0`` and ``x_j = size_j - 1`` contributes all its voxels (edge voxels belong to
    several planes and count once per plane); the value is the mean of ``ddf ** 2`` over batch, components and
    these plane voxels. It pins the field to zero at the image border. Units: voxel^2. A
    :class:`~noder_monai.functional.SeparableField` gives the same value from its coarse grid.
    """

    def forward(self, ddf: torch.Tensor | SeparableField) -> torch.Tensor:
        """
        Args:
            ddf: displacement field of shape ``(N, D, *spatial)`` in voxels, or a
                :class:`~noder_monai.functional.SeparableField` of that shape.

        Returns:
            Scalar tensor.

        Raises:
            ValueError: if ``ddf`` is not of that shape.
        """
        if isinstance(ddf, SeparableField):
            _check_field_shape(ddf)
            return ddf.boundary()
        check_ddf(ddf, "ddf")
        squared = ddf * ddf
        total = squared.new_zeros(())
        count = 0
        for dim in range(2, ddf.ndim):
            for index in (0, ddf.shape[dim] - 1):
                plane = squared.select(dim, index)
                total = total + plane.sum()
                count += plane.numel()
        return total / count


def _check_field_shape(field: SeparableField, min_size: int = 1) -> None:
    """:func:`~noder_monai.functional.check_ddf` on the shape of a separable field's dense form."""
    check_ddf(torch.empty(field.shape, device="meta"), "ddf", min_size=min_size)
