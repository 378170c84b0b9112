"""Small helpers shared by every layer: atomic file writes, JSON/CSV writers, torch device and thread choice."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["cosine_decay", "atomic_write", "write_json", "write_csv", "free_cores", "set_threads", "resolve_device", "summary_writer"]

PathLike = Union[str, "os.PathLike[str]"]


def cosine_decay(step: int, total_steps: int, initial: float, final: float) -> float:
    """The value at ``step`` of a cosine from ``initial`` (step 0) to ``final`` (step ``total_steps`` and after)."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))


def atomic_write(path: PathLike, data: bytes | Callable[[str], None]) -> Path:
    """Write ``path`` through a temporary file in its folder, then rename: no half-written file is ever visible.

    Args:
        path: the file to write (its folder is created).
        data: the bytes to write, or a function that writes the file whose path it is given (e.g.
            ``lambda tmp: torch.save(obj, tmp)``).

    Returns:
        ``path`` as a ``Path``; the file has the permissions of a new file under the current umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name ends with the target's name, so writers that pick a format by extension (nibabel) work
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            if not callable(data):
                stream.write(data)
        if callable(data):
            data(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_json(document: Any, path: PathLike, indent: int = 2) -> Path:
    """Write ``document`` as JSON (no NaN/inf allowed) atomically."""
    return atomic_write(path, (json.dumps(document, indent=indent, allow_nan=False) + "\n").encode("utf-8"))


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: PathLike) -> Path:
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
