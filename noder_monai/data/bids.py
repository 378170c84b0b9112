"""Longitudinal BIDS datasets as a datalist: one subject per ``sub-*`` folder, one scan per ``ses-*`` session.

A plain reader of the BIDS folder layout (no pybids, which would add a dependency and index every file of a large
dataset): it reads, under ``root``::

    sub-<label>/sub-<label>_sessions.tsv                       session_id, <time column> (e.g. age), ...
    sub-<label>/ses-<session>/anat/sub-<label>_ses-<session>[_<entity>-<value>...]_<suffix>.nii[.gz]

and returns the datalist the bundle reads (format: :mod:`noder_monai.data.datalist`), with absolute paths and the
sessions' values of ``time_column`` as scan times. Not read: derivatives, JSON sidecars, inheritance of metadata.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from noder_monai.utils import PathLike

__all__ = ["bids_datalist"]

logger = logging.getLogger(__name__)

_MISSING = ("", "n/a", "na", "nan")


def _sessions_table(path: str, time_column: str) -> dict[str, str]:
    """``{session_id: raw time value}`` from a ``*_sessions.tsv`` file."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
        columns = rows[0].keys() if rows else []
    if "session_id" not in columns or time_column not in columns:
        raise ValueError(f"sessions file '{path}' needs the columns 'session_id' and '{time_column}', "
                         f"has {sorted(columns)}.")
    return {row["session_id"].strip(): (row[time_column] or "").strip() for row in rows}


def _labels(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (str, int)) else list(value)
    return [str(v) if str(v).startswith("sub-") else f"sub-{v}" for v in values]


def _session_images(folder: str, subject: str, suffix: str, match: str | None) -> dict[str, str]:
    """``{session: image}`` of one subject: its ``ses-*/anat/<subject>_<session>*_<suffix>.nii[.gz]`` files."""
    images: dict[str, str] = {}
    for session_dir in sorted(glob.glob(os.path.join(folder, "ses-*"))):
        session = os.path.basename(session_dir)
        files = sorted(glob.glob(os.path.join(session_dir, "anat", f"{subject}_{session}*_{suffix}.nii*")))
        files = [f for f in files if f.endswith((".nii", ".nii.gz")) and (match is None or match in os.path.basename(f))]
        if len(files) > 1:
            raise ValueError(f"{subject} {session}: {len(files)} '{suffix}' images {[os.path.basename(f) for f in files]}; "
                             f"keep one or choose with --match (e.g. --match run-1).")
        if files:
            images[session] = files[0]
    return images


def _timed_scans(folder: str, subject: str, images: dict[str, str], time_column: str) -> list[tuple[float, str, str]]:
    """``(time, session, image)`` of one subject's sessions, sorted by time, the times read from its sessions file."""
    table_path = os.path.join(folder, f"{subject}_sessions.tsv")
    if not os.path.isfile(table_path):
        raise ValueError(f"{subject}: sessions file '{table_path}' not found; it gives each session's "
                         f"'{time_column}'.")
    table = _sessions_table(table_path, time_column)
    scans = []
    for session, image in images.items():
        if session not in table:
            raise ValueError(f"{subject} {session}: no row in '{table_path}' (it lists {sorted(table)}).")
        raw = table[session]
        if raw.lower() in _MISSING:
            raise ValueError(f"{subject} {session}: missing '{time_column}' in '{table_path}'; every session "
                             f"with an image needs its time.")
        try:
            time = float(raw)
        except ValueError:
            raise ValueError(f"{subject} {session}: '{time_column}' is {raw!r} in '{table_path}', not a number.") from None
        if not math.isfinite(time):
            raise ValueError(f"{subject} {session}: '{time_column}' is {raw!r} in '{table_path}', not finite.")
        scans.append((time, session, image))
    scans.sort()
    for (t0, s0, _), (t1, s1, _) in zip(scans, scans[1:]):
        if t0 == t1:
            raise ValueError(f"{subject}: sessions {s0} and {s1} have the same '{time_column}' {t0:g}.")
    return scans


def bids_datalist(
    root: PathLike,
    participant_label: str | Sequence[str] | None = None,
    time_column: str = "age",
    suffix: str = "T1w",
    match: str | None = None,
) -> dict[str, Any]:
    """The datalist of a longitudinal BIDS dataset: per subject, one scan per session, timed by ``time_column``.

    Args:
        root: the BIDS dataset folder (holding ``sub-*`` folders).
        participant_label: subjects to read, with or without ``sub-`` (default: every ``sub-*`` folder).
        time_column: column of ``sub-<label>_sessions.tsv`` holding each session's time (e.g. ``age``), in the
            unit the predictions will be asked in.
        suffix: the image suffix under ``ses-*/anat`` (``T1w``, ``T2w``, ``FLAIR``, ...).
        match: keep only files whose name contains this text (e.g. ``run-1``) when a session has several.

    Returns:
        ``{"generator": {...}, "subjects": [{"id": "sub-<label>", "scans": [{"image", "time"}, ...]}, ...]}``,
        scans ordered by time; subjects with fewer than two sessions are left out with a warning.

    Raises:
        ValueError: ``root`` is not a folder, a chosen subject is missing, a sessions file is missing or lacks the
            columns, a session with an image has no row or no (numeric) time, a session has several images, two
            sessions share a time, or no subject has two timed sessions. Messages name the subject and session.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"BIDS root '{root}' is not a folder.")
    wanted = _labels(participant_label)
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "sub-*")) if os.path.isdir(p))
    if wanted is not None:
        missing = [label for label in wanted if label not in found]
        if missing:
            raise ValueError(f"BIDS root '{root}' has no subject folder {missing}; it has {found}.")
        found = wanted
    subjects = []
    for subject in found:
        images = _session_images(os.path.join(root, subject), subject, suffix, match)
        if not images:
            logger.warning("%s: no ses-*/anat/*_%s.nii[.gz] image; left out", subject, suffix)
            continue
        scans = _timed_scans(os.path.join(root, subject), subject, images, time_column)
        if len(scans) < 2:
            logger.warning("%s: %d timed session(s), a fit needs 2; left out", subject, len(scans))
            continue
        subjects.append({"id": subject, "scans": [{"image": image, "time": time} for time, _, image in scans]})
    if not subjects:
        raise ValueError(f"BIDS root '{root}': no subject has two sessions with a '{suffix}' image and a "
                         f"'{time_column}'.")
    generator = {"function": "noder_monai.data.bids_datalist", "root": root, "time_column": time_column,
                 "suffix": suffix, "participant_label": wanted, "match": match}
    return {"generator": generator, "subjects": subjects}
