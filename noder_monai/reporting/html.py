"""A self-contained HTML report per fitted subject, and the index page of a cohort.

Each page embeds its matplotlib figures as base64 PNG (no external file, script, style sheet or URL), in the
sections of :data:`SECTIONS`: observed / predicted / difference per time point, the Jacobian determinant over the
anatomy, each structure's volume over time (from the Jacobian determinant, with its 90 % band when the subject has
an uncertainty ensemble), the loss curve, the held-out metrics (NODER beside the nearest observed scan and linear
intensity interpolation), the appearance choice and, with an ensemble, the predictive standard deviation map over
the predicted image. ``noder report OUTPUT_DIR`` writes them for a finished run
(:func:`~noder_monai.workflows.report.cohort_report`).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from noder_monai.baselines import linear_interpolation, nearest_scan
from noder_monai.data import SubjectEntry
from noder_monai.data.datalist import time_split
from noder_monai.io import load_image, load_label_map
from noder_monai.metrics import nrmse, ssim
from noder_monai.model import FittedSubject, load_fitted_subject
from noder_monai.model.loader import SubjectLike
from noder_monai.reporting.figures import (images_figure, jacobian_figure, loss_figure, png, uncertainty_figure,
                                           volumes_figure)
from noder_monai.reporting.tables import label_volumes, split_means
from noder_monai.utils import PathLike, atomic_write

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["SECTIONS", "HTMLReportHandler", "heldout_comparison", "index_page", "read_folded", "subject_comparison",
           "subject_report"]

logger = logging.getLogger(__name__)

SECTIONS = (
    "Observed, predicted and difference",
    "Jacobian determinant over the anatomy",
    "Structure volumes over time",
    "Loss curve",
    "Held-out metrics",
    "Appearance chosen for this subject",
    "Uncertainty of the predictions",
)
"""Section titles of a subject page, in page order (the first four hold one figure; the last holds one when the
subject has an uncertainty ensemble)."""

_MAX_ROWS = 8
_GRID_POINTS = 41  # the Jacobian-integrated curves are smooth; each point costs one inverse map per member
_MAX_STRUCTURES = 6
_STYLE = """
body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
figure{margin:0}figure img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.note{color:#555}.best{font-weight:bold}
"""


_IMAGES_CAPTION = ("Middle slice of the last axis. Rows: scan times (observed scans were fitted; held-out scans were "
                   "not). The grey columns share one window. Predicted - observed is mostly the scans' own noise; the "
                   "last column is what the fitted trajectory changed since the first scan.")
_JACOBIAN_CAPTION = ("Jacobian determinant of the map from each time's grid back to the first scan (the values of "
                     "jacobian_t<time>.nii.gz), over the predicted anatomy (middle slice): below 1 (red) where the "
                     "tissue there occupies more volume than in the first scan, above 1 (blue) where it occupies less, "
                     "1 (white) no change.")


def _pick(count: int, limit: int) -> list[int]:
    if count <= limit:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, limit)})


def _kind(time: float, observed: Sequence[float], heldout: Sequence[float]) -> str:
    if time in observed:
        return "observed"
    split = time_split(time, observed)
    return f"held out, {split}" if time in heldout else split


def _metrics_html(rows: Sequence[Mapping[str, Any]], folded: Mapping[float, Any], per_scan: bool = True) -> str:
    if not rows:
        return ('<p class="note">No held-out scans: add "heldout" scans to the datalist to score '
                'predictions against scans the fit did not see.</p>')
    means = split_means(rows)
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


def _figure_html(title: str, image: str | None, caption: str) -> str:
    body = (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{image}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>") if image else f'<p class="note">{html.escape(caption)}</p>'
    return f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>"


def _appearance_html(subject: FittedSubject) -> str:
    """The appearance choice of the fit: every candidate's validation NRMSE (each observed scan after the first
    predicted from the others) beside the intensity-only references, and a warning when NODER does not beat them."""
    choice = subject.source_choice
    if choice is None or not choice.errors:
        reason = "the fit was given a fixed source" if choice is None else "two scans leave none out to validate"
        return f"<section><h2>{SECTIONS[5]}</h2>\n<p class=\"note\">No validation: {reason}.</p>\n</section>"
    rows = [(name, value, name == choice.source) for name, value in choice.errors.items()]
    rows += [(f"{name} (intensity only)", value, False) for name, value in choice.references.items()]
    body = "".join(f'<tr><td class="l">{html.escape(name)}</td><td{" class=best" if best else ""}>{value:.4f}</td></tr>'
                   for name, value, best in rows)
    warning = "" if choice.beats_references else (
        '<p><b>Warning:</b> the chosen appearance does not predict this subject\'s own scans better than an '
        "intensity-only method; check the scans' alignment and the fit (loss curve) before using its predictions.</p>")
    floor = (f" Magnitude images: scans averaged in power with the background's noise power ({choice.noise_floor:.4g}) "
             "subtracted." if choice.noise_floor > 0 else "")
    return (f"<section><h2>{SECTIONS[5]}</h2>\n{warning}<p class=\"note\">Each observed scan after the first "
            f"predicted from the others; chosen: <b>{html.escape(choice.source)}</b> (lowest validation NRMSE).{floor}"
            f"</p>\n<table><tr><th class=\"l\">candidate</th><th>validation NRMSE</th></tr>{body}</table>\n</section>")


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def heldout_comparison(entry: SubjectEntry, observed: torch.Tensor, targets: torch.Tensor,
                       predicted: torch.Tensor) -> list[dict]:
    """NRMSE and SSIM at each held-out scan of ``entry`` for NODER, the nearest observed scan and linear intensity
    interpolation (the two baselines that move no anatomy).

    Args:
        entry: the subject (its observed and held-out times).
        observed: (T, 1, *S) the observed scans.
        targets: (H, 1, *S) the held-out scans, in time order.
        predicted: (H, 1, *S) NODER's predictions at those times.

    Returns:
        ``[{"time", "split", "method", "nrmse", "ssim"}, ...]``; ``[]`` when the subject has no held-out scans.
    """
    if not entry.heldout:
        return []
    times = sorted(t for _, t in entry.heldout)
    predictions = {
        "NODER": predicted,
        "nearest observed scan": nearest_scan(observed, entry.times, times),
        "linear interpolation": linear_interpolation(observed, entry.times, times),
    }
    rows = []
    for method, images in predictions.items():
        for t, n, s in zip(times, nrmse(images, targets).tolist(), ssim(images, targets).tolist()):
            rows.append({"time": t, "split": entry.split(t), "method": method, "nrmse": n, "ssim": s})
    return rows


def subject_comparison(subject: FittedSubject, entry: SubjectEntry, reader: str | None = None) -> list[dict]:
    """:func:`heldout_comparison` of a fitted subject, its scans read from the datalist entry (no page drawn)."""
    if not entry.heldout:
        return []
    heldout = sorted(entry.heldout, key=lambda scan: scan[1])
    targets = torch.stack([load_image(path, reader)[0] for path, _ in heldout])
    predicted = subject.predict([t for _, t in heldout]).images
    return heldout_comparison(entry, entry.load(reader).images, targets, predicted)


def _report_times(entry: SubjectEntry) -> dict[str, list[float]]:
    """The times each figure shows: ``rows`` (at most 8 scan times), ``jacobian`` (the middle and last observed
    times and the last query time after them; also the uncertainty maps'), ``grid`` (a dense grid over the whole
    span with every scan time, for the structure volumes' smooth curves)."""
    observed = [float(t) for t in entry.times]
    heldout = sorted(float(t) for _, t in entry.heldout)
    scans = sorted([*observed, *heldout])
    later = [t for t in sorted({*entry.predict_times, *heldout}) if t > observed[-1]]
    end = max([observed[-1], *entry.predict_times, *heldout])
    grid = np.unique(np.concatenate([np.linspace(observed[0], end, _GRID_POINTS), observed, heldout])).tolist()
    return {"rows": [scans[i] for i in _pick(len(scans), _MAX_ROWS)],
            "jacobian": sorted({observed[len(observed) // 2], observed[-1], *later[-1:]}),
            "grid": grid if entry.label is not None else [], "heldout": heldout, "observed": observed}


def _volumes_section(subject: FittedSubject, labels: torch.Tensor | None, times: Mapping[str, list[float]]) -> str:
    if labels is None:
        return _figure_html(SECTIONS[2], None, "No label map in the datalist ('label' on the first scan's grid): "
                                               "structure volumes over time need one.")
    values = [int(v) for v in torch.unique(labels.to(torch.int64)).tolist() if v != 0]
    sizes = {v: int((labels.to(torch.int64) == v).sum()) for v in values}
    chosen = sorted(sorted(values, key=lambda v: -sizes[v])[:_MAX_STRUCTURES])
    banded = subject.ensemble is not None
    rows = label_volumes(subject, labels, times["grid"], uncertainty=banded)

    def curve(label: int, column: str) -> list[float]:  # ml
        return [row[column] / 1000.0 for row in rows if row["label"] == label]

    volumes = {f"label {v}": curve(v, "volume_mm3") for v in chosen}
    bands = {f"label {v}": (curve(v, "lower_mm3"), curve(v, "upper_mm3")) for v in chosen} if banded else None
    figure = volumes_figure(times["grid"], volumes, times["observed"], times["heldout"], list(volumes), bands)
    caption = (f"Volume of each structure of the first scan's label map ({len(chosen)} largest of {len(values)}) "
               f"along the fitted trajectory: the Jacobian determinant integrated over the structure's voxels in the "
               f"first scan (label_volumes.csv's volume_mm3)"
               + ("; shaded: the calibrated 90% band of the subject's uncertainty ensemble" if banded else "")
               + "; dots: observed times; purple bands: held-out times; orange: extrapolation beyond the last scan.")
    return _figure_html(SECTIONS[2], png(figure), caption)


def _uncertainty_section(subject: FittedSubject, times: Mapping[str, list[float]]) -> str:
    """The predictive standard deviation over the predicted image at the Jacobian figure's times, or a note saying
    how to fit an ensemble."""
    if subject.ensemble is None:
        return _figure_html(SECTIONS[6], None, "No uncertainty ensemble in this subject's model file: `noder predict "
                                               "--uncertainty` (or the bundle's inference with \"uncertainty\": true) "
                                               "fits one and stores it there.")
    shown = times["jacobian"]
    prediction = subject.predict(shown, uncertainty=True)
    kinds = [_kind(t, times["observed"], times["heldout"]) for t in shown]
    caption = (f"Predictive standard deviation of the image (the values of image_std_t<time>.nii.gz) over the "
               f"predicted image, middle slice: the predicted image +- 1.645 std is the calibrated 90% interval. "
               f"{subject.ensemble.summary()}.")
    return _figure_html(SECTIONS[6], png(uncertainty_figure(shown, prediction.images, prediction.image_std, kinds)),
                        caption)


def subject_report(subject: FittedSubject, entry: SubjectEntry, path: PathLike, folded: Mapping[float, Any] | None = None,
                   reader: str | None = None) -> tuple[str, list[dict]]:
    """Write one fitted subject's page: its images and fields come from one :meth:`FittedSubject.predict` over every
    time the image figures show, its structure volumes from :meth:`FittedSubject.structure_volumes` on a dense time
    grid (with their 90 % bands, and the standard deviation maps from ``predict(..., uncertainty=True)``, when the
    subject has an uncertainty ensemble).

    Args:
        subject: the fitted subject.
        entry: its datalist entry (scans, optional label, held-out scans, predict_times).
        path: the page to write (``<output_dir>/<id>/report.html``).
        folded: % folded voxels per held-out time (from the evaluation's ``subject_metrics.json``), if known.
        reader: image reader.

    Returns:
        ``(path, comparison rows)`` (:func:`heldout_comparison`).
    """
    times = _report_times(entry)
    sequence = entry.load(reader)
    heldout = sorted(entry.heldout, key=lambda scan: scan[1])
    targets = torch.stack([load_image(p, reader)[0] for p, _ in heldout]) if heldout else None
    labels = load_label_map(entry.label, reader)[0] if entry.label is not None else None
    query = sorted({times["observed"][0], *times["rows"], *times["jacobian"], *times["heldout"]})
    prediction = subject.predict(query)
    at = {t: index for index, t in enumerate(prediction.times.tolist())}

    def images(chosen: Sequence[float]) -> torch.Tensor:
        return prediction.images[[at[t] for t in chosen]]

    scans = {**dict(zip(times["observed"], sequence.images)),
             **({t: target for t, target in zip(times["heldout"], targets)} if targets is not None else {})}
    kinds = [_kind(t, times["observed"], times["heldout"]) for t in times["rows"]]
    observed_rows = torch.stack([scans[t] for t in times["rows"]])
    sections = [_figure_html(SECTIONS[0], png(images_figure(times["rows"], kinds, observed_rows, images(times["rows"]),
                                                            images(times["observed"][:1])[0])), _IMAGES_CAPTION)]
    jacobians = prediction.jacobians[[at[t] for t in times["jacobian"]]]
    jac_kinds = [_kind(t, times["observed"], times["heldout"]) for t in times["jacobian"]]
    sections.append(_figure_html(SECTIONS[1], png(jacobian_figure(times["jacobian"], images(times["jacobian"]),
                                                                  jacobians, jac_kinds)), _JACOBIAN_CAPTION))
    sections.append(_volumes_section(subject, labels, times))
    sections.append(_figure_html(SECTIONS[3], png(loss_figure(subject.history)) if subject.history else None,
                                 "Total loss and its similarity term per epoch; dotted lines: resolution changes."))
    comparison = [] if targets is None else heldout_comparison(entry, sequence.images, targets, images(times["heldout"]))
    sections.append(f"<section><h2>{SECTIONS[4]}</h2>\n{_metrics_html(comparison, folded or {})}\n</section>")
    sections.append(_appearance_html(subject))
    sections.append(_uncertainty_section(subject, times))
    observed = times["observed"]
    chosen = subject.source_choice.source if subject.default_source == "auto" else subject.default_source
    header = (f'<p>{len(observed)} observed scans at times {", ".join(f"{t:g}" for t in observed)}'
              + (f'; held out: {", ".join(f"{t:g}" for t in times["heldout"])}' if times["heldout"] else "")
              + f"; fitted {len(subject.history)} epochs; appearance of the predictions: {html.escape(chosen)}.</p>")
    written = atomic_write(path, _page(f"NODER report: {entry.id}", header + "\n".join(sections)).encode("utf-8"))
    logger.info("%s: report -> %s", entry.id, written)
    return written, comparison


def index_page(path: PathLike, entries: Sequence[SubjectEntry], pages: Mapping[str, Any],
               rows: Sequence[Mapping[str, Any]]) -> str:
    """Write a cohort's index: a link per subject with a page (``pages``: id -> anything true), "not fitted" for the
    others, and the mean held-out metrics of every subject's comparison ``rows``."""
    items = []
    for entry in entries:
        if entry.id in pages:
            items.append(f'<li><a href="{html.escape(entry.id)}/report.html">{html.escape(entry.id)}</a>: '
                         f"{len(entry.scans)} scans, {len(entry.heldout)} held out</li>")
        else:
            items.append(f"<li>{html.escape(entry.id)}: not fitted</li>")
    body = f"<section><h2>Subjects</h2><ul>{''.join(items)}</ul></section>"
    body += (f"<section><h2>Held-out metrics (mean over all subjects' held-out scans)</h2>\n"
             f"{_metrics_html(rows, {}, per_scan=False)}\n<p class=\"note\">Per scan: each subject's page."
             f"</p></section>")
    return atomic_write(path, _page(f"NODER cohort report: {len(pages)} subject(s)", body).encode("utf-8"))


def read_folded(path: PathLike) -> dict[float, Any]:
    """% folded voxels per held-out time from an evaluation's ``subject_metrics.json`` ({} if there is none)."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return {float(row["time"]): row.get("percent_folded") for row in json.load(handle).get("scans", [])}


class HTMLReportHandler:
    """Write the subject's ``report.html`` (:func:`subject_report`) when a MONAI evaluation run completes; the
    bundle's ``evaluate.json`` attaches it to its evaluator.

    A failure to draw the report (e.g. matplotlib missing) is logged as an error and does not fail the evaluation,
    whose metrics are already saved.

    Args:
        subject: the fitted subject (a ``FittedSubjectLoader``, as the evaluator's, a ``FittedSubject`` or its file).
        entry: the subject's datalist entry.
        path: the page to write.
        metrics_path: the evaluation's ``subject_metrics.json`` (% folded voxels), if any.
        enabled: False attaches nothing.
    """

    def __init__(self, subject: SubjectLike, entry: SubjectEntry, path: PathLike, metrics_path: PathLike | None = None,
                 enabled: bool = True) -> None:
        self.subject, self.entry, self.path = subject, entry, os.fspath(path)
        self.metrics_path = None if metrics_path is None else os.fspath(metrics_path)
        self.enabled = bool(enabled)
        self.written: str | None = None

    def attach(self, engine: Any) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        try:
            folded = read_folded(self.metrics_path) if self.metrics_path else {}
            self.written, _ = subject_report(load_fitted_subject(self.subject), self.entry, self.path, folded)
        except Exception:  # noqa: BLE001 - the metrics are saved; the page is a view of them
            logger.exception("%s: the HTML report could not be written", self.entry.id)
