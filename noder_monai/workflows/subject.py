"""One function per stage and subject: what ``noder fit``, ``noder predict`` and ``noder evaluate`` do for one
subject of a datalist (:func:`train_subject`, :func:`infer_subject`, :func:`evaluate_subject`), and what the bundle's
runs share with them: the per-subject tables (:func:`write_label_volumes`, :func:`write_subject_metrics`) and the
uncertainty ensemble fitted on first use (:func:`ensure_ensemble`).

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
from noder_monai.engines import FitConfig, fit_ensemble, fit_sequence
from noder_monai.engines.trainer import HISTORY_TERMS
from noder_monai.io import label_dtype, load_image, save_image, save_itk_displacement
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim
from noder_monai.model import FittedSubject, Prediction
from noder_monai.model.appearance import SourceChoice
from noder_monai.model.uncertainty import Ensemble
from noder_monai.reporting.figures import save_montage
from noder_monai.reporting.tables import LABEL_VOLUME_COLUMNS, heldout_rows, label_volumes, mean_metrics
from noder_monai.utils import PathLike, summary_writer, write_csv, write_json
from noder_monai.workflows.markers import update_output
from noder_monai.workflows.paths import SubjectPaths

__all__ = ["PREDICTION_KINDS", "UNCERTAINTY_KINDS", "ensure_ensemble", "evaluate_subject", "infer_subject",
           "remove_uncertainty_maps", "train_subject", "write_label_volumes", "write_subject_metrics"]

logger = logging.getLogger(__name__)

PREDICTION_KINDS = {"image": "images", "ddf": "ddfs", "ddf_itk": "ddfs_itk", "jacobian": "jacobians", "label": "labels",
                    "image_std": "image_std", "log_jacobian_std": "log_jacobian_std"}
"""The prediction files per query time (file-name kind: ``predictions.json`` key)."""

UNCERTAINTY_KINDS = ("image_std", "log_jacobian_std")
"""The kinds written only with uncertainty: the calibrated predictive standard deviation of the image (input units;
``image +- 1.645 * image_std`` is the 90 % interval) and of ``log`` of the Jacobian determinant."""


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
                  device: torch.device, batch_size: int, reader: str | None, uncertainty: bool = False) -> dict:
    """Predict one subject at its query times (:meth:`SubjectEntry.query_times`) and write images, fields (voxel and
    ITK conventions), Jacobian maps and carried labels with their volumes; with ``uncertainty`` also the calibrated
    standard deviation maps of the image and of log det J, and the volumes' 90 % bands (the subject's ensemble is
    fitted and stored in its model file first if it has none: :func:`ensure_ensemble`). Returns
    ``predictions.json``'s content with ``outputs``."""
    subject = paths.load_model(entry, device)
    if uncertainty:
        ensure_ensemble(subject, paths.model)
    times = entry.query_times(predict_times)
    labels = subject.read_labels(entry.label, reader)[0] if entry.label is not None else None
    prediction = subject.predict(times, labels=labels, batch_size=batch_size, uncertainty=uncertainty)
    kinds = [kind for kind in PREDICTION_KINDS if uncertainty or kind not in UNCERTAINTY_KINDS]
    if not uncertainty:
        remove_uncertainty_maps(paths)
    written = _write_predictions(prediction, paths, kinds)
    outputs = [path for kind in kinds for path in written[kind]]
    if labels is not None:
        outputs.append(write_label_volumes(paths, subject, labels, times, prediction.labels, uncertainty))
    record = {"subject": entry.id, "times": times, **{PREDICTION_KINDS[kind]: written[kind] for kind in kinds},
              "percent_corrected": prediction.corrected.tolist()}
    if uncertainty:
        record["uncertainty"] = subject.ensemble.summary()
    outputs.append(write_json(record, paths.predictions_json))
    logger.info("%s: %d time point(s) -> %s", entry.id, len(times), paths.predictions)
    return {**record, "outputs": outputs}


def _write_predictions(prediction: Prediction, paths: SubjectPaths, kinds: Sequence[str]) -> dict[str, list[str]]:
    """Every file of ``kinds`` (:data:`PREDICTION_KINDS`) at every predicted time, in the scans' header forms (outputs
    read exactly like the inputs); no label files without carried labels."""
    maps = {"image": prediction.images, "ddf": prediction.ddfs, "ddf_itk": prediction.ddfs,
            "jacobian": prediction.jacobians, "label": prediction.labels, "image_std": prediction.image_std,
            "log_jacobian_std": prediction.log_jacobian_std}
    written: dict[str, list[str]] = {kind: [] for kind in kinds}
    for index, t in enumerate(prediction.times.tolist()):
        for kind in (kind for kind in kinds if maps[kind] is not None):
            path, value = paths.prediction(kind, t), maps[kind][index]
            if kind == "ddf_itk":
                written[kind].append(save_itk_displacement(value, prediction.geometry, path, time=t))
            else:
                dtype = {"dtype": label_dtype(maps[kind])} if kind == "label" else {}
                written[kind].append(save_image(value, prediction.geometry, path, time=t, **dtype))
    return written


def remove_uncertainty_maps(paths: SubjectPaths) -> None:
    """Delete standard deviation maps an earlier ``--uncertainty`` run left in the subject's predictions folder, so
    that no map of another run (or of an earlier fit) sits beside this run's predictions: what a prediction without
    uncertainty does first (``noder predict``, the bundle's inference)."""
    folder = paths.predictions
    names = sorted(name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if name.startswith(tuple(f"{kind}_t" for kind in UNCERTAINTY_KINDS)) and name.endswith(".nii.gz"))
    for name in names:
        os.remove(os.path.join(folder, name))
    if names:
        logger.info("%s: removed %d standard deviation map(s) of an earlier --uncertainty run from %s",
                    paths.subject, len(names), folder)


def ensure_ensemble(subject: FittedSubject, path: PathLike) -> Ensemble:
    """The subject's uncertainty ensemble; if it has none, fit one (:func:`~noder_monai.engines.fit_ensemble`, its
    defaults), log its summary and save the subject back to its model file ``path`` (atomically), so that later runs
    reuse it. The training stage's done-marker beside the file then records the file's new size: the fit is the
    same, the stage stays done (:func:`~noder_monai.workflows.markers.update_output`). The ``noder predict
    --uncertainty`` and the bundle's ``"uncertainty": true`` path.

    Raises:
        ValueError: as :func:`~noder_monai.engines.fit_ensemble` (a file without its observed scans, fewer than 3
            non-constant scans).
    """
    if subject.ensemble is not None:
        return subject.ensemble
    path = os.path.abspath(os.fspath(path))
    start = timer.perf_counter()
    ensemble = fit_ensemble(subject)
    logger.info("%s: %s (%.1f s) -> %s; `noder report` draws it in the subject's report", subject.subject,
                ensemble.summary(), timer.perf_counter() - start, path)
    subject.save(path)
    update_output(os.path.dirname(path), "training", path)
    return ensemble


def write_label_volumes(paths: SubjectPaths, subject: FittedSubject, labels: torch.Tensor, times: Sequence[float],
                        carried: torch.Tensor | None, uncertainty: bool = False) -> str:
    """``label_volumes.csv``: every structure's volume at every predicted time, from the Jacobian determinant
    integrated over the baseline label map ``labels``, with the carried maps' voxel counts and, with
    ``uncertainty``, the 90 % band (:func:`~noder_monai.reporting.tables.label_volumes`)."""
    columns = LABEL_VOLUME_COLUMNS if uncertainty else LABEL_VOLUME_COLUMNS[:4]
    return write_csv(label_volumes(subject, labels, times, carried, uncertainty), list(columns), paths.label_volumes)


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
