"""MONAI transforms that warp images and label maps along a fitted subject's trajectory.

A fitted subject (the one file written by :meth:`noder_monai.model.FittedSubject.save`) gives a displacement field
at any time; these transforms warp whatever channel-first image they are given with it (MONAI ``Warp``'s values,
pull-back convention ``out(x) = image(x + ddf(x))``), so they slot into any ``Compose`` pipeline, e.g. to carry a
second modality or a segmentation that is co-registered to the subject's baseline scan through time.

Intensities are never rescaled: an image is warped in its own units (the subject's baseline and intensity mapping
stored in the file are not used here). Warping the subject's own baseline scan therefore gives the same image as
:meth:`FittedSubject.predict`. Metadata of a ``MetaTensor`` input (affine, file name) is kept, so ``SaveImaged``
writes the result in the input's world space.

A subject given as a path is loaded on first use and cached per process (keyed by path, modification time and
size), so a transform holds only the path: it pickles cheaply and works in ``DataLoader`` worker processes.

Frames: a ``MetaTensor`` says where it lies (its affine and shape). An image on the fitted grid is warped with the
field as it is; a 3D image on another grid (after ``Orientationd``, ``Spacingd``, a crop) gets the field resampled
into its own voxel frame (MONAI ``SpatialResample``, vectors turned into its voxel axes), so the warp is the same
motion in world space; a 2D image on another grid is refused with both affines named. Plain tensors and arrays, and
``MetaTensor``s with MONAI's default identity affine (made without one, or indexed out of a batch), carry no frame
and are taken to lie on the fitted grid.

Both transforms are invertible (MONAI ``InvertibleTransform``): the query time is recorded in the transform trace,
and ``inverse`` (or ``Invertd``) warps back with the inverse map's field at that time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import InvertibleTransform, MapTransform, SpatialResample
from monai.utils import TraceKeys, TransformBackends, convert_to_dst_type, ensure_tuple_rep

from noder_monai.data.sequence import AFFINE_ATOL
from noder_monai.functional import warp, warp_nearest
from noder_monai.io import GEOMETRY_META_KEY
from noder_monai.metrics import jacobian_determinant
from noder_monai.model import PREDICT_SOURCES, FittedSubject, FittedSubjectLoader, load_fitted_subject
from noder_monai.model.loader import SubjectLike

__all__ = ["ODEWarp", "ODEWarpd", "ODEWarpD", "ODEWarpDict", "WARP_MODES", "PADDING_MODES"]

WARP_MODES = ("bilinear", "nearest", "bicubic")
"""Interpolation modes (``torch.nn.functional.grid_sample``); ``bicubic`` is 2D only."""
PADDING_MODES = ("border", "zeros", "reflection")
"""Values used for sampling positions outside the image."""


def _check_option(value: str, options: Sequence[str], name: str) -> str:
    value = str(value)
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}.")
    return value


def _as_time(value: Any, name: str) -> float:
    """A query time from a number, a 0-d/1-element tensor or array; ValueError naming ``name`` otherwise."""
    try:
        time = float(torch.as_tensor(value, dtype=torch.float64).reshape(()))  # a Python float stays exact
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a single number (a time), got {value!r}.") from error
    if not math.isfinite(time):
        raise ValueError(f"{name} must be a finite number (a time), got {value!r}.")
    return time


# --- frames: the field of a fitted subject in the voxel frame of the image it warps (issue 17) -------------------


def _image_affine(img: Any, spatial_dims: int) -> torch.Tensor | None:
    """The (4, 4) voxel-to-world matrix of a ``MetaTensor`` (a 2D image's (3, 3) one embedded); None for other inputs
    and for MONAI's default affine, the identity, which a tensor made without one (or indexed out of a batch) gets."""
    if not isinstance(img, MetaTensor):
        return None
    affine = torch.as_tensor(img.affine, dtype=torch.float64).cpu()
    if affine.shape == (3, 3) and spatial_dims == 2:
        affine = to_affine_nd(3, affine)
    return None if torch.equal(affine, torch.eye(4, dtype=torch.float64)) else affine


def _same_grid(affine: torch.Tensor, shape: Sequence[int], subject: FittedSubject) -> bool:
    """Whether an image of spatial ``shape`` and (4, 4) ``affine`` lies on the fitted grid (columns of its axes and
    the origin equal up to ``AFFINE_ATOL`` mm)."""
    columns = [*range(subject.model.spatial_dims), 3]
    return tuple(int(s) for s in shape) == tuple(subject.spatial_size) and torch.allclose(
        affine[:, columns], subject.affine[:, columns], atol=AFFINE_ATOL, rtol=0.0)


def _check_overlap(affine: torch.Tensor, shape: Sequence[int], subject: FittedSubject, where: str) -> None:
    """Refuse an image none of whose voxels lies inside the fitted grid: its field would be the border's copy."""
    corners = torch.cartesian_prod(*[torch.tensor([0.0, s - 1.0], dtype=torch.float64) for s in shape])
    voxels = torch.linalg.solve(subject.affine, affine @ torch.cat([corners, torch.ones(len(corners), 1,
                                                                                       dtype=torch.float64)], 1).T)
    low, high = voxels[:3].min(1).values, voxels[:3].max(1).values
    size = torch.tensor(subject.spatial_size, dtype=torch.float64)
    if bool((high < -0.5).any() or (low > size - 0.5).any()):
        raise ValueError(f"{where} (affine {affine.tolist()}, size {tuple(shape)}) does not overlap the grid subject "
                         f"'{subject.subject}' was fitted on (affine {subject.affine.tolist()}, size "
                         f"{tuple(subject.spatial_size)}).")


def field_in_frame(ddf: torch.Tensor, subject: FittedSubject, affine: torch.Tensor, shape: Sequence[int],
                   where: str = "img") -> torch.Tensor:
    """A fitted subject's field ``ddf`` ``(3, *S)`` (fitted voxels) as the same motion in another 3D voxel frame.

    With ``A_s`` the fitted affine and ``A`` the image's, the image's voxel ``y`` lies at fitted voxel
    ``x(y) = A_s^-1 A y``; the field there (MONAI ``SpatialResample``, bilinear, border padding) is turned into the
    image's voxel axes by the linear parts, ``M = A[:3, :3]^-1 A_s[:3, :3]``, so that ``Warp`` in the image's frame
    moves every world point as the fitted map does.

    Returns:
        ``(3, *shape)`` float32 in the image's voxels, on ``ddf``'s device.

    Raises:
        ValueError: naming ``where`` and both affines, if the image does not overlap the fitted grid.
    """
    _check_overlap(affine, shape, subject, where)
    source = MetaTensor(ddf.to(torch.float32), affine=subject.affine.to(torch.float64))
    resample = SpatialResample(mode="bilinear", padding_mode="border", align_corners=True, dtype=torch.float32)
    sampled = resample(source, dst_affine=affine, spatial_size=tuple(int(s) for s in shape)).as_tensor()
    rotation = torch.linalg.solve(affine[:3, :3], subject.affine[:3, :3]).to(device=sampled.device, dtype=sampled.dtype)
    return torch.einsum("ij,j...->i...", rotation, sampled).contiguous()


# --- end of frames ------------------------------------------------------------------------------------------------


class ODEWarp(InvertibleTransform):
    """Warp a channel-first image ``(C, *spatial)`` with a fitted subject's displacement at a time.

    Args:
        subject: a :class:`FittedSubject`, the path of its file (loaded lazily, cached per process) or a
            :class:`~noder_monai.model.FittedSubjectLoader` (the bundle's inference: weights loaded when the run starts).
        mode: interpolation, one of :data:`WARP_MODES`: ``"bilinear"`` for images, ``"nearest"`` for label maps.
            Defaults to ``"bilinear"``.
        padding_mode: one of :data:`PADDING_MODES`. Defaults to ``"border"`` (as :meth:`FittedSubject.predict`).
        device: device on which a subject given as a path is loaded and the warp is computed. Defaults to ``"cpu"``.
        source: None (default) warps the given image; one of ``PREDICT_SOURCES`` (``"baseline"``, ``"template"``,
            ``"nearest"``, or ``"default"`` for the subject's ``default_source``) returns the subject's own predicted
            image at the time instead (``FittedSubject.appearance``), with the given image's type and metadata: the
            path the bundle's inference takes for the subject's scan.

    Call with ``img`` ``(C, *spatial)`` (tensor, ``MetaTensor`` or array) and ``time`` in the subject's time unit;
    returns the warped image of the same type, on the input's device, with a ``MetaTensor``'s metadata kept (and the
    time recorded in its transform trace, so :meth:`inverse` warps it back). A ``MetaTensor`` on another 3D grid is
    warped in its own frame (:func:`field_in_frame`); a tensor or array must have the fitted spatial size.
    ``nearest`` copies input voxels (:func:`~noder_monai.functional.warp_nearest`): the input dtype and every value
    are kept exactly (label IDs of any integer dtype up to int64); ``bilinear``/``bicubic`` return float32.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        subject: SubjectLike,
        mode: str = "bilinear",
        padding_mode: str = "border",
        device: str | torch.device = "cpu",
        source: str | None = None,
    ) -> None:
        if source is not None:
            _check_option(source, ("default", *PREDICT_SOURCES), "source")
        self.source = source
        if not isinstance(subject, (str, os.PathLike, FittedSubject, FittedSubjectLoader)):
            raise ValueError(f"subject must be a FittedSubject or the path of its file, got {type(subject).__name__}.")
        self.subject_source = subject if isinstance(subject, (FittedSubject, FittedSubjectLoader)) else os.fspath(subject)
        self.mode = _check_option(mode, WARP_MODES, "mode")
        self.padding_mode = _check_option(padding_mode, PADDING_MODES, "padding_mode")
        self.device = torch.device(device)

    @property
    def subject(self) -> FittedSubject:
        """The fitted subject (loaded on first access in each process)."""
        return load_fitted_subject(self.subject_source, self.device)

    def displacement(self, time: float, inverse: bool = False) -> torch.Tensor:
        """Displacement field ``(D, *spatial)`` in fitted voxels at ``time`` (the subject's time unit); with
        ``inverse``, the field of the inverse map (``NODER.displacement(..., inverse=True)``)."""
        subject = self.subject
        times = [_as_time(time, "time")]
        if not inverse:
            return subject.displacement(times)[0]
        with torch.inference_mode():
            return subject.model.displacement(subject.scaled_time(times), inverse=True)[0]

    def uncertainty(self, time: float, source: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated predictive standard deviations at ``time`` on the fitted grid, from the subject's
        uncertainty ensemble (:meth:`FittedSubject.predict` with ``uncertainty=True``): of the subject's own
        predicted image (``source`` as in :class:`ODEWarp`; None or ``"default"``: the subject's default source), in
        input intensity units (``prediction +- 1.645 * std`` is the 90 % interval), and of ``log`` of the Jacobian
        determinant.

        Returns:
            ``(image_std, log_jacobian_std)``, each ``(1, *spatial)`` float32 on the CPU.

        Raises:
            ValueError: naming the subject, if its file holds no uncertainty ensemble (or not the ``source``).
        """
        subject = self.subject
        try:
            subject.check_uncertainty()
        except ValueError as error:
            raise ValueError(f"subject '{subject.subject}': {error}") from error
        prediction = subject.predict([_as_time(time, "time")], source=None if source == "default" else source,
                                     uncertainty=True)
        return prediction.image_std[0], prediction.log_jacobian_std[0]

    def frame(self, img: NdarrayOrTensor, ddf: torch.Tensor, name: str = "img") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The field ``ddf`` (fitted voxels) in the voxel frame of ``img`` ``(C, *spatial)``, and the image's affine
        when it differs from the fitted one (None: ``img`` lies on the fitted grid or carries no affine).

        Raises:
            ValueError: naming ``name``: not channel-first; a tensor or array of another spatial size than the fitted
                one; a 2D image on another grid, or a 3D image outside the fitted grid (both affines named).
        """
        subject = self.subject
        spatial_dims = subject.model.spatial_dims
        if img.ndim != spatial_dims + 1:
            raise ValueError(
                f"{name} must be channel-first (C, *spatial) with {spatial_dims} spatial axes, got shape {tuple(img.shape)}."
            )
        affine = _image_affine(img, spatial_dims)
        if affine is None or _same_grid(affine, img.shape[1:], subject):
            subject.check_spatial_size(img.shape[1:], name)
            return ddf, None
        if spatial_dims == 2:
            raise ValueError(
                f"{name} (affine {affine.tolist()}, size {tuple(img.shape[1:])}) is not on the grid subject "
                f"'{subject.subject}' was fitted on (affine {subject.affine.tolist()}, size {tuple(subject.spatial_size)})"
                "; a 2D field is not resampled: resample the image onto the fitted grid first."
            )
        return field_in_frame(ddf, subject, affine, img.shape[1:], name), affine

    def warp(
        self,
        img: NdarrayOrTensor,
        ddf: torch.Tensor,
        mode: str | None = None,
        padding_mode: str | None = None,
        name: str = "img",
        source: str | None = None,
        time: float | None = None,
    ) -> NdarrayOrTensor:
        """Warp ``img`` ``(C, *spatial)`` with a field ``ddf`` ``(D, *spatial)`` already in its frame (:meth:`frame`).

        Raises:
            ValueError: naming ``name``, for ``bicubic`` in 3D, or a ``source`` without ``time``.
        """
        mode = _check_option(mode or self.mode, WARP_MODES, "mode")
        padding_mode = _check_option(padding_mode or self.padding_mode, PADDING_MODES, "padding_mode")
        subject = self.subject
        spatial_dims = len(subject.spatial_size)
        if tuple(img.shape[1:]) != tuple(ddf.shape[1:]):
            raise ValueError(f"{name} has spatial size {tuple(img.shape[1:])}, its field {tuple(ddf.shape[1:])}.")
        if mode == "bicubic" and spatial_dims != 2:
            raise ValueError(f"mode 'bicubic' is only available for 2D images, {name} is {spatial_dims}D.")
        source = source or self.source
        if source is not None:
            if time is None:
                raise ValueError(f"{name}: source {source!r} needs the query time.")
            times = torch.tensor([_as_time(time, "time")], dtype=torch.float64)
            warped = subject.appearance(times, ddf[None], None if source == "default" else source)[0]
            warped = warped.expand(img.shape[0], *warped.shape[1:])
            out, *_ = convert_to_dst_type(warped.clone(), dst=img, dtype=torch.float32)
            return out
        values = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        # "nearest" gathers input voxels in their own dtype, so integer IDs stay exact
        if mode == "nearest":
            with torch.inference_mode():
                warped = warp_nearest(values.to(ddf.device)[None], ddf[None], padding_mode)[0]
            out, *_ = convert_to_dst_type(warped.clone(), dst=img, dtype=values.dtype)
            return out
        moving = values.to(device=ddf.device, dtype=torch.float32)[None]
        with torch.inference_mode():
            warped = warp(moving, ddf[None].to(torch.float32), mode, padding_mode)[0]
        out, *_ = convert_to_dst_type(warped.clone(), dst=img, dtype=torch.float32)
        return out

    def _warped(self, img: NdarrayOrTensor, time: float, mode: str, padding_mode: str, name: str,
                source: str | None, inverse: bool = False) -> NdarrayOrTensor:
        """``img`` warped to ``time`` in its own frame (backwards with ``inverse``); a ``source`` only forwards."""
        field, affine = self.frame(img, self.displacement(time, inverse), name)
        _check_source_grid(source, affine, self.subject, name)
        return self.warp(img, field, mode, padding_mode, name, source=None if inverse else source, time=time)

    def __call__(
        self, img: NdarrayOrTensor, time: float, mode: str | None = None, padding_mode: str | None = None
    ) -> NdarrayOrTensor:
        """Warp ``img`` ``(C, *spatial)`` to ``time``; ``mode``/``padding_mode`` override the constructor's. The time,
        mode and padding are recorded in a ``MetaTensor``'s transform trace."""
        time = _as_time(time, "time")
        mode, padding_mode = mode or self.mode, padding_mode or self.padding_mode
        out = self._warped(img, time, mode, padding_mode, "img", self.source)
        if isinstance(out, MetaTensor):
            out = self.push_transform(out, extra_info=_trace(time, mode, padding_mode))
        return out

    def inverse(self, data: NdarrayOrTensor) -> NdarrayOrTensor:
        """Warp ``data`` back from the time recorded by :meth:`__call__` with the inverse map's field (up to
        interpolation error: two interpolations and the inverse's fixed-point residual)."""
        info = self.pop_transform(data)[TraceKeys.EXTRA_INFO]
        return self._warped(data, info["time"], info["mode"], info["padding_mode"], "img", None, inverse=True)


def _check_source_grid(source: str | None, affine: torch.Tensor | None, subject: FittedSubject, name: str) -> None:
    """Refuse a ``source`` prediction for an image off the fitted grid (``affine`` not None), naming both affines."""
    if source is not None and affine is not None:
        raise ValueError(f"{name} (affine {affine.tolist()}) is not on the grid subject '{subject.subject}' was fitted "
                         f"on (affine {subject.affine.tolist()}); source {source!r} predicts on the fitted grid only.")


def _check_std_grid(affine: torch.Tensor | None, subject: FittedSubject) -> None:
    """Refuse standard deviation maps for items off the fitted grid (``affine`` not None), naming both affines."""
    if affine is not None:
        raise ValueError(f"image_std_key/log_jacobian_std_key: the items (affine {affine.tolist()}) are not on the grid "
                         f"subject '{subject.subject}' was fitted on (affine {subject.affine.tolist()}); the standard "
                         f"deviation maps are on the fitted grid only.")


def _trace(time: float, mode: str, padding_mode: str, subject: Any = None) -> dict[str, Any]:
    """The ``extra_info`` of a warp in the transform trace (the subject only as a path: the trace is deep-copied)."""
    path = subject if isinstance(subject, (str, os.PathLike)) else None
    return {"time": time, "mode": mode, "padding_mode": padding_mode, "subject": None if path is None else os.fspath(path)}


class ODEWarpd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ODEWarp`: warp ``keys`` to one time with one displacement field.

    Every key is warped in its own frame (:meth:`ODEWarp.frame`). An output on the fitted grid also gets the
    subject's input geometry under ``GEOMETRY_META_KEY`` (JSON text), which
    ``SaveImaged(writer=noder_monai.io.GeometryNiftiWriter)`` writes back exactly (qform, sform, codes, singleton
    axis). Each output's metadata gets the ``time``, which ``SaveImaged(output_name_formatter=
    noder_monai.transforms.TimeNameFormatter())`` puts in the file name (one file per query time). The time, mode and
    padding are recorded in the transform trace: :meth:`inverse` (and MONAI ``Invertd``) warps back.

    Args:
        keys: keys of the items to warp, each ``(C, *spatial)``.
        subject: a :class:`FittedSubject`, the path of its file or a :class:`~noder_monai.model.FittedSubjectLoader`,
            used for every item; or None with ``subject_key``.
        time: the query time (a number), or the key of the item holding it (e.g. ``"time"``). Defaults to ``"time"``.
        mode: interpolation per key (a sequence) or for all keys: ``"bilinear"`` for images, ``"nearest"`` for
            label maps. Defaults to ``"bilinear"``.
        padding_mode: per key or for all keys, one of :data:`PADDING_MODES`. Defaults to ``"border"``.
        subject_key: key of the item holding each sample's subject (path or :class:`FittedSubject`), for
            pipelines over many subjects; exclusive with ``subject``. Only a path is recorded for the inverse.
        ddf_key: if given, also store the field ``(D, *spatial)`` under this key, in voxels of the first key's frame
            (a ``MetaTensor`` with that frame's affine).
        jacobian_key: if given, also store the Jacobian determinant ``(1, *spatial)`` of ``x -> x + ddf(x)`` (local
            volume change) under this key (a ``MetaTensor`` with the field's affine).
        device: device on which subjects are loaded and warps computed. Defaults to ``"cpu"``.
        allow_missing_keys: do not raise if a key is missing.
        source: per key (a sequence) or for all keys: None warps the item, a source returns the subject's own
            predicted image instead (see :class:`ODEWarp`; on the fitted grid only). Defaults to None.
        image_std_key: if given, also store the calibrated predictive standard deviation ``(1, *spatial)`` of the
            subject's own predicted image (input intensity units; :meth:`ODEWarp.uncertainty`, with the first
            ``source`` given, else the subject's default) under this key; needs the subject's uncertainty ensemble
            and items on the fitted grid.
        log_jacobian_std_key: likewise for the standard deviation ``(1, *spatial)`` of ``log`` of the Jacobian
            determinant.

    Each stored map is a ``MetaTensor`` with the field's affine and metadata (the ``time`` and, on the fitted grid,
    the input geometry), like the other outputs.

    Raises:
        ValueError: naming the key, for an item whose spatial size differs from the fitted one (a tensor or array),
            an item on another 2D grid or outside the fitted grid (both affines named), a time item that is not a
            number, or (naming the subject) a standard deviation key for a subject without an uncertainty ensemble
            or for items off the fitted grid.
    """

    backend = ODEWarp.backend

    def __init__(
        self,
        keys: KeysCollection,
        subject: SubjectLike | None = None,
        time: float | str = "time",
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "border",
        subject_key: str | None = None,
        ddf_key: str | None = None,
        device: str | torch.device = "cpu",
        allow_missing_keys: bool = False,
        jacobian_key: str | None = None,
        source: str | None | Sequence[str | None] = None,
        image_std_key: str | None = None,
        log_jacobian_std_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source = list(source) if isinstance(source, (list, tuple)) else [source] * len(self.keys)
        if len(self.source) != len(self.keys):
            raise ValueError(f"source must be one value or one per key ({len(self.keys)}), got {source!r}.")
        for value in self.source:
            if value is not None:
                _check_option(value, ("default", *PREDICT_SOURCES), "source")
        if (subject is None) == (subject_key is None):
            raise ValueError(
                f"give exactly one of subject and subject_key, got subject={subject!r}, subject_key={subject_key!r}."
            )
        if isinstance(time, bool) or not isinstance(time, (str, int, float)):
            raise ValueError(f"time must be a number or the key of the item holding it, got {time!r}.")
        self.time = time if isinstance(time, str) else _as_time(time, "time")
        self.mode = [_check_option(m, WARP_MODES, "mode") for m in ensure_tuple_rep(mode, len(self.keys))]
        self.padding_mode = [
            _check_option(p, PADDING_MODES, "padding_mode") for p in ensure_tuple_rep(padding_mode, len(self.keys))
        ]
        self.subject_key = subject_key
        self.ddf_key = ddf_key
        self.jacobian_key = jacobian_key
        self.image_std_key, self.log_jacobian_std_key = image_std_key, log_jacobian_std_key
        self.device = torch.device(device)
        self.warper = None if subject is None else ODEWarp(subject, device=self.device)

    def _time(self, data: Mapping[Hashable, Any]) -> float:
        if not isinstance(self.time, str):
            return self.time
        if self.time not in data:
            raise KeyError(f"time key {self.time!r} is not in the data (keys: {list(data)}).")
        return _as_time(data[self.time], f"data[{self.time!r}]")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.warper is not None:
            warper, recorded = self.warper, None
        else:
            if self.subject_key not in d:
                raise KeyError(f"subject key {self.subject_key!r} is not in the data (keys: {list(d)}).")
            warper, recorded = ODEWarp(d[self.subject_key], device=self.device), d[self.subject_key]
        time = self._time(d)
        ddf = warper.displacement(time)
        subject = warper.subject
        geometry = json.dumps(subject.geometry.to_dict())
        fields: dict[Any, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for key, mode, padding_mode, source in self.key_iterator(d, self.mode, self.padding_mode, self.source):
            name = f"data[{key!r}]"
            affine = _image_affine(d[key], subject.model.spatial_dims)
            grid = None if affine is None else (tuple(affine.flatten().tolist()), tuple(d[key].shape[1:]))
            if grid not in fields:
                fields[grid] = warper.frame(d[key], ddf, name)
            field, frame_affine = fields[grid]
            _check_source_grid(source, frame_affine, subject, name)
            d[key] = warper.warp(d[key], field, mode, padding_mode, name=name, source=source, time=time)
            if isinstance(d[key], MetaTensor):
                d[key].meta.update({"time": time, **({GEOMETRY_META_KEY: geometry} if frame_affine is None else {})})
            self.push_transform(d, key, extra_info=_trace(time, mode, padding_mode, recorded))
        field, frame_affine = next(iter(fields.values()), (ddf, None))
        affine = (subject.affine if frame_affine is None else frame_affine).clone()
        meta = {"time": time, **({GEOMETRY_META_KEY: geometry} if frame_affine is None else {})}
        if self.ddf_key is not None:
            d[self.ddf_key] = MetaTensor(field.clone(), affine=affine, meta=dict(meta))
        if self.jacobian_key is not None:
            jacobian = jacobian_determinant(field[None])[0]
            d[self.jacobian_key] = MetaTensor(jacobian, affine=affine.clone(), meta=dict(meta))
        if self.image_std_key is not None or self.log_jacobian_std_key is not None:
            _check_std_grid(frame_affine, subject)
            source = next((value for value in self.source if value is not None), None)
            maps = warper.uncertainty(time, source)
            for key, value in zip((self.image_std_key, self.log_jacobian_std_key), maps):
                if key is not None:
                    d[key] = MetaTensor(value.to(field.device), affine=affine.clone(), meta=dict(meta))
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Warp ``keys`` back from the recorded time with the inverse map's field (:meth:`ODEWarp.inverse`).

        Raises:
            ValueError: for an item warped with a ``subject_key`` that held a :class:`FittedSubject` (not recorded).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d, key)[TraceKeys.EXTRA_INFO]
            warper = self.warper
            if warper is None:
                if info.get("subject") is None:
                    raise ValueError(f"data[{key!r}] was warped with a FittedSubject under subject_key "
                                     f"{self.subject_key!r}; only a subject given as a path can be inverted.")
                warper = ODEWarp(info["subject"], device=self.device)
            d[key] = warper._warped(d[key], info["time"], info["mode"], info["padding_mode"], f"data[{key!r}]", None,
                                    inverse=True)
        return d


ODEWarpD = ODEWarpDict = ODEWarpd
