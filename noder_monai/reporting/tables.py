"""The evaluation's tables: held-out metrics per scan, split and cohort (JSON and markdown), NODER beside the two
baselines that move no anatomy, and structure volumes over time."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from noder_monai.data import SPLITS, SubjectEntry
from noder_monai.io import voxel_volume_mm3

__all__ = ["METRICS", "appearance_table", "comparison_table", "heldout_rows", "label_volumes", "markdown_table", "mean_metrics",
           "metrics_report", "split_means"]

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


def label_volumes(labels: torch.Tensor, times: Sequence[float], affine: Any) -> list[dict]:
    """Structure volumes over time: one row ``{"time", "label", "voxels", "volume_mm3"}`` per time and non-zero
    label of ``labels`` (Q, 1, *S), the voxel volume from ``affine`` (:func:`~noder_monai.io.voxel_volume_mm3`: a 2D
    image stored with a singleton axis counts its slice thickness)."""
    voxel_mm3 = voxel_volume_mm3(affine)
    rows = []
    for t, label_map in zip(times, labels):
        values, counts = torch.unique(label_map.to(torch.int64), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            if value != 0:
                rows.append({"time": t, "label": value, "voxels": count, "volume_mm3": round(count * voxel_mm3, 6)})
    return rows

