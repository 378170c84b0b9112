"""Getting a fitted subject from its file: cached per process for transforms, or into a config's network when a MONAI
run starts (the bundle's inference).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Union

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from noder_monai.model.checkpoint import SUBJECT_FORMAT, read_checkpoint, validate_subject_checkpoint
from noder_monai.model.subject import FittedSubject
from noder_monai.networks import NODER
from noder_monai.utils import PathLike

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["FittedSubjectLoader", "SubjectLike", "load_fitted_subject"]

SubjectLike = Union[str, "os.PathLike[str]", FittedSubject, "FittedSubjectLoader"]
"""What a transform accepts as its subject: a fitted subject, the path of its file, or a :class:`FittedSubjectLoader`."""


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int, device: str) -> FittedSubject:
    return FittedSubject.load(path, map_location=device)


def load_fitted_subject(subject: SubjectLike, device: str | torch.device = "cpu") -> FittedSubject:
    """Return ``subject`` itself, the loader's subject, or the fitted subject stored at that path (cached per process,
    keyed by path, modification time and size).

    Args:
        subject: a :class:`FittedSubject`, a :class:`FittedSubjectLoader` or the path of a file written by
            :meth:`FittedSubject.save`.
        device: where a subject loaded from a path is placed; ignored otherwise.

    Raises:
        FileNotFoundError: naming the path, if it does not exist.
        ValueError: naming the path, if it is not a fitted-subject file.
    """
    if isinstance(subject, FittedSubject):
        return subject
    if isinstance(subject, FittedSubjectLoader):
        return subject.subject
    if not isinstance(subject, (str, os.PathLike)):
        raise ValueError(f"subject must be a FittedSubject or the path of its file, got {type(subject).__name__}.")
    path = os.path.abspath(os.fspath(subject))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fitted subject file {path!r} does not exist.")
    stat = os.stat(path)
    return _load_cached(path, stat.st_mtime_ns, stat.st_size, str(torch.device(device)))


class FittedSubjectLoader:
    """Load a fitted-subject file into a given network when a MONAI run starts (``Events.STARTED``), or on first use.

    The bundle's ``inference.json`` defines ``network_def`` from its config keys, so the config parses and its
    properties check before any subject is fitted; this handler then loads the file's weights strictly into that
    network (:meth:`FittedSubject.load` with ``network``) and the transforms given this loader
    (``ODEWarpd(subject=loader)``) use the resulting subject. Weights are never left random: a missing file, another
    kind of file or a network defined with other arguments than the file records is an error naming the file.

    Args:
        load_path: the fitted-subject file (``<output_dir>/<id>/model.pt``).
        network: the :class:`NODER` to load the weights into.
        map_location: device of the loaded tensors.
    """

    def __init__(self, load_path: PathLike, network: NODER, map_location: str | torch.device = "cpu") -> None:
        self.load_path = os.fspath(load_path)
        self.network = network
        self.map_location = torch.device(map_location)
        self._subject: FittedSubject | None = None

    @property
    def subject(self) -> FittedSubject:
        """The fitted subject (loaded on first access).

        Raises:
            FileNotFoundError: naming the file, if it does not exist (fit the subject first).
            ValueError: naming the file, as :meth:`FittedSubject.load`.
        """
        if self._subject is None:
            if not os.path.isfile(self.load_path):
                raise FileNotFoundError(f"fitted subject file {self.load_path!r} does not exist; run training first.")
            self._subject = FittedSubject.load(self.load_path, self.map_location, network=self.network)
        return self._subject

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> FittedSubject:
        return self.subject


def fitted_subject_from_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], network: torch.nn.Module, device: str | torch.device = "cpu"
) -> FittedSubject:
    """Deprecated (the bundle's old ``inference.json``): a :class:`FittedSubject` around ``network`` whose weights a
    ``CheckpointLoader`` loads later. Use :class:`FittedSubjectLoader`, which loads them and checks the network."""
    path = "<memory>"
    if not isinstance(checkpoint, Mapping):
        path, checkpoint = checkpoint, read_checkpoint(checkpoint, SUBJECT_FORMAT, map_location=device)
    validate_subject_checkpoint(dict(checkpoint), path)
    return FittedSubject.from_checkpoint(dict(checkpoint), network, path, device)
