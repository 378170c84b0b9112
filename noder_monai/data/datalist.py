"""Reading and checking a datalist: which scans belong to which subject, and when each was acquired.

Format (JSON)::

    {"subjects": [
        {"id": "sub-001",
         "scans": [{"image": "sub-001/scans/t0.00.nii.gz", "time": 0.0},
                   {"image": "sub-001/scans/t0.70.nii.gz", "time": 0.7}],
         "label": "sub-001/label.nii.gz",
         "heldout": [{"image": "sub-001/heldout/t7.00.nii.gz", "time": 7.0}],
         "predict_times": [2.1, 8.0]}
    ]}

``id`` and ``scans`` (at least two, strictly increasing times) are required; ``label``, ``heldout`` and
``predict_times`` are optional. Paths are relative to ``dataset_dir`` (default: the datalist's folder) unless absolute.
Other top-level keys are ignored; unknown keys inside a subject are an error (a misspelt optional field would
otherwise be dropped silently).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from noder_monai.data.sequence import SubjectSequence, load_sequence, read_label_map
from noder_monai.io import check_image_file, load_scan, scan_shape
from noder_monai.utils import PathLike

__all__ = ["SPLITS", "SubjectEntry", "load_datalist", "select_subject", "time_split"]

logger = logging.getLogger(__name__)

SUBJECT_KEYS = ("id", "scans", "label", "heldout", "predict_times")
SPLITS = ("interpolation", "extrapolation")
"""How a held-out time relates to the observed ones: inside their span, or outside it."""


def time_split(time: float, observed: Sequence[float]) -> str:
    """``"interpolation"`` if ``time`` lies within ``[observed[0], observed[-1]]`` (sorted observed times), else
    ``"extrapolation"``: the one held-out split rule of the evaluation, the cohort tables and the report."""
    return SPLITS[0] if observed[0] <= time <= observed[-1] else SPLITS[1]


@dataclass
class SubjectEntry:
    """One subject of a datalist, with every path resolved and checked to exist.

    Attributes:
        id: subject identifier, unique in the datalist.
        scans: ``[(path, time), ...]`` observed scans, at least two, times strictly increasing.
        label: label map on the first scan's grid, or ``None``.
        heldout: ``[(path, time), ...]`` scans kept out of fitting, for evaluation (any times).
        predict_times: times at which predictions are wanted.
    """

    id: str
    scans: list[tuple[str, float]]
    label: str | None = None
    heldout: list[tuple[str, float]] = field(default_factory=list)
    predict_times: list[float] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        """Acquisition times of the observed scans."""
        return [time for _, time in self.scans]

    def load(self, reader: str | None = None) -> SubjectSequence:
        """Read the observed scans with :func:`~noder_monai.data.sequence.load_sequence`.

        Args:
            reader: ``"itk"``, ``"nibabel"`` or ``None`` (MONAI's default).

        Returns:
            The subject's :class:`~noder_monai.data.sequence.SubjectSequence`.
        """
        return load_sequence([path for path, _ in self.scans], self.times, subject=self.id, reader=reader)

    def query_times(self, default: Sequence[float] | None = None) -> list[float]:
        """The times inference predicts this subject at, sorted and unique: its own ``predict_times``, else
        ``default``, else its observed and held-out times. A warning names the subject when it has its own and
        ``default`` differs (``--times`` / ``predict_times`` of the run do not apply to it)."""
        if self.predict_times and default and sorted(map(float, default)) != sorted(map(float, self.predict_times)):
            logger.warning("subject '%s': predicted at its own predict_times %s from the datalist, not at the "
                           "given times %s", self.id, list(self.predict_times), list(default))
        times = self.predict_times or (list(default) if default else None) or [
            *self.times, *(t for _, t in self.heldout)]
        return sorted({float(t) for t in times})

    def split(self, time: float) -> str:
        """The held-out split of ``time`` (:func:`time_split` against the observed times)."""
        return time_split(time, self.times)

    def files(self) -> list[tuple[str, str]]:
        """``(field, path)`` of every file the subject names: scans, held-out scans, label map."""
        return [*(("scans", p) for p, _ in self.scans), *(("heldout", p) for p, _ in self.heldout),
                *((("label", self.label),) if self.label else ())]

    def check_files(self) -> int:
        """Read every file completely and check that all share one grid; check the label map's values and its grid
        in world space (:func:`~noder_monai.data.read_label_map`); return the cost (voxels x scans). Every stage runs
        it on every subject before any work, so a bad file fails before a fit.

        Raises:
            ValueError: naming the subject, field and file, for an unreadable file, a file on another grid, or a label
                map that is not one volume of finite integers on the first scan's grid (size and affine).
        """
        shapes: dict[tuple[int, ...], list[str]] = {}
        for role, path in self.files():
            if role == "label":
                continue
            try:
                shape = scan_shape(path, read_all=True)
            except Exception as error:  # any reader error: the file is unreadable
                raise ValueError(f"subject '{self.id}': field '{role}' file '{path}' cannot be read: "
                                 f"{type(error).__name__}: {error}") from error
            shapes.setdefault(shape, []).append(path)
        if len(shapes) > 1:
            raise ValueError(f"subject '{self.id}': files have different grids: "
                             + "; ".join(f"{list(k)}: {v}" for k, v in shapes.items()))
        if self.label is not None:
            first, geometry = load_scan(self.scans[0][0])
            read_label_map(self.label, first.shape[1:], geometry.affine, f"subject '{self.id}': field 'label'")
        return math.prod(next(iter(shapes))) * len(self.scans)

    def cost(self) -> int:
        """Cost of fitting the subject: voxels x observed scans, the voxels from the first scan's header (0 if it
        cannot be read: the up-front file check reports it)."""
        try:
            return math.prod(scan_shape(self.scans[0][0])) * len(self.scans)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by check_files, not here
            return 0


def _time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    return float(value)


def _path(value: Any, base: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty path string, got {value!r}.")
    return check_image_file(os.path.normpath(os.path.join(base, value)), where)


def _scan_list(value: Any, base: str, where: str) -> list[tuple[str, float]]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of {{'image': path, 'time': number}}, got {value!r}.")
    scans = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or "image" not in item or "time" not in item:
            raise ValueError(f"{where}[{index}] must be an object with 'image' and 'time', got {item!r}.")
        time = _time(item["time"], f"{where}[{index}].time")
        scans.append((_path(item["image"], base, f"{where}[{index}].image"), time))
    return scans


def _subject(raw: Any, index: int, base: str) -> SubjectEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"subject #{index}: must be an object, got {raw!r}.")
    if "id" not in raw:
        raise ValueError(f"subject #{index}: missing field 'id'.")
    sid = raw["id"]
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"subject #{index}: field 'id' must be a non-empty string, got {sid!r}.")
    prefix = f"subject '{sid}': field"
    unknown = sorted(set(raw) - set(SUBJECT_KEYS))
    if unknown:
        raise ValueError(f"subject '{sid}': unknown field(s) {unknown}; allowed fields are {list(SUBJECT_KEYS)}.")
    if "scans" not in raw:
        raise ValueError(f"{prefix} 'scans' is missing.")
    scans = _scan_list(raw["scans"], base, f"{prefix} 'scans'")
    if len(scans) < 2:
        raise ValueError(f"{prefix} 'scans' needs at least 2 scans, got {len(scans)}.")
    for position in range(1, len(scans)):
        previous, current = scans[position - 1][1], scans[position][1]
        if current <= previous:
            problem = "duplicate" if current == previous else "unsorted"
            raise ValueError(
                f"{prefix} 'scans' times must be strictly increasing, {problem} times {previous:g} and {current:g} "
                f"(entries {position - 1} and {position})."
            )
    label = raw.get("label")
    if label is not None:
        label = _path(label, base, f"{prefix} 'label'")
    heldout = _scan_list(raw.get("heldout", []), base, f"{prefix} 'heldout'")
    predict = raw.get("predict_times", [])
    if not isinstance(predict, list):
        raise ValueError(f"{prefix} 'predict_times' must be a list of numbers, got {predict!r}.")
    predict_times = [_time(value, f"{prefix} 'predict_times'[{position}]") for position, value in enumerate(predict)]
    return SubjectEntry(id=sid, scans=scans, label=label, heldout=heldout, predict_times=predict_times)


def load_datalist(path: PathLike, dataset_dir: PathLike | None = None) -> list[SubjectEntry]:
    """Read a datalist JSON file and check every subject.

    Args:
        path: the datalist file (format in this module's docstring).
        dataset_dir: folder that relative paths start from; ``None`` uses the datalist's folder.

    Returns:
        One :class:`SubjectEntry` per subject, in file order, with absolute, existing paths.

    Raises:
        FileNotFoundError: the datalist or a file it names does not exist (the message names the subject and field).
        ValueError: the file is not valid JSON or lacks ``"subjects"`` or lists none; a subject lacks ``id`` or
            ``scans``, has an unknown field, fewer than two scans, a time that is not a finite number, duplicate or
            unsorted scan times, or an id already used. Messages name the subject id and the field.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datalist file not found: '{path}'.")
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"datalist '{path}' is not valid JSON: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("subjects"), list):
        raise ValueError(f"datalist '{path}': field 'subjects' (a list of subjects) is missing.")
    if not document["subjects"]:
        raise ValueError(f"datalist '{path}': field 'subjects' is empty.")
    base = os.path.dirname(os.path.abspath(path)) if dataset_dir is None else os.path.abspath(os.fspath(dataset_dir))
    entries: list[SubjectEntry] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["subjects"]):
        entry = _subject(raw, index, base)
        if entry.id in seen:
            raise ValueError(f"datalist '{path}': subject '{entry.id}': field 'id' is used by more than one subject.")
        seen.add(entry.id)
        entries.append(entry)
    return entries


def select_subject(subjects: Sequence[SubjectEntry], subject_id: str | None = None) -> SubjectEntry:
    """The subject ``subject_id`` of ``subjects``; None takes the first (and says how to run all of them).

    Raises:
        ValueError: naming the datalist's ids, if ``subject_id`` is not one of them or the datalist is empty.
    """
    if not subjects:
        raise ValueError("the datalist has no subjects.")
    if subject_id is None:
        if len(subjects) > 1:
            logger.warning(
                "subject_id not given: running subject '%s', the first of %d; run every subject with "
                "`python -m monai.bundle run_workflow noder_monai.workflows.CohortWorkflow ...` or `noder fit`.",
                subjects[0].id, len(subjects),
            )
        return subjects[0]
    for entry in subjects:
        if entry.id == str(subject_id):
            return entry
    raise ValueError(f"subject_id {subject_id!r} is not in the datalist; its ids are {[e.id for e in subjects]}.")

