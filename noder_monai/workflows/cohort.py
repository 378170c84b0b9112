"""Run one stage over a cohort, across processes, GPUs and machines: :func:`run_cohort`.

Each rank of a ``torchrun`` (or the one process) takes its cost-balanced share of the subjects
(:func:`~noder_monai.workflows.shares.partition_subjects`) and runs them one after another; it

- checks every subject's files up front (readable, one grid) and records the unreadable ones as failed;
- skips a subject whose done-marker matches this config and these input files (:mod:`~noder_monai.workflows.markers`),
  so a rerun resumes;
- holds a lock per subject and stage, so two runs into one folder never write one subject at once: the second one
  reports it as ``locked`` and goes on;
- records a failing subject (id, error, traceback file ``<summary_dir>/cohort_failures/<id>_<stage>.txt``) and goes
  on;
- logs a progress line with an ETA per finished subject;
- at the end, rank 0 gathers every rank's records (:mod:`~noder_monai.workflows.gather`), writes
  ``<summary_dir>/cohort_summary_<stage>.json`` (one record per subject of the whole cohort, finished earlier or now)
  and runs the stage's merge (the cohort tables).

What a stage does per subject (its folder, input files, checks, work and merge) is a
:class:`~noder_monai.workflows.stages.Job`.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import socket
import sys
import time as timer
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from noder_monai.data import SubjectEntry
from noder_monai.utils import atomic_write, write_json
from noder_monai.workflows import markers
from noder_monai.workflows.gather import gather_shares, run_token, wait_for_ranks, write_share
from noder_monai.workflows.shares import dist_env, partition_subjects
from noder_monai.workflows.stages import STAGES, Job

__all__ = ["STATUSES", "CohortResult", "exit_status", "run_cohort"]

logger = logging.getLogger(__name__)

STATUSES = ("done", "skipped", "failed", "locked")
"""A subject's status after a cohort run."""
MAX_EXIT_CODE = 100


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


def exit_status(stage: str, records: Mapping[str, Mapping[str, Any]]) -> int:
    """The exit status of this process after a stage: the number of failed subjects (capped at 100) on rank 0, whose
    records cover the whole cohort, 0 on other ranks; rank 0 first waits until every rank finished (torchrun stops
    every process as soon as one exits non-zero). The one exit rule of the ``noder`` command and ``CohortWorkflow``.
    """
    wait_for_ranks(stage)
    if dist_env()[0] != 0:
        return 0
    return min(sum(record.get("status") == "failed" for record in records.values()), MAX_EXIT_CODE)


def run_cohort(subjects: Sequence[SubjectEntry], job: Job, distributed: bool | None = None,
               wait_s: float = 1.0) -> CohortResult:
    """Run ``job`` once per subject of this rank's share; skip finished subjects; isolate failures; merge on rank 0.

    Args:
        subjects: the whole cohort (every rank passes the same list).
        job: the stage's work per subject and its cohort merge (:class:`~noder_monai.workflows.stages.Job`).
        distributed: shard over torchrun's ranks; None: when ``WORLD_SIZE`` > 1.
        wait_s: rank 0's polling interval for the other ranks' result files.
    """
    if job.stage not in STAGES:
        raise ValueError(f"run_cohort: stage must be one of {STAGES}, got {job.stage!r}.")
    rank, world, _ = dist_env()
    if distributed is False:
        rank, world = 0, 1
    subjects = list(subjects)
    summary_dir = os.path.abspath(job.summary_dir)
    token = run_token(job.stage, summary_dir, world)
    share = partition_subjects(subjects, rank, world, [s.cost() for s in subjects])
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    logger.info("%s%s: %d of %d subject(s) in this share", tag, job.stage, len(share), len(subjects))
    records, counters = _run_share(share, job, summary_dir, rank, tag)
    result = CohortResult(job.stage, records, rank, world)
    if world > 1:
        write_share(summary_dir, job.stage, token, rank, {**counters, "records": records})
        if rank != 0:
            return result
        records, ranks = gather_shares(summary_dir, job.stage, token, world, wait_s)
    else:
        ranks = {"0": counters}
    result.records = {entry.id: records.get(entry.id, {"status": "missing"}) for entry in subjects}
    result.summary_path = _write_summary(result, summary_dir, ranks)
    job.merge(subjects, result.records)
    return result


def _run_share(share: Sequence[SubjectEntry], job: Job, summary_dir: str, rank: int,
               tag: str) -> tuple[dict[str, dict], dict]:
    """Every subject of this rank's share, in order; returns the records and this rank's counters."""
    problems = {}
    for entry in share:  # every file of the share before any work
        try:
            job.check(entry)
        except Exception as error:  # noqa: BLE001 - any unreadable input fails its subject, not the run
            problems[entry.id] = error
    digest = markers.config_hash(job.config)
    start = timer.perf_counter()
    records, worked, work_seconds = {}, 0, 0.0
    for index, entry in enumerate(share):
        began = timer.perf_counter()
        if entry.id in problems:
            record = _failure(entry, job.stage, problems[entry.id], summary_dir)
        else:
            try:
                record = _one_subject(entry, job, digest, summary_dir, rank, tag)
            except Exception as error:  # noqa: BLE001 - e.g. its lock file cannot be written: the others go on
                record = _failure(entry, job.stage, error, summary_dir)
        records[entry.id] = record
        elapsed = timer.perf_counter() - began
        if record["status"] in ("done", "failed"):
            worked, work_seconds = worked + 1, work_seconds + elapsed
        eta = work_seconds / worked * (len(share) - index - 1) if worked else 0.0
        logger.info("%s%s %d/%d %s %s in %.1f s; elapsed %s, ETA %s", tag, job.stage, index + 1, len(share), entry.id,
                    record["status"], elapsed, _duration(timer.perf_counter() - start), _duration(eta))
        _release_memory()
    counters = {"host": socket.gethostname(), "subjects": len(share), "worked": worked,
                "seconds": round(timer.perf_counter() - start, 3), "peak_rss_mib": _peak_rss_mib()}
    return records, counters


def _one_subject(entry: SubjectEntry, job: Job, digest: str, summary_dir: str, rank: int, tag: str) -> dict:
    """One subject: skipped when its marker proves it done, kept by ``job.keep``, else worked (under its lock)."""
    folder = job.folder(entry)
    try:
        files, extra = job.inputs(entry)
        input_digest = markers.files_hash(files, extra)
    except Exception as error:  # noqa: BLE001 - an unreadable input fails its subject
        return _failure(entry, job.stage, error, summary_dir)
    with markers.subject_lock(folder, job.stage) as held:
        if not held:
            return {"status": "locked", "error": "another run holds this subject's lock"}
        marker = markers.read_marker(folder, job.stage)
        if marker is not None and marker.get("subject") != entry.id:
            return _failure(entry, job.stage, ValueError(
                f"subject '{entry.id}': folder '{folder}' holds the {job.stage} outputs of subject "
                f"'{marker.get('subject')}' (ids that share one folder, e.g. differing only in letter case on this file "
                f"system); give the subjects distinct ids or another output_dir."), summary_dir)
        reasons = markers.stale_reasons(marker, digest, input_digest)
        if not reasons:
            return {**marker["record"], "status": "skipped"}
        kept = job.keep(entry)
        if kept is not None:
            return {**kept, "status": "skipped"}
        if reasons != ["no done-marker"]:
            logger.info("%s%s: redoing (%s)", tag, entry.id, "; ".join(reasons))
        return _work(entry, job, folder, (digest, input_digest), summary_dir, rank)


def _work(entry: SubjectEntry, job: Job, folder: str, digests: tuple[str, str], summary_dir: str, rank: int) -> dict:
    try:
        markers.remove_marker(folder, job.stage)  # before any output changes
        began = timer.perf_counter()
        record = dict(job.work(entry))
        outputs = [os.fspath(p) for p in record.pop("outputs", [])]
        record.update(status="done", seconds=round(timer.perf_counter() - began, 3), rank=rank)
        markers.write_marker(folder, job.stage, entry.id, digests, job.config, outputs, record)
        return record
    except Exception as error:  # noqa: BLE001 - a failing subject is recorded; the others go on
        return _failure(entry, job.stage, error, summary_dir)


def _failure(entry: SubjectEntry, stage: str, error: BaseException, summary_dir: str) -> dict:
    """The failed subject's record, its traceback written to ``cohort_failures/<id>_<stage>.txt``; never raises: when
    that file cannot be written either (e.g. the disk is full), the record says why and holds no traceback file."""
    path: str | None = os.path.join(summary_dir, "cohort_failures", f"{entry.id}_{stage}.txt")
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": path}
    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as write_error:
        record.update(traceback=None, traceback_error=str(write_error))
        logger.error("%s: %s", entry.id, write_error)
    logger.error("%s: %s failed: %s: %s (traceback: %s)", entry.id, stage, type(error).__name__, error,
                 record["traceback"] or "not written")
    return record


def _write_summary(result: CohortResult, summary_dir: str, ranks: dict) -> str:
    """``cohort_summary_<stage>.json``: counts, each rank's counters, the failures and every subject's record."""
    counts = {status: sum(r.get("status") == status for r in result.records.values()) for status in STATUSES}
    failed = [{"id": k, "error": v.get("error"), "traceback": v.get("traceback")}
              for k, v in result.records.items() if v.get("status") == "failed"]
    path = write_json({"stage": result.stage, "subjects": len(result.records), "world_size": result.world_size,
                       "counts": counts, "ranks": ranks, "failed": failed, "records": result.records},
                      os.path.join(summary_dir, f"cohort_summary_{result.stage}.json"))
    logger.info("%s: %s -> %s", result.stage, ", ".join(f"{n} {s}" for s, n in counts.items() if n), path)
    for entry_id in result.failed:
        logger.error("%s failed: %s (%s)", entry_id, result.records[entry_id].get("error"),
                     result.records[entry_id].get("traceback"))
    return path


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _release_memory() -> None:
    """Drop the finished subject's network and data before the next one (memory stays flat over a cohort)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ``ru_maxrss`` in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
