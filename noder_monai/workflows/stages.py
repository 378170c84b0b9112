"""The three stages, one name each, and what each does over a cohort (:class:`Job`).

========== ============================ =========================== ===================== ==============
stage      Python                       ``noder`` verb              bundle config / run   MONAI type
========== ============================ =========================== ===================== ==============
training   :func:`~.jobs.train`         ``noder fit``               ``train.json``,       ``train``
                                                                    ``run training``
inference  :func:`~.jobs.infer`         ``noder predict``           ``inference.json``,   ``infer``
                                                                    ``run inference``
evaluation :func:`~.jobs.evaluate`      ``noder evaluate``          ``+ evaluate.json``,  ``infer``
                                                                    ``run evaluation``
========== ============================ =========================== ===================== ==============

The stage name is the one in done-markers (``done_<stage>.json``), summaries (``cohort_summary_<stage>.json``),
locks, failure files and log lines. The ``noder`` verbs keep the words users know (fit a subject, predict at a
time); this table is their one translation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from noder_monai.data import SubjectEntry
from noder_monai.reporting.tables import METRICS, markdown_table, metrics_report
from noder_monai.utils import atomic_write, read_csv, read_json, write_csv, write_json
from noder_monai.workflows.paths import SubjectPaths

__all__ = ["STAGES", "EvaluationJob", "InferenceJob", "Job", "TrainingJob", "cohort_label_volumes"]

logger = logging.getLogger(__name__)

STAGES = ("training", "inference", "evaluation")

Work = Callable[[SubjectEntry], Mapping[str, Any]]
"""Does one subject's stage and returns its JSON-able record, with ``"outputs"``: the files it wrote (their sizes
go into the done-marker; a missing one later makes the subject redo)."""


@dataclass
class Job:
    """One stage over a cohort: what :func:`~noder_monai.workflows.cohort.run_cohort` asks of each subject.

    Args:
        output_dir: the run's output folder.
        work: does one subject (:data:`Work`): the ``noder`` functions of :mod:`~noder_monai.workflows.subject`,
            or ``CohortWorkflow``'s run of the bundle config.
        config: JSON-able settings that change the result (hashed into the done-markers).
        eval_dir: the evaluation's folder.
    """

    output_dir: str
    work: Work
    config: Any = None
    eval_dir: str | None = None
    stage: ClassVar[str] = ""

    def paths(self, entry: SubjectEntry) -> SubjectPaths:
        return SubjectPaths(self.output_dir, entry.id, self.eval_dir)

    @property
    def summary_dir(self) -> str:
        """Where ``cohort_summary_<stage>.json``, ``cohort_failures/`` and the cohort tables go."""
        return self.output_dir

    def folder(self, entry: SubjectEntry) -> str:
        """The subject's folder: it holds the done-marker and the lock."""
        return self.paths(entry).folder

    def check(self, entry: SubjectEntry) -> None:
        """The up-front check of a subject, before any work: every file readable, one grid."""
        entry.check_files()

    def inputs(self, entry: SubjectEntry) -> tuple[list[str], Any]:
        """``(files, extra)`` whose bytes (and ``extra``) are hashed into the done-marker."""
        raise NotImplementedError

    def keep(self, entry: SubjectEntry) -> dict | None:
        """A record to keep a subject without a valid done-marker as finished (None: do it)."""
        return None

    def merge(self, entries: Sequence[SubjectEntry], records: Mapping[str, dict]) -> None:
        """Rank 0, at the end: the cohort's tables from every subject's files (earlier runs' subjects included)."""


@dataclass
class TrainingJob(Job):
    """Training: fit every subject. ``skip_existing`` also keeps a ``model.pt`` without a done-marker (an older
    version's output) while it still matches the datalist's scans and times."""

    skip_existing: bool = False
    stage: ClassVar[str] = "training"

    def inputs(self, entry: SubjectEntry) -> tuple[list[str], Any]:
        return [path for path, _ in entry.scans], entry.times

    def keep(self, entry: SubjectEntry) -> dict | None:
        paths = self.paths(entry)
        if not self.skip_existing or not os.path.isfile(paths.model):
            return None
        try:
            paths.load_model(entry)
        except ValueError as error:
            logger.warning("%s: %s; fitting again", entry.id, error)
            return None
        return {"model": paths.model, "legacy": True}


@dataclass
class InferenceJob(Job):
    """Inference: predict every fitted subject at its query times (:meth:`SubjectEntry.query_times` with
    ``predict_times``); the merge writes ``<output_dir>/cohort_label_volumes.csv``."""

    predict_times: Sequence[float] | None = None
    stage: ClassVar[str] = "inference"

    def check(self, entry: SubjectEntry) -> None:
        entry.check_files()
        self.paths(entry).require_model()

    def inputs(self, entry: SubjectEntry) -> tuple[list[str], Any]:
        return [self.paths(entry).model, *([entry.label] if entry.label else [])], entry.query_times(self.predict_times)

    def merge(self, entries: Sequence[SubjectEntry], records: Mapping[str, dict]) -> None:
        cohort_label_volumes(entries, [self.paths(entry).label_volumes for entry in entries],
                             os.path.join(self.output_dir, "cohort_label_volumes.csv"))


@dataclass
class EvaluationJob(Job):
    """Evaluation: score every fitted subject with held-out scans; the merge writes ``<eval_dir>/metrics.json``,
    ``metrics.md`` and ``cohort_metrics.csv`` (one row per subject and held-out time) and keeps the report in
    :attr:`report`."""

    report: dict = field(default_factory=dict)
    stage: ClassVar[str] = "evaluation"

    @property
    def summary_dir(self) -> str:
        return os.fspath(self.eval_dir)

    def folder(self, entry: SubjectEntry) -> str:
        return self.paths(entry).evaluation

    def check(self, entry: SubjectEntry) -> None:
        entry.check_files()
        self.paths(entry).require_model()

    def inputs(self, entry: SubjectEntry) -> tuple[list[str], Any]:
        return [self.paths(entry).model, *(p for p, _ in entry.heldout)], [t for _, t in entry.heldout]

    def merge(self, entries: Sequence[SubjectEntry], records: Mapping[str, dict]) -> None:
        results = {}
        for entry in entries:
            result = read_json(self.paths(entry).subject_metrics)
            if result is not None:
                results[entry.id] = result
        rows = [{"subject": sid, **row} for sid, result in results.items() for row in result["scans"]]
        if rows:
            write_csv(rows, ["subject", "time", "split", *METRICS], os.path.join(self.summary_dir, "cohort_metrics.csv"))
        failed = [k for k, v in records.items() if v.get("status") == "failed"]
        self.report = metrics_report(results, failed)
        write_json(self.report, os.path.join(self.summary_dir, "metrics.json"))
        atomic_write(os.path.join(self.summary_dir, "metrics.md"), markdown_table(self.report).encode("utf-8"))


def cohort_label_volumes(entries: Sequence[SubjectEntry], sources: Sequence[str], path: str) -> str | None:
    """``cohort_label_volumes.csv``: one row per subject and time, one ``volume_mm3_label<k>`` column per label, from
    every subject's ``label_volumes.csv`` (``sources``, one per entry); None (nothing written) when none has one."""
    rows, labels = [], set()
    for entry, source in zip(entries, sources):
        table = read_csv(source)
        by_time: dict[float, dict] = {}
        for line in table:
            label = int(line["label"])
            labels.add(label)
            by_time.setdefault(float(line["time"]), {})[f"volume_mm3_label{label}"] = float(line["volume_mm3"])
        rows.extend({"subject": entry.id, "time": t, **v} for t, v in sorted(by_time.items()))
    if not rows:
        return None
    return write_csv(rows, ["subject", "time", *(f"volume_mm3_label{k}" for k in sorted(labels))], path)
