"""A self-contained HTML report per fitted subject, and an index page for a cohort.

Each page embeds its matplotlib figures as base64 PNG (no external file, script, style sheet or URL), in five
sections: observed / predicted / difference per time point, the Jacobian determinant over the anatomy, each
structure's volume over time, the loss curve, and the held-out metrics (NODER beside the nearest observed scan and
linear intensity interpolation). ``noder report OUTPUT_DIR`` writes them for a finished run::

    <output_dir>/<id>/report.html      one page per subject
    <output_dir>/report.html           the index (links to the subject pages, mean held-out metrics)
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from noder_monai.utils import PathLike, atomic_write

__all__ = ["SECTIONS", "HTMLReportHandler", "subject_report", "cohort_report", "heldout_comparison", "comparison_table"]

logger = logging.getLogger(__name__)

SECTIONS = (
    "Observed, predicted and difference",
    "Jacobian determinant over the anatomy",
    "Structure volumes over time",
    "Loss curve",
    "Held-out metrics",
)
"""Section titles of a subject page, in page order (each but the last holds one figure)."""

_MAX_ROWS = 8
_MAX_STRUCTURES = 6
_STYLE = """
body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
figure{margin:0}figure img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.note{color:#555}.best{font-weight:bold}
"""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ImportError("the HTML report needs matplotlib: pip install matplotlib") from error
    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _slice(volume: torch.Tensor) -> np.ndarray:
    """``(1, *S)`` or ``(*S)`` -> the 2D array shown: the middle slice of the last axis, first axis horizontal."""
    array = volume.detach().cpu().to(torch.float64).numpy()
    array = array[0] if array.ndim in (3, 4) and array.shape[0] == 1 else array
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2]
    return np.flipud(array.T)


def _pick(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def _kind(time: float, observed: Sequence[float], heldout: Sequence[float]) -> str:
    if time in observed:
        return "observed"
    split = "interpolation" if observed[0] <= time <= observed[-1] else "extrapolation"
    return f"held out, {split}" if time in heldout else split


def _images_figure(times, kinds, observed, predicted, start):
    """Rows: times; columns: observed, predicted, predicted - observed, and predicted - predicted at the first time
    (``start``: ``(1, *S)``), the change the fitted trajectory carries (free of scan noise)."""
    plt = _pyplot()
    rows = len(times)
    shown_obs = [_slice(v) for v in observed]
    shown_pred = [_slice(v) for v in predicted]
    first = _slice(start)
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


def _jacobian_figure(times, images, jacobians, kinds=None):
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    count = len(times)
    figure, axes = plt.subplots(1, count, figsize=(3.2 * count + 1.0, 3.6), squeeze=False)
    values = np.concatenate([_slice(j).ravel() for j in jacobians])  # window from every voxel shown
    spread = float(np.percentile(np.abs(values - 1.0), 99.5)) or 0.05
    norm = TwoSlopeNorm(vmin=max(1.0 - spread, 1e-3), vcenter=1.0, vmax=1.0 + spread)
    overlay = None
    for index in range(count):
        anatomy = _slice(images[index])
        low, high = np.percentile(anatomy, [1, 99.5])
        axes[0, index].imshow(anatomy, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        inside = anatomy > low + 0.1 * (high - low)  # the overlay stays on the anatomy, not the background
        shown = np.ma.masked_where(~inside, _slice(jacobians[index]))
        # det J of the pull-back map (time t's grid -> first scan): < 1 where the tissue grew, so red is low
        overlay = axes[0, index].imshow(shown, cmap="RdBu", norm=norm, alpha=0.6, interpolation="nearest")
        axes[0, index].set_title(f"t = {times[index]:g}" + (f" ({kinds[index]})" if kinds else ""), fontsize=10)
        axes[0, index].set_xticks([])
        axes[0, index].set_yticks([])
    figure.colorbar(overlay, ax=axes[0].tolist(), fraction=0.03, pad=0.02,
                    label="det J  (red < 1: grew, blue > 1: shrank)")
    return figure


def _volumes_figure(grid, volumes, observed, heldout, names):
    plt = _pyplot()
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


def _loss_figure(history: Sequence[Mapping[str, Any]]):
    plt = _pyplot()
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


def _nrmse(prediction: torch.Tensor, target: torch.Tensor) -> list[float]:
    from noder_monai.metrics import nrmse

    return [float(v) for v in nrmse(prediction, target)]


def _ssim(prediction: torch.Tensor, target: torch.Tensor) -> list[float]:
    from noder_monai.metrics import ssim

    return [float(v) for v in ssim(prediction, target)]


def heldout_comparison(subject: Any, entry: Any, reader: str | None = None) -> list[dict]:
    """NRMSE and SSIM at each held-out scan of ``entry`` for NODER, the nearest observed scan and linear intensity
    interpolation (the two baselines that move no anatomy). Returns ``[]`` when the subject has no held-out scans.

    Returns:
        ``[{"time", "split", "method", "nrmse", "ssim"}, ...]``.
    """
    from noder_monai.baselines import linear_interpolation, nearest_scan
    from noder_monai.io import load_image

    if not entry.heldout:
        return []
    scans = sorted(entry.heldout, key=lambda scan: scan[1])
    times = [t for _, t in scans]
    target = torch.stack([load_image(path, reader)[0] for path, _ in scans])
    sequence = entry.load(reader)
    predictions = {
        "NODER": subject.predict(times).images,
        "nearest observed scan": nearest_scan(sequence.images, sequence.times, times),
        "linear interpolation": linear_interpolation(sequence.images, sequence.times, times),
    }
    first, last = entry.times[0], entry.times[-1]
    rows = []
    for method, images in predictions.items():
        for t, n, s in zip(times, _nrmse(images, target), _ssim(images, target)):
            rows.append({"time": t, "split": "interpolation" if first <= t <= last else "extrapolation",
                         "method": method, "nrmse": n, "ssim": s})
    return rows


def _split_means(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, float, float]]:
    out = []
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for split in ("interpolation", "extrapolation"):
        for method in methods:
            chosen = [row for row in rows if row["split"] == split and row["method"] == method]
            if chosen:
                out.append((split, method, len(chosen), float(np.mean([r["nrmse"] for r in chosen])),
                            float(np.mean([r["ssim"] for r in chosen]))))
    return out


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean held-out NRMSE / SSIM per split and method (:func:`heldout_comparison` rows, any subjects) as markdown."""
    lines = ["| split | method | n | NRMSE (lower is better) | SSIM (higher is better) |", "|---|---|---|---|---|"]
    for split, method, count, n, s in _split_means(rows):
        lines.append(f"| {split} | {method} | {count} | {n:.4f} | {s:.4f} |")
    return "\n".join(lines) + "\n"


def _metrics_html(rows: Sequence[Mapping[str, Any]], folded: Mapping[float, Any], per_scan: bool = True) -> str:
    if not rows:
        return ('<p class="note">No held-out scans: add "heldout" scans to the datalist to score '
                'predictions against scans the fit did not see.</p>')
    means = _split_means(rows)
    parts = ['<table><tr><th class="l">split</th><th class="l">method</th><th>n</th><th>NRMSE (lower is better)</th>'
             '<th>SSIM (higher is better)</th></tr>']
    for split in dict.fromkeys(m[0] for m in means):
        chosen = [m for m in means if m[0] == split]
        best_n, best_s = min(m[3] for m in chosen), max(m[4] for m in chosen)
        for _, method, count, n, s in chosen:
            parts.append(f'<tr><td class="l">{split}</td><td class="l">{html.escape(method)}</td><td>{count}</td>'
                         f'<td class="{"best" if n == best_n else ""}">{n:.4f}</td>'
                         f'<td class="{"best" if s == best_s else ""}">{s:.4f}</td></tr>')
    parts.append("</table>")
    if not per_scan:
        return "\n".join(parts)
    parts.append("<p></p><table><tr><th>time</th><th class=\"l\">split</th><th class=\"l\">method</th>"
                 "<th>NRMSE</th><th>SSIM</th><th>% folded</th></tr>")
    for row in rows:
        fold = folded.get(row["time"]) if row["method"] == "NODER" else None
        parts.append(f'<tr><td>{row["time"]:g}</td><td class="l">{row["split"]}</td>'
                     f'<td class="l">{html.escape(row["method"])}</td><td>{row["nrmse"]:.4f}</td>'
                     f'<td>{row["ssim"]:.4f}</td><td>{"" if fold is None else f"{fold:.3g}"}</td></tr>')
    parts.append("</table>")
    return "\n".join(parts)


def _figure_html(title: str, png: str | None, caption: str) -> str:
    body = (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>") if png else f'<p class="note">{html.escape(caption)}</p>'
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _entries(output_dir: str, datalist: PathLike | None) -> list:
    from noder_monai.workflows.bundle import datalist_subjects

    if datalist is None:
        datalist = os.path.join(output_dir, "datalist.json")
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"no datalist given and '{datalist}' not found: pass the datalist the run used.")
    return datalist_subjects(datalist)


def subject_report(
    output_dir: PathLike,
    entry: Any,
    eval_dir: PathLike | None = None,
    device: str | torch.device = "cpu",
    reader: str | None = None,
    comparison: list[dict] | None = None,
) -> str:
    """Write ``<output_dir>/<id>/report.html`` for one fitted subject of the datalist (a ``SubjectEntry``).

    Args:
        output_dir: the folder ``noder fit`` wrote to (holds ``<id>/model.pt`` and ``<id>/loss.json``).
        entry: the subject's datalist entry (scans, optional label, held-out scans, predict_times).
        eval_dir: folder of ``noder evaluate``'s outputs (default ``<output_dir>/eval``): the % folded voxels of
            ``<eval_dir>/<id>/subject_metrics.json`` are shown when present.
        device: torch device for the predictions the figures show.
        reader: image reader.
        comparison: :func:`heldout_comparison` rows if already computed.

    Returns:
        the page's path.
    """
    from noder_monai.io import load_image
    from noder_monai.model.subject import FittedSubject

    output_dir = os.path.abspath(os.fspath(output_dir))
    folder = os.path.join(output_dir, entry.id)
    subject = FittedSubject.load(os.path.join(folder, "model.pt"), map_location=device)
    observed = [float(t) for t in entry.times]
    heldout = sorted(float(t) for _, t in entry.heldout)
    scans = sorted([(t, p) for p, t in entry.scans] + [(t, p) for p, t in entry.heldout])
    rows = _pick(len(scans), _MAX_ROWS)
    times = [scans[i][0] for i in rows]
    targets = torch.stack([load_image(scans[i][1], reader)[0] for i in rows])
    kinds = [_kind(t, observed, heldout) for t in times]
    prediction = subject.predict([observed[0], *times])
    figure = _images_figure(times, kinds, targets, prediction.images[1:], prediction.images[0])
    sections = [_figure_html(SECTIONS[0], _png(figure),
                             "Middle slice of the last axis. Rows: scan times (observed scans were fitted; held-out "
                             "scans were not). The grey columns share one window. Predicted - observed is mostly the "
                             "scans' own noise; the last column is what the fitted trajectory changed since the "
                             "first scan.")]

    extra = sorted({*entry.predict_times, *heldout})
    later = [t for t in extra if t > observed[-1]]
    jac_times = sorted({observed[len(observed) // 2], observed[-1], *(later[-1:] if later else [])})
    jac = subject.predict(jac_times)
    jac_kinds = [_kind(t, observed, heldout) for t in jac_times]
    sections.append(_figure_html(SECTIONS[1], _png(_jacobian_figure(jac_times, jac.images, jac.jacobians, jac_kinds)),
                                 "Jacobian determinant of the map from each time's grid back to the first scan (the values of "
                                 "jacobian_t<time>.nii.gz), over the predicted anatomy (middle slice): below 1 (red) "
                                 "where the tissue there occupies more volume than in the first scan, above 1 (blue) "
                                 "where it occupies less, 1 (white) no change."))

    end = max([observed[-1], *extra])
    grid = np.unique(np.concatenate([np.linspace(observed[0], end, 25), observed, heldout]))
    if entry.label is not None:
        labels, _ = load_image(entry.label, reader)
        carried = subject.predict(grid.tolist(), labels=labels).labels
        voxel_ml = abs(float(torch.det(subject.affine[:3, :3].to(torch.float64)))) / 1000.0
        values = [int(v) for v in torch.unique(labels.to(torch.int64)).tolist() if v != 0]
        sizes = {v: int((labels.to(torch.int64) == v).sum()) for v in values}
        chosen = sorted(sorted(values, key=lambda v: -sizes[v])[:_MAX_STRUCTURES])
        volumes = {f"label {v}": [float((frame.to(torch.int64) == v).sum()) * voxel_ml for frame in carried]
                   for v in chosen}
        png = _png(_volumes_figure(grid, volumes, observed, heldout, list(volumes)))
        caption = (f"Volume of each structure of the first scan's label map ({len(chosen)} largest of "
                   f"{len(values)}) along the fitted trajectory; dots: observed times; purple bands: held-out times; "
                   f"orange: extrapolation beyond the last scan.")
    else:
        png, caption = None, ("No label map in the datalist ('label' on the first scan's grid): structure volumes "
                              "over time need one.")
    sections.append(_figure_html(SECTIONS[2], png, caption))

    history = subject.history
    loss_path = os.path.join(folder, "loss.json")
    if os.path.isfile(loss_path):
        with open(loss_path, encoding="utf-8") as handle:
            history = json.load(handle)
    sections.append(_figure_html(SECTIONS[3], _png(_loss_figure(history)) if history else None,
                                 "Total loss and its similarity term per epoch; dotted lines: resolution changes."))

    folded: dict[float, Any] = {}
    metrics_path = os.path.join(os.fspath(eval_dir) if eval_dir else os.path.join(output_dir, "eval"), entry.id,
                                "subject_metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as handle:
            for row in json.load(handle).get("scans", []):
                folded[float(row["time"])] = row.get("percent_folded")
    if comparison is None:
        comparison = heldout_comparison(subject, entry, reader)
    sections.append(f"<section><h2>{SECTIONS[4]}</h2>\n{_metrics_html(comparison, folded)}\n</section>")

    header = (f'<p>{len(observed)} observed scans at times {", ".join(f"{t:g}" for t in observed)}'
              + (f'; held out: {", ".join(f"{t:g}" for t in heldout)}' if heldout else "")
              + f"; fitted {len(history)} epochs; predictions from the {html.escape(subject.default_source)}.</p>")
    path = atomic_write(os.path.join(folder, "report.html"),
                        _page(f"NODER report: {entry.id}", header + "\n".join(sections)).encode("utf-8"))
    logger.info("%s: report -> %s", entry.id, path)
    return path


def cohort_report(
    output_dir: PathLike,
    datalist: PathLike | None = None,
    eval_dir: PathLike | None = None,
    device: str | torch.device = "cpu",
    reader: str | None = None,
) -> dict[str, Any]:
    """Write every fitted subject's page and the index ``<output_dir>/report.html`` (links and held-out means).

    Subjects of the datalist without ``<output_dir>/<id>/model.pt`` are listed as not fitted. Under ``torchrun``
    each rank draws the pages of its share of the subjects (the same cost-balanced share as the fit,
    :func:`~noder_monai.workflows.cohort.partition_subjects`) and rank 0 writes the index.

    Args:
        output_dir: the folder ``noder fit`` wrote to.
        datalist: the run's datalist (default: ``<output_dir>/datalist.json``, which ``noder fit`` writes for
            scans, cine and BIDS inputs).
        eval_dir: as for :func:`subject_report`.
        device: torch device for the figures' predictions.
        reader: image reader.

    Returns:
        ``{"index": path, "pages": {id: path}, "comparison": rows of every subject}``; on ranks other than 0,
        ``index`` is None and ``pages`` and ``comparison`` cover the rank's share.
    """
    from noder_monai.workflows.cohort import dist_env, partition_subjects
    from noder_monai.model.subject import FittedSubject

    output_dir = os.path.abspath(os.fspath(output_dir))
    entries = _entries(output_dir, datalist)
    rank, world, _ = dist_env()
    share = {entry.id for entry in partition_subjects(entries, rank, world)}
    pages: dict[str, str] = {}
    all_rows: list[dict] = []
    items = []
    for entry in entries:
        if not os.path.isfile(os.path.join(output_dir, entry.id, "model.pt")):
            items.append(f"<li>{html.escape(entry.id)}: not fitted</li>")
            continue
        if entry.id not in share and rank != 0:
            continue
        rows = heldout_comparison(FittedSubject.load(os.path.join(output_dir, entry.id, "model.pt")), entry, reader)
        if entry.id in share:
            pages[entry.id] = subject_report(output_dir, entry, eval_dir, device, reader, comparison=rows)
        all_rows.extend({**row, "subject": entry.id} for row in rows)
        items.append(f'<li><a href="{html.escape(entry.id)}/report.html">{html.escape(entry.id)}</a>: '
                     f"{len(entry.scans)} scans, {len(entry.heldout)} held out</li>")
    if rank != 0:
        return {"index": None, "pages": pages, "comparison": all_rows}
    body = f"<section><h2>Subjects</h2><ul>{''.join(items)}</ul></section>"
    body += (f"<section><h2>Held-out metrics (mean over all subjects' held-out scans)</h2>\n"
             f"{_metrics_html(all_rows, {}, per_scan=False)}\n<p class=\"note\">Per scan: each subject's page."
             f"</p></section>")
    index = atomic_write(os.path.join(output_dir, "report.html"),
                         _page(f"NODER cohort report: {len(pages)} subject(s)", body).encode("utf-8"))
    return {"index": index, "pages": pages, "comparison": all_rows}


class HTMLReportHandler:
    """Write the subject's ``report.html`` (:func:`subject_report`) when a MONAI evaluation run completes; the
    bundle's ``evaluate.json`` attaches it to its evaluator.

    A failure to draw the report (e.g. matplotlib missing) is logged as an error and does not fail the evaluation,
    whose metrics are already saved.

    Args:
        output_dir: the folder the fit wrote ``<id>/model.pt`` to.
        subject: the subject's datalist entry (``SubjectEntry``).
        eval_dir: as for :func:`subject_report`.
        enabled: False attaches nothing.
    """

    def __init__(self, output_dir: PathLike, subject: Any, eval_dir: PathLike | None = None, enabled: bool = True) -> None:
        self.output_dir = os.fspath(output_dir)
        self.subject = subject
        self.eval_dir = None if eval_dir is None else os.fspath(eval_dir)
        self.enabled = bool(enabled)
        self.path: str | None = None

    def attach(self, engine: Any) -> None:
        if not self.enabled:
            return
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        try:
            self.path = subject_report(self.output_dir, self.subject, self.eval_dir)
        except Exception:  # the metrics are saved; the page is a view of them
            logger.exception("%s: the HTML report could not be written", getattr(self.subject, "id", self.subject))
