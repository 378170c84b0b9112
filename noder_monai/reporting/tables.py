"""The evaluation report: the metrics table in markdown and a montage per subject (observed, predicted, difference)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from noder_monai.utils import PathLike, atomic_write

__all__ = ["METRICS", "markdown_table", "save_montage", "mean_metrics"]

METRICS = ("nrmse", "ssim", "psnr", "percent_folded")
"""Held-out metrics of the evaluation report, in table order."""


def _middle_slice(volume: torch.Tensor) -> np.ndarray:
    """``(1, *S)`` -> 2D array for display: the middle slice of the last axis (3D), first axis horizontal, second up."""
    array = volume[0].detach().cpu().to(torch.float64).numpy()
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2]
    return np.flipud(array.T)


def save_montage(observed: torch.Tensor, predicted: torch.Tensor, path: PathLike, times: Sequence[float] | None = None) -> PathLike:
    """Write a PNG montage with matplotlib: rows = time points; columns observed, predicted (same grey window) and
    predicted - observed (blue negative, red positive, symmetric window); the middle slice of the last axis.

    Args:
        observed: ``(T, 1, *S)`` held-out scans.
        predicted: ``(T, 1, *S)`` predictions at the same times.
        path: the PNG file (written atomically).
        times: row titles.

    Raises:
        ImportError: naming the package, if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ImportError("the montage needs matplotlib: pip install matplotlib (or montage=False)") from error
    if observed.shape != predicted.shape or observed.shape[0] < 1:
        raise ValueError(f"observed and predicted must have one equal (T, 1, *S) shape, got {tuple(observed.shape)} "
                         f"and {tuple(predicted.shape)}.")
    shown_obs = [_middle_slice(v) for v in observed]
    shown_pred = [_middle_slice(v) for v in predicted]
    low, high = np.percentile(np.concatenate([s.ravel() for s in shown_obs]), [1, 99])
    differences = [p - o for p, o in zip(shown_pred, shown_obs)]
    limit = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in differences])), 99)) or 1.0
    rows = len(shown_obs)
    figure, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for row, (obs, pred, diff) in enumerate(zip(shown_obs, shown_pred, differences)):
        for column, (image, options) in enumerate(
            [(obs, {"cmap": "gray", "vmin": low, "vmax": high}), (pred, {"cmap": "gray", "vmin": low, "vmax": high}),
             (diff, {"cmap": "bwr", "vmin": -limit, "vmax": limit})]
        ):
            axes[row, column].imshow(image, interpolation="nearest", **options)
            axes[row, column].set_axis_off()
        if times is not None:
            axes[row, 0].text(-0.04, 0.5, f"t = {times[row]:g}", transform=axes[row, 0].transAxes, fontsize=8,
                              rotation=90, ha="right", va="center")
    for column, title in enumerate(("observed", "predicted", "predicted - observed")):
        axes[0, column].set_title(title, fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
    plt.close(figure)
    return path


def mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    means: dict[str, float | None] = {}
    for name in METRICS:
        values = [row[name] for row in rows if row[name] is not None]
        means[name] = float(np.mean(values)) if values else None
    return means


def markdown_table(report: Mapping[str, Any]) -> str:
    """The metrics of :func:`evaluate`'s report as a markdown table: one row per scan, per split and overall."""
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
    return "\n".join(lines) + "\n"


