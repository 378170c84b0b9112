"""Displacement fields to pretrain the deformation autoencoder on: generated here, or read from the user's files.

Generated fields (:class:`DeformationFieldGenerator`, :class:`GeneratedDeformationFields`) are smooth
diffeomorphisms at the magnitudes of longitudinal MRI (a few voxels), each the composition of up to three parts,
every part the exponential of a stationary velocity field (scaling and squaring, MONAI ``DVF2DDF`` with
``padding_mode="border"``):

* ``"background"``: multi-scale smooth random velocity (Gaussian noise on coarse control grids, upsampled and
  box-smoothed), faded to zero at the image border (fields of registered head or chest scans vanish outside the body);
* ``"regions"``: local expansions and shrinkages, like atrophy or ventricle enlargement: radial velocities with a
  Gaussian profile around random centres, each randomly expanding or shrinking;
* ``"cardiac"``: a contraction towards (or expansion from) a long axis plus a twist about it (3D: rotation whose sense
  changes along the axis; 2D: a rotation about a centre), like a beating ventricle.

Fields follow this package's convention: ``(N, D, *spatial)``, voxel units, MONAI ``Warp`` pull-back
(``out(x) = image(x + ddf(x))``), channel ``i`` along spatial axis ``i``. Every random draw of a field comes from
``numpy.random.SeedSequence(key)`` with the field's own key (``(seed, index)`` in
:meth:`DeformationFieldGenerator.generate`, ``(seed, stream, index)`` in :class:`GeneratedDeformationFields`), so a
field does not depend on the batch it is generated in.

User fields (:func:`load_displacement_field`, :class:`DisplacementFieldPatches`) are NIfTI files, for example exported
from VoxelMorph or ANTs, in any of these layouts (``D`` = spatial dims, the number of components):

* ``(X, Y, Z, 1, D)`` with intent ``vector``: the ITK / ANTs displacement-field layout (and this package's
  ``save_image``); a 2D field is ``(X, Y, 1, 1, 2)``;
* ``(X, Y, Z, D)`` channels last (VoxelMorph's ``save_volfile``) or ``(D, X, Y, Z)`` channels first (PyTorch);
  2D: ``(X, Y, 2)``, ``(X, Y, 1, 2)`` or ``(2, X, Y)``. When both ends have ``D`` entries, channels last is assumed.

Units: a file does not say reliably what its vectors measure (this package writes voxel units in the ITK layout
whose ITK/ANTs meaning is millimetres), so the caller says it with ``units``:

* ``"voxel"`` (default): displacements in voxels along the array axes (VoxelMorph, this package);
* ``"mm"``: physical displacements in world coordinates, as ITK and ANTs write them (``frame="LPS"``, the default)
  or in the NIfTI RAS frame (``frame="RAS"``); they are converted to voxels with the file's affine,
  ``d_voxel = inverse(A) @ F @ d_world`` with ``A`` the affine's rotation-and-spacing block and ``F`` the LPS->RAS
  flip ``diag(-1, -1, 1)`` (identity for RAS).

After conversion the largest displacement is checked against ``max_displacement`` (default a quarter of the
smallest spatial size): a larger value almost always means millimetres read as voxels (or a wrong scale factor),
and raises a ``ValueError`` naming the file and suggesting ``units="mm"``. Shapes, component counts and non-finite
values also raise a ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from torch.utils.data import Dataset

from noder_monai.functional import box_filter, compose_displacements

__all__ = [
    "FIELD_COMPONENTS",
    "DISPLACEMENT_UNITS",
    "WORLD_FRAMES",
    "DeformationFieldGenerator",
    "GeneratedDeformationFields",
    "DisplacementFieldPatches",
    "field_spatial_size",
    "list_displacement_fields",
    "load_displacement_field",
]

PathLike = Union[str, "os.PathLike[str]"]

FIELD_COMPONENTS = ("background", "regions", "cardiac")
"""The parts a generated field is composed of, in the order they are applied."""
DISPLACEMENT_UNITS = ("voxel", "mm")
"""Accepted ``units`` of user fields."""
WORLD_FRAMES = ("LPS", "RAS")
"""Accepted world frames of millimetre fields: ITK/ANTs (LPS) or NIfTI (RAS)."""

_DEFAULT_PROBABILITIES = {"background": 0.8, "regions": 0.7, "cardiac": 0.4}
_LPS_TO_RAS = (-1.0, -1.0, 1.0)


def _check_range(value: Sequence[float], name: str, low: float = 0.0) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must be a pair (min, max) with {low} <= min <= max, got {tuple(value)!r}.")
    return pair


def _unit_max(field: torch.Tensor) -> torch.Tensor:
    """Scale each field of ``(N, D, *S)`` so that its longest vector has length 1 (zero fields stay zero)."""
    norms = field.pow(2).sum(1).sqrt().flatten(1).amax(1).clamp_min(1e-12)
    return field / norms.view(-1, *([1] * (field.ndim - 1)))


class DeformationFieldGenerator:
    """Random smooth diffeomorphic displacement fields, 2D or 3D (see the module docstring for the three parts).

    Each field draws which parts it has (each with its probability in ``probabilities``, at least one), a target
    size ``m`` uniformly in ``max_displacement`` voxels, and a weight in [0.3, 1] per part (the largest set to 1):
    every part's velocity is scaled so that its longest vector is ``m`` times its weight, so the composed field's
    largest displacement is about ``m`` (more where parts overlap). Velocities are built, integrated and composed on
    a grid ``integration_stride`` times coarser than the image, then upsampled linearly: the fields are smooth on
    that scale, and this is about 8 times cheaper in 3D for stride 2.

    Args:
        spatial_size: (X, Y) or (X, Y, Z), each >= 8.
        max_displacement: range (min, max) of a field's target largest displacement, voxels. Defaults to (0.5, 4.0).
        probabilities: chance that a field has each part, keys in :data:`FIELD_COMPONENTS`; missing keys keep their
            defaults (background 0.8, regions 0.7, cardiac 0.4); 0 excludes a part.
        background_spacings: control-point spacings of the background's scales as fractions of the image size,
            coarse first; scale ``k`` has amplitude ``spacing_k / spacing_0``. Defaults to (0.5, 0.25).
        border_taper: fraction of each axis over which the background fades to zero at both borders; 0 disables.
            Defaults to 0.15.
        regions: range (min, max) of the number of local expansion/shrinkage regions. Defaults to (1, 4).
        region_sigma: range of a region's Gaussian width as a fraction of the image size. Defaults to (0.1, 0.25).
        integration_steps: scaling-and-squaring steps. Defaults to 7.
        integration_stride: integrate on a grid this many times coarser (1 = full resolution). Defaults to 2.
        device: torch device the fields are built on. Defaults to the CPU.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        max_displacement: Sequence[float] = (0.5, 4.0),
        probabilities: dict[str, float] | None = None,
        background_spacings: Sequence[float] = (0.5, 0.25),
        border_taper: float = 0.15,
        regions: Sequence[int] = (1, 4),
        region_sigma: Sequence[float] = (0.1, 0.25),
        integration_steps: int = 7,
        integration_stride: int = 2,
        device: str | torch.device = "cpu",
    ):
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 8:
            raise ValueError(f"spatial_size must have 2 or 3 entries, each >= 8, got {tuple(spatial_size)!r}.")
        self.spatial_dims = len(self.spatial_size)
        self.max_displacement = _check_range(max_displacement, "max_displacement")
        unknown = set(probabilities or {}) - set(FIELD_COMPONENTS)
        if unknown:
            raise ValueError(f"probabilities keys must be in {FIELD_COMPONENTS}, got {sorted(unknown)!r}.")
        self.probabilities = {**_DEFAULT_PROBABILITIES, **{k: float(v) for k, v in (probabilities or {}).items()}}
        if any(not 0.0 <= p <= 1.0 for p in self.probabilities.values()) or not any(self.probabilities.values()):
            raise ValueError(f"probabilities must lie in [0, 1] with at least one > 0, got {self.probabilities!r}.")
        self.background_spacings = tuple(float(s) for s in background_spacings)
        if not self.background_spacings or any(not 0.0 < s <= 1.0 for s in self.background_spacings):
            raise ValueError(f"background_spacings must be fractions in (0, 1], got {tuple(background_spacings)!r}.")
        if not 0.0 <= border_taper <= 0.5:
            raise ValueError(f"border_taper must be in [0, 0.5], got {border_taper!r}.")
        self.border_taper = float(border_taper)
        self.regions = tuple(int(v) for v in _check_range(regions, "regions"))
        self.region_sigma = _check_range(region_sigma, "region_sigma")
        if self.region_sigma[0] <= 0:
            raise ValueError(f"region_sigma must be > 0, got {tuple(region_sigma)!r}.")
        if integration_steps < 1:
            raise ValueError(f"integration_steps must be >= 1, got {integration_steps!r}.")
        if integration_stride < 1 or min(self.spatial_size) // integration_stride < 4:
            raise ValueError(
                f"integration_stride must be >= 1 and leave >= 4 voxels per axis, got {integration_stride!r} "
                f"for spatial_size {self.spatial_size}."
            )
        self.integration_stride = int(integration_stride)
        self.device = torch.device(device)
        self._integrate = DVF2DDF(num_steps=integration_steps, mode="bilinear", padding_mode="border")
        self._work_size = tuple(math.ceil(s / self.integration_stride) for s in self.spatial_size)
        axes = [torch.linspace(0, s - 1, c, device=self.device) for s, c in zip(self.spatial_size, self._work_size)]
        self._coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (D, *work) image-voxel coordinates
        self._to_work = torch.tensor(
            [(c - 1) / (s - 1) for c, s in zip(self._work_size, self.spatial_size)], device=self.device
        ).view(1, -1, *([1] * self.spatial_dims))  # image voxels -> work-grid voxels, per component
        self._taper = self._border_window()

    def config(self) -> dict[str, Any]:
        """The constructor arguments as plain values (for checkpoints and documentation)."""
        return {
            "spatial_size": list(self.spatial_size),
            "max_displacement": list(self.max_displacement),
            "probabilities": dict(self.probabilities),
            "background_spacings": list(self.background_spacings),
            "border_taper": self.border_taper,
            "regions": list(self.regions),
            "region_sigma": list(self.region_sigma),
            "integration_steps": self._integrate.num_steps,
            "integration_stride": self.integration_stride,
        }

    def _border_window(self) -> torch.Tensor:
        """(*work) product over axes of a smoothstep from 0 at the border to 1 at ``border_taper`` of the axis."""
        window = torch.ones(self._work_size, device=self.device)
        if self.border_taper == 0:
            return window
        for axis, size in enumerate(self.spatial_size):
            position = self._coords[axis]
            distance = torch.minimum(position, size - 1 - position) / max(self.border_taper * (size - 1), 1e-6)
            ramp = distance.clamp(0.0, 1.0)
            window = window * ramp * ramp * (3 - 2 * ramp)
        return window

    def _background(self, rngs: list[np.random.Generator]) -> torch.Tensor:
        """(N, D, *work) unit-max multi-scale smooth random velocities, tapered at the border."""
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        total = torch.zeros(len(rngs), self.spatial_dims, *self._work_size, device=self.device)
        for spacing in self.background_spacings:
            grid = [max(2, math.ceil(1 / spacing) + 1) for _ in self.spatial_size]
            noise = np.stack([rng.standard_normal((self.spatial_dims, *grid)) for rng in rngs])
            coarse = torch.as_tensor(noise, dtype=torch.float32, device=self.device)
            fine = F.interpolate(coarse, size=self._work_size, mode=mode, align_corners=True)
            width = 2 * int(spacing * min(self._work_size) / 2) + 1
            total += box_filter(fine, width, "replicate") * (spacing / self.background_spacings[0])
        return _unit_max(total * self._taper)

    def _regions(self, rngs: list[np.random.Generator]) -> torch.Tensor:
        """(N, D, *work) unit-max sums of radial Gaussian-profile velocities around random centres."""
        size = torch.tensor(self.spatial_size, dtype=torch.float32, device=self.device)
        view = (-1,) + (1,) * self.spatial_dims
        fields = []
        for rng in rngs:
            field = torch.zeros_like(self._coords)
            for _ in range(int(rng.integers(self.regions[0], self.regions[1] + 1))):
                centre = torch.as_tensor(rng.uniform(0.25, 0.75, self.spatial_dims), dtype=torch.float32)
                centre = centre.to(self.device)
                sigma = float(rng.uniform(*self.region_sigma)) * size
                offset = (self._coords - (centre * (size - 1)).view(view)) / sigma.view(view)
                weight = float(rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0]))
                field += weight * offset * torch.exp(-0.5 * offset.pow(2).sum(0, keepdim=True))
            fields.append(field)
        return _unit_max(torch.stack(fields))

    def _cardiac(self, rngs: list[np.random.Generator]) -> torch.Tensor:
        """(N, D, *work) unit-max contraction (or expansion) towards a long axis plus a twist about it."""
        size = torch.tensor(self.spatial_size, dtype=torch.float32, device=self.device)
        view = (-1,) + (1,) * self.spatial_dims
        fields = []
        for rng in rngs:
            centre = torch.as_tensor(rng.uniform(0.4, 0.6, self.spatial_dims), dtype=torch.float32, device=self.device)
            offset = self._coords - (centre * (size - 1)).view(view)
            radius = float(rng.uniform(0.15, 0.3)) * float(size.min())
            if self.spatial_dims == 3:
                tilt, azimuth = rng.uniform(0.0, math.pi / 6), rng.uniform(0.0, 2 * math.pi)
                axis = torch.tensor(
                    [math.sin(tilt) * math.cos(azimuth), math.sin(tilt) * math.sin(azimuth), math.cos(tilt)],
                    device=self.device,
                ).view(view)
                height = (offset * axis).sum(0, keepdim=True)
                planar = offset - height * axis
                length = float(rng.uniform(0.25, 0.4)) * float(size.min())
                window = torch.exp(-0.5 * (planar.pow(2).sum(0, keepdim=True) / radius**2 + (height / length) ** 2))
                rotation = torch.linalg.cross(axis.expand_as(planar), planar, dim=0) * (height / length)
            else:
                planar = offset
                window = torch.exp(-0.5 * planar.pow(2).sum(0, keepdim=True) / radius**2)
                rotation = torch.stack([-planar[1], planar[0]])
            contraction = float(rng.uniform(0.0, 1.0) * rng.choice([-1.0, 1.0]))
            twist = float(rng.uniform(0.0, 1.0) * rng.choice([-1.0, 1.0]))
            parts = _unit_max(torch.stack([planar * window, rotation * window]))
            fields.append(contraction * parts[0] + twist * parts[1])
        return _unit_max(torch.stack(fields))

    def _draw_magnitudes(self, rng: np.random.Generator) -> list[float]:
        """Largest velocity (voxels) of each part of one field; 0 for the parts it does not have."""
        present = [rng.uniform() < self.probabilities[name] for name in FIELD_COMPONENTS]
        if not any(present):
            candidates = [i for i, name in enumerate(FIELD_COMPONENTS) if self.probabilities[name] > 0]
            present[int(rng.choice(candidates))] = True
        target = rng.uniform(*self.max_displacement)
        weights = np.where(present, rng.uniform(0.3, 1.0, len(present)), 0.0)
        return [float(w) for w in target * weights / weights.max()]

    @torch.no_grad()
    def fields(self, keys: Sequence[Sequence[int]]) -> torch.Tensor:
        """Generate one field per key; field ``k`` depends on ``keys[k]`` only (``numpy.random.default_rng(key)``).

        Args:
            keys: one seed key per field, each an int or a sequence of ints (e.g. ``(seed, index)``).

        Returns:
            (N, D, *S) float32 displacement fields in voxels, on ``device``.
        """
        if len(keys) == 0:
            raise ValueError("keys must contain at least one seed key.")
        streams = [[np.random.default_rng(s) for s in np.random.SeedSequence(key).spawn(4)] for key in keys]
        magnitudes = torch.tensor([self._draw_magnitudes(s[0]) for s in streams], device=self.device)
        parts = [
            self._background([s[1] for s in streams]),
            self._regions([s[2] for s in streams]),
            self._cardiac([s[3] for s in streams]),
        ]
        view = (-1,) + (1,) * (self.spatial_dims + 1)
        velocities = torch.cat([part * magnitudes[:, k].view(view) for k, part in enumerate(parts)])
        ddfs = self._integrate(velocities * self._to_work).split(len(keys))
        field = ddfs[0]
        for later in ddfs[1:]:
            field = compose_displacements(field, later)
        if self.integration_stride > 1:
            mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
            field = F.interpolate(field, size=self.spatial_size, mode=mode, align_corners=True)
        return (field / self._to_work).contiguous()

    def generate(self, num_fields: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        """Fields ``start .. start + num_fields - 1`` of the stream ``seed``: keys ``(seed, index)``.

        Returns:
            (num_fields, D, *S) float32 displacement fields in voxels.
        """
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields!r}.")
        return self.fields([(seed, start + index) for index in range(num_fields)])


class GeneratedDeformationFields(Dataset):
    """Map-style dataset of ``num_fields`` generated fields, made on access; item ``k`` has key ``(seed, stream, k)``.

    ``__getitems__`` (used by ``torch.utils.data.DataLoader`` for batches) builds a whole batch at once, which is
    several times faster than one field at a time; :meth:`batch` returns the stacked tensor directly.

    Args:
        num_fields: number of items.
        spatial_size: (X, Y) or (X, Y, Z).
        seed: seed of the fields.
        stream: sub-stream of ``seed`` (e.g. 0 for training, 1 for validation); datasets that differ in ``seed`` or
            ``stream`` share no field.
        generator_kwargs: further :class:`DeformationFieldGenerator` arguments (``max_displacement``, ...).

    Shapes:
        item: (D, *spatial_size) float32, voxel units.
    """

    def __init__(
        self, num_fields: int, spatial_size: Sequence[int], seed: int = 0, stream: int = 0, **generator_kwargs: Any
    ):
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields!r}.")
        if seed < 0 or stream < 0:
            raise ValueError(f"seed and stream must be >= 0, got {seed!r} and {stream!r}.")
        self.num_fields = int(num_fields)
        self.seed = int(seed)
        self.stream = int(stream)
        self.generator = DeformationFieldGenerator(spatial_size, **generator_kwargs)

    def __len__(self) -> int:
        return self.num_fields

    def _check(self, index: int) -> int:
        if not -self.num_fields <= index < self.num_fields:
            raise IndexError(f"index {index} is out of range for {self.num_fields} fields.")
        return index % self.num_fields

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), D, *S) fields for the given item indices."""
        return self.generator.fields([(self.seed, self.stream, self._check(int(i))) for i in indices])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batch([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return list(self.batch(indices).unbind(0))


def list_displacement_fields(
    source: PathLike | Sequence[PathLike], dataset_dir: PathLike | None = None
) -> dict[str, list[Path]]:
    """Resolve the user's displacement-field files.

    Args:
        source: a folder (every ``*.nii`` / ``*.nii.gz`` in it, sorted by name), a JSON datalist, or a list of files.
            Datalist format: ``{"training": [entry, ...], "validation": [entry, ...]}`` (``validation`` optional),
            each entry a path string or ``{"field": path}``; paths relative to ``dataset_dir`` (default: the
            datalist's folder) unless absolute.
        dataset_dir: base folder of a datalist's relative paths.

    Returns:
        ``{"training": [...], "validation": [...]}`` (validation empty unless the datalist gives one).

    Raises:
        FileNotFoundError: naming ``source`` or a listed file that does not exist.
        ValueError: naming the datalist and the field, if it is malformed or lists no file.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
            if not files:
                raise ValueError(f"displacement-field folder '{path}' holds no .nii or .nii.gz file.")
            return {"training": files, "validation": []}
        if not path.is_file():
            raise FileNotFoundError(f"displacement-field source '{path}' is neither a folder nor a file.")
        if path.name.endswith((".nii", ".nii.gz")):
            return {"training": [path], "validation": []}
        return _read_field_datalist(path, Path(dataset_dir) if dataset_dir is not None else path.parent)
    files = [Path(p) for p in source]
    if not files:
        raise ValueError("the list of displacement-field files is empty.")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"displacement-field file '{file}' does not exist.")
    return {"training": files, "validation": []}


def _read_field_datalist(path: Path, base: Path) -> dict[str, list[Path]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"displacement-field datalist '{path}' is not readable JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("training"), list) or not content["training"]:
        raise ValueError(f"displacement-field datalist '{path}' must hold a non-empty list under 'training'.")
    lists: dict[str, list[Path]] = {}
    for split in ("training", "validation"):
        entries = content.get(split, [])
        if not isinstance(entries, list):
            raise ValueError(f"datalist '{path}': '{split}' must be a list, got {type(entries).__name__}.")
        lists[split] = []
        for number, entry in enumerate(entries):
            value = entry.get("field") if isinstance(entry, dict) else entry
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"datalist '{path}': {split}[{number}] must be a path or {{'field': path}}, got {entry!r}."
                )
            file = Path(value) if os.path.isabs(value) else base / value
            if not file.is_file():
                raise FileNotFoundError(f"datalist '{path}': {split}[{number}] file '{file}' does not exist.")
            lists[split].append(file)
    return lists


def _layout(shape: tuple[int, ...], spatial_dims: int, path: str) -> tuple[str, tuple[int, ...]]:
    """``(layout, spatial size)`` of a NIfTI array shape: "itk" (X,Y,Z,1,D), "last" (...,D) or "first" (D,...)."""
    expected = f"{spatial_dims} components (one per spatial axis)"
    if len(shape) == 5:
        if shape[3] != 1 or shape[4] != spatial_dims:
            raise ValueError(
                f"displacement field '{path}': a 5D file must be (X, Y, Z, 1, {spatial_dims}) (ITK/ANTs vector layout) "
                f"with {expected}, got shape {shape}."
            )
        layout, spatial = "itk", shape[:3]
    elif len(shape) in (3, 4) and shape[-1] == spatial_dims:
        layout, spatial = "last", shape[:-1]
    elif len(shape) in (3, 4) and shape[0] == spatial_dims:
        layout, spatial = "first", shape[1:]
    else:
        raise ValueError(
            f"displacement field '{path}': expected {expected} along the last (channels last) or first (channels "
            f"first) axis, got shape {shape}."
        )
    if spatial_dims == 2 and len(spatial) == 3 and spatial[2] == 1:
        spatial = spatial[:2]
    if len(spatial) != spatial_dims:
        raise ValueError(
            f"displacement field '{path}': shape {shape} has {len(spatial)} spatial axes, expected {spatial_dims}."
        )
    return layout, tuple(int(s) for s in spatial)


def _check_inputs(spatial_dims: int, units: str, frame: str) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if units not in DISPLACEMENT_UNITS:
        raise ValueError(f"units must be one of {DISPLACEMENT_UNITS}, got {units!r}.")
    if frame not in WORLD_FRAMES:
        raise ValueError(f"frame must be one of {WORLD_FRAMES}, got {frame!r}.")


def _open(path: PathLike) -> nib.spatialimages.SpatialImage:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"displacement field '{path}' does not exist.")
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises ImageFileError, OSError, ... for unreadable files
        raise ValueError(f"displacement field '{path}' is not a readable NIfTI file: {error}") from error


def field_spatial_size(path: PathLike, spatial_dims: int = 3) -> tuple[int, ...]:
    """Spatial size of a displacement-field file from its header alone (layout and component count checked)."""
    return _layout(tuple(_open(path).shape), spatial_dims, os.fspath(path))[1]


def load_displacement_field(
    path: PathLike,
    spatial_dims: int = 3,
    units: str = "voxel",
    frame: str = "LPS",
    max_displacement: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one displacement-field NIfTI file (layouts and units: see the module docstring).

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        spatial_dims: 2 or 3; the field must have this many components and spatial axes.
        units: ``"voxel"`` or ``"mm"`` (converted to voxels with the affine).
        frame: world frame of millimetre fields, ``"LPS"`` (ITK/ANTs) or ``"RAS"``; ignored for voxel units.
        max_displacement: largest plausible displacement in voxels; defaults to a quarter of the smallest spatial
            size.

    Returns:
        ``(ddf, affine)``: ddf (D, *S) float32 in voxels (MONAI ``Warp`` convention), affine (4, 4) float64 (RAS).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file: unreadable, wrong layout or component count, non-finite values, or a largest
            displacement above ``max_displacement`` (with a hint about millimetres).
    """
    _check_inputs(spatial_dims, units, frame)
    path = os.fspath(path)
    image = _open(path)
    layout, spatial = _layout(tuple(image.shape), spatial_dims, path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if layout == "itk":
        data = np.moveaxis(data[..., 0, :], -1, 0)
    elif layout == "last":
        data = np.moveaxis(data, -1, 0)
    field = torch.from_numpy(np.ascontiguousarray(data.reshape(spatial_dims, *spatial)))
    bad = int((~torch.isfinite(field)).sum())
    if bad:
        raise ValueError(f"displacement field '{path}' has {bad} non-finite values (NaN or Inf).")
    affine = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    if units == "mm":
        matrix = affine[:spatial_dims, :spatial_dims]
        if abs(float(torch.linalg.det(matrix))) < 1e-12:
            raise ValueError(f"displacement field '{path}': its affine is singular, cannot convert mm to voxels.")
        signs = _LPS_TO_RAS[:spatial_dims] if frame == "LPS" else (1.0,) * spatial_dims
        flip = torch.tensor(signs, dtype=torch.float64)
        to_voxels = torch.linalg.inv(matrix) * flip  # inv(A) @ diag(flip)
        field = torch.einsum("ij,j...->i...", to_voxels, field.double()).float()
    limit = min(spatial) / 4 if max_displacement is None else float(max_displacement)
    largest = float(field.pow(2).sum(0).sqrt().max())
    if largest > limit:
        hint = " If the file holds millimetres (ITK/ANTs), pass units='mm'." if units == "voxel" else ""
        raise ValueError(
            f"displacement field '{path}': largest displacement {largest:.3g} voxels exceeds the plausible limit "
            f"{limit:.3g} voxels (max_displacement).{hint}"
        )
    return field, affine


class DisplacementFieldPatches(Dataset):
    """The user's displacement fields as a dataset of (optionally cropped and flipped) training samples.

    Headers are checked when the dataset is built (layout, component count, size >= ``patch_size``), so a wrong
    file fails at once; values (finite, plausible units) are checked when a file is read. Item ``k`` comes from file
    ``k % len(files)``, so a block of ``len(files)`` consecutive items covers every file once; its crop position and
    flips are drawn from ``numpy.random.default_rng((seed, k))``. A flip along axis ``i`` reverses that axis and
    negates component ``i`` (the flipped field is the field of the flipped images).

    Args:
        files: displacement-field files.
        spatial_dims: 2 or 3.
        patch_size: crop size (one int for every axis, or one per axis); None returns whole fields (batch size 1
            unless all files have one size).
        num_samples: number of items; defaults to ``len(files)``.
        flips: randomly flip each axis with probability 0.5 (augmentation for small sets).
        units, frame, max_displacement: see :func:`load_displacement_field`.
        cache: keep every file's field in memory after its first read.
        seed: seed of crops and flips.

    Shapes:
        item: (D, *patch_size) float32, voxel units.
    """

    def __init__(
        self,
        files: Sequence[PathLike],
        spatial_dims: int = 3,
        patch_size: int | Sequence[int] | None = None,
        num_samples: int | None = None,
        flips: bool = False,
        units: str = "voxel",
        frame: str = "LPS",
        max_displacement: float | None = None,
        cache: bool = True,
        seed: int = 0,
    ):
        _check_inputs(spatial_dims, units, frame)
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("files must list at least one displacement-field file.")
        self.spatial_dims = spatial_dims
        if patch_size is not None:
            if isinstance(patch_size, int):
                patch = (int(patch_size),) * spatial_dims
            else:
                patch = tuple(int(p) for p in patch_size)
            if len(patch) != spatial_dims or min(patch) < 1:
                raise ValueError(f"patch_size must be one or {spatial_dims} positive ints, got {patch_size!r}.")
            patch_size = patch
        self.patch_size = patch_size
        self.sizes = [field_spatial_size(file, spatial_dims) for file in self.files]
        for file, size in zip(self.files, self.sizes):
            if self.patch_size is not None and any(s < p for s, p in zip(size, self.patch_size)):
                raise ValueError(
                    f"displacement field '{file}' has spatial size {size}, smaller than patch_size {self.patch_size}."
                )
        self.num_samples = len(self.files) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}.")
        self.flips = flips
        self.load_kwargs = {
            "spatial_dims": spatial_dims, "units": units, "frame": frame, "max_displacement": max_displacement
        }
        self.cache = cache
        self.seed = int(seed)
        self._cached: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def field(self, file_index: int) -> torch.Tensor:
        """The whole checked field (D, *S) of file ``file_index``, in voxels."""
        if file_index in self._cached:
            return self._cached[file_index]
        field = load_displacement_field(self.files[file_index], **self.load_kwargs)[0]
        if self.cache:
            self._cached[file_index] = field
        return field

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for {self.num_samples} samples.")
        index %= self.num_samples
        field = self.field(index % len(self.files))
        rng = np.random.default_rng((self.seed, index))
        if self.patch_size is not None:
            starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(field.shape[1:], self.patch_size)]
            field = field[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(starts, self.patch_size))]
        if self.flips:
            for axis in range(self.spatial_dims):
                if rng.uniform() < 0.5:
                    field = field.flip(axis + 1)
                    field = torch.cat([field[:axis], -field[axis : axis + 1], field[axis + 1 :]])
        return field.contiguous()

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), D, *patch) stacked items (all of one size)."""
        return torch.stack([self[int(i)] for i in indices])
