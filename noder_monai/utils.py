"""Small helpers shared by every layer: atomic file writes, JSON/CSV writers, torch device and thread choice."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import time as _time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["cosine_decay", "atomic_write", "clean_stale_temporaries", "temporary_name", "write_json", "write_csv", "free_cores", "set_threads", "resolve_device", "summary_writer"]

PathLike = Union[str, "os.PathLike[str]"]


def cosine_decay(step: int, total_steps: int, initial: float, final: float) -> float:
    """The value at ``step`` of a cosine from ``initial`` (step 0) to ``final`` (step ``total_steps`` and after)."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))


TEMP_MARK = "noder"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path: PathLike) -> str:
    """The temporary name :func:`atomic_write` uses for ``path``: ``.<name>.noder-<host>-<pid>-<hex>.tmp`` beside it."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{TEMP_MARK}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: PathLike, write: bytes | Callable[[str], None]) -> str:
    """Write ``path`` atomically with mode ``0o666 & ~umask``: ``write`` (bytes, or a callable taking a temporary
    path) fills a temporary file in the same folder, which then replaces ``path``. One helper, one mode, for every
    output of the package (NIfTI, JSON, CSV, PNG, checkpoints).

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = temporary_name(path)
    try:
        if callable(write):
            write(temporary)
        else:
            with open(temporary, "wb") as handle:
                handle.write(bytes(write))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


_OWN_TEMP = re.compile(r"^\..+\." + TEMP_MARK + r"-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^(\.tmp-[0-9a-f]{32}-.+|\..+\.[A-Za-z0-9_]{8}\.tmp)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(folder: PathLike, legacy_age_s: float = 3600.0) -> list[str]:
    """Remove the temporary files a killed run of this package left under ``folder`` (recursively).

    Removed: our own temporaries (``.<name>.noder-<host>-<pid>-<hex>.tmp``) whose writing process on this host is no
    longer running (on another host: older than ``legacy_age_s``), and temporaries of older package versions
    (``.tmp-<uuid>-<name>``, ``.<name>.<8 chars>.tmp``) older than ``legacy_age_s``. Nothing else is touched.

    Returns:
        the removed paths.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
    now = _time.time()
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            match = _OWN_TEMP.match(name)
            try:
                age = now - os.lstat(full).st_mtime
            except OSError:
                continue
            if match:
                stale = not _alive(int(match["pid"])) if match["host"] == host else age > legacy_age_s
            else:
                stale = bool(_LEGACY_TEMP.match(name)) and age > legacy_age_s
            if stale:
                try:
                    os.remove(full)
                    removed.append(full)
                except FileNotFoundError:
                    pass
    return removed


def write_json(document: Any, path: PathLike, indent: int = 2) -> str:
    """Write ``document`` as JSON (no NaN/inf allowed) atomically."""
    return atomic_write(path, (json.dumps(document, indent=indent, allow_nan=False) + "\n").encode("utf-8"))


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: PathLike) -> str:
    """Write ``rows`` (dicts) as a CSV file with a header of ``columns``, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue().encode("utf-8"))


def free_cores() -> int:
    """CPU cores this process may use minus the 1-minute load average (at least 1).

    More torch threads than idle cores makes every operation wait on descheduled threads: on a 2-core machine with
    one other busy process, 2 threads ran a fit many times slower than 1 (``benchmarks/README.md``).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, round(usable - os.getloadavg()[0]))) if hasattr(os, "getloadavg") else usable


def set_threads(num_threads: int | None) -> int:
    """``torch.set_num_threads(num_threads)``; None uses :func:`free_cores`. Returns the number set."""
    if num_threads is None:
        num_threads = free_cores()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
    torch.set_num_threads(num_threads)
    return num_threads


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None picks ``cuda`` when available, else ``cpu``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def summary_writer(enabled: bool | None, log_dir: PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``log_dir`` when ``enabled`` (or None and tensorboard is installed), else None.

    Raises:
        ImportError: naming the package, if ``enabled`` is True and tensorboard is not installed.
    """
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if enabled:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
        return None
    return SummaryWriter(log_dir=os.fspath(log_dir))
