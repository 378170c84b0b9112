"""The HTML report of a finished run: every fitted subject's page and the cohort's index, each rank drawing the
pages of its share (``noder report``, and ``noder fit`` / ``noder evaluate`` at their end)."""

from __future__ import annotations

import os
from typing import Any

import torch

from noder_monai.data import datalist_subjects
from noder_monai.model import FittedSubject
from noder_monai.reporting.html import index_page, read_folded, subject_comparison, subject_report
from noder_monai.utils import PathLike
from noder_monai.workflows.paths import SubjectPaths
from noder_monai.workflows.shares import dist_env, partition_subjects

__all__ = ["cohort_report"]


def cohort_report(
    output_dir: PathLike,
    datalist: PathLike | None = None,
    eval_dir: PathLike | None = None,
    device: str | torch.device = "cpu",
    reader: str | None = None,
) -> dict[str, Any]:
    """Write every fitted subject's page and the index ``<output_dir>/report.html`` (links and held-out means).

    Subjects of the datalist without a fitted model are listed as not fitted. Under ``torchrun`` each rank draws the
    pages of its share of the subjects (the same cost-balanced share as the fit,
    :func:`~noder_monai.workflows.shares.partition_subjects`) and rank 0 writes the index, from the comparison rows
    every page returns (rank 0 computes the other ranks' rows without drawing their pages).

    Args:
        output_dir: the folder ``noder fit`` wrote to.
        datalist: the run's datalist (default: ``<output_dir>/datalist.json``, which ``noder fit`` writes for
            scans, cine and BIDS inputs).
        eval_dir: folder of ``noder evaluate``'s outputs (default ``<output_dir>/eval``): the % folded voxels of each
            ``<eval_dir>/<id>/subject_metrics.json`` are shown when present.
        device: torch device for the figures' predictions.
        reader: image reader.

    Returns:
        ``{"index": path, "pages": {id: path}, "comparison": rows of every subject}``; on ranks other than 0,
        ``index`` is None and ``pages`` and ``comparison`` cover the rank's share.

    Raises:
        FileNotFoundError: no datalist given and ``<output_dir>/datalist.json`` does not exist.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if datalist is None:
        datalist = os.path.join(output_dir, "datalist.json")
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"no datalist given and '{datalist}' not found: pass the datalist the run used.")
    entries = datalist_subjects(datalist)
    rank, world, _ = dist_env()
    share = {entry.id for entry in partition_subjects(entries, rank, world)}
    pages: dict[str, str] = {}
    rows: list[dict] = []
    for entry in entries:
        paths = SubjectPaths(output_dir, entry.id, eval_dir)
        if not os.path.isfile(paths.model) or (entry.id not in share and rank != 0):
            continue
        subject = FittedSubject.load(paths.model, map_location=device)
        if entry.id in share:
            pages[entry.id], comparison = subject_report(subject, entry, paths.report,
                                                         read_folded(paths.subject_metrics), reader)
        else:
            comparison = subject_comparison(subject, entry, reader)
        rows.extend({**row, "subject": entry.id} for row in comparison)
    if rank != 0:
        return {"index": None, "pages": pages, "comparison": rows}
    fitted = {entry.id: True for entry in entries if os.path.isfile(SubjectPaths(output_dir, entry.id).model)}
    index = index_page(os.path.join(output_dir, "report.html"), entries, fitted, rows)
    return {"index": index, "pages": pages, "comparison": rows}
