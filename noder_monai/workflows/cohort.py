"""A cohort of subjects across processes, GPUs and machines: shares, locks, done-markers, failures, summaries.

One subject is the unit of work (its own network and optimizer), so processes started by ``torchrun`` need no
gradient exchange: each rank takes a disjoint, cost-balanced share of the subjects
(:func:`partition_subjects`, MONAI's ``partition_dataset`` over the subjects sorted by voxels x scans) and runs them
one after another with :func:`run_cohort`, which

- checks every subject's files up front (headers: readable, same grid) and records the unreadable ones as failed;
- skips a subject whose done-marker (``<folder>/done_<stage>.json``, written last, after every output was written
  atomically) holds the same config hash and input hash and lists outputs that are all present with their sizes;
  a changed config or changed input files redo it;
- holds a lock per subject and stage (``<folder>/.noder_<stage>.lock``, ``fcntl.flock``: released by the kernel when
  a process dies), so two runs into one folder never write one subject at once: the second one reports it as
  ``locked`` and goes on;
- records a failing subject (id, error, traceback file ``<summary_dir>/cohort_failures/<id>_<stage>.txt``) and goes on;
- logs a progress line with an ETA per finished subject;
- at the end, rank 0 waits for every rank's result file and writes ``<summary_dir>/cohort_summary_<stage>.json``
  (one record per subject of the whole cohort, finished earlier or now) and runs the stage's merge (the cohort CSVs).

No process group is created (MONAI's metric handlers would try to gather across ranks): the ranks agree on a run
token through torchrun's key-value store and finish through files.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import socket
import time as timer
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from noder_monai.data import SubjectEntry
from noder_monai.utils import atomic_write, write_csv, write_json

__all__ = [
    "STAGES",
    "CohortResult",
    "cohort_label_volumes",
    "cohort_metrics",
    "config_hash",
    "dist_env",
    "files_hash",
    "partition_subjects",
    "rank_device",
    "rank_threads",
    "read_marker",
    "run_cohort",
    "subject_cost",
    "subject_lock",
    "wait_for_ranks",
]

logger = logging.getLogger(__name__)

STAGES = ("train", "inference", "evaluate")
MARKER_FORMAT = "noder-monai-done-1"
_STATUSES = ("done", "skipped", "failed", "locked")


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``(0, 1, 0)`` outside it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"dist_env: RANK={rank} and WORLD_SIZE={world} are inconsistent.")
    return rank, world, local


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available (or ``device`` is a plain ``"cuda"``),
    else ``device`` or the CPU. An explicit ``cuda:K`` or ``cpu`` is kept."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    _, _, local = dist_env()
    return torch.device("cuda", local % max(1, torch.cuda.device_count()))


def rank_threads(num_threads: int | None = None) -> int:
    """Torch CPU threads of this process: ``num_threads`` if given, else the idle cores
    (:func:`noder_monai.utils.free_cores`) divided among the ranks on this machine (``LOCAL_WORLD_SIZE``)."""
    if num_threads is not None:
        return num_threads
    from noder_monai.utils import free_cores

    return max(1, free_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


_NIBABEL = (".nii", ".nii.gz", ".mgz", ".mgh", ".hdr", ".img")


def _check_file(path: str) -> tuple[int, ...]:
    """Read ``path`` completely (a corrupt, truncated or unreadable file fails here); return its shape."""
    if path.endswith(_NIBABEL):
        import nibabel as nib
        import numpy as np

        return tuple(int(s) for s in np.asarray(nib.load(path).dataobj).shape)
    from noder_monai.io import load_image

    data, _ = load_image(path)
    return tuple(int(s) for s in data.shape[1:])


def check_subject(entry: SubjectEntry) -> int:
    """Check a subject's files can be read and share one grid; return its cost (voxels x scans).

    Raises:
        ValueError: naming the subject and file, for an unreadable file or a file on another grid.
    """
    shapes = {}
    for role, path in [*(("scans", p) for p, _ in entry.scans), *(("heldout", p) for p, _ in entry.heldout),
                       *((("label", entry.label),) if entry.label else ())]:
        try:
            shape = _check_file(path)
        except Exception as error:  # any reader error: the file is unreadable
            raise ValueError(f"subject '{entry.id}': field '{role}' file '{path}' cannot be read: "
                             f"{type(error).__name__}: {error}") from error
        shape = tuple(s for s in shape if s != 1) or shape
        shapes.setdefault(shape, []).append(path)
    if len(shapes) > 1:
        raise ValueError(f"subject '{entry.id}': files have different grids: "
                         + "; ".join(f"{list(k)}: {v}" for k, v in shapes.items()))
    voxels = 1
    for size in next(iter(shapes)):
        voxels *= size
    return voxels * len(entry.scans)


def subject_cost(entry: SubjectEntry) -> int:
    """Cost of fitting a subject: voxels x observed scans, the voxels read from the first scan's NIfTI/MGH header
    (other formats: its size in bytes, which orders subjects of one format the same way; 0 if unreadable)."""
    path = entry.scans[0][0]
    try:
        if path.endswith(_NIBABEL):
            import nibabel as nib

            voxels = 1
            for size in nib.load(path).shape:
                voxels *= int(size)
        else:
            voxels = os.path.getsize(path)
        return voxels * len(entry.scans)
    except Exception:
        return 0


def partition_subjects(
    subjects: Sequence[SubjectEntry],
    rank: int | None = None,
    world_size: int | None = None,
    costs: Sequence[float] | None = None,
) -> list[SubjectEntry]:
    """This rank's share of the subjects: MONAI's ``partition_dataset`` (round robin, no padding, no shuffle) over
    the subjects sorted by cost, largest first, so every rank gets about the same total cost; the share is in that
    order (largest first, which shortens the tail). The same on every rank for the same datalist and files.

    Args:
        subjects: the whole cohort.
        rank, world_size: default from :func:`dist_env`.
        costs: per subject; default :func:`subject_cost` (voxels x scans).
    """
    from monai.data import partition_dataset

    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"partition_subjects: rank must be in [0, {world_size}), got {rank}.")
    subjects = list(subjects)
    costs = [subject_cost(s) for s in subjects] if costs is None else list(costs)
    if len(costs) != len(subjects):
        raise ValueError(f"partition_subjects: {len(costs)} costs for {len(subjects)} subjects.")
    order = sorted(range(len(subjects)), key=lambda i: (-costs[i], subjects[i].id))
    if world_size == 1:
        return [subjects[i] for i in order]
    shares = partition_dataset(order, num_partitions=world_size, shuffle=False, even_divisible=False)
    return [subjects[i] for i in shares[rank]]


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


def marker_path(folder: str, stage: str) -> str:
    return os.path.join(folder, f"done_{stage}.json")


def read_marker(folder: str, stage: str) -> dict | None:
    """The done-marker of a subject's stage, or None if absent or unreadable."""
    try:
        with open(marker_path(folder, stage)) as handle:
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


@contextlib.contextmanager
def subject_lock(folder: str, stage: str) -> Iterator[bool]:
    """Hold ``<folder>/.noder_<stage>.lock`` (non-blocking ``flock``); yields False if another process holds it."""
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, f".noder_{stage}.lock"), "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


_TOKENS = {"calls": 0}


def _store(world: int):
    """torchrun's key-value store (``MASTER_ADDR``, ``MASTER_PORT``; no process group)."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, _, _ = dist_env()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent_store, timeout=timedelta(hours=1),
                         wait_for_workers=False)


def _run_token(world: int) -> str:
    """A token every rank of this run shares: rank 0's, passed through torchrun's key-value store. Every rank calls
    this once per cohort run, in the same order."""
    token = uuid.uuid4().hex
    if world == 1:
        return token
    rank, _, _ = dist_env()
    _TOKENS["calls"] += 1
    store = _store(world)
    key = f"noder_monai/cohort_token/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{_TOKENS['calls']}"
    if rank == 0:
        store.set(key, token)
        return token
    return store.get(key).decode()


def wait_for_ranks(name: str, wait_s: float = 0.5) -> None:
    """Rank 0 waits until every rank of this ``torchrun`` run has called ``wait_for_ranks(name)``; other ranks
    only check in. Call it last, before exiting: torchrun stops every process as soon as one exits non-zero, so rank
    0, which exits with the cohort's failure count, must exit after the others finished their share. No-op outside
    torchrun."""
    rank, world, _ = dist_env()
    if world == 1:
        return
    store = _store(world)
    key = f"noder_monai/finished/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/{name}"
    store.add(key, 1)
    if rank != 0:
        return
    waited = 0.0
    while store.add(key, 0) < world:
        if waited % 600 < wait_s:
            logger.info("rank 0: waiting for the other ranks to finish %s", name)
        timer.sleep(wait_s)
        waited += wait_s


@dataclass
class CohortResult:
    """What :func:`run_cohort` did: ``records`` ``{id: record}`` (with ``status``), on rank 0 for the whole cohort,
    on other ranks for their share; ``failed`` the ids that failed (cohort-wide on rank 0)."""

    stage: str
    records: dict[str, dict] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    summary_path: str | None = None

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.records.items() if v.get("status") == "failed"]

    @property
    def exit_code(self) -> int:
        """Number of failed subjects, capped at 100 (0: all finished)."""
        return min(len(self.failed), 100)


def run_cohort(
    subjects: Sequence[SubjectEntry],
    stage: str,
    work: Callable[[SubjectEntry], Mapping[str, Any]],
    folder: Callable[[SubjectEntry], str],
    summary_dir: str | os.PathLike,
    config: Any,
    inputs: Callable[[SubjectEntry], tuple[Sequence[str], Any]],
    merge: Callable[[Sequence[SubjectEntry], dict[str, dict]], None] | None = None,
    check: Callable[[SubjectEntry], Any] | None = check_subject,
    legacy: Callable[[SubjectEntry, str], dict | None] | None = None,
    distributed: bool | None = None,
    wait_s: float = 1.0,
) -> CohortResult:
    """Run ``work`` once per subject of this rank's share; skip finished subjects; isolate failures; merge on rank 0.

    Args:
        subjects: the whole cohort (every rank passes the same list).
        stage: one of :data:`STAGES` (names the markers, locks and summary).
        work: does one subject and returns its JSON-able record, with ``"outputs"``: the files it wrote (their
            sizes go into the marker; a missing one later makes the subject redo).
        folder: the subject's folder (holds its marker and lock).
        summary_dir: where ``cohort_summary_<stage>.json``, ``cohort_failures/`` and the rank files go.
        config: JSON-able settings that change the result (hashed into the marker).
        inputs: ``(files, extra)`` of a subject whose bytes (and ``extra``) are hashed into the marker.
        merge: called on rank 0 at the end with the whole cohort and its records (write the cohort tables).
        check: up-front check of a subject's files, run over the share before any work; None skips it.
        legacy: for a subject without a valid marker, ``legacy(entry, folder)`` may return a record to keep it
            as finished anyway (outputs of a version without markers); None redoes such subjects.
        distributed: shard over torchrun's ranks; None: when ``WORLD_SIZE`` > 1.
        wait_s: rank 0's polling interval for the other ranks' result files.
    """
    if stage not in STAGES:
        raise ValueError(f"run_cohort: stage must be one of {STAGES}, got {stage!r}.")
    rank, world, _ = dist_env()
    if distributed is False:
        rank, world = 0, 1
    summary_dir = os.path.abspath(os.fspath(summary_dir))
    token = _run_token(world)
    subjects = list(subjects)
    costs = [subject_cost(s) for s in subjects]
    share = partition_subjects(subjects, rank, world, costs) if world > 1 else partition_subjects(subjects, 0, 1, costs)
    digest = config_hash(config)
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    logger.info("%s%s: %d of %d subject(s) in this share", tag, stage, len(share), len(subjects))

    records: dict[str, dict] = {}
    problems: dict[str, BaseException] = {}
    if check is not None:  # every file of the share before any work
        for entry in share:
            try:
                check(entry)
            except Exception as error:
                problems[entry.id] = error
    start = timer.perf_counter()
    worked, work_seconds = 0, 0.0
    for index, entry in enumerate(share):
        subject_folder = folder(entry)
        began = timer.perf_counter()
        if entry.id in problems:
            record = _failure(entry, stage, problems[entry.id], summary_dir)
        else:
            try:
                files, extra = inputs(entry)
                input_digest = files_hash(files, extra)
            except Exception as error:
                input_digest, record = None, _failure(entry, stage, error, summary_dir)
            if input_digest is not None:
                with subject_lock(subject_folder, stage) as held:
                    if not held:
                        record = {"status": "locked", "error": "another run holds this subject's lock"}
                    elif not (reasons := stale_reasons(read_marker(subject_folder, stage), digest, input_digest)):
                        record = {**read_marker(subject_folder, stage)["record"], "status": "skipped"}
                    elif legacy is not None and (kept := legacy(entry, subject_folder)) is not None:
                        record = {**kept, "status": "skipped"}
                    else:
                        if reasons != ["no done-marker"]:
                            logger.info("%s%s: redoing (%s)", tag, entry.id, "; ".join(reasons))
                        record = _work_one(entry, stage, work, subject_folder, summary_dir, digest, input_digest,
                                           config, rank)
        records[entry.id] = record
        elapsed = timer.perf_counter() - began
        if record["status"] in ("done", "failed"):
            worked, work_seconds = worked + 1, work_seconds + elapsed
        left = len(share) - index - 1
        eta = work_seconds / worked * left if worked else 0.0
        logger.info("%s%s %d/%d %s %s in %.1f s; elapsed %s, ETA %s", tag, stage, index + 1, len(share), entry.id,
                    record["status"], elapsed, _duration(timer.perf_counter() - start), _duration(eta))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    result = CohortResult(stage, records, rank, world)
    ranks = {str(rank): {"host": socket.gethostname(), "subjects": len(share), "worked": worked,
                         "seconds": round(timer.perf_counter() - start, 3), "peak_rss_mib": _peak_rss_mib()}}
    if world > 1:
        rank_file = os.path.join(summary_dir, ".cohort", f"{stage}_rank{rank}.json")
        write_json({"token": token, "rank": rank, **ranks[str(rank)], "records": records}, rank_file)
        if rank != 0:
            return result
        records, ranks = _gather(summary_dir, stage, token, world, wait_s)
    result.records = {entry.id: records.get(entry.id, {"status": "missing"}) for entry in subjects}
    counts = {status: sum(r.get("status") == status for r in result.records.values()) for status in _STATUSES}
    result.summary_path = write_json(
        {"stage": stage, "subjects": len(subjects), "world_size": world, "counts": counts, "ranks": ranks,
         "failed": [{"id": k, "error": v.get("error"), "traceback": v.get("traceback")}
                    for k, v in result.records.items() if v.get("status") == "failed"],
         "records": result.records},
        os.path.join(summary_dir, f"cohort_summary_{stage}.json"),
    )
    if merge is not None:
        merge(subjects, result.records)
    logger.info("%s: %s -> %s", stage, ", ".join(f"{n} {s}" for s, n in counts.items() if n), result.summary_path)
    for entry_id in result.failed:
        logger.error("%s failed: %s (%s)", entry_id, result.records[entry_id].get("error"),
                     result.records[entry_id].get("traceback"))
    return result


def _work_one(entry, stage, work, subject_folder, summary_dir, digest, input_digest, config, rank) -> dict:
    try:
        stale = read_marker(subject_folder, stage)
        if stale is not None:  # the marker is removed before any output changes
            os.remove(marker_path(subject_folder, stage))
        began = timer.perf_counter()
        record = dict(work(entry))
        outputs = [os.fspath(p) for p in record.pop("outputs", [])]
        record.update(status="done", seconds=round(timer.perf_counter() - began, 3), rank=rank)
        marker = {"format": MARKER_FORMAT, "subject": entry.id, "stage": stage, "config_hash": digest,
                  "input_hash": input_digest, "config": config,
                  "outputs": {path: os.path.getsize(path) for path in outputs}, "record": record,
                  "finished": timer.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(json.loads(json.dumps(marker, default=str)), marker_path(subject_folder, stage))
        return record
    except Exception as error:
        return _failure(entry, stage, error, summary_dir)


def _failure(entry: SubjectEntry, stage: str, error: BaseException, summary_dir: str) -> dict:
    path = os.path.join(summary_dir, "cohort_failures", f"{entry.id}_{stage}.txt")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    atomic_write(path, text.encode("utf-8"))
    logger.error("%s: %s failed: %s: %s (traceback: %s)", entry.id, stage, type(error).__name__, error, path)
    return {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": path}


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ``ru_maxrss`` in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _gather(summary_dir: str, stage: str, token: str, world: int, wait_s: float) -> tuple[dict[str, dict], dict]:
    records: dict[str, dict] = {}
    ranks: dict[str, dict] = {}
    pending = set(range(world))
    waited = 0.0
    while pending:
        for other in sorted(pending):
            try:
                with open(os.path.join(summary_dir, ".cohort", f"{stage}_rank{other}.json")) as handle:
                    document = json.load(handle)
            except (OSError, ValueError):
                continue
            if document.get("token") == token:
                records.update(document.pop("records"))
                ranks[str(other)] = {k: v for k, v in document.items() if k not in ("token", "rank")}
                pending.discard(other)
        if pending:
            if waited % 600 < wait_s:
                logger.info("rank 0: waiting for rank(s) %s to finish their share", sorted(pending))
            timer.sleep(wait_s)
            waited += wait_s
    return records, ranks


# --- the cohort tables (rank 0, from the per-subject files, so subjects finished by earlier runs are included) ---

def cohort_label_volumes(subjects: Sequence[SubjectEntry], prediction_dir: Callable[[SubjectEntry], str],
                         path: str) -> str | None:
    """``cohort_label_volumes.csv``: one row per subject and time, one ``volume_mm3_label<k>`` column per label,
    from every subject's ``label_volumes.csv``; None (nothing written) when no subject has one."""
    import csv

    rows, labels = [], set()
    for entry in subjects:
        source = os.path.join(prediction_dir(entry), "label_volumes.csv")
        if not os.path.isfile(source):
            continue
        by_time: dict[float, dict] = {}
        with open(source, newline="") as handle:
            for line in csv.DictReader(handle):
                label = int(float(line["label"]))
                labels.add(label)
                by_time.setdefault(float(line["time"]), {})[f"volume_mm3_label{label}"] = float(line["volume_mm3"])
        rows.extend({"subject": entry.id, "time": t, **v} for t, v in sorted(by_time.items()))
    if not rows:
        return None
    columns = ["subject", "time", *(f"volume_mm3_label{k}" for k in sorted(labels))]
    return write_csv(rows, columns, path)


def cohort_metrics(subjects: Sequence[SubjectEntry], metrics_file: Callable[[SubjectEntry], str], path: str,
                   metrics: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``cohort_metrics.csv``: one row per subject and held-out time (``subject, time, split, <metrics>``), from
    every subject's ``subject_metrics.json``. Returns ``(path or None, {id: that file's content})``."""
    rows, results = [], {}
    for entry in subjects:
        try:
            with open(metrics_file(entry)) as handle:
                result = json.load(handle)
        except (OSError, ValueError):
            continue
        results[entry.id] = result
        rows.extend({"subject": entry.id, **row} for row in result["scans"])
    if not rows:
        return None, results
    return write_csv(rows, ["subject", "time", "split", *metrics], path), results
