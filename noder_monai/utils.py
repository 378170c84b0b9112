"""Small helpers shared by every layer: atomic file writes, JSON/CSV writers, torch device and thread choice."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
import socket
import time as _time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

__all__ = ["OutputWriteError", "atomic_write", "clean_stale_temporaries", "cosine_decay", "free_cores", "read_csv", "read_json",
           "resolve_device", "set_threads", "summary_writer", "temporary_name", "tensorboard_available", "time_tag",
           "write_csv", "write_json"]

PathLike = Union[str, "os.PathLike[str]"]


def cosine_decay(step: int, total_steps: int, initial: float, final: float) -> float:
    """The value at ``step`` of a cosine from ``initial`` (step 0) to ``final`` (step ``total_steps`` and after)."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return final + 0.5 * (initial - final) * (1 + math.cos(math.pi * progress))


def time_tag(time: Any) -> str:
    """File-name tag of a time: ``"t"`` + the shortest decimal that reads back as the same number (``t2.1``,
    ``t7.0``, ``t-0.5``, ``t1.0000001``), so distinct times always get distinct tags. A float32 scalar (a time that
    went through float32 metadata) is written with float32's shortest decimal (``float32(2.1)`` -> ``t2.1``)."""
    if isinstance(time, torch.Tensor):
        time = time.detach().cpu().numpy()
    if getattr(time, "dtype", None) == np.float32:
        time = str(np.float32(time))  # float32's shortest decimal
    return f"t{float(time)!r}"


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


class OutputWriteError(OSError):
    """A file of the package's outputs could not be written (no space, read-only file system, no permission): the
    message names the file, the cause and what to do; ``errno`` is the system's."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not OSError's "[Errno N] ...: path"


_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write to another folder",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write to another folder",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "permission denied: write to a folder you may write to, or change its permissions",
    errno.EPERM: "the operation is not permitted: write to a folder you may write to",
}


def _write_error(path: str, error: OSError) -> OutputWriteError:
    hint = _WRITE_HINTS.get(error.errno)
    cause = error.strerror or str(error)
    failure = OutputWriteError(f"cannot write '{path}': {cause}" + (f"; {hint}." if hint else "."))
    failure.errno, failure.strerror, failure.filename = error.errno, error.strerror, path
    return failure


def atomic_write(path: PathLike, write: bytes | Callable[[str], None]) -> str:
    """Write ``path`` atomically with mode ``0o666 & ~umask``: ``write`` (bytes, or a callable taking a temporary
    path) fills a temporary file in the same folder, which then replaces ``path``. One helper, one mode, for every
    output of the package (NIfTI, JSON, CSV, PNG, checkpoints). A failed write leaves ``path`` as it was and no
    temporary behind.

    Returns:
        ``path`` as a string.

    Raises:
        OutputWriteError: (an ``OSError``) naming ``path``, the cause and what to do, when the system refuses the
            write (no space, read-only file system, no permission, ...).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    temporary = temporary_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        if callable(write):
            write(temporary)
        else:
            with open(temporary, "wb") as handle:
                handle.write(bytes(write))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OutputWriteError:
        raise
    except OSError as error:
        raise _write_error(path, error) from error
    finally:
        with contextlib.suppress(OSError):
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


def read_json(path: PathLike) -> Any:
    """The JSON document at ``path``, or None when it is absent or unreadable (a file a killed run never wrote)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def read_csv(path: PathLike) -> list[dict[str, str]]:
    """The rows of the CSV file at ``path`` as dicts of text (``[]`` when it is absent)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: PathLike) -> str:
    """Write ``rows`` (dicts) as a CSV file with a header of ``columns``, atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue().encode("utf-8"))


def _busy_cpus(interval: float) -> float | None:
    """CPUs busy over the next ``interval`` seconds, from two reads of ``/proc/stat`` (None where it is absent)."""
    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0)

    first = read()
    if first is None:
        return None
    _time.sleep(interval)
    second = read()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return (total - idle) / total * (os.cpu_count() or 1)


def free_cores(interval: float = 0.3) -> int:
    """CPU cores this process may use that are idle now (at least 1).

    More torch threads than idle cores makes every operation wait on descheduled threads: on a 2-core machine with
    one other busy process, 2 threads ran a fit many times slower than 1 (``benchmarks/README.md``). The busy cores
    are sampled over ``interval`` seconds (``/proc/stat``), not read from the 1-minute load average, which still
    counts a job (e.g. ``pip install``) that ended seconds ago; a core more than 25% busy counts as busy. Without
    ``/proc/stat`` the 1-minute load average is used.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cpus(interval)
    if busy is None:
        if not hasattr(os, "getloadavg"):
            return usable
        busy = os.getloadavg()[0]
    return max(1, min(usable, math.floor(usable - busy + 0.25)))


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


def tensorboard_available(required: bool | None = None) -> bool:
    """Whether ``torch.utils.tensorboard`` imports (tensorboard is optional: the ``tracking`` extra).

    Raises:
        ImportError: naming the package, if ``required`` is True and it is not installed.
    """
    try:
        import torch.utils.tensorboard  # noqa: F401 - optional package, imported only when asked for
    except ImportError as error:
        if required:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
        return False
    return True


def summary_writer(enabled: bool | None, log_dir: PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``log_dir`` when ``enabled`` (or None and tensorboard is installed), else None.

    Raises:
        ImportError: naming the package, if ``enabled`` is True and tensorboard is not installed.
    """
    if enabled is False or not tensorboard_available(enabled):
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional package: see tensorboard_available

    return SummaryWriter(log_dir=os.fspath(log_dir))
