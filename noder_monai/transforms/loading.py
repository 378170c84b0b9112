"""Scans and label maps read by the package's one loader (:func:`noder_monai.io.load_scan`) inside a MONAI
pipeline: the bundle's inference and evaluation read the subject's files with :class:`LoadScand` and
:class:`LoadLabelMapd`, as ``noder predict`` and ``noder evaluate`` read them."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from noder_monai.io import Geometry, load_scan
from noder_monai.model import load_fitted_subject
from noder_monai.model.loader import SubjectLike

__all__ = ["LoadLabelMapd", "LoadScand"]


def _meta_tensor(data: Any, geometry: Geometry, path: str) -> MetaTensor:
    return MetaTensor(data, affine=geometry.affine, meta={"filename_or_obj": path})


class LoadScand(MapTransform):
    """Read image files with :func:`~noder_monai.io.load_scan`: channel first, a 2D image's singleton axis dropped
    (the grid the fit saw), a ``MetaTensor`` ``(C, *S)`` with the file's affine and name.

    Args:
        keys: keys holding image paths.
        reader: ``"itk"``, ``"nibabel"`` or None (MONAI's choice).
        allow_missing_keys: do not raise if a key is missing.

    Raises:
        FileNotFoundError, ValueError: naming the file (see :func:`~noder_monai.io.load_scan`).
    """

    def __init__(self, keys: KeysCollection, reader: str | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader = reader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            d[key] = _meta_tensor(*load_scan(path, self.reader), path)
        return d


class LoadLabelMapd(MapTransform):
    """Read label-map files for a fitted subject (:meth:`~noder_monai.model.FittedSubject.read_labels`): one volume
    of integer labels, finite, on the fitted grid (size and affine). Each becomes a ``MetaTensor`` ``(1, *S)`` with
    the file's affine and name.

    Args:
        keys: keys holding label-map paths.
        subject: the fitted subject (a ``FittedSubjectLoader``, a ``FittedSubject`` or its file).
        reader: ``"itk"``, ``"nibabel"`` or None (MONAI's choice).
        allow_missing_keys: do not raise if a key is missing (a subject without a label map).

    Raises:
        ValueError: naming the file: several channels, non-integer or non-finite values, another grid.
    """

    def __init__(self, keys: KeysCollection, subject: SubjectLike, reader: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.subject, self.reader = subject, reader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            d[key] = _meta_tensor(*load_fitted_subject(self.subject).read_labels(path, self.reader), path)
        return d
