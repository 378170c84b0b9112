"""Reading and writing single images and displacement fields as NIfTI.

Reading goes through MONAI :class:`~monai.transforms.LoadImage` (ITK or nibabel reader, channel first, affine in RAS
world coordinates). Writing goes through nibabel to a temporary name in the destination folder followed by
:func:`os.replace`, so a reader never sees a half-written file. Multi-channel arrays (displacement fields) are stored
channels last as ``(*spatial, 1, C)`` with NIfTI intent ``vector``: the layout ITK and ANTs use for displacement
fields.
"""

from __future__ import annotations

import os
from typing import Union

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage
from numpy.typing import DTypeLike

from noder_monai.utils import atomic_write

__all__ = ["READERS", "load_image", "save_image"]

PathLike = Union[str, "os.PathLike[str]"]

#: Accepted values of the ``reader`` argument and the MONAI reader each selects (``None``: MONAI's default choice).
READERS = {"itk": "ITKReader", "nibabel": "NibabelReader", None: None}


def _resolve_reader(reader: str | None) -> str | None:
    key = reader.lower() if isinstance(reader, str) else reader
    if key not in READERS:
        raise ValueError(f"reader must be one of 'itk', 'nibabel' or None, got {reader!r}.")
    return READERS[key]


def load_image(path: PathLike, reader: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one image or vector field with MONAI ``LoadImage`` (``image_only=True``, ``ensure_channel_first=True``).

    Singleton axes beyond the third spatial axis (the NIfTI time axis of a vector image) are dropped, and a third
    spatial axis of length 1 is dropped too, so a 2D image or 2D displacement field comes back 2D whichever reader is
    used. The affine is the MetaTensor's (RAS world coordinates, mm), embedded in a 4x4 matrix for 2D images.

    Args:
        path: image file (NIfTI or any format the chosen reader supports).
        reader: ``"itk"`` (MONAI ``ITKReader``), ``"nibabel"`` (MONAI ``NibabelReader``) or ``None`` (MONAI picks).

    Returns:
        ``(image, affine)``: image ``(C, *spatial)`` float32 with ``C = 1`` for a scalar image and ``C = spatial_dims``
        for a displacement field; affine ``(4, 4)`` float64 voxel-to-world matrix.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``reader`` is not recognised, or the file cannot be read as an image (the message names the path).
    """
    reader_name = _resolve_reader(reader)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: '{path}'.")
    loader = LoadImage(reader=reader_name, image_only=True, ensure_channel_first=True, dtype=np.float32)
    try:
        image = loader(path)
    except Exception as err:  # readers raise RuntimeError, OSError, ImageFileError, ... for a bad file
        raise ValueError(f"cannot read image '{path}': {err}") from err
    affine = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    data = image.as_tensor().to(torch.float32)
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 4:
        raise ValueError(f"image '{path}' has shape {tuple(data.shape)} (channel first): more than 3 spatial axes.")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if affine.shape != (4, 4):
        full = torch.eye(4, dtype=torch.float64)
        rank = affine.shape[0] - 1
        full[:rank, :rank] = affine[:rank, :rank]
        full[:rank, 3] = affine[:rank, rank]
        affine = full
    return data.contiguous(), affine


def save_image(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    path: PathLike,
    dtype: DTypeLike = np.float32,
) -> str:
    """Write a channel-first image or displacement field as NIfTI, atomically.

    The data go to a temporary file in the destination folder which then replaces ``path`` (``os.replace``), so an
    interrupted write leaves no partial file under ``path``. ``C = 1`` is stored as a plain ``(*spatial)`` volume;
    ``C > 1`` is stored channels last as ``(*spatial3, 1, C)`` with intent ``vector`` (2D fields get a third spatial
    axis of length 1), the displacement-field layout of ITK and ANTs. Values are written as given (a ddf in this
    package is in voxel units, MONAI ``Warp`` convention); integer ``dtype`` rounds to the nearest integer.

    Args:
        array: ``(C, *spatial)`` with 2 or 3 spatial axes.
        affine: ``(4, 4)`` voxel-to-world matrix (RAS, mm).
        path: destination file, ``.nii`` or ``.nii.gz``; missing parent folders are created.
        dtype: on-disk data type, e.g. ``np.float32`` (default) or ``np.uint8`` for label maps.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``array`` is not ``(C, *spatial)`` with 2-3 spatial axes, ``affine`` is not ``(4, 4)``, or
            ``path`` does not end in ``.nii`` / ``.nii.gz``.
    """
    path = os.fspath(path)
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"path must end with '.nii' or '.nii.gz', got '{path}'.")
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim not in (3, 4):
        raise ValueError(f"array must be (C, *spatial) with 2 or 3 spatial axes, got shape {data.shape}.")
    matrix = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    matrix = matrix.astype(np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {matrix.shape}.")
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.rint(data)
    data = data.astype(dtype)
    channels = data.shape[0]
    if channels == 1:
        volume = data[0]
    else:
        spatial = data.shape[1:] + (1,) * (4 - data.ndim)
        volume = np.moveaxis(data, 0, -1).reshape(spatial + (1, channels))
    image = nib.Nifti1Image(volume, matrix)
    image.header.set_xyzt_units("mm", "sec")
    if channels > 1:
        image.header.set_intent("vector")
    atomic_write(path, lambda temporary: nib.save(image, temporary))
    return path
