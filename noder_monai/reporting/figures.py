"""Figures of a subject (matplotlib, an optional dependency imported on first use): the montage of the evaluation
and the figures of the HTML report. Every figure shows the middle slice of the last axis of a 3D volume."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from noder_monai.utils import PathLike, atomic_write

__all__ = ["images_figure", "jacobian_figure", "loss_figure", "middle_slice", "png", "pyplot", "save_montage",
           "uncertainty_figure", "volumes_figure"]


def pyplot(purpose: str = "the HTML report") -> Any:
    """matplotlib's ``pyplot`` on the Agg backend, imported on first use: matplotlib is an optional dependency (the
    ``report`` extra) that only figures need.

    Raises:
        ImportError: naming the package and ``purpose``, if matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ImportError(f"{purpose} needs matplotlib: pip install matplotlib") from error
    return plt


def png(figure: Any) -> str:
    """The figure as base64 PNG text (for an ``<img src="data:...">``), without software metadata; closes it."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def middle_slice(volume: torch.Tensor) -> np.ndarray:
    """``(1, *S)`` or ``(*S)`` -> the 2D array shown: the middle slice of the last axis, first axis horizontal."""
    array = volume.detach().cpu().to(torch.float64).numpy()
    array = array[0] if array.ndim in (3, 4) and array.shape[0] == 1 else array
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2]
    return np.flipud(array.T)


def images_figure(times, kinds, observed, predicted, start):
    """Rows: times; columns: observed, predicted, predicted - observed, and predicted - predicted at the first time
    (``start``: ``(1, *S)``), the change the fitted trajectory carries (free of scan noise)."""
    plt = pyplot()
    rows = len(times)
    shown_obs = [middle_slice(v) for v in observed]
    shown_pred = [middle_slice(v) for v in predicted]
    first = middle_slice(start)
    low, high = np.percentile(np.concatenate([s.ravel() for s in shown_obs]), [1, 99.5])
    diffs = [p - o for p, o in zip(shown_pred, shown_obs)]
    changes = [p - first for p in shown_pred]
    limit = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in diffs + changes])), 99.5)) or 1.0
    figure, axes = plt.subplots(rows, 4, figsize=(10.0, 2.45 * rows + 0.9), squeeze=False,
                                gridspec_kw={"wspace": 0.04, "hspace": 0.08})
    grey = {"cmap": "gray", "vmin": low, "vmax": high, "interpolation": "nearest"}
    signed = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit, "interpolation": "nearest"}
    for row in range(rows):
        image_grey = axes[row, 0].imshow(shown_obs[row], **grey)
        axes[row, 1].imshow(shown_pred[row], **grey)
        image_signed = axes[row, 2].imshow(diffs[row], **signed)
        axes[row, 3].imshow(changes[row], **signed)
        for column in range(4):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(f"t = {times[row]:g}\n{kinds[row]}", fontsize=9)
    for column, title in enumerate(("observed scan", "predicted (NODER)", "predicted - observed",
                                    "predicted change since t = " + f"{times[0]:g}")):
        axes[0, column].set_title(title, fontsize=10)
    figure.colorbar(image_grey, ax=axes[:, :2].ravel().tolist(), orientation="horizontal", fraction=0.5 / rows,
                    pad=0.02, aspect=30, label="intensity (input units)")
    figure.colorbar(image_signed, ax=axes[:, 2:].ravel().tolist(), orientation="horizontal", fraction=0.5 / rows,
                    pad=0.02, aspect=30, label="difference (red: brighter, blue: darker)")
    return figure


def _overlay_figure(times, images, maps, kinds, options, label, anatomy_only):
    """One panel per time: the predicted image (grey, its own window) under a map drawn with ``options`` (imshow
    keyword arguments), only over the anatomy with ``anatomy_only``; one colour bar labelled ``label``."""
    plt = pyplot()
    count = len(times)
    figure, axes = plt.subplots(1, count, figsize=(3.2 * count + 1.0, 3.6), squeeze=False)
    overlay = None
    for index in range(count):
        anatomy = middle_slice(images[index])
        low, high = np.percentile(anatomy, [1, 99.5])
        axes[0, index].imshow(anatomy, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        shown = middle_slice(maps[index])
        if anatomy_only:  # the overlay stays on the anatomy, not the background
            shown = np.ma.masked_where(anatomy <= low + 0.1 * (high - low), shown)
        overlay = axes[0, index].imshow(shown, alpha=0.6, interpolation="nearest", **options)
        axes[0, index].set_title(f"t = {times[index]:g}" + (f" ({kinds[index]})" if kinds else ""), fontsize=10)
        axes[0, index].set_xticks([])
        axes[0, index].set_yticks([])
    figure.colorbar(overlay, ax=axes[0].tolist(), fraction=0.03, pad=0.02, label=label)
    return figure


def jacobian_figure(times, images, jacobians, kinds=None):
    pyplot()
    from matplotlib.colors import TwoSlopeNorm  # matplotlib is optional: see pyplot

    values = np.concatenate([middle_slice(j).ravel() for j in jacobians])  # window from every voxel shown
    spread = float(np.percentile(np.abs(values - 1.0), 99.5)) or 0.05
    norm = TwoSlopeNorm(vmin=max(1.0 - spread, 1e-3), vcenter=1.0, vmax=1.0 + spread)
    # det J of the pull-back map (time t's grid -> first scan): < 1 where the tissue grew, so red is low
    return _overlay_figure(times, images, jacobians, kinds, {"cmap": "RdBu", "norm": norm},
                           "det J  (red < 1: grew, blue > 1: shrank)", anatomy_only=True)


def uncertainty_figure(times, images, image_std, kinds=None):
    """The predictive standard deviation ``image_std`` ``(Q, 1, *S)`` over the predicted images ``(Q, 1, *S)``, one
    panel per time, one window (0 to the 99.5th percentile of every voxel shown)."""
    values = np.concatenate([middle_slice(s).ravel() for s in image_std])
    top = float(np.percentile(values, 99.5)) or 1.0
    return _overlay_figure(times, images, image_std, kinds, {"cmap": "magma", "vmin": 0.0, "vmax": top},
                           "standard deviation (input units)", anatomy_only=False)


def volumes_figure(grid, volumes, observed, heldout, names, bands=None):
    """One panel per structure: its volume curve over the time ``grid`` (``volumes``: name -> values), with the
    ``bands`` (name -> (lower, upper) values) filled when given."""
    plt = pyplot()
    count = len(names)
    columns = min(3, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.5), squeeze=False)
    grid = np.asarray(grid)
    for index, name in enumerate(names):
        axis = axes[index // columns, index % columns]
        curve = np.asarray(volumes[name])
        if grid[-1] > observed[-1]:
            axis.axvspan(observed[-1], grid[-1], color="tab:orange", alpha=0.12,
                         label="extrapolation" if index == 0 else None)
        width = 0.01 * (grid[-1] - grid[0] or 1.0)
        for k, t in enumerate(heldout):
            axis.axvspan(t - width, t + width, color="tab:purple", alpha=0.25,
                         label="held-out time" if index == 0 and k == 0 else None)
        if bands is not None:
            axis.fill_between(grid, bands[name][0], bands[name][1], color="tab:blue", alpha=0.2, linewidth=0,
                              label="90% band" if index == 0 else None)
        axis.plot(grid, curve, color="tab:blue", label="NODER" if index == 0 else None)
        marks = np.interp(observed, grid, curve)
        axis.plot(observed, marks, "o", color="black", markersize=4, label="observed time" if index == 0 else None)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("time")
        axis.set_ylabel("volume (ml)")
        axis.grid(alpha=0.3)
    for index in range(count, rows * columns):
        axes[index // columns, index % columns].set_axis_off()
    figure.legend(loc="lower center", ncol=4, fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return figure


def loss_figure(history: Sequence[Mapping[str, Any]]):
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.2))
    epochs = [record["epoch"] + 1 for record in history]
    axis.plot(epochs, [record["total"] for record in history], label="total")
    axis.plot(epochs, [record["similarity"] for record in history], label="similarity (NCC)", alpha=0.7)
    levels = [record.get("level") for record in history]
    for index in range(1, len(levels)):
        if levels[index] != levels[index - 1]:
            axis.axvline(epochs[index], color="grey", linestyle=":")
            axis.text(epochs[index], 0.02, f" level {levels[index]}", fontsize=8, va="bottom",
                      transform=axis.get_xaxis_transform())
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    axis.set_title(f"Loss curve ({len(history)} epochs; level = image voxels per fitted voxel)", fontsize=11)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    return figure


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
    plt = pyplot("the montage (or montage=False)")
    if observed.shape != predicted.shape or observed.shape[0] < 1:
        raise ValueError(f"observed and predicted must have one equal (T, 1, *S) shape, got {tuple(observed.shape)} "
                         f"and {tuple(predicted.shape)}.")
    shown_obs = [middle_slice(v) for v in observed]
    shown_pred = [middle_slice(v) for v in predicted]
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
