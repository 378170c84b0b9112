"""The jobs behind the ``noder`` command: fit, predict and evaluate every subject of a datalist, and the demo.

The fit is the bundle's training run (:func:`~noder_monai.engines.fit_sequence` runs the same
:class:`~noder_monai.engines.trainer.NODERTrainer` and handlers as ``bundle/configs/train.json``); predictions
equal those of ``bundle/configs/inference.json``. Output layout under ``output_dir`` (one folder per subject id)::

    <id>/model.pt                         the fitted subject (FittedSubject.save)
    <id>/template.nii.gz                  the subject template, when the fit built one (the default)
    <id>/loss.csv, <id>/loss.json         the loss curve, one record per epoch
    <id>/fitted/image_t<time>.nii.gz      the fit at every observed time
    <id>/predictions/{image,ddf,jacobian,label}_t<time>.nii.gz, predictions.json, label_volumes.csv
    <id>/predictions/ddf_itk_t<time>.nii.gz  the displacement in ITK/ANTs convention (LPS millimetres)
    <id>/done_train.json, <id>/done_inference.json   done-markers, written last (see engines.distributed)
    training_summary.json, inference_summary.json, cohort_label_volumes.csv, cohort_summary_<stage>.json
    tensorboard/<id>/ (when tensorboard is installed)

and under ``eval_dir``: ``metrics.json``, ``metrics.md``, ``cohort_metrics.csv``, ``<id>_montage.png`` and
``<id>/subject_metrics.json``. Every job runs through :func:`~noder_monai.workflows.cohort.run_cohort`: under
``torchrun`` each rank takes a cost-balanced share; finished subjects are skipped, failing ones recorded; rank 0
writes the cohort files. ``<time>`` is
:func:`~noder_monai.engines.evaluator.time_tag` (``t2.1``, ``t7.0``, ``t-0.5``). Every file is written to a
temporary name and renamed, with the input scans' geometry (NIfTI qform/sform and their codes, see
:class:`~noder_monai.io.image.Geometry`). Every job first checks that the folder it writes to is writable
(:func:`~noder_monai.io.image.check_output_dir`) and removes the temporaries a killed run left there.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import time as timer
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from noder_monai.data import SubjectEntry, make_demo_dataset
from noder_monai.io import load_image, save_image
from noder_monai.io.image import check_output_dir, load_label_map, parse_times, voxel_volume_mm3
from noder_monai.io.itk_field import save_itk_displacement
from noder_monai.workflows import cohort
from noder_monai.workflows.bundle import datalist_subjects
from noder_monai.engines.fit import FitConfig, fit_sequence
from noder_monai.engines.evaluator import time_tag
from noder_monai.reporting.tables import METRICS, markdown_table, mean_metrics, save_montage
from noder_monai.model.subject import FittedSubject
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim
from noder_monai.networks import NODER
from noder_monai.utils import atomic_write, clean_stale_temporaries, set_threads, summary_writer, write_csv, write_json

__all__ = ["train", "infer", "evaluate", "run_demo", "split_settings"]

logger = logging.getLogger(__name__)

_AFFINE_ATOL = 1e-4


def _settings(values: Mapping[str, Any] | None, allowed: Sequence[str], name: str) -> dict[str, Any]:
    values = dict(values or {})
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown setting(s) {unknown}; allowed: {sorted(allowed)}.")
    return values


def split_settings(**settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort flat settings into :class:`FitConfig` fields and :class:`NODER` arguments (the names do not overlap).

    Returns:
        ``(fit, network)`` dictionaries.

    Raises:
        ValueError: naming the settings that are neither.
    """
    fit_names = {f.name for f in dataclasses.fields(FitConfig)}
    network_names = set(inspect.signature(NODER).parameters) - {"spatial_size"}
    unknown = sorted(set(settings) - fit_names - network_names)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown}; FitConfig fields: {sorted(fit_names)}; NODER arguments: {sorted(network_names)}."
        )
    fit = {k: v for k, v in settings.items() if k in fit_names}
    return fit, {k: v for k, v in settings.items() if k in network_names}


def _fit_config(fit: Mapping[str, Any] | FitConfig | None) -> FitConfig:
    if isinstance(fit, FitConfig):
        return fit
    return FitConfig(**_settings(fit, [f.name for f in dataclasses.fields(FitConfig)], "fit"))


def _network_kwargs(network: Mapping[str, Any] | None) -> dict[str, Any]:
    allowed = [name for name in inspect.signature(NODER).parameters if name != "spatial_size"]
    return _settings(network, allowed, "network")


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _epoch_logger(subject: str, total_epochs: int, writer: Any) -> Callable[[dict], None]:
    every = max(1, total_epochs // 10)

    def log(record: dict) -> None:
        epoch = record["epoch"]
        if writer is not None:
            for term in ("total", "similarity", "smoothness", "boundary"):
                writer.add_scalar(f"loss/{term}", record[term], epoch)
        if epoch % every == 0 or epoch == total_epochs - 1:
            logger.debug(  # one INFO line per subject (its summary); the terminal shows a bar
                "%s epoch %d/%d level %d loss %.5f (similarity %.5f)",
                subject, epoch + 1, total_epochs, record["level"], record["total"], record["similarity"],
            )

    return log


def _check_grid(subject: FittedSubject, shape: Sequence[int], affine: torch.Tensor, where: str) -> None:
    subject.check_spatial_size(shape, where)
    if not torch.allclose(affine.to(torch.float64), subject.affine, atol=_AFFINE_ATOL):
        raise ValueError(f"{where} has affine {affine.tolist()}, but subject '{subject.subject}' was fitted on affine "
                         f"{subject.affine.tolist()}.")


def _prepare_output_dir(path: str | os.PathLike) -> str:
    """:func:`check_output_dir` (fail before any work if ``path`` cannot be written), then remove the temporaries a
    killed run left there. Returns the absolute path."""
    path = check_output_dir(path)
    removed = clean_stale_temporaries(path)
    if removed:
        logger.info("removed %d temporary file(s) a killed run left in %s", len(removed), path)
    return path


def _stale_reasons(subject: FittedSubject, entry: SubjectEntry) -> list[str]:
    """Why ``subject`` no longer fits the datalist entry (its scan files and times); empty when it does."""
    return subject.stale_reasons(paths=[path for path, _ in entry.scans], times=entry.times)


def _load_subject(output_dir: str, entry: SubjectEntry, device: torch.device) -> FittedSubject:
    path = os.path.join(output_dir, entry.id, "model.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subject '{entry.id}': fitted model '{path}' not found; run training with this output_dir first.")
    subject = FittedSubject.load(path, map_location=device)
    if subject.subject != entry.id:
        raise ValueError(f"subject '{entry.id}': '{path}' holds subject '{subject.subject}'.")
    reasons = _stale_reasons(subject, entry)
    if reasons:
        raise ValueError(f"subject '{entry.id}': model '{path}' is stale: {'; '.join(reasons)}. Fit the subject "
                         "again (noder fit, or train() with skip_existing=True refits stale models).")
    return subject


def train(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "outputs",
    network: Mapping[str, Any] | None = None,
    fit: Mapping[str, Any] | FitConfig | None = None,
    pretrained: str | os.PathLike | None = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
    skip_existing: bool = False,
    tensorboard: bool | None = None,
    progress: bool = True,
    reader: str | None = None,
) -> dict[str, dict]:
    """Fit every subject of a datalist; write its model, loss curve and fitted images (see the module docstring).

    Args:
        datalist: datalist file (format: ``noder_monai.data.datalist``); see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        output_dir: where each subject's folder is written.
        network: :class:`NODER` keyword arguments other than ``spatial_size``.
        fit: :class:`FitConfig` fields (or a ``FitConfig``).
        pretrained: deformation-autoencoder file initialising the encoder/decoder; ``"auto"`` uses the one shipped
            with the package for the data's spatial dims (``engines.pretrain.default_autoencoder_path``) when it is
            installed; None starts from random weights.
        device: torch device; None uses cuda when available.
        seed: random seed of every fit.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`noder_monai.utils.free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        skip_existing: also keep subjects whose ``model.pt`` exists without a done-marker (outputs of an older
            version); subjects with a valid done-marker are always kept (a rerun resumes).
        tensorboard: write loss scalars to ``<output_dir>/tensorboard/<id>``; None does so if tensorboard is installed.
        progress: show a progress bar per subject.
        reader: image reader, ``"itk"``, ``"nibabel"`` or None (MONAI's choice).

    Returns:
        ``{subject id: {"status", "model", "epochs", "final_loss", "seconds", "fitted"}}`` (``status``: ``done``,
        ``skipped`` (finished by an earlier run), ``failed`` (with ``error`` and ``traceback``) or ``locked``), for
        the whole cohort on rank 0 (also written to ``<output_dir>/training_summary.json``), for the rank's share
        on other ranks.

    Raises:
        ValueError: ``output_dir`` exists and is not a folder or is not writable (before any subject is fitted).
    """
    set_threads(cohort.rank_threads(num_threads))
    output_dir = os.path.abspath(os.fspath(output_dir))
    device = cohort.rank_device(device)
    config = _fit_config(fit)
    network = _network_kwargs(network)
    if pretrained not in (None, "auto") and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained autoencoder file '{pretrained}' not found.")
    if tensorboard:  # a missing package is the run's error, not each subject's
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as error:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
    entries = datalist_subjects(datalist, dataset_dir, demo_dir, demo)
    output_dir = _prepare_output_dir(output_dir)  # after the datalist checks, before the first fit

    def work(entry: SubjectEntry) -> dict:
        return _train_subject(entry, output_dir, config, network, pretrained, device, seed, progress, tensorboard,
                              reader)

    settings = {"fit": dataclasses.asdict(config), "network": network, "seed": seed,
                "pretrained": _file_identity(pretrained)}
    result = cohort.run_cohort(
        entries, "train", work, lambda entry: os.path.join(output_dir, entry.id), output_dir, settings,
        inputs=lambda entry: ([path for path, _ in entry.scans], entry.times),
        merge=lambda subjects, records: write_json(records, os.path.join(output_dir, "training_summary.json")),
        legacy=_legacy_model if skip_existing else None,
    )
    return result.records


def _file_identity(path: Any) -> Any:
    """A file setting as it enters the config hash: its path, size and modification time (None, "auto" as is)."""
    if path in (None, "auto") or not os.path.isfile(path):
        return path
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _legacy_model(entry: SubjectEntry, folder: str) -> dict | None:
    """``skip_existing``: keep a ``model.pt`` without a done-marker if it still matches the datalist's scans."""
    path = os.path.join(folder, "model.pt")
    if not os.path.isfile(path):
        return None
    try:
        reasons = _stale_reasons(FittedSubject.load(path), entry)
    except ValueError as error:
        reasons = [f"it cannot be read ({error})"]
    if reasons:
        logger.warning("%s: %s is stale (%s); fitting again", entry.id, path, "; ".join(reasons))
        return None
    return {"model": path, "legacy": True}


def _train_subject(entry: SubjectEntry, output_dir: str, config: FitConfig, network: dict, pretrained: Any,
                   device: torch.device, seed: int, progress: bool, tensorboard: bool | None,
                   reader: str | None) -> dict:
    """Fit one subject and write its model, loss curve and fitted images; returns its record with ``outputs``."""
    folder = os.path.join(output_dir, entry.id)
    model_path = os.path.join(folder, "model.pt")
    sequence = entry.load(reader)
    writer = summary_writer(tensorboard, os.path.join(output_dir, "tensorboard", entry.id))
    logger.info("%s: fitting %d scans of size %s on %s", entry.id, len(entry.scans), sequence.spatial_size, device)
    start = timer.perf_counter()
    try:
        subject = fit_sequence(
            sequence, config, network, pretrained, device, seed, progress and f"subject {entry.id}",
            callback=_epoch_logger(entry.id, config.epochs, writer),
        )
    finally:
        if writer is not None:
            writer.close()
    seconds = timer.perf_counter() - start
    subject.save(model_path)
    outputs = [model_path, write_json(subject.history, os.path.join(folder, "loss.json")),
               write_csv(subject.history, ["epoch", "level", "total", "similarity", "smoothness", "boundary"],
                         os.path.join(folder, "loss.csv"))]
    template = subject.save_template(os.path.join(folder, "template.nii.gz"))
    outputs += [template] if template else []
    fitted = subject.predict(sequence.times)
    paths = [
        save_image(image, sequence.geometry, os.path.join(folder, "fitted", f"image_{time_tag(t)}.nii.gz"))
        for image, t in zip(fitted.images, sequence.times.tolist())
    ]
    final = subject.history[-1]["total"]
    logger.info("%s: %d epochs in %.1f s, final loss %.5f -> %s", entry.id, len(subject.history), seconds, final,
                model_path)
    return {"model": model_path, "epochs": len(subject.history), "final_loss": final,
            "fit_seconds": round(seconds, 3), "fitted": paths, "outputs": outputs + paths}


def _label_volumes(labels: torch.Tensor, times: Sequence[float], affine: torch.Tensor) -> list[dict]:
    voxel_mm3 = voxel_volume_mm3(affine)  # a 2D image stored with a singleton axis counts its slice thickness
    rows = []
    for t, label_map in zip(times, labels):
        values, counts = torch.unique(label_map.to(torch.int64), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            if value != 0:
                rows.append({"time": t, "label": value, "voxels": count, "volume_mm3": round(count * voxel_mm3, 6)})
    return rows


def infer(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "outputs",
    predict_times: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    reader: str | None = None,
) -> dict[str, dict]:
    """Predict every fitted subject of a datalist at its query times; write images, fields, Jacobians and labels.

    Query times per subject: its datalist ``predict_times``, else ``predict_times`` given here, else its observed
    and held-out times. The baseline label map is carried along when the subject has a ``label``.

    Args:
        datalist: datalist file; see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        output_dir: the folder :func:`train` wrote to; predictions go to ``<output_dir>/<id>/predictions``.
        predict_times: query times for subjects without their own ``predict_times`` (anything
            :func:`~noder_monai.io.image.parse_times` accepts, e.g. ``[1.0, 2.5]`` or ``"[1.0, 2.5]"``).
        device: torch device; None uses cuda when available.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`noder_monai.utils.free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        batch_size: time points decoded and warped at once.
        reader: image reader for label maps.

    Raises:
        ValueError: ``output_dir`` cannot be written, a fitted model is stale (its scan files or times changed; the
            message names the model file and the change), or a label map is not one volume of integer labels.

    Returns:
        ``{subject id: predictions.json content and "status"}`` (as :func:`train`), also written to
        ``<output_dir>/inference_summary.json``; ``<output_dir>/cohort_label_volumes.csv`` holds one row per
        subject and time.
    """
    set_threads(cohort.rank_threads(num_threads))
    output_dir = os.path.abspath(os.fspath(output_dir))
    device = cohort.rank_device(device)
    if predict_times is not None:
        predict_times = parse_times(predict_times, name="predict_times")
    entries = datalist_subjects(datalist, dataset_dir, demo_dir, demo)
    output_dir = _prepare_output_dir(output_dir)

    def merge(subjects: Sequence[SubjectEntry], records: dict[str, dict]) -> None:
        write_json(records, os.path.join(output_dir, "inference_summary.json"))
        cohort.cohort_label_volumes(subjects, lambda entry: os.path.join(output_dir, entry.id, "predictions"),
                                         os.path.join(output_dir, "cohort_label_volumes.csv"))

    result = cohort.run_cohort(
        entries, "inference", lambda entry: _infer_subject(entry, output_dir, predict_times, device, batch_size, reader),
        lambda entry: os.path.join(output_dir, entry.id), output_dir, {"predict_times": predict_times},
        inputs=lambda entry: ([os.path.join(output_dir, entry.id, "model.pt"), *([entry.label] if entry.label else [])],
                              entry.predict_times),
        merge=merge, check=_check_fitted(output_dir),
    )
    return result.records


def _check_fitted(output_dir: str) -> Callable[[SubjectEntry], None]:
    def check(entry: SubjectEntry) -> None:
        cohort.check_subject(entry)
        path = os.path.join(output_dir, entry.id, "model.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"subject '{entry.id}': fitted model '{path}' not found; run training with this "
                                    "output_dir first.")

    return check


def _infer_subject(entry: SubjectEntry, output_dir: str, predict_times: Sequence[float] | None,
                   device: torch.device, batch_size: int, reader: str | None) -> dict:
    """Predict one subject at its query times and write its files; returns predictions.json's content + ``outputs``."""
    subject = _load_subject(output_dir, entry, device)
    times = entry.predict_times or predict_times or sorted({*entry.times, *(t for _, t in entry.heldout)})
    times = sorted(set(times))
    labels = None
    if entry.label is not None:
        labels, label_geometry = load_label_map(entry.label, reader)
        _check_grid(subject, labels.shape[1:], torch.as_tensor(label_geometry.affine, dtype=torch.float64),
                    f"subject '{entry.id}': field 'label' ({entry.label})")
    prediction = subject.predict(times, labels=labels, batch_size=batch_size)
    folder = os.path.join(output_dir, entry.id, "predictions")
    record: dict[str, Any] = {"subject": entry.id, "times": times, "images": [], "ddfs": [], "ddfs_itk": [],
                              "jacobians": [], "labels": []}
    geometry = prediction.geometry  # the scans' header forms: outputs read exactly like the inputs
    for index, t in enumerate(times):
        tag = time_tag(t)
        record["images"].append(save_image(prediction.images[index], geometry,
                                           os.path.join(folder, f"image_{tag}.nii.gz")))
        record["ddfs"].append(save_image(prediction.ddfs[index], geometry, os.path.join(folder, f"ddf_{tag}.nii.gz")))
        record["ddfs_itk"].append(save_itk_displacement(prediction.ddfs[index], geometry,
                                                        os.path.join(folder, f"ddf_itk_{tag}.nii.gz")))
        record["jacobians"].append(save_image(prediction.jacobians[index], geometry,
                                              os.path.join(folder, f"jacobian_{tag}.nii.gz")))
        if prediction.labels is not None:
            record["labels"].append(save_image(prediction.labels[index], geometry,
                                               os.path.join(folder, f"label_{tag}.nii.gz"), dtype=np.int32))
    outputs = [*record["images"], *record["ddfs"], *record["ddfs_itk"], *record["jacobians"], *record["labels"]]
    if prediction.labels is not None:
        outputs.append(write_csv(_label_volumes(prediction.labels, times, prediction.affine),
                                 ["time", "label", "voxels", "volume_mm3"], os.path.join(folder, "label_volumes.csv")))
    outputs.append(write_json(record, os.path.join(folder, "predictions.json")))
    logger.info("%s: %d time point(s) -> %s", entry.id, len(times), folder)
    return {**record, "outputs": outputs}


def evaluate(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "outputs",
    eval_dir: str | os.PathLike = "eval",
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
    montage: bool = True,
    reader: str | None = None,
) -> dict[str, Any]:
    """Score every fitted subject on its held-out scans: NRMSE, SSIM, PSNR and % folded voxels.

    A held-out time inside the observed span counts as ``interpolation``, outside as ``extrapolation``. SSIM and
    PSNR use each held-out scan's own intensity range. Writes ``metrics.json`` (per scan, per subject, per split,
    overall), ``metrics.md`` (the table) and, with ``montage``, ``<id>_montage.png`` into ``eval_dir``: one row per
    held-out time, columns observed, predicted (same grey window) and predicted - observed (blue negative, red
    positive); the middle slice of the last axis.

    Args:
        datalist: datalist file; see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.workflows.bundle.datalist_subjects`.
        output_dir: the folder :func:`train` wrote to.
        eval_dir: where the report is written.
        device: torch device; None uses cuda when available.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`noder_monai.utils.free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        montage: write the PNG montages.
        reader: image reader for the held-out scans.

    Returns:
        the ``metrics.json`` content, with ``failed`` (the ids that failed) (on rank 0; ``cohort_metrics.csv``
        holds one row per subject and held-out time); on other ranks ``{"metrics", "failed"}`` of their share.

    Raises:
        ValueError: no subject of the datalist has held-out scans, ``eval_dir`` cannot be written, a fitted model is
            stale, or a held-out scan is constant or has NaN/Inf voxels (the message names the file).
    """
    set_threads(cohort.rank_threads(num_threads))
    output_dir = os.path.abspath(os.fspath(output_dir))
    eval_dir = os.path.abspath(os.fspath(eval_dir))
    device = cohort.rank_device(device)
    entries = [entry for entry in datalist_subjects(datalist, dataset_dir, demo_dir, demo) if entry.heldout]
    if not entries:
        raise ValueError("no subject of the datalist has a 'heldout' field: there is nothing to evaluate.")
    eval_dir = _prepare_output_dir(eval_dir)
    report: dict[str, Any] = {}

    def merge(subjects: Sequence[SubjectEntry], records: dict[str, dict]) -> None:
        report.update(_merge_reports(subjects, eval_dir, records))

    result = cohort.run_cohort(
        entries, "evaluate", lambda entry: _evaluate_subject(entry, output_dir, eval_dir, device, montage, reader),
        lambda entry: os.path.join(eval_dir, entry.id), eval_dir, {"montage": montage},
        inputs=lambda entry: ([os.path.join(output_dir, entry.id, "model.pt"), *(p for p, _ in entry.heldout)],
                              [t for _, t in entry.heldout]),
        merge=merge, check=_check_fitted(output_dir),
    )
    if result.rank != 0:  # the cohort report is rank 0's; other ranks return their share's failures
        return {"metrics": list(METRICS), "failed": result.failed}
    return report


def _merge_reports(subjects: Sequence[SubjectEntry], eval_dir: str, records: dict[str, dict]) -> dict[str, Any]:
    """metrics.json, metrics.md and cohort_metrics.csv from every subject's ``<eval_dir>/<id>/subject_metrics.json``."""
    _, results = cohort.cohort_metrics(
        subjects, lambda entry: os.path.join(eval_dir, entry.id, "subject_metrics.json"),
        os.path.join(eval_dir, "cohort_metrics.csv"), METRICS,
    )
    all_rows = [row for result in results.values() for row in result["scans"]]
    report: dict[str, Any] = {"metrics": list(METRICS), "subjects": results}
    report["splits"] = {
        split: {"count": len(rows), **mean_metrics(rows)}
        for split in ("interpolation", "extrapolation")
        if (rows := [row for row in all_rows if row["split"] == split])
    }
    report["overall"] = {"count": len(all_rows), **mean_metrics(all_rows)}
    report["failed"] = sorted(k for k, v in records.items() if v.get("status") == "failed")
    write_json(report, os.path.join(eval_dir, "metrics.json"))
    atomic_write(os.path.join(eval_dir, "metrics.md"), markdown_table(report).encode("utf-8"))
    logger.info("metrics -> %s", os.path.join(eval_dir, "metrics.json"))  # the table: metrics.md, printed by the CLI
    return report


def _evaluate_subject(entry: SubjectEntry, output_dir: str, eval_dir: str, device: torch.device, montage: bool,
                      reader: str | None) -> dict:
    """Score one subject's held-out scans; writes ``<eval_dir>/<id>/subject_metrics.json`` (and the montage)."""
    subject = _load_subject(output_dir, entry, device)
    scans = sorted(entry.heldout, key=lambda scan: scan[1])
    targets = []
    for index, (path, _) in enumerate(scans):
        image, affine = load_image(path, reader)
        _check_grid(subject, image.shape[1:], affine, f"subject '{entry.id}': field 'heldout'[{index}] ({path})")
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
    first, last = float(subject.times[0]), float(subject.times[-1])
    rows = []
    for index, (path, t) in enumerate(scans):
        row = {"time": t, "split": "interpolation" if first <= t <= last else "extrapolation", "image": path}
        row.update({name: _finite_or_none(float(values[name][index])) for name in METRICS})
        rows.append(row)
    result: dict[str, Any] = {"scans": rows, "mean": mean_metrics(rows)}
    outputs = []
    if montage:
        result["montage"] = os.fspath(save_montage(target, prediction.images,
                                                   os.path.join(eval_dir, f"{entry.id}_montage.png"), times))
        outputs.append(result["montage"])
    outputs.append(write_json(result, os.path.join(eval_dir, entry.id, "subject_metrics.json")))
    logger.info("%s: %s", entry.id, ", ".join(f"{k} {v:.4g}" for k, v in result["mean"].items() if v is not None))
    return {"mean": result["mean"], "outputs": outputs}


def run_demo(
    directory: str | os.PathLike = "noder_demo",
    n_subjects: int = 2,
    size: int = 64,
    network: Mapping[str, Any] | None = None,
    fit: Mapping[str, Any] | FitConfig | None = None,
    pretrained: str | os.PathLike | None = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Make the demo dataset (if absent) in ``<directory>/data``, then train, infer and evaluate.

    Returns:
        ``{"datalist", "output_dir", "eval_dir", "training", "inference", "metrics", "table", "seconds"}``; the
        table is ``metrics.md``'s text and ``seconds`` the wall time of each stage.
    """
    directory = os.path.abspath(os.fspath(directory))
    output_dir, eval_dir = os.path.join(directory, "outputs"), os.path.join(directory, "eval")
    seconds: dict[str, float] = {}
    start = timer.perf_counter()
    datalist = make_demo_dataset(os.path.join(directory, "data"), n_subjects=n_subjects, size=size, seed=seed)
    seconds["data"] = timer.perf_counter() - start
    common = {"datalist": datalist, "output_dir": output_dir, "device": device, "num_threads": num_threads}
    start = timer.perf_counter()
    training = train(network=network, fit=fit, pretrained=pretrained, seed=seed, progress=progress, **common)
    seconds["training"] = timer.perf_counter() - start
    start = timer.perf_counter()
    inference = infer(**common)
    seconds["inference"] = timer.perf_counter() - start
    start = timer.perf_counter()
    metrics = evaluate(eval_dir=eval_dir, **common)
    seconds["evaluation"] = timer.perf_counter() - start
    return {"datalist": datalist, "output_dir": output_dir, "eval_dir": eval_dir, "training": training,
            "inference": inference, "metrics": metrics, "table": markdown_table(metrics),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}
