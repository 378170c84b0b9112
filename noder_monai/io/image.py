"""Reading and writing single images and displacement fields as NIfTI, with the input's geometry kept exactly.

Reading goes through one MONAI image reader chosen explicitly (:data:`READERS`: ``ITKReader`` or ``NibabelReader``;
by default ``NibabelReader`` for NIfTI/MGH/Analyze files and ``ITKReader`` for every other format), with the steps of
MONAI's ``LoadImage`` (channel first, affine in RAS world coordinates) but without instantiating every reader MONAI
knows (which, with pydicom installed, warns on every load). Voxels are read in the file's own data type and checked
before conversion: scans must fit float32, label maps must hold integers (:func:`load_label_map`, int64). :func:`load_scan` also returns the file's :class:`Geometry`: the NIfTI header's qform and sform
(matrices and codes, copied field by field), the layout of a 2D image stored with one singleton axis, and the affine
ITK reads. Writing an output with that geometry (:func:`save_image` with ``geometry``) copies the header forms, so
nibabel and ITK (ITK-SNAP, ANTs) each place the output exactly where they place the input, even when the input's
qform and sform disagree (a warning says so when the input is read).

Writing goes to a temporary name in the destination folder (``.<name>.noder-<host>-<pid>-<random>.tmp``) followed
by :func:`os.replace`, so a reader never sees a half-written file; every file gets the same mode (``0o666`` less
the umask). :func:`~noder_monai.utils.clean_stale_temporaries` removes the temporaries a killed run of ours left behind.
Multi-channel arrays (displacement fields) are stored channels last as ``(*spatial, 1, C)`` with NIfTI intent
``vector``: the layout ITK and ANTs use for displacement fields.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import itk
import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader, MetaTensor, NibabelReader, NibabelWriter
from monai.transforms import EnsureChannelFirst
from numpy.typing import DTypeLike

from noder_monai.utils import PathLike, atomic_write, temporary_name

__all__ = [
    "READERS",
    "GEOMETRY_META_KEY",
    "Geometry",
    "GeometryNiftiWriter",
    "check_image_file",
    "check_output_dir",
    "load_image",
    "load_label_map",
    "label_dtype",
    "load_scan",
    "parse_times",
    "save_image",
    "scan_shape",
    "time_description",
    "voxel_volume_mm3",
]



#: Accepted values of the ``reader`` argument and the MONAI reader each selects (``None``: ``NibabelReader`` for the
#: formats nibabel reads with their header (NIfTI, MGH, Analyze), ``ITKReader`` for the others).
READERS = {"itk": "ITKReader", "nibabel": "NibabelReader", None: None}

#: Largest finite float32: scans are computed in float32, so larger magnitudes are refused by name.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Largest integer every float32 represents exactly (2^24); label IDs above it are at risk in a float32 file.
FLOAT32_EXACT_INT = 2**24

#: NIfTI qform and sform farther apart than this (mm, any matrix entry) are reported as disagreeing.
FORM_ATOL = 1e-3

#: Header fields that define a NIfTI file's world geometry; copied verbatim from an input to its outputs.
NIFTI_GEOMETRY_FIELDS = (
    "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
    "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units",
)
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_HEADER_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".hdr", ".img")


def _resolve_reader(reader: str | None) -> str | None:
    key = reader.lower() if isinstance(reader, str) else reader
    if key not in READERS:
        raise ValueError(f"reader must be one of 'itk', 'nibabel' or None, got {reader!r}.")
    return READERS[key]


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python floats/ints/lists (exact for float32 values)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


@dataclasses.dataclass
class Geometry:
    """World geometry of an input file, carried to every output written on its grid.

    Attributes:
        affine: ``(4, 4)`` voxel-to-world matrix (RAS, mm) the reader returned, columns in the order of the loaded
            array's axes (for a 2D image stored with a singleton axis, the two in-plane axes then the singleton one).
        file_shape: the file's spatial shape, singleton axis included, e.g. ``(48, 1, 48)``.
        squeezed_axis: the file axis of length 1 dropped to make a 2D image, or ``None``.
        nifti: the NIfTI header's geometry fields (:data:`NIFTI_GEOMETRY_FIELDS`) as plain values, or ``None`` for
            other formats (outputs then get qform = sform = ``affine``).
        itk_affine: ``(4, 4)`` RAS matrix of the same grid as ITK reads the file (differs from ``affine`` only when
            the reader was nibabel and the file's qform and sform disagree), columns ordered like ``affine``.
        source: the file read.
    """

    affine: np.ndarray
    file_shape: tuple[int, ...]
    squeezed_axis: int | None = None
    nifti: dict | None = None
    itk_affine: np.ndarray | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
        self.itk_affine = self.affine.copy() if self.itk_affine is None else np.asarray(
            self.itk_affine, dtype=np.float64).reshape(4, 4)
        self.file_shape = tuple(int(s) for s in self.file_shape)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the loaded array's spatial axes (the singleton axis of a stored-2D image removed)."""
        if self.squeezed_axis is None:
            return self.file_shape
        return tuple(s for axis, s in enumerate(self.file_shape) if axis != self.squeezed_axis)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3; for a 2D image stored with a singleton axis, area times slice thickness."""
        return voxel_volume_mm3(self.affine)

    def to_dict(self) -> dict:
        """Plain-value description (lists, floats, ints, strings) for checkpoints and JSON."""
        return {
            "affine": self.affine.tolist(),
            "file_shape": list(self.file_shape),
            "squeezed_axis": self.squeezed_axis,
            "nifti": self.nifti,
            "itk_affine": self.itk_affine.tolist(),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Geometry:
        """Rebuild from :meth:`to_dict`'s output; ``ValueError`` naming the field if one is missing or malformed."""
        if not isinstance(state, Mapping):
            raise ValueError(f"geometry must be a dictionary, got {type(state).__name__}.")
        for key in ("affine", "file_shape"):
            if key not in state:
                raise ValueError(f"geometry is missing field {key!r}, got fields {sorted(state)}.")
        try:
            geometry = cls(
                affine=np.asarray(state["affine"], dtype=np.float64),
                file_shape=tuple(state["file_shape"]),
                squeezed_axis=state.get("squeezed_axis"),
                nifti=dict(state["nifti"]) if state.get("nifti") is not None else None,
                itk_affine=state.get("itk_affine"),
                source=state.get("source"),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"geometry field is malformed: {error}") from error
        if not np.isfinite(geometry.affine).all():
            raise ValueError("geometry field 'affine' must be finite.")
        return geometry

    @classmethod
    def from_affine(cls, affine: np.ndarray | torch.Tensor, spatial_shape: Sequence[int]) -> Geometry:
        """Geometry of a grid known only by its affine (no source file): 2D grids are stored as ``(H, W, 1)``."""
        matrix = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) == 2:
            return cls(affine=matrix, file_shape=shape + (1,), squeezed_axis=2)
        return cls(affine=matrix, file_shape=shape)


def voxel_volume_mm3(affine: np.ndarray | torch.Tensor) -> float:
    """``|det(affine[:3, :3])|``: the voxel volume in mm^3, slice thickness included for a stored-2D image."""
    matrix = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    return float(abs(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:3, :3])))


def _embed(affine: np.ndarray) -> np.ndarray:
    if affine.shape == (4, 4):
        return affine.astype(np.float64)
    full = np.eye(4)
    rank = affine.shape[0] - 1
    full[:rank, :rank] = affine[:rank, :rank]
    full[:rank, 3] = affine[:rank, rank]
    return full


def _itk_affine(path: str, header: nib.Nifti1Header | None = None) -> np.ndarray | None:
    """The RAS voxel-to-world matrix of ``path`` as ITK reads its header (no voxel data read), or None; a 2D NIfTI
    file's slice position and thickness come from ``header`` (:func:`_complete_plane`)."""
    try:
        image_io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        if image_io is None:
            return None
        image_io.SetFileName(path)
        image_io.ReadImageInformation()
        dims = min(int(image_io.GetNumberOfDimensions()), 3)
        matrix = np.eye(4)
        for axis in range(dims):
            direction = np.asarray(list(image_io.GetDirection(axis))[:dims], dtype=np.float64)
            matrix[:dims, axis] = direction * float(image_io.GetSpacing(axis))
            matrix[axis, 3] = float(image_io.GetOrigin(axis))
    except Exception:  # a format ITK cannot read: nothing to compare with
        return None
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    matrix = lps_to_ras @ matrix
    if dims == 2:
        matrix = _complete_plane(path, matrix[[0, 1, 3]][:, [0, 1, 3]], header)
    return matrix


def _nifti_fields(header: nib.Nifti1Header) -> dict:
    return {key: _plain(np.asarray(header[key])) for key in NIFTI_GEOMETRY_FIELDS}


def _check_forms(path: str, header: nib.Nifti1Header, used: np.ndarray) -> None:
    """Warn when a NIfTI file's qform and sform both apply but disagree, saying which one the reader used."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode <= 0 or scode <= 0:
        return
    qform, sform = header.get_qform(), header.get_sform()
    if np.allclose(qform, sform, atol=FORM_ATOL, rtol=0.0):
        return
    gap = float(np.abs(qform[:3, 3] - sform[:3, 3]).max())
    if np.allclose(used[:3], sform[:3], atol=FORM_ATOL, rtol=0.0):
        which = "sform"
    elif np.allclose(used[:3], qform[:3], atol=FORM_ATOL, rtol=0.0):
        which = "qform"
    else:
        which = "neither form (the reader's own choice)"
    warnings.warn(
        f"'{path}': qform (code {qcode}, origin {np.round(qform[:3, 3], 3).tolist()}) and sform (code {scode}, "
        f"origin {np.round(sform[:3, 3], 3).tolist()}) disagree (origins {gap:.3g} mm apart); nibabel and MONAI's "
        f"NibabelReader use the sform, ITK (ITK-SNAP, ANTs) the qform. This run used the {which}. Outputs keep both "
        f"forms and codes, so every tool places them where it places this input.",
        UserWarning,
        stacklevel=3,
    )


def _squeeze_singleton(data: torch.Tensor, affine: np.ndarray, path: str) -> tuple[torch.Tensor, np.ndarray, int | None]:
    """Drop the one singleton spatial axis of a 3D array (C, X, Y, Z): a 2D image kept in its plane."""
    spatial = tuple(data.shape[1:])
    if len(spatial) != 3:
        return data, affine, None
    singletons = [axis for axis, size in enumerate(spatial) if size == 1]
    if not singletons:
        return data, affine, None
    if len(singletons) > 1:
        raise ValueError(
            f"image '{path}' has spatial size {spatial}: {len(singletons)} axes of length 1 (axes {singletons}); "
            f"a 3D image needs at least 3 voxels along every axis and a 2D image exactly one singleton axis."
        )
    axis = singletons[0]
    kept = [a for a in range(3) if a != axis]
    order = kept + [axis]
    affine = affine.copy()
    affine[:3, :3] = affine[:3, order]
    return data.squeeze(axis + 1), affine, axis


def check_image_file(path: PathLike, where: str | None = None) -> str:
    """``path`` as a string, checked to name an existing file, not a folder (a DICOM series is not read).

    Raises:
        ValueError: ``path`` is a folder; FileNotFoundError: it does not exist. Both name ``where`` (e.g. a datalist
            field) and the path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{f'{where}: ' if where else 'image '}'{path}' is a folder, not an image file: folders (e.g. a DICOM "
            f"series) are not read; convert the series to one NIfTI file (e.g. with dcm2niix) and give that file."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file not found: '{path}'." if where else f"image file not found: '{path}'.")
    return path


def _monai_reader(path: str, reader: str | None) -> ITKReader | NibabelReader:
    """The MONAI reader for ``path``: the one asked for, else nibabel for its header formats and ITK for the rest."""
    name = _resolve_reader(reader)
    if name is None:
        name = "NibabelReader" if path.endswith(_HEADER_SUFFIXES) else "ITKReader"
    return NibabelReader() if name == "NibabelReader" else ITKReader()


def _read_native(path: str, reader: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` as MONAI's ``LoadImage(ensure_channel_first=True)`` with one explicit reader gives them,
    in the file's own data type: array ``(C, *spatial)``, affine RAS ``(S + 1, S + 1)`` for ``S`` spatial axes."""
    monai_reader = _monai_reader(path, reader)
    try:
        array, meta = monai_reader.get_data(monai_reader.read(path))
    except Exception as err:  # readers raise RuntimeError, OSError, ImageFileError, ... for a bad file
        raise ValueError(f"cannot read image '{path}' with MONAI's {type(monai_reader).__name__}: {err}") from err
    array = np.asarray(array)
    channel = meta.get("original_channel_dim", float("nan"))
    if isinstance(channel, float) and math.isnan(channel):  # EnsureChannelFirst's rule: no channel axis -> add one
        array = array[None]
    else:
        array = np.moveaxis(array, int(channel), 0)
    return array, np.asarray(meta["affine"], dtype=np.float64)


def _as_float32(array: np.ndarray, path: str) -> torch.Tensor:
    """A scan's voxels as float32, refusing finite values that float32 cannot hold (they would become Inf)."""
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and array.size:
        finite = np.abs(array[np.isfinite(array)])
        largest = float(finite.max()) if finite.size else 0.0
        if largest > FLOAT32_MAX:
            raise ValueError(
                f"image '{path}' ({array.dtype}) has values up to {largest:.3g}, which overflow float32 (largest "
                f"{FLOAT32_MAX:.3g}), the type every scan is computed in; rescale the image (e.g. to its physical "
                f"unit) and save it again."
            )
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _as_labels(array: np.ndarray, path: str) -> torch.Tensor:
    """A label map's voxels as int64, exactly: integer types as they are, floats only when every value is a finite
    integer in int64's range. ValueError naming the file and the first offending voxel otherwise."""
    if array.dtype.kind == "b":
        return torch.from_numpy(array.astype(np.int64))
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"label map '{path}' ({array.dtype}) has labels up to {int(array.max())}, above int64's "
                         f"largest value; renumber the labels.")
    if array.dtype.kind in "iu":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if array.dtype.kind != "f":
        raise ValueError(f"label map '{path}' has data type {array.dtype}; labels must be integers.")
    for problem, bad in (("non-finite", ~np.isfinite(array)), ("non-integer", np.isfinite(array) & (array != np.round(array)))):
        if bad.any():
            voxel = tuple(int(i) for i in np.argwhere(bad)[0][1:])
            raise ValueError(f"label map '{path}' has {problem} values ({array[(0, *voxel)]!r} at voxel {voxel}, "
                             f"{int(bad.sum())} voxel(s) in all); labels must be finite integers.")
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest >= 2.0**63:
        raise ValueError(f"label map '{path}' has labels up to {largest:.6g}, beyond int64; renumber the labels.")
    if array.dtype.itemsize <= 4 and largest > FLOAT32_EXACT_INT:
        warnings.warn(f"label map '{path}' is stored as {array.dtype} with labels up to {largest:.0f}: above "
                      f"{FLOAT32_EXACT_INT} that type cannot hold every integer, so distinct IDs may have been merged "
                      f"when the file was written; store label maps with an integer data type.", UserWarning,
                      stacklevel=3)
    return torch.from_numpy(array.astype(np.int64))


def _complete_plane(path: str, affine: np.ndarray, header: nib.Nifti1Header | None) -> np.ndarray:
    """The ``(4, 4)`` RAS matrix of a 2D image whose reader gave only an in-plane ``(3, 3)`` ``affine``: for a NIfTI
    file, its header's form (the sform when its code is set, else the qform, as nibabel reads it), which also holds
    the slice's position, thickness and tilt that a 2D matrix cannot; otherwise ``affine`` padded with the
    identity."""
    if affine.shape == (4, 4):
        return affine
    if header is not None:
        for code, form in ((header["sform_code"], header.get_sform()), (header["qform_code"], header.get_qform())):
            if int(code) > 0:
                return np.asarray(form, dtype=np.float64)
    return _embed(affine)


def _nifti_header(path: str) -> nib.Nifti1Header | None:
    if not path.endswith(_NIFTI_SUFFIXES):
        return None
    try:
        header = nib.load(path).header
    except Exception:  # the reader read it, so this does not happen for a valid NIfTI file
        return None
    return header if isinstance(header, nib.Nifti1Header) else None


def _load(path: PathLike, reader: str | None, labels: bool) -> tuple[torch.Tensor, Geometry]:
    """:func:`load_scan` (``labels=False``: float32) and :func:`load_label_map` (``labels=True``: int64)."""
    path = check_image_file(path)
    array, reader_affine = _read_native(path, reader)
    data = _as_labels(array, path) if labels else _as_float32(array, path)
    header = _nifti_header(path)
    affine = _complete_plane(path, reader_affine, header)
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 4:
        raise ValueError(f"image '{path}' has shape {tuple(data.shape)} (channel first): more than 3 spatial axes.")
    file_shape = tuple(data.shape[1:])
    data, affine, squeezed = _squeeze_singleton(data, affine, path)
    nifti = None
    if header is not None:
        nifti = _nifti_fields(header)
        full = affine.copy()
        if squeezed is not None:
            full[:3, :3] = full[:3, np.argsort([a for a in range(3) if a != squeezed] + [squeezed])]
        _check_forms(path, header, full)
    itk_affine = _itk_affine(path, header)
    if itk_affine is not None and squeezed is not None:
        itk_affine[:3, :3] = itk_affine[:3, [a for a in range(3) if a != squeezed] + [squeezed]]
    geometry = Geometry(affine=affine, file_shape=file_shape, squeezed_axis=squeezed, nifti=nifti,
                        itk_affine=itk_affine, source=path)
    return data.contiguous(), geometry


def load_scan(path: PathLike, reader: str | None = None) -> tuple[torch.Tensor, Geometry]:
    """Read one image or vector field with a MONAI reader (:data:`READERS`) and return it with its :class:`Geometry`.

    Singleton axes beyond the third spatial axis (the NIfTI time axis of a vector image) are dropped. A 3D file with
    exactly one axis of length 1 (``(48, 1, 48)``, ``(1, 48, 48)``, ``(48, 48, 1)``) is a 2D image: that axis is
    dropped and recorded, and :func:`save_image` puts it back, so outputs have the input's layout and geometry. A
    2D NIfTI file keeps its slice position and thickness from its header whichever reader reads it.

    Args:
        path: image file (NIfTI, NRRD, MetaImage or any format the chosen reader supports).
        reader: ``"itk"`` (MONAI ``ITKReader``), ``"nibabel"`` (MONAI ``NibabelReader``) or ``None`` (nibabel for
            NIfTI/MGH/Analyze files, ITK for the others).

    Returns:
        ``(image, geometry)``: image ``(C, *spatial)`` float32; ``geometry.affine`` the ``(4, 4)`` voxel-to-world
        matrix (RAS, mm) whose first columns follow the returned spatial axes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``reader`` is not recognised; ``path`` is a folder (DICOM series are not read: convert them to
            NIfTI, e.g. with dcm2niix); the file cannot be read as an image; it holds finite values beyond float32's
            range (e.g. a float64 file with values near 1e39); it has more than 3 spatial axes or more than one
            singleton axis. Every message names the path.
    """
    return _load(path, reader, labels=False)


def scan_shape(path: PathLike, read_all: bool = False) -> tuple[int, ...]:
    """The spatial size :func:`load_scan` gives a file (the singleton axis of a 2D image and trailing singleton axes
    dropped; a 4D file keeps its 4th axis), from the NIfTI/MGH header without reading the voxels.

    Args:
        path: the image file.
        read_all: read every voxel (NIfTI/MGH; other formats are always read through :func:`load_scan`), so a
            truncated or corrupt file fails here.

    Raises:
        whatever the reader raises for an unreadable file.
    """
    path = os.fspath(path)
    if not path.endswith(_HEADER_SUFFIXES):
        data, _ = load_scan(path)
        return tuple(int(s) for s in data.shape[1:])
    image = nib.load(path)
    shape = tuple(int(s) for s in (np.asarray(image.dataobj).shape if read_all else image.shape))
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3 and shape.count(1) == 1:
        shape = tuple(s for s in shape if s != 1)
    return shape


def load_image(path: PathLike, reader: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one image or vector field; see :func:`load_scan` (which also returns the file's :class:`Geometry`).

    Returns:
        ``(image, affine)``: image ``(C, *spatial)`` float32 with ``C = 1`` for a scalar image and ``C = spatial_dims``
        for a displacement field; affine ``(4, 4)`` float64 voxel-to-world matrix (RAS, mm).
    """
    data, geometry = load_scan(path, reader)
    return data, torch.as_tensor(geometry.affine, dtype=torch.float64)


def load_label_map(path: PathLike, reader: str | None = None) -> tuple[torch.Tensor, Geometry]:
    """Read an integer label map ``(1, *spatial)`` int64 with its :class:`Geometry`, every ID exact.

    The voxels are read in the file's data type and converted to int64 without a float32 step, so any integer type
    up to int64 keeps its IDs (e.g. uint32 IDs above 2^24). A float file is accepted when every value is a finite
    integer (warned about when float32 holds IDs above 2^24, which that type cannot all represent).

    Raises:
        ValueError: naming the file: several channels (a one-hot or 4D label map: give one volume of integer
            labels), non-integer or non-finite values (the first offending voxel is named), IDs beyond int64; and
            as :func:`load_scan`.
    """
    data, geometry = _load(path, reader, labels=True)
    if data.shape[0] != 1:
        raise ValueError(
            f"label map '{os.fspath(path)}' has {data.shape[0]} channels (shape {tuple(data.shape[1:])} per channel): "
            f"a one-hot or 4D label map is not supported; give one volume of integer labels (e.g. argmax over the "
            f"channels)."
        )
    return data, geometry


def _as_geometry(affine: Any, spatial_shape: tuple[int, ...]) -> Geometry:
    if isinstance(affine, Geometry):
        if tuple(affine.spatial_shape) != spatial_shape:
            raise ValueError(
                f"array has spatial size {spatial_shape} but the geometry of '{affine.source}' is for "
                f"{tuple(affine.spatial_shape)}."
            )
        return affine
    matrix = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    matrix = matrix.astype(np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {matrix.shape}.")
    return Geometry.from_affine(matrix, spatial_shape)


def _file_affine(geometry: Geometry) -> np.ndarray:
    """The voxel-to-world matrix of the file layout (singleton axis back in place)."""
    matrix = geometry.affine.copy()
    if geometry.squeezed_axis is not None:
        order = [a for a in range(3) if a != geometry.squeezed_axis] + [geometry.squeezed_axis]
        matrix[:3, :3] = matrix[:3, np.argsort(order)]
    return matrix


def _is_rigid(matrix: np.ndarray) -> bool:
    linear = matrix[:3, :3]
    zooms = np.linalg.norm(linear, axis=0)
    if np.any(zooms == 0):
        return False
    rotation = linear / zooms
    return bool(np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-5))


def _write_nifti(path: str, image: nib.Nifti1Image, time: float | None) -> str:
    """Write ``image`` to ``path`` atomically (gzip level 1 for ``.gz``), its time in ``descrip``; returns the path."""
    if time is not None:
        image.header["descrip"] = time_description(time)
    payload = image.to_bytes()
    if path.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    return str(atomic_write(path, payload))


def _nifti_image(volume: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    if geometry.nifti is not None:
        header = nib.Nifti1Header()
        header.set_data_dtype(volume.dtype)
        header.set_data_shape(volume.shape)
        for key, value in geometry.nifti.items():
            if key == "pixdim":
                pixdim = np.asarray(header["pixdim"]).copy()
                pixdim[:4] = np.asarray(value, dtype=np.float32)[:4]
                header["pixdim"] = pixdim
            else:
                header[key] = np.asarray(value)
        image = nib.Nifti1Image(volume, None, header=header)
        return image
    matrix = _file_affine(geometry)
    image = nib.Nifti1Image(volume, matrix)
    image.header.set_sform(matrix, code="scanner")
    image.header.set_qform(matrix, code="scanner" if _is_rigid(matrix) else "unknown")
    image.header.set_xyzt_units("mm", "sec")
    return image


def check_output_dir(path: PathLike) -> str:
    """Make sure ``path`` is a folder this process can write into, before any work starts.

    Creates it (with parents) when missing, then creates and removes a probe file in it.

    Returns:
        the absolute path.

    Raises:
        ValueError: ``path`` (or a parent) exists and is not a folder, or the folder is not writable; the message
            names the path and the reason.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir '{path}' exists and is not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output_dir '{path}' cannot be created: {error.strerror or error}.") from error
    probe = temporary_name(os.path.join(path, "write-check"))
    try:
        with open(probe, "wb"):
            pass
    except OSError as error:
        raise ValueError(f"output_dir '{path}' is not writable: {error.strerror or error}.") from error
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return path


def parse_times(value: Any, name: str = "times") -> list[float]:
    """Query or acquisition times from the command line or an API call, as a list of finite floats.

    Accepts a number, a sequence of numbers, or a string such as ``"[1.0, 2.5]"``, ``"1.0,2.5"``, ``"[1.0 2.5]"`` or
    ``"2"``. Strings inside a list (``["1.0"]``) are refused: pass numbers.

    Raises:
        ValueError: naming ``name``, the offending entry and what was expected.
    """
    expected = 'expected a number or a list of numbers such as "[1.0, 2.5]"'
    if isinstance(value, torch.Tensor) or isinstance(value, np.ndarray):
        value = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value).reshape(-1).tolist()
    if isinstance(value, str):
        text = value.strip()
        inner = text[1:-1] if len(text) >= 2 and text[0] + text[-1] in ("[]", "()") else text
        tokens = [token for token in re.split(r"[\s,]+", inner.strip()) if token]
        if not tokens:
            raise ValueError(f"{name}: {value!r} holds no time; {expected}.")
        values = []
        for token in tokens:
            try:
                values.append(float(token))
            except ValueError:
                raise ValueError(f"{name}: {token!r} in {value!r} is not a number; {expected}.") from None
    elif isinstance(value, Real) and not isinstance(value, bool):
        values = [float(value)]
    elif isinstance(value, (Sequence, set)) and not isinstance(value, (bytes, bytearray)):
        values = []
        for index, entry in enumerate(value):
            if isinstance(entry, bool) or not isinstance(entry, Real):
                kind = f"the string {entry!r}" if isinstance(entry, str) else f"{entry!r} ({type(entry).__name__})"
                raise ValueError(f"{name}[{index}] is {kind}, not a number; {expected}.")
            values.append(float(entry))
    else:
        raise ValueError(f"{name} is {value!r} ({type(value).__name__}); {expected}.")
    for index, entry in enumerate(values):
        if not math.isfinite(entry):
            raise ValueError(f"{name} must be finite, got {entry!r} at index {index}.")
    return values


def time_description(time: float) -> bytes:
    """The NIfTI ``descrip`` of an output at ``time``: ``noder-monai time=<repr>``, the exact float (file names
    carry :func:`~noder_monai.utils.time_tag`)."""
    return f"noder-monai time={float(time)!r}".encode("ascii")


def label_dtype(labels: np.ndarray | torch.Tensor) -> np.dtype:
    """The on-disk type of a label map: int32 (read by every NIfTI tool) when every ID fits, else int64."""
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    info = np.iinfo(np.int32)
    if values.size == 0 or (int(values.min()) >= info.min and int(values.max()) <= info.max):
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _integer_data(data: np.ndarray, dtype: np.dtype, path: str) -> np.ndarray:
    """``data`` ready for an integer ``dtype``: floats rounded, and every value checked to fit."""
    if data.dtype.kind == "f":
        data = np.rint(data)
    info = np.iinfo(dtype)
    if data.size and (data.min() < info.min or data.max() > info.max):
        raise ValueError(f"'{path}': values from {data.min()} to {data.max()} do not fit {dtype} "
                         f"([{info.min}, {info.max}]); write it as {label_dtype(data)} (label_dtype).")
    return data


def save_image(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor | Geometry,
    path: PathLike,
    dtype: DTypeLike = np.float32,
    time: float | None = None,
) -> str:
    """Write a channel-first image or displacement field as NIfTI, atomically, in the input's geometry.

    ``affine`` is either a :class:`Geometry` read with the input (:func:`load_scan`): the NIfTI header's qform,
    sform, their codes, pixdim and units are copied verbatim, and a 2D image gets its singleton axis back where the
    input had it; or a plain ``(4, 4)`` matrix (RAS, mm), written as sform and, when it is a rotation times zooms,
    qform too (both code 1), so nibabel and ITK read the same grid. ``C = 1`` is stored as a plain volume; ``C > 1``
    channels last as ``(*spatial3, 1, C)`` with intent ``vector``. Values are written as given (a ddf in this package
    is in voxel units, MONAI ``Warp`` convention; see :mod:`noder_monai.io.itk_field` for ITK/ANTs fields);
    integer ``dtype`` rounds floats to the nearest integer and copies integers exactly. See :func:`~noder_monai.utils.atomic_write` for the temporary name and file mode.

    Args:
        array: ``(C, *spatial)`` with 2 or 3 spatial axes.
        affine: the input's :class:`Geometry`, or a ``(4, 4)`` voxel-to-world matrix.
        path: destination file, ``.nii`` or ``.nii.gz``; missing parent folders are created.
        dtype: on-disk data type, e.g. ``np.float32`` (default) or ``np.uint8`` for label maps.
        time: the exact time the image shows, written to the header's ``descrip`` field (:func:`time_description`).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``array`` is not ``(C, *spatial)`` with 2-3 spatial axes or does not fit the geometry, ``affine``
            is not ``(4, 4)``, ``path`` does not end in ``.nii`` / ``.nii.gz``, or an integer ``dtype`` cannot hold
            every value (e.g. label IDs above 2^31 as int32: see :func:`label_dtype`).
    """
    path = os.fspath(path)
    if not path.endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"path must end with '.nii' or '.nii.gz', got '{path}'.")
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim not in (3, 4):
        raise ValueError(f"array must be (C, *spatial) with 2 or 3 spatial axes, got shape {data.shape}.")
    geometry = _as_geometry(affine, tuple(data.shape[1:]))
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = _integer_data(data, np.dtype(dtype), path)
    data = data.astype(dtype)
    channels = data.shape[0]
    data = data.reshape((channels,) + geometry.file_shape)
    if channels == 1:
        volume = data[0]
    else:
        volume = np.moveaxis(data, 0, -1).reshape(geometry.file_shape + (1, channels))
    image = _nifti_image(volume, geometry)
    if channels > 1:
        image.header.set_intent("vector")
    return _write_nifti(path, image, time)


GEOMETRY_META_KEY = "noder_geometry"
"""MetaTensor metadata key holding a :class:`Geometry` as JSON text (text survives MONAI's collation unchanged)."""


class GeometryNiftiWriter(NibabelWriter):
    """MONAI ``SaveImaged(writer=GeometryNiftiWriter)``: NIfTI written by :func:`save_image` in the input's geometry.

    When the item's metadata holds :data:`GEOMETRY_META_KEY` (set by ``ODEWarpd`` from the fitted subject), the
    file gets the input header's qform, sform, codes, pixdim and singleton axis verbatim, so nibabel and ITK read
    the output's grid exactly as they read the input's (a 2D image gets its singleton axis back, with no resampling);
    otherwise it writes as MONAI's ``NibabelWriter``. With ``output_dtype=None`` floating data is written as float32
    and integer data (label maps) as :func:`label_dtype` says, every ID exact; the item's ``time`` metadata goes to
    the header's ``descrip`` (:func:`time_description`).
    """

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs: Any):
        self.channel_first = torch.as_tensor(data_array) if channel_dim == 0 else None
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=squeeze_end_dims, **kwargs)

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any):
        time = (meta_dict or {}).get("time")
        self.time = None if time is None else float(torch.as_tensor(time, dtype=torch.float64).reshape(()))
        text = (meta_dict or {}).get(GEOMETRY_META_KEY)
        self.geometry = Geometry.from_dict(json.loads(text)) if isinstance(text, str) else None
        if self.geometry is None or self.channel_first is None:  # written by NibabelWriter: it needs the metadata
            super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs: Any):
        if self.geometry is None or self.channel_first is None:
            return super().write(filename, verbose=verbose, **obj_kwargs)
        dtype = self.output_dtype
        if dtype is None:
            dtype = np.float32 if self.channel_first.is_floating_point() else label_dtype(self.channel_first)
        return save_image(self.channel_first, self.geometry, filename, dtype=dtype, time=self.time)
