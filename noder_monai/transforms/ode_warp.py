"""MONAI transforms that warp images and label maps along a fitted subject's trajectory.

A fitted subject (the one file written by :meth:`noder_monai.model.FittedSubject.save`) gives a displacement field
at any time; these transforms warp whatever channel-first image they are given with it (MONAI ``Warp``, pull-back
convention ``out(x) = image(x + ddf(x))``), so they slot into any ``Compose`` pipeline, e.g. to carry a second
modality or a segmentation that is co-registered to the subject's baseline scan through time.

Intensities are never rescaled: an image is warped in its own units (the subject's baseline and intensity mapping
stored in the file are not used here). Warping the subject's own baseline scan therefore gives the same image as
:meth:`FittedSubject.predict`. Metadata of a ``MetaTensor`` input (affine, file name) is kept, so ``SaveImaged``
writes the result in the input's world space.

A subject given as a path is loaded on first use and cached per process (keyed by path, modification time and
size), so a transform holds only the path: it pickles cheaply and works in ``DataLoader`` worker processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple_rep

from noder_monai.functional import warp_nearest
from noder_monai.io import GEOMETRY_META_KEY
from noder_monai.metrics import jacobian_determinant
from noder_monai.model import PREDICT_SOURCES, FittedSubject, FittedSubjectLoader, load_fitted_subject
from noder_monai.model.loader import SubjectLike

__all__ = ["ODEWarp", "ODEWarpd", "ODEWarpD", "ODEWarpDict", "WARP_MODES", "PADDING_MODES"]

WARP_MODES = ("bilinear", "nearest", "bicubic")
"""Interpolation modes (``torch.nn.functional.grid_sample``); ``bicubic`` is 2D only."""
PADDING_MODES = ("border", "zeros", "reflection")
"""Values used for sampling positions outside the image."""


@functools.lru_cache(maxsize=None)
def _warp_block(mode: str, padding_mode: str) -> Warp:
    return Warp(mode=mode, padding_mode=padding_mode)


def _check_option(value: str, options: Sequence[str], name: str) -> str:
    value = str(value)
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}.")
    return value


def _as_time(value: Any, name: str) -> float:
    """A query time from a number, a 0-d/1-element tensor or array; ValueError naming ``name`` otherwise."""
    try:
        time = float(torch.as_tensor(value, dtype=torch.float64).reshape(()))  # float64: a Python time stays exact
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a single number (a time), got {value!r}.") from error
    if not math.isfinite(time):
        raise ValueError(f"{name} must be a finite number (a time), got {value!r}.")
    return time


class ODEWarp(Transform):
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

    Call with ``img`` ``(C, *spatial)`` (tensor, ``MetaTensor`` or array, spatial size equal to the fitted one) and
    ``time`` in the subject's time unit; returns the warped image of the same type, on the input's device, with a
    ``MetaTensor``'s metadata kept. ``nearest`` copies input voxels (:func:`~noder_monai.functional.warp_nearest`):
    the input dtype and every value are kept exactly (label IDs of any integer dtype up to int64);
    ``bilinear``/``bicubic`` return float32.
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

    def displacement(self, time: float) -> torch.Tensor:
        """Displacement field ``(D, *spatial)`` in voxels at ``time`` (the subject's time unit)."""
        return self.subject.displacement([_as_time(time, "time")])[0]

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
        """Warp ``img`` ``(C, *spatial)`` with a field ``ddf`` ``(D, *spatial)`` from :meth:`displacement`.

        Raises:
            ValueError: naming ``name``, if ``img`` is not channel-first with the fitted spatial size.
        """
        mode = _check_option(mode or self.mode, WARP_MODES, "mode")
        padding_mode = _check_option(padding_mode or self.padding_mode, PADDING_MODES, "padding_mode")
        subject = self.subject
        spatial_dims = len(subject.spatial_size)
        if img.ndim != spatial_dims + 1:
            raise ValueError(
                f"{name} must be channel-first (C, *spatial) with {spatial_dims} spatial axes, got shape {tuple(img.shape)}."
            )
        subject.check_spatial_size(img.shape[1:], name)
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
        # issue 18 (labels): "nearest" gathers input voxels in their own dtype, so integer IDs stay exact
        if mode == "nearest":
            with torch.inference_mode():
                warped = warp_nearest(values.to(ddf.device)[None], ddf[None], padding_mode)[0]
            out, *_ = convert_to_dst_type(warped.clone(), dst=img, dtype=values.dtype)
            return out
        moving = values.to(device=ddf.device, dtype=torch.float32)[None]
        with torch.inference_mode():
            warped = _warp_block(mode, padding_mode)(moving, ddf[None].to(torch.float32))[0]
        out, *_ = convert_to_dst_type(warped.clone(), dst=img, dtype=torch.float32)
        return out

    def __call__(
        self, img: NdarrayOrTensor, time: float, mode: str | None = None, padding_mode: str | None = None
    ) -> NdarrayOrTensor:
        """Warp ``img`` ``(C, *spatial)`` to ``time``; ``mode``/``padding_mode`` override the constructor's."""
        return self.warp(img, self.displacement(time), mode, padding_mode, time=time)


class ODEWarpd(MapTransform):
    """Dictionary version of :class:`ODEWarp`: warp ``keys`` to one time with one displacement field.

    Every output's metadata also gets the subject's input geometry under ``GEOMETRY_META_KEY`` (JSON text), which
    ``SaveImaged(writer=noder_monai.io.GeometryNiftiWriter)`` writes back exactly (qform, sform, codes, singleton
    axis).

    Args:
        keys: keys of the items to warp, each ``(C, *spatial)``.
        subject: a :class:`FittedSubject`, the path of its file or a :class:`~noder_monai.model.FittedSubjectLoader`,
            used for every item; or None with ``subject_key``.
        time: the query time (a number), or the key of the item holding it (e.g. ``"time"``). Defaults to ``"time"``.
        mode: interpolation per key (a sequence) or for all keys: ``"bilinear"`` for images, ``"nearest"`` for
            label maps. Defaults to ``"bilinear"``.
        padding_mode: per key or for all keys, one of :data:`PADDING_MODES`. Defaults to ``"border"``.
        subject_key: key of the item holding each sample's subject (path or :class:`FittedSubject`), for
            pipelines over many subjects; exclusive with ``subject``.
        ddf_key: if given, also store the field ``(D, *spatial)`` in voxels under this key (a ``MetaTensor`` with
            the subject's affine).
        jacobian_key: if given, also store the Jacobian determinant ``(1, *spatial)`` of ``x -> x + ddf(x)`` (local
            volume change) under this key (a ``MetaTensor`` with the subject's affine).
        device: device on which subjects are loaded and warps computed. Defaults to ``"cpu"``.
        allow_missing_keys: do not raise if a key is missing.
        source: per key (a sequence) or for all keys: None warps the item, a source returns the subject's own
            predicted image instead (see :class:`ODEWarp`). Defaults to None.

    Raises:
        ValueError: naming the key, for an item whose spatial size differs from the fitted one or a time item that
            is not a number.
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
            warper = self.warper
        else:
            if self.subject_key not in d:
                raise KeyError(f"subject key {self.subject_key!r} is not in the data (keys: {list(d)}).")
            warper = ODEWarp(d[self.subject_key], device=self.device)
        time = self._time(d)
        ddf = warper.displacement(time)
        meta = {"time": time, GEOMETRY_META_KEY: json.dumps(warper.subject.geometry.to_dict())}
        for key, mode, padding_mode, source in self.key_iterator(d, self.mode, self.padding_mode, self.source):
            d[key] = warper.warp(d[key], ddf, mode, padding_mode, name=f"data[{key!r}]", source=source, time=time)
            if isinstance(d[key], MetaTensor):
                d[key].meta.update(meta)
        if self.ddf_key is not None:
            d[self.ddf_key] = MetaTensor(ddf.clone(), affine=warper.subject.affine.clone(), meta=dict(meta))
        if self.jacobian_key is not None:
            jacobian = jacobian_determinant(ddf[None])[0]
            d[self.jacobian_key] = MetaTensor(jacobian, affine=warper.subject.affine.clone(), meta=dict(meta))
        return d


ODEWarpD = ODEWarpDict = ODEWarpd
