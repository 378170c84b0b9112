"""Jacobian determinant of a displacement field and the percentage of folded voxels."""

from __future__ import annotations

import torch

from noder_monai.functional import check_ddf

__all__ = ["jacobian_determinant", "percent_folded"]


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the deformation ``x -> x + ddf(x)`` at every voxel.

    ``J_ij = delta_ij + d ddf_i / d x_j`` with central differences inside and one-sided differences on the
    border voxels (``torch.gradient``), voxel units; the determinant is written out (``a d - b c`` in 2D, the
    rule of Sarrus in 3D). 1 means no local volume change, > 1 expansion, < 1 shrinkage, <= 0 a fold.
    Differentiable.

    Args:
        ddf: displacement field of shape ``(B, D, *spatial)``, ``D`` = 1, 2 or 3 spatial axes of at least
            2 voxels, channel ``i`` along spatial axis ``i``, in voxels.

    Returns:
        Tensor of shape ``(B, 1, *spatial)``, dimensionless.

    Raises:
        ValueError: if ``ddf`` is not of that shape.
    """
    check_ddf(ddf, "ddf", min_size=2)
    dims = ddf.ndim - 2
    gradients = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = [[gradients[j][:, i] + (1.0 if i == j else 0.0) for j in range(dims)] for i in range(dims)]
    if dims == 1:
        det = jac[0][0]
    elif dims == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        det = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
    return det.unsqueeze(1)


def percent_folded(ddf: torch.Tensor) -> torch.Tensor:
    """Percentage of voxels where the deformation ``x -> x + ddf(x)`` folds: ``det(J) <= 0``.

    Args:
        ddf: displacement field of shape ``(B, D, *spatial)`` in voxels (see :func:`jacobian_determinant`).

    Returns:
        Tensor of shape ``(B,)`` in percent (0 to 100), in the dtype of ``ddf``.

    Raises:
        ValueError: if ``ddf`` is not of that shape.
    """
    folded = jacobian_determinant(ddf) <= 0
    return 100.0 * folded.flatten(1).to(ddf.dtype).mean(dim=1)
