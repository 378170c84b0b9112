"""The evaluation's tables: held-out metrics per scan, split and cohort (JSON and markdown), NODER beside the two
baselines that move no anatomy, and structure volumes over time (``label_volumes.csv``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from noder_monai.data import SPLITS, SubjectEntry
from noder_monai.model import FittedSubject

__all__ = ["LABEL_VOLUME_COLUMNS", "METRICS", "appearance_table", "comparison_table", "heldout_rows", "label_volumes",
           "markdown_table", "mean_metrics", "metrics_report", "split_means"]

METRICS = ("nrmse", "ssim", "psnr", "percent_folded")
"""Held-out metrics of the evaluation report, in table order."""


def mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean of each metric over ``rows`` (None where no row has a value)."""
    means: dict[str, float | None] = {}
    for name in METRICS:
        values = [row[name] for row in rows if row[name] is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


def markdown_table(report: Mapping[str, Any]) -> str:
    """The metrics of ``metrics.json`` (:func:`metrics_report`) as a markdown table: one row per scan, per split and overall."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    lines = ["| subject | time | split | NRMSE | SSIM | PSNR (dB) | % folded |", "|---|---|---|---|---|---|---|"]
    for subject, result in report["subjects"].items():
        for row in result["scans"]:
            lines.append(f"| {subject} | {row['time']:g} | {row['split']} | "
                         + " | ".join(fmt(row[name]) for name in METRICS) + " |")
    for split, result in report["splits"].items():
        lines.append(f"| **{split}** (n={result['count']}) | | | " + " | ".join(fmt(result[name]) for name in METRICS)
                     + " |")
    overall = report["overall"]
    lines.append(f"| **overall** (n={overall['count']}) | | | " + " | ".join(fmt(overall[name]) for name in METRICS)
                 + " |")
    return "\n".join(lines) + "\n" + appearance_table(report)


def appearance_table(report: Mapping[str, Any]) -> str:
    """The appearance each subject's fit chose (``subject_metrics.json``'s ``appearance``) with its validation NRMSE
    (each observed scan after the first predicted from the others) beside the two intensity-only references, as
    markdown; empty when no subject records a choice."""
    rows = [(subject, result["appearance"]) for subject, result in report["subjects"].items()
            if result.get("appearance") and result["appearance"].get("errors")]
    if not rows:
        return ""
    lines = ["", "Appearance chosen per subject (validation NRMSE on its own observed scans, each predicted from the "
             "others):", "", "| subject | chosen | validation NRMSE | linear interpolation | nearest scan | |",
             "|---|---|---|---|---|---|"]
    for subject, choice in rows:
        references = choice["references"]
        flag = "" if choice["beats_references"] else "WARNING: not better than an intensity-only method"
        lines.append(f"| {subject} | {choice['source']} | {choice['errors'][choice['source']]:.4f} | "
                     f"{references['linear interpolation']:.4f} | {references['nearest scan']:.4f} | {flag} |")
    return "\n".join(lines) + "\n"


def heldout_rows(entry: SubjectEntry, values: Mapping[str, Sequence[float]]) -> list[dict]:
    """One row per held-out scan of ``entry`` (sorted by time): ``{"time", "split", "image", <metric>...}``, the
    metric values given per scan in that order (NaN/Inf or absent: None)."""
    scans = sorted(entry.heldout, key=lambda scan: scan[1])
    rows = []
    for index, (path, time) in enumerate(scans):
        row = {"time": time, "split": entry.split(time), "image": path}
        for name in METRICS:
            value = float(values[name][index]) if name in values else math.nan
            row[name] = value if math.isfinite(value) else None
        rows.append(row)
    return rows


def metrics_report(results: Mapping[str, Mapping[str, Any]], failed: Sequence[str] = ()) -> dict[str, Any]:
    """The cohort's ``metrics.json``: every subject's rows (``results``: id -> ``subject_metrics.json``), the means
    per split and overall, and the ids that failed."""
    all_rows = [row for result in results.values() for row in result["scans"]]
    report: dict[str, Any] = {"metrics": list(METRICS), "subjects": dict(results)}
    report["splits"] = {
        split: {"count": len(rows), **mean_metrics(rows)}
        for split in SPLITS
        if (rows := [row for row in all_rows if row["split"] == split])
    }
    report["overall"] = {"count": len(all_rows), **mean_metrics(all_rows)}
    report["failed"] = sorted(failed)
    return report


def split_means(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, float, float]]:
    """``(split, method, count, mean NRMSE, mean SSIM)`` per split and method of comparison rows (``{"split",
    "method", "nrmse", "ssim"}``), methods in their first order."""
    out = []
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for split in SPLITS:
        for method in methods:
            chosen = [row for row in rows if row["split"] == split and row["method"] == method]
            if chosen:
                out.append((split, method, len(chosen), float(np.mean([r["nrmse"] for r in chosen])),
                            float(np.mean([r["ssim"] for r in chosen]))))
    return out


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean held-out NRMSE / SSIM per split and method (comparison rows of any subjects) as markdown."""
    lines = ["| split | method | n | NRMSE (lower is better) | SSIM (higher is better) |", "|---|---|---|---|---|"]
    for split, method, count, n, s in split_means(rows):
        lines.append(f"| {split} | {method} | {count} | {n:.4f} | {s:.4f} |")
    return "\n".join(lines) + "\n"


LABEL_VOLUME_COLUMNS = ("time", "label", "voxels", "volume_mm3", "lower_mm3", "upper_mm3")
"""Columns of ``label_volumes.csv`` (the last two with uncertainty)."""


def label_volumes(subject: FittedSubject, labels: torch.Tensor, times: Sequence[float],
                  carried: torch.Tensor | None = None, uncertainty: bool = False) -> list[dict]:
    """Structure volumes over time: one row per time and non-zero label of the baseline label map ``labels``
    ``(*S)`` or ``(1, *S)``, the rows of ``label_volumes.csv`` (columns :data:`LABEL_VOLUME_COLUMNS`).

    ``volume_mm3`` is the structure's volume from the Jacobian determinant of the fitted map integrated over its
    baseline label (:meth:`FittedSubject.structure_volumes`: partial volumes, smooth in time; a 2D image stored with a
    singleton axis counts its slice thickness); with ``uncertainty`` it is the median of the calibrated 90 % band
    ``[lower_mm3, upper_mm3]``. ``voxels``, only with ``carried`` (the label map carried to each time, ``(Q, 1, *S)``
    from :meth:`FittedSubject.predict`), counts that map's voxels of the label, for reference.

    Raises:
        ValueError: as :meth:`FittedSubject.structure_volumes` (no ensemble with ``uncertainty``, labels that are not
            finite integers on the fitted grid).
    """
    times = [float(t) for t in times]
    volumes = subject.structure_volumes(times, labels, uncertainty)
    bands = ("lower", "upper") if uncertainty else ()
    rows = []
    for index, time in enumerate(times):
        counts = {}
        if carried is not None:
            values, numbers = torch.unique(carried[index].to(torch.int64), return_counts=True)
            counts = dict(zip(values.tolist(), numbers.tolist()))
        for column, label in enumerate(volumes["labels"]):
            row = {"time": time, "label": label, **({"voxels": counts.get(label, 0)} if carried is not None else {}),
                   "volume_mm3": round(float(volumes["volume"][index, column]), 6)}
            row.update({f"{band}_mm3": round(float(volumes[band][index, column]), 6) for band in bands})
            rows.append(row)
    return rows
