"""Label maps read for a fitted subject, with the checks ``noder predict`` runs: the bundle's inference reads the
subject's label map with :class:`LoadLabelMapd`."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from noder_monai.model import load_fitted_subject
from noder_monai.model.loader import SubjectLike

__all__ = ["LoadLabelMapd"]


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
            labels, geometry = load_fitted_subject(self.subject).read_labels(path, self.reader)
            d[key] = MetaTensor(labels, affine=geometry.affine, meta={"filename_or_obj": path})
        return d
