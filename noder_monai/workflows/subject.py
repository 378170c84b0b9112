"""One function per stage and subject: what ``noder fit``, ``noder predict`` and ``noder evaluate`` do for one
subject of a datalist (:func:`train_subject`, :func:`infer_subject`, :func:`evaluate_subject`), and the per-subject
tables the bundle's runs share with them (:func:`write_label_volumes`, :func:`write_subject_metrics`).

Every file is written to a temporary name and renamed, with the input scans' geometry; names are
:class:`~noder_monai.workflows.paths.SubjectPaths`'.
"""

from __future__ import annotations

import logging
import os
import time as timer
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from noder_monai.data import SubjectEntry
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.engines.trainer import HISTORY_TERMS
from noder_monai.io import label_dtype, load_image, save_image, save_itk_displacement
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim
from noder_monai.model.appearance import SourceChoice
from noder_monai.reporting.figures import save_montage
from noder_monai.reporting.tables import heldout_rows, label_volumes, mean_metrics
from noder_monai.utils import summary_writer, write_csv, write_json
from noder_monai.workflows.paths import SubjectPaths

__all__ = ["evaluate_subject", "infer_subject", "train_subject", "write_label_volumes", "write_subject_metrics"]

logger = logging.getLogger(__name__)

PREDICTION_KINDS = {"image": "images", "ddf": "ddfs", "ddf_itk": "ddfs_itk", "jacobian": "jacobians", "label": "labels"}
"""The prediction files per query time (file-name kind: ``predictions.json`` key)."""


def train_subject(entry: SubjectEntry, paths: SubjectPaths, config: FitConfig, network: Mapping[str, Any],
                  pretrained: Any, device: torch.device, seed: int, progress: bool, tensorboard: bool | None,
                  reader: str | None) -> dict:
    """Fit one subject (:func:`~noder_monai.engines.fit_sequence`) and write its loss curve, template, the fit at every
    observed time and, last, its model (a failed write leaves no model, so the subject is fitted again). Returns its
    record with ``outputs``."""
    sequence = entry.load(reader)
    writer = summary_writer(tensorboard, paths.tensorboard)
    logger.info("%s: fitting %d scans of size %s on %s", entry.id, len(entry.scans), sequence.spatial_size, device)
    start = timer.perf_counter()
    try:
        subject = fit_sequence(sequence, config, dict(network), pretrained, device, seed,
                               progress and f"subject {entry.id}", callback=_epoch_logger(entry.id, config.epochs, writer))
    finally:
        if writer is not None:
            writer.close()
    seconds = timer.perf_counter() - start
    outputs = [write_json(subject.history, paths.loss("json")),
               write_csv(subject.history, ["epoch", "level", *HISTORY_TERMS], paths.loss("csv"))]
    template = subject.save_template(paths.template)
    fitted = subject.predict(sequence.times)
    images = [save_image(image, sequence.geometry, paths.fitted(t), time=t)
              for image, t in zip(fitted.images, sequence.times.tolist())]
    outputs.append(os.fspath(subject.save(paths.model)))  # last: a model file means every other output was written
    final = subject.history[-1]["total"]
    logger.info("%s: %d epochs in %.1f s, final loss %.5f -> %s", entry.id, len(subject.history), seconds, final,
                paths.model)
    choice = subject.source_choice
    return {"model": paths.model, "epochs": len(subject.history), "final_loss": final,
            "fit_seconds": round(seconds, 3), "fitted": images, "outputs": [*outputs, *([template] if template else []),
                                                                            *images],
            **({"appearance": choice.summary()} if choice is not None else {})}


def _epoch_logger(subject: str, total_epochs: int, writer: Any) -> Callable[[dict], None]:
    every = max(1, total_epochs // 10)

    def log(record: dict) -> None:
        epoch = record["epoch"]
        if writer is not None:
            for term in HISTORY_TERMS:
                writer.add_scalar(f"loss/{term}", record[term], epoch)
        if epoch % every == 0 or epoch == total_epochs - 1:
            logger.debug(  # one INFO line per subject (its summary); the terminal shows a bar
                "%s epoch %d/%d level %d loss %.5f (similarity %.5f)",
                subject, epoch + 1, total_epochs, record["level"], record["total"], record["similarity"],
            )

    return log


def infer_subject(entry: SubjectEntry, paths: SubjectPaths, predict_times: Sequence[float] | None,
                  device: torch.device, batch_size: int, reader: str | None) -> dict:
    """Predict one subject at its query times (:meth:`SubjectEntry.query_times`) and write images, fields (voxel and
    ITK conventions), Jacobian maps and carried labels with their volumes. Returns ``predictions.json``'s content
    with ``outputs``."""
    subject = paths.load_model(entry, device)
    times = entry.query_times(predict_times)
    labels = subject.read_labels(entry.label, reader)[0] if entry.label is not None else None
    prediction = subject.predict(times, labels=labels, batch_size=batch_size)
    geometry = prediction.geometry  # the scans' header forms: outputs read exactly like the inputs
    written: dict[str, list[str]] = {kind: [] for kind in PREDICTION_KINDS}
    for index, t in enumerate(times):
        written["image"].append(save_image(prediction.images[index], geometry, paths.prediction("image", t), time=t))
        written["ddf"].append(save_image(prediction.ddfs[index], geometry, paths.prediction("ddf", t), time=t))
        written["ddf_itk"].append(save_itk_displacement(prediction.ddfs[index], geometry, paths.prediction("ddf_itk", t),
                                                        time=t))
        written["jacobian"].append(save_image(prediction.jacobians[index], geometry, paths.prediction("jacobian", t),
                                              time=t))
        if prediction.labels is not None:
            written["label"].append(save_image(prediction.labels[index], geometry, paths.prediction("label", t),
                                               dtype=label_dtype(prediction.labels), time=t))
    outputs = [path for kind in PREDICTION_KINDS for path in written[kind]]
    if prediction.labels is not None:
        outputs.append(write_label_volumes(paths, prediction.labels, times, prediction.affine))
    record = {"subject": entry.id, "times": times, **{key: written[kind] for kind, key in PREDICTION_KINDS.items()},
              "percent_corrected": prediction.corrected.tolist()}
    outputs.append(write_json(record, paths.predictions_json))
    logger.info("%s: %d time point(s) -> %s", entry.id, len(times), paths.predictions)
    return {**record, "outputs": outputs}


def write_label_volumes(paths: SubjectPaths, labels: torch.Tensor, times: Sequence[float], affine: Any) -> str:
    """``label_volumes.csv``: every structure's volume at every predicted time (:func:`~noder_monai.reporting.
    tables.label_volumes`)."""
    return write_csv(label_volumes(labels, times, affine), ["time", "label", "voxels", "volume_mm3"],
                     paths.label_volumes)


def evaluate_subject(entry: SubjectEntry, paths: SubjectPaths, device: torch.device, montage: bool,
                     reader: str | None) -> dict:
    """Score one subject's held-out scans (NRMSE, SSIM, PSNR, % folded voxels); writes ``subject_metrics.json``
    and, with ``montage``, the montage. Returns ``{"mean", "outputs"}``."""
    subject = paths.load_model(entry, device)
    scans = sorted(entry.heldout, key=lambda scan: scan[1])
    targets = []
    for index, (path, _) in enumerate(scans):
        image, affine = load_image(path, reader)
        subject.check_grid(image.shape[1:], affine, f"subject '{entry.id}': field 'heldout'[{index}] ({path})")
        targets.append(image)
    target = torch.stack(targets)
    times = [t for _, t in scans]
    prediction = subject.predict(times)
    names = [path for path, _ in scans]  # a constant or NaN held-out scan is named in the error
    values = {
        "nrmse": nrmse(prediction.images, target, names=names),
        "ssim": ssim(prediction.images, target, names=names),
        "psnr": psnr(prediction.images, target, names=names),
        "percent_folded": percent_folded(prediction.ddfs),
    }
    outputs = [os.fspath(save_montage(target, prediction.images, paths.montage, times))] if montage else []
    result = write_subject_metrics(entry, paths, values, montage=outputs[0] if outputs else None,
                                   appearance=subject.source_choice)
    logger.info("%s: %s", entry.id, ", ".join(f"{k} {v:.4g}" for k, v in result["mean"].items() if v is not None))
    return {"mean": result["mean"], "outputs": [*outputs, paths.subject_metrics]}


def write_subject_metrics(entry: SubjectEntry, paths: SubjectPaths, values: Mapping[str, Sequence[float]],
                          montage: str | None = None, appearance: SourceChoice | None = None) -> dict:
    """``<eval_dir>/<id>/subject_metrics.json``: one row per held-out scan (:func:`~noder_monai.reporting.tables.
    heldout_rows`), their mean and, when the fit chose one, the appearance choice with every candidate's validation
    error; the file both the ``noder`` evaluation and the bundle's write. Returns it."""
    rows = heldout_rows(entry, values)
    result: dict[str, Any] = {"scans": rows, "mean": mean_metrics(rows)}
    if appearance is not None:
        result["appearance"] = {**appearance.to_dict(), "beats_references": appearance.beats_references}
    if montage is not None:
        result["montage"] = montage
    write_json(result, paths.subject_metrics)
    return result
