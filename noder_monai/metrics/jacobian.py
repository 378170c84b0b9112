"""Jacobian determinant of a displacement field (:func:`~noder_monai.functional.jacobian_determinant`) and the
percentage of folded voxels."""

from __future__ import annotations

import torch

from noder_monai.functional import jacobian_determinant

__all__ = ["jacobian_determinant", "percent_folded"]


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
