"""A user's data as the bundle's datalist: a list of scans with times, a 4D cine file, or a BIDS dataset.

:func:`inputs_datalist` turns what ``noder fit`` / ``noder predict`` were given into a datalist document (format:
:mod:`noder_monai.data.datalist`, absolute paths) and :func:`write_inputs_datalist` writes it to
``<output_dir>/datalist.json``, so the bundle (``--datalist <output_dir>/datalist.json``) reruns the same subjects.
A cine file's frames are written as 3D files under ``<output_dir>/inputs/<id>/`` (the datalist names one file
per scan). Only :func:`write_inputs_datalist` writes; everything else only reads and checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from noder_monai.data.bids import bids_datalist
from noder_monai.data.datalist import SubjectEntry, load_datalist
from noder_monai.data.demo import make_demo_dataset
from noder_monai.io import check_image_file, load_scan, parse_times, save_image
from noder_monai.utils import PathLike, write_json

__all__ = ["cine_datalist", "cine_frame_times", "datalist_subjects", "inputs_datalist", "is_series", "safe_id",
           "scans_datalist", "write_inputs_datalist"]

logger = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


def safe_id(text: str) -> str:
    """A subject id usable as a folder name on every file system, one per ``text``: ``text`` itself when it is one
    (letters, digits, ``.``, ``_``, ``-``, not starting with ``.``, ``_`` or ``-``), else its other characters
    replaced by ``_`` plus the first 8 hex digits of its SHA-256 (``"pat ä"`` -> ``pat__-c1cf6a6a``), so two names
    never share a folder; the datalist records the name given (``generator.subject``)."""
    if _SAFE_ID.match(text):
        return text
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-") or "sub"
    return f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def scans_datalist(scans: Sequence[PathLike], times: Any, subject: str = "sub-01") -> dict[str, Any]:
    """One subject from its scan files and their acquisition times (one time per file, any order of files).

    Raises:
        ValueError: fewer than two scans, a scan that is a folder (a DICOM series: the message says to convert it,
            e.g. with dcm2niix), or a number of times that differs from the number of scans.
        FileNotFoundError: a scan file does not exist.
    """
    paths = [os.path.abspath(os.fspath(p)) for p in scans]
    if times is None:
        raise ValueError(f"{len(paths)} scans need their acquisition times: --times T1 T2 ... (one per scan).")
    values = parse_times(times, "times")
    if len(paths) < 2:
        raise ValueError(f"a fit needs at least two scans, got {len(paths)}: {paths}.")
    if len(values) != len(paths):
        raise ValueError(f"{len(paths)} scans but {len(values)} times {values}: give one time per scan.")
    for index, path in enumerate(paths):
        check_image_file(path, f"scan {index}")
    ordered = sorted(zip(values, paths))
    return {"generator": {"function": "noder_monai.data.scans_datalist", "subject": subject},
            "subjects": [{"id": safe_id(subject), "scans": [{"image": p, "time": t} for t, p in ordered]}]}


def is_series(path: PathLike) -> bool:
    """Whether ``path`` is a NIfTI file with more than one frame along its 4th axis (a cine / 4D series)."""
    path = os.fspath(path)
    if not path.endswith((".nii", ".nii.gz")) or not os.path.isfile(path):
        return False
    shape = nib.load(path).shape
    return len(shape) >= 4 and shape[3] > 1


def cine_frame_times(path: PathLike) -> list[float]:
    """Frame times in seconds of a 4D NIfTI file from its header: frame ``k`` at ``k * pixdim[4]`` (unit from
    ``xyzt_units``: sec, msec or usec; ``toffset`` added).

    Raises:
        ValueError: naming the file, when the header has no frame duration or no time unit (pass the times).
    """
    path = os.fspath(path)
    header = nib.load(path).header
    frames = int(header["dim"][4])
    step = float(str(np.float32(header["pixdim"][4])))  # the header's float32 as written (0.05, not 0.0500000007)
    unit = header.get_xyzt_units()[1]
    if not step > 0 or unit not in _TIME_UNITS:
        raise ValueError(f"cine '{path}': the header gives no frame time (pixdim[4] = {step:g}, time unit "
                         f"{unit!r}); pass the frame times: --times T1 T2 ... ({frames} values).")
    scale = _TIME_UNITS[unit]
    offset = float(str(np.float32(header["toffset"]))) * scale
    return [round(offset + k * step * scale, 9) for k in range(frames)]


_CINE_GENERATOR = "noder_monai.data.cine_datalist"


def cine_datalist(path: PathLike, frames_dir: PathLike, times: Any = None, subject: str | None = None) -> dict[str, Any]:
    """One subject from a 4D cine file (time = last axis), its frames named as 3D files in ``frames_dir``; nothing
    is written here: :func:`write_inputs_datalist` writes the frames (with the cine's geometry) and the datalist.

    Args:
        path: 4D NIfTI file ``(*spatial, T)``.
        frames_dir: folder of the frame files ``frame_<k>.nii.gz``.
        times: one time per frame; None reads them from the header (:func:`cine_frame_times`, seconds).
        subject: subject name (default: the file name without extension); the id is :func:`safe_id` of it.

    Raises:
        ValueError: naming the file: one frame, a number of times other than of frames, times not increasing.
    """
    path = os.path.abspath(os.fspath(path))
    values = cine_frame_times(path) if times is None else parse_times(times, "times")
    shape = nib.load(path).shape
    frames = shape[3] if len(shape) > 3 else 1
    if frames < 2:
        raise ValueError(f"cine '{path}' has 1 frame; a fit needs at least 2.")
    if len(values) != frames:
        raise ValueError(f"cine '{path}' has {frames} frames but {len(values)} times were given.")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"cine '{path}': frame times must increase strictly, got {values}.")
    frames_dir = os.path.abspath(os.fspath(frames_dir))
    scans = [{"image": os.path.join(frames_dir, f"frame_{index:03d}.nii.gz"), "time": float(time)}
             for index, time in enumerate(values)]
    name = subject or _stem(path)
    return {"generator": {"function": _CINE_GENERATOR, "cine": path, "subject": name},
            "subjects": [{"id": safe_id(name), "scans": scans}]}


def inputs_datalist(
    inputs: Sequence[PathLike],
    output_dir: PathLike,
    times: Any = None,
    bids: PathLike | None = None,
    participant_label: str | Sequence[str] | None = None,
    time_column: str = "age",
    subject: str | None = None,
) -> dict[str, Any] | str:
    """What the user gave, as a datalist: a datalist path (``.json``, returned as is), a BIDS root (``bids``), one
    4D cine file, or several scans with ``times``.

    Returns:
        a datalist path, or a datalist document to write with :func:`write_inputs_datalist`.

    Raises:
        ValueError: the inputs fit none of these forms; the message says which forms exist.
    """
    inputs = [os.fspath(p) for p in inputs]
    for index, path in enumerate(inputs):
        if os.path.isdir(path):  # a DICOM series folder: say how to convert it
            check_image_file(path, f"input {index}")
    if bids is not None:
        if inputs:
            raise ValueError(f"give either --bids ROOT or input files, got both (--bids {bids} and {inputs}).")
        return bids_datalist(bids, participant_label, time_column)
    if len(inputs) == 1 and inputs[0].endswith(".json"):
        if times is not None:
            raise ValueError("--times gives the scans' times when fitting scan files; a datalist holds its own times.")
        return inputs[0]
    if len(inputs) == 1 and is_series(inputs[0]):
        name = subject or _stem(inputs[0])
        return cine_datalist(inputs[0], os.path.join(os.fspath(output_dir), "inputs", safe_id(name)), times, name)
    if len(inputs) >= 2:
        return scans_datalist(inputs, times, subject or "sub-01")
    raise ValueError(
        f"inputs {inputs}: give a JSON datalist, a 4D cine file, two or more scans with --times T1 T2 ..., "
        f"or --bids ROOT."
    )


def write_inputs_datalist(document: dict[str, Any], output_dir: PathLike) -> str:
    """Write ``document`` to ``<output_dir>/datalist.json`` (atomically) and return its path; for a cine
    (:func:`cine_datalist`) first write its frames, each with the cine's geometry. Call it once the output folder
    is checked: it is the first write of ``noder fit`` / ``noder predict``."""
    generator = document.get("generator", {})
    if generator.get("function") == _CINE_GENERATOR:
        data, geometry = load_scan(generator["cine"])
        for index, scan in enumerate(document["subjects"][0]["scans"]):
            save_image(data[index:index + 1], geometry, scan["image"])
    return write_json(document, os.path.join(os.path.abspath(os.fspath(output_dir)), "datalist.json"))


def datalist_subjects(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
) -> list[SubjectEntry]:
    """The subjects of a datalist (format: ``noder_monai.data.datalist``), their ids checked as folder names.

    Args:
        datalist: the datalist file; its relative paths start at ``dataset_dir``, or at its own folder if None.
        dataset_dir: the data folder; with no ``datalist``, the datalist is ``<dataset_dir>/datalist.json``.
        demo_dir: with neither of the above, the demo dataset in this folder (made on first use).
        demo: keyword arguments of :func:`noder_monai.data.make_demo_dataset` for the demo dataset.

    Raises:
        ValueError: none of ``datalist``, ``dataset_dir`` and ``demo_dir`` is given, an id is not a safe
            folder name, or two ids differ only in letter case (one folder on macOS and Windows); both are named.
    """
    if datalist is not None:
        path, base = os.fspath(datalist), None if dataset_dir is None else os.fspath(dataset_dir)
    elif dataset_dir is not None:
        path, base = os.path.join(os.fspath(dataset_dir), "datalist.json"), os.fspath(dataset_dir)
    elif demo_dir is not None:
        if not os.path.isfile(os.path.join(os.fspath(demo_dir), "datalist.json")):
            logger.info("making the demo dataset in %s", demo_dir)
        path, base = make_demo_dataset(demo_dir, **dict(demo or {})), None
    else:
        raise ValueError("give datalist (a datalist file) or dataset_dir (a folder holding datalist.json), got neither.")
    entries = load_datalist(path, base)
    folders: dict[str, str] = {}
    for entry in entries:
        if not _SAFE_ID.match(entry.id):
            raise ValueError(
                f"subject '{entry.id}': field 'id' is used as a folder name and may only hold letters, digits, '.', "
                f"'_' and '-' (not starting with '.', '_' or '-'), got {entry.id!r}."
            )
        other = folders.setdefault(entry.id.casefold(), entry.id)
        if other != entry.id:
            raise ValueError(
                f"datalist '{path}': subjects '{other}' and '{entry.id}' differ only in letter case, so they would "
                f"share one folder on file systems that ignore case (macOS, Windows); give them distinct ids."
            )
    logger.info("datalist %s: %d subject(s)", path, len(entries))
    return entries
