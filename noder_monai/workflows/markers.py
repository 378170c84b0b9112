"""Done-markers: a subject's stage is done when ``<folder>/done_<stage>.json`` (written last, after every output was
written atomically) holds the same config hash and input hash and lists outputs that are all present with their
sizes; a changed config or changed input files redo it. A per-subject lock keeps two runs off one subject."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time as timer
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from noder_monai.utils import write_json

__all__ = ["MARKER_FORMAT", "config_hash", "files_hash", "read_marker", "remove_marker", "stale_reasons", "subject_lock",
           "update_output", "write_marker"]

MARKER_FORMAT = "noder-monai-done-2"
"""``format`` of a done-marker (``-2``: stages named ``training``, ``inference``, ``evaluation``)."""


def config_hash(config: Any) -> str:
    """SHA-256 (16 hex digits) of a JSON-able config (keys sorted; other values by ``str``)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def files_hash(paths: Sequence[str], extra: Any = None) -> str:
    """SHA-256 (16 hex digits) of the bytes of ``paths`` (in order) and of ``extra`` (e.g. the scan times)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fspath(path).encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:16]


def _marker_path(folder: str, stage: str) -> str:
    return os.path.join(folder, f"done_{stage}.json")


def read_marker(folder: str, stage: str) -> dict | None:
    """The done-marker of a subject's stage, or None if absent, unreadable or of another format."""
    try:
        with open(_marker_path(folder, stage)) as handle:
            marker = json.load(handle)
        return marker if marker.get("format") == MARKER_FORMAT else None
    except (OSError, ValueError):
        return None


def stale_reasons(marker: dict | None, config_digest: str, input_digest: str) -> list[str]:
    """Why a marker does not prove the subject done with this config and these inputs (empty: done)."""
    if marker is None:
        return ["no done-marker"]
    reasons = []
    if marker.get("config_hash") != config_digest:
        reasons.append("config changed")
    if marker.get("input_hash") != input_digest:
        reasons.append("input files changed")
    for path, size in marker.get("outputs", {}).items():
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            reasons.append(f"output {path} missing or changed")
            break
    return reasons


def remove_marker(folder: str, stage: str) -> None:
    """Remove the marker before a subject's outputs change (a killed run then redoes it)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(_marker_path(folder, stage))


def write_marker(folder: str, stage: str, subject: str, digests: tuple[str, str], config: Any,
                 outputs: Sequence[str], record: Mapping[str, Any]) -> str:
    """Write the done-marker last: ``digests`` (config hash, input hash), the config, every output's size, the
    subject's record."""
    marker = {"format": MARKER_FORMAT, "subject": subject, "stage": stage, "config_hash": digests[0],
              "input_hash": digests[1], "config": config,
              "outputs": {os.fspath(path): os.path.getsize(path) for path in outputs}, "record": dict(record),
              "finished": timer.strftime("%Y-%m-%dT%H:%M:%S")}
    return write_json(json.loads(json.dumps(marker, default=str)), _marker_path(folder, stage))


def update_output(folder: str, stage: str, path: str) -> str | None:
    """Record the new size of output ``path`` in the stage's done-marker, if the marker lists it: for an output that
    a later stage extends without changing the stage's result (the fitted file gains an uncertainty ensemble), so that
    the stage stays done. Returns the marker's path, or None (no marker, or ``path`` is not one of its outputs)."""
    marker = read_marker(folder, stage)
    path = os.fspath(path)
    if marker is None or path not in marker.get("outputs", {}):
        return None
    marker["outputs"][path] = os.path.getsize(path)
    return write_json(marker, _marker_path(folder, stage))


@contextlib.contextmanager
def subject_lock(folder: str, stage: str) -> Iterator[bool]:
    """Hold ``<folder>/.noder_<stage>.lock`` (non-blocking ``flock``, released by the kernel when a process dies);
    yields False if another process holds it."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".noder_{stage}.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
