"""Displacement fields in the ITK / ANTs convention: physical millimetres, LPS axes, one vector per voxel.

The package's own fields (``Prediction.ddfs``) are in voxel units along the array axes (MONAI ``Warp``, pull-back:
``out(v) = image(v + ddf(v))``). ITK's ``DisplacementFieldTransform`` and ANTs (``antsApplyTransforms``) read a
NIfTI vector image ``(X, Y, Z, 1, 3)`` whose vectors are physical displacements in ITK's LPS world space, and map
each output point ``x`` to ``x + u(x)`` in the moving image: the same pull-back, so

    u(x) = D_LPS @ A[:3, :D] @ ddf(v),   D_LPS = diag(-1, -1, 1),

with ``A`` the grid's voxel-to-world matrix (RAS) as ITK reads the file. :func:`save_itk_displacement` writes that
field on the input's grid (header forms copied, as every other output), ready for
``itk.DisplacementFieldTransform`` + ``itk.resample_image_filter`` or ``antsApplyTransforms -t field.nii.gz``.
"""

from __future__ import annotations

import numpy as np
import torch

from noder_monai.io.image import Geometry, _as_geometry, _nifti_image, _write_nifti
from noder_monai.utils import PathLike

__all__ = ["ddf_to_itk", "save_itk_displacement"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ddf_to_itk(ddf: torch.Tensor | np.ndarray, geometry: Geometry | np.ndarray | torch.Tensor) -> np.ndarray:
    """Voxel-unit field ``(D, *spatial)`` -> ITK displacement vectors ``(*file_shape, V)`` in LPS millimetres.

    ``V`` is 3 for 3D grids and for 2D images whose singleton axis is not the last (ITK reads those files as 3D);
    for a 2D image stored ``(X, Y, 1)`` ITK reads a 2D grid, and ``V = 2`` (the in-plane LPS components).

    Args:
        ddf: displacement in voxels, channel ``i`` along spatial axis ``i`` (the package's convention).
        geometry: the input's :class:`~noder_monai.io.image.Geometry` (its ``itk_affine`` is used), or a (4, 4)
            RAS affine.
    """
    field = ddf.detach().cpu().numpy() if isinstance(ddf, torch.Tensor) else np.asarray(ddf)
    field = field.astype(np.float64)
    dims = field.ndim - 1
    if field.ndim not in (3, 4) or field.shape[0] != dims:
        raise ValueError(f"ddf must have shape (D, *spatial) with D = 2 or 3 spatial axes, got {field.shape}.")
    geometry = _as_geometry(geometry, tuple(field.shape[1:]))
    linear = _RAS_TO_LPS @ geometry.itk_affine[:3, :dims]
    vectors = np.einsum("wd,d...->...w", linear, field)  # (*spatial, 3)
    vectors = vectors.reshape(geometry.file_shape + (3,))
    if geometry.squeezed_axis == 2:
        vectors = vectors[..., :2]
    return vectors.astype(np.float32)


def save_itk_displacement(
    ddf: torch.Tensor | np.ndarray, geometry: Geometry | np.ndarray | torch.Tensor, path: PathLike,
    time: float | None = None,
) -> str:
    """Write one field (``(D, *spatial)``, voxel units) as an ITK/ANTs displacement field, NIfTI, atomically.

    The file is ``(*file_shape, 1, V)`` float32 with intent ``vector``, vectors as :func:`ddf_to_itk` returns them,
    and the input's geometry (header forms copied from ``geometry``); ``time`` goes to the header's ``descrip``.

    Returns:
        ``path`` as a string.
    """
    path = str(path)
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"path must end with '.nii' or '.nii.gz', got '{path}'.")
    vectors = ddf_to_itk(ddf, geometry)
    field = ddf.detach().cpu().numpy() if isinstance(ddf, torch.Tensor) else np.asarray(ddf)
    geometry = _as_geometry(geometry, tuple(field.shape[1:]))
    volume = vectors.reshape(geometry.file_shape + (1, vectors.shape[-1]))
    image = _nifti_image(volume, geometry)
    image.header.set_intent("vector")
    return _write_nifti(path, image, time)
