"""One subject's image sequence: scans on one grid, their acquisition times and the grid's affine."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from noder_monai.io import Geometry, load_label_map, load_scan
from noder_monai.utils import PathLike

__all__ = ["SubjectSequence", "file_fingerprint", "load_sequence", "load_series", "read_label_map"]

AFFINE_ATOL = 1e-4


def file_fingerprint(path: PathLike) -> dict:
    """What identifies a scan file's content: ``{"path", "size", "mtime_ns", "sha256"}`` (plain values)."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns),
            "sha256": digest.hexdigest()}


def read_label_map(
    path: PathLike, spatial_size: Sequence[int], affine: torch.Tensor | np.ndarray, where: str,
    reader: str | None = None,
) -> tuple[torch.Tensor, Geometry]:
    """Read a label map for scans on the grid (``spatial_size``, ``affine``): the one label check of every stage.

    The map must be one volume of finite integers (:func:`~noder_monai.io.load_label_map`, IDs exact as int64) on
    the scans' grid in world space: the same size and the same voxel-to-world matrix (up to ``AFFINE_ATOL`` mm), so
    label voxel ``v`` covers the scans' voxel ``v``.

    Args:
        path: the label-map file.
        spatial_size: the scans' grid size.
        affine: the scans' ``(4, 4)`` voxel-to-world matrix.
        where: what the message names, e.g. ``"subject 'sub-01': field 'label'"``.
        reader: ``"itk"``, ``"nibabel"`` or None.

    Returns:
        ``(labels (1, *S) int64, geometry)``.

    Raises:
        ValueError: naming ``where`` and the file: several channels, non-integer or non-finite values, another size
            or another affine.
    """
    path = os.fspath(path)
    labels, geometry = load_label_map(path, reader)
    size, expected = tuple(labels.shape[1:]), tuple(int(s) for s in spatial_size)
    matrix = torch.as_tensor(geometry.affine, dtype=torch.float64)
    reference = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if size != expected or not torch.allclose(matrix, reference, atol=AFFINE_ATOL, rtol=0.0):
        what = (f"size {size}, the scans {expected}" if size != expected else
                f"affine {matrix.numpy().round(4).tolist()}, the scans {reference.numpy().round(4).tolist()}")
        raise ValueError(f"{where} ('{path}') is not on the scans' grid in world space ({what}); resample the label "
                         f"map onto the first scan (nearest neighbour) so that both have the same size and affine.")
    return labels, geometry


def _scan_name(index: int, paths: Sequence[str] | None) -> str:
    return f"scan {index} ('{paths[index]}')" if paths is not None else f"scan {index}"


@dataclass
class SubjectSequence:
    """Scans of one subject on a common grid, ordered by acquisition time.

    Validated on construction: at least two scans, one finite time per scan, strictly increasing times, finite voxel
    values, a ``(4, 4)`` affine. Every error is a ``ValueError`` naming the subject, the field and the offending value.

    Attributes:
        images: ``(T, 1, *spatial)`` float32 scans, 2 or 3 spatial axes.
        times: ``(T,)`` float64 acquisition times in the user's unit (years, seconds, fraction of a cycle).
        affine: ``(4, 4)`` float64 voxel-to-world matrix shared by all scans (RAS, mm).
        subject: subject identifier used in messages and outputs.
        paths: the file of each scan when read from disk, else ``None``.
        geometry: the first scan's :class:`~noder_monai.io.image.Geometry` (header forms, 2D layout) that outputs are
            written with; ``None`` builds one from ``affine``.
        fingerprints: :func:`file_fingerprint` of each scan when read from disk, else ``None``.
    """

    images: torch.Tensor
    times: torch.Tensor
    affine: torch.Tensor
    subject: str = "subject"
    paths: list[str] | None = None
    geometry: Geometry | None = None
    fingerprints: list[dict] | None = None

    def __post_init__(self) -> None:
        images = torch.as_tensor(self.images)
        if images.ndim not in (4, 5) or images.shape[1] != 1:
            raise ValueError(
                f"subject '{self.subject}': field 'images' must be (T, 1, *spatial) with 2 or 3 spatial axes, "
                f"got shape {tuple(images.shape)}."
            )
        self.images = images.to(torch.float32)
        times = torch.as_tensor(self.times, dtype=torch.float64).reshape(-1)
        count = images.shape[0]
        if count < 2:
            raise ValueError(f"subject '{self.subject}': field 'images' needs at least 2 scans, got {count}.")
        if times.numel() != count:
            raise ValueError(
                f"subject '{self.subject}': field 'times' has {times.numel()} values for {count} scans."
            )
        if not bool(torch.isfinite(times).all()):
            raise ValueError(
                f"subject '{self.subject}': field 'times' must be finite numbers, got {times.tolist()}."
            )
        for index in range(1, count):
            previous, current = float(times[index - 1]), float(times[index])
            if current <= previous:
                problem = "duplicate" if current == previous else "unsorted"
                raise ValueError(
                    f"subject '{self.subject}': field 'times' must be strictly increasing, {problem} values "
                    f"times[{index - 1}]={previous:g} and times[{index}]={current:g} (times {times.tolist()})."
                )
        self.times = times
        if self.paths is not None:
            self.paths = [str(path) for path in self.paths]
            if len(self.paths) != count:
                raise ValueError(
                    f"subject '{self.subject}': field 'paths' has {len(self.paths)} entries for {count} scans."
                )
        finite = torch.isfinite(self.images).flatten(1).all(dim=1)
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            raise ValueError(
                f"subject '{self.subject}': field 'images': {_scan_name(index, self.paths)} contains NaN or Inf "
                f"voxels."
            )
        affine = torch.as_tensor(self.affine, dtype=torch.float64)
        if affine.shape != (4, 4) or not bool(torch.isfinite(affine).all()):
            raise ValueError(
                f"subject '{self.subject}': field 'affine' must be a finite (4, 4) matrix, got shape "
                f"{tuple(affine.shape)}."
            )
        self.affine = affine
        if self.geometry is None:
            self.geometry = Geometry.from_affine(affine, self.spatial_size)

    def fitted_on(self) -> dict:
        """Plain description of what a model fitted to this sequence saw: grid, affine, times and scan files."""
        return {
            "subject": self.subject,
            "spatial_size": list(self.spatial_size),
            "affine": self.affine.tolist(),
            "times": self.times.tolist(),
            "scans": [dict(item) for item in self.fingerprints] if self.fingerprints is not None else None,
        }

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes, 2 or 3."""
        return self.images.ndim - 2

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """Grid size ``(*spatial)`` in voxels."""
        return tuple(self.images.shape[2:])

    @classmethod
    def from_tensors(
        cls,
        images: torch.Tensor | np.ndarray,
        times: Sequence[float] | torch.Tensor | np.ndarray,
        affine: torch.Tensor | np.ndarray | None = None,
        subject: str = "subject",
    ) -> SubjectSequence:
        """Build a validated sequence from in-memory scans.

        Args:
            images: ``(T, 1, *spatial)`` scans (any real dtype, converted to float32).
            times: ``T`` acquisition times, strictly increasing.
            affine: ``(4, 4)`` voxel-to-world matrix; ``None`` gives the identity (1 mm voxels at the origin).
            subject: subject identifier used in messages.

        Returns:
            The validated :class:`SubjectSequence`.
        """
        matrix = torch.eye(4, dtype=torch.float64) if affine is None else affine
        return cls(images=torch.as_tensor(images), times=times, affine=matrix, subject=subject)


def load_sequence(
    paths: Sequence[PathLike],
    times: Sequence[float],
    subject: str = "subject",
    reader: str | None = None,
) -> SubjectSequence:
    """Read one subject's scans with MONAI ``LoadImage`` and check they form a sequence on one grid.

    Args:
        paths: one single-channel image file per scan, in time order.
        times: acquisition time of each scan, strictly increasing.
        subject: subject identifier used in messages.
        reader: ``"itk"``, ``"nibabel"`` or ``None`` (MONAI's default), see :func:`noder_monai.io.image.load_image`.

    Returns:
        :class:`SubjectSequence` with images ``(T, 1, *spatial)`` and the first scan's affine.

    Raises:
        FileNotFoundError: a file does not exist (the message names it).
        ValueError: a file cannot be read, has more than one channel, or its shape or affine (atol 1e-4) differs from
            the first scan's (the message names both files); fewer than two scans; times not finite or not strictly
            increasing; NaN/Inf voxels (the message names the file).
    """
    names = [str(path) for path in paths]
    values = times.tolist() if isinstance(times, (torch.Tensor, np.ndarray)) else list(times)
    if len(names) != len(values):
        raise ValueError(f"subject '{subject}': {len(names)} paths but {len(values)} times.")
    if len(names) < 2:
        raise ValueError(f"subject '{subject}': field 'paths' needs at least 2 scans, got {len(names)}.")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise ValueError(
                f"subject '{subject}': field 'times' entry {index} must be a finite number, got {value!r}."
            )
    images = []
    affine = None
    geometry = None
    for index, name in enumerate(names):
        image, scan_geometry = load_scan(name, reader=reader)
        scan_affine = torch.as_tensor(scan_geometry.affine, dtype=torch.float64)
        if image.shape[0] != 1:
            raise ValueError(
                f"subject '{subject}': scan '{name}' has {image.shape[0]} {_channel_kind(name)}, shape "
                f"{tuple(image.shape[1:])} each; a scan must be one single-channel image. {_series_hint(name)}"
            )
        if index == 0:
            affine, geometry = scan_affine, scan_geometry
        elif image.shape != images[0].shape:
            raise ValueError(
                f"subject '{subject}': scan '{name}' has shape {tuple(image.shape[1:])} but '{names[0]}' has "
                f"{tuple(images[0].shape[1:])}; all scans must share one grid."
            )
        elif not torch.allclose(scan_affine, affine, atol=AFFINE_ATOL, rtol=0.0):
            raise ValueError(
                f"subject '{subject}': scan '{name}' has affine {scan_affine.numpy().round(4).tolist()} but "
                f"'{names[0]}' has {affine.numpy().round(4).tolist()} (atol {AFFINE_ATOL}); all scans must share "
                f"one grid."
            )
        images.append(image)
    return SubjectSequence(
        images=torch.stack(images),
        times=[float(value) for value in values],
        affine=affine,
        subject=subject,
        paths=names,
        geometry=geometry,
        fingerprints=[file_fingerprint(name) for name in names],
    )


def _is_time_series(path: str) -> bool:
    """A NIfTI file whose 4th axis is time (not a vector field stored as ``(X, Y, Z, 1, C)``)."""
    if not path.endswith((".nii", ".nii.gz")):
        return False
    try:
        header = nib.load(path).header
    except Exception:
        return False
    dims = header["dim"]
    return int(dims[0]) == 4 and int(dims[4]) > 1


def _channel_kind(path: str) -> str:
    return "time points (a 4D series)" if _is_time_series(path) else "channels"


def _series_hint(path: str) -> str:
    if _is_time_series(path):
        return (
            "Give one file per time point, or read the 4D series (e.g. a cine) with "
            "noder_monai.data.load_series(path, times)."
        )
    return "Give one single-channel file per time point."


def load_series(
    path: PathLike,
    times: Sequence[float],
    subject: str = "subject",
    reader: str | None = None,
) -> SubjectSequence:
    """Read a 4D series (one file, last axis = time, e.g. a cardiac cine) as one subject's sequence.

    Args:
        path: a 4D image file ``(*spatial, T)`` (2D series may be stored as ``(X, Y, 1, T)``).
        times: the acquisition time of each of the ``T`` frames, strictly increasing.
        subject: subject identifier used in messages.
        reader: see :func:`noder_monai.io.image.load_image`.

    Raises:
        ValueError: naming the file, if it has one frame or the number of times differs from the number of frames.
    """
    name = os.fspath(path)
    data, geometry = load_scan(name, reader=reader)
    values = times.tolist() if isinstance(times, (torch.Tensor, np.ndarray)) else list(times)
    if data.shape[0] < 2:
        raise ValueError(f"subject '{subject}': series '{name}' has 1 frame; a series needs at least 2.")
    if len(values) != data.shape[0]:
        raise ValueError(
            f"subject '{subject}': series '{name}' has {data.shape[0]} frames but {len(values)} times were given."
        )
    fingerprint = file_fingerprint(name)
    return SubjectSequence(
        images=data[:, None],
        times=[float(value) for value in values],
        affine=torch.as_tensor(geometry.affine, dtype=torch.float64),
        subject=subject,
        paths=[name] * data.shape[0],
        geometry=geometry,
        fingerprints=[fingerprint] * data.shape[0],
    )
