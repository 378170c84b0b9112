"""A subject's scans as one training item: what the bundle's ``train.json`` reads from files
(:class:`LoadSequenced`) and what :func:`~noder_monai.engines.fit_sequence` makes of an in-memory sequence
(:func:`sequence_item`), so every fit starts from the same item.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys

from noder_monai.data import SubjectSequence, load_sequence, read_label_map

__all__ = ["LoadSequenced", "sequence_item"]


def sequence_item(sequence: SubjectSequence) -> dict[str, Any]:
    """The training item of a sequence.

    Returns:
        ``{"image": MetaTensor (T, *S) float32 (scans as channels; affine, and the files as ``filename_or_obj``),
        "time": (T,) float64, "subject": id, "geometry": JSON text of the first scan's Geometry, "fitted_on":
        JSON text of SubjectSequence.fitted_on()}``; the two records are text so that they survive collation.
    """
    images = sequence.images.as_tensor() if isinstance(sequence.images, MetaTensor) else sequence.images
    meta = {"filename_or_obj": list(sequence.paths)} if sequence.paths else {}
    return {
        Keys.IMAGE: MetaTensor(images[:, 0], affine=sequence.affine, meta=meta),
        "time": sequence.times.to(torch.float64),
        "subject": sequence.subject,
        "geometry": json.dumps(sequence.geometry.to_dict()),
        "fitted_on": json.dumps(sequence.fitted_on()),
    }


class LoadSequenced(MapTransform):
    """Read a subject's scan files into its training item (:func:`sequence_item`) with
    :func:`~noder_monai.data.load_sequence`: one grid, strictly increasing times, finite voxels, a 2D image's
    singleton axis dropped, geometry and file fingerprints recorded. A label map named by ``label_key`` is checked
    too (:func:`~noder_monai.data.read_label_map`: finite integers on the scans' grid in world space), so a bad label
    map fails before the fit rather than at inference; the item keeps its path.

    Args:
        keys: the key holding the list of scan files (``"image"``); it receives the scans ``(T, *S)``.
        time_key: the key holding the scans' times.
        subject_key: the key holding the subject id (for messages and the fitted file).
        reader: ``"itk"``, ``"nibabel"`` or None (nibabel for NIfTI, ITK for other formats).
        label_key: the key holding the label-map path, when the subject has one.

    Raises:
        ValueError: naming the subject and file, from :func:`~noder_monai.data.load_sequence` and
            :func:`~noder_monai.data.read_label_map`.
    """

    def __init__(self, keys: KeysCollection = Keys.IMAGE, time_key: str = "time", subject_key: str = "subject",
                 reader: str | None = None, label_key: str = Keys.LABEL) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"LoadSequenced reads one list of scans, got keys {self.keys}.")
        self.time_key, self.subject_key, self.reader, self.label_key = time_key, subject_key, reader, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        subject = str(d.get(self.subject_key, "subject"))
        sequence = load_sequence(d[key], d[self.time_key], subject=subject, reader=self.reader)
        if d.get(self.label_key) is not None:
            read_label_map(d[self.label_key], sequence.spatial_size, sequence.affine,
                           f"subject '{subject}': field 'label'", self.reader)
        item = sequence_item(sequence)
        d[key] = item.pop(Keys.IMAGE)
        d.update(item)
        return d
