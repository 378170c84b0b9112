"""The jobs behind the MONAI bundle and the ``noder`` command: fit, predict and evaluate every subject of a datalist.

Each job is one function with plain arguments, so ``bundle/configs/*.json`` (``python -m monai.bundle run ...``) and
``noder_monai.cli`` call the same code. Output layout under ``output_dir`` (one folder per subject id)::

    <id>/model.pt                         the fitted subject (FittedSubject.save)
    <id>/loss.csv, <id>/loss.json         the loss curve, one record per epoch
    <id>/fitted/image_t<time>.nii.gz      the fit at every observed time
    <id>/predictions/{image,ddf,jacobian,label}_t<time>.nii.gz, predictions.json, label_volumes.csv
    training_summary.json, inference_summary.json, tensorboard/<id>/ (when tensorboard is installed)

and under ``eval_dir``: ``metrics.json``, ``metrics.md`` and ``<id>_montage.png``. ``<time>`` is Python's shortest
repr of the time (``t2.1``, ``t7.0``, ``t-0.5``). Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import re
import struct
import sys
import tempfile
import time as timer
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

from noder_monai.data import SubjectEntry, load_datalist, load_image, make_demo_dataset, save_image
from noder_monai.engines.fit import FitConfig, fit_sequence
from noder_monai.engines.pretrain import default_autoencoder_path
from noder_monai.engines.subject import FittedSubject
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim
from noder_monai.networks import NODER

__all__ = [
    "bundle_root",
    "load_common",
    "updated",
    "resolve_datalist",
    "resolve_device",
    "split_settings",
    "train",
    "infer",
    "evaluate",
    "run_demo",
    "time_tag",
    "markdown_table",
    "png_bytes",
    "METRICS",
]

logger = logging.getLogger(__name__)

METRICS = ("nrmse", "ssim", "psnr", "percent_folded")
"""Held-out metrics reported by :func:`evaluate`, in table order."""
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_AFFINE_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# configuration helpers used by the bundle configs


def _is_bundle(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "configs", "metadata.json"))


def bundle_root(start: str | os.PathLike | None = None) -> str:
    """The bundle folder (the one holding ``configs/metadata.json``), as an absolute path.

    Args:
        start: a bundle folder to check; None searches the current folder, then ``./bundle`` (so the runner works
            from the repository root and from ``bundle/``), then the entries of ``sys.path`` (``monai.bundle run``
            adds the folder above the config file's ``configs/`` there).

    Raises:
        FileNotFoundError: no candidate holds ``configs/metadata.json`` (the message lists where it looked).
    """
    if start is not None:
        candidates = [os.fspath(start)]
    else:
        candidates = [os.getcwd(), os.path.join(os.getcwd(), "bundle"), *[entry or os.getcwd() for entry in sys.path]]
    for candidate in candidates:
        if _is_bundle(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        f"cannot find the bundle folder (a folder holding configs/metadata.json); looked in {candidates[:2]} and "
        "sys.path. Run from the repository root or from bundle/."
    )


def load_common(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed top-level definitions of ``<bundle root>/configs/common.json`` (shared by every workflow config).

    ``bundle_root`` inside the file is replaced by the folder actually used, so paths defined from it point at the
    same bundle that the file was read from.

    Args:
        root: the bundle folder; None finds it with :func:`bundle_root`.

    Returns:
        ``{key: parsed value}`` for every top-level key except ``imports``.
    """
    from monai.bundle import ConfigParser

    root = bundle_root(root)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "common.json"))
    parser["bundle_root"] = root
    keys = [key for key in parser.get() if key not in (parser.meta_key, "imports")]
    return {key: parser.get_parsed_content(key) for key in keys}


def updated(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` applied: lets ``--fit#epochs 50`` override one shared setting."""
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a mapping of settings, got {type(base).__name__}.")
    return {**base, **changes}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None picks ``cuda`` when available, else ``cpu``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_datalist(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
) -> tuple[str, str | None]:
    """Which datalist to read and where its relative paths start.

    Args:
        datalist: the datalist file; its relative paths start at ``dataset_dir``, or at its own folder if None.
        dataset_dir: the data folder; with no ``datalist``, the datalist is ``<dataset_dir>/datalist.json``.
        demo_dir: with neither of the above, the demo dataset in this folder (made on first use).
        demo: keyword arguments of :func:`noder_monai.data.make_demo_dataset` for the demo dataset.

    Returns:
        ``(datalist path, dataset_dir or None)``.

    Raises:
        ValueError: none of ``datalist``, ``dataset_dir`` and ``demo_dir`` is given.
    """
    if datalist is not None:
        return os.fspath(datalist), None if dataset_dir is None else os.fspath(dataset_dir)
    if dataset_dir is not None:
        return os.path.join(os.fspath(dataset_dir), "datalist.json"), os.fspath(dataset_dir)
    if demo_dir is None:
        raise ValueError("give datalist (a datalist file) or dataset_dir (a folder holding datalist.json), got neither.")
    if not os.path.isfile(os.path.join(os.fspath(demo_dir), "datalist.json")):
        logger.info("making the demo dataset in %s", demo_dir)
    return make_demo_dataset(demo_dir, **dict(demo or {})), None


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


def _pretrained(pretrained: str | os.PathLike | None, spatial_dims: int) -> str | os.PathLike | None:
    """``"auto"``: the autoencoder shipped for ``spatial_dims`` if installed (else None, with a warning)."""
    if pretrained != "auto":
        return pretrained
    try:
        return default_autoencoder_path(spatial_dims)
    except FileNotFoundError as error:
        logger.warning("%s Fitting from randomly initialised encoder/decoder weights.", error)
        return None


def free_cores() -> int:
    """CPU cores this process may use minus the 1-minute load average (at least 1).

    More torch threads than idle cores makes every operation wait on descheduled threads: on a 2-core machine with
    one other busy process, 2 threads ran a fit 10-50x slower than 1 (design.md).
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, round(usable - os.getloadavg()[0]))) if hasattr(os, "getloadavg") else usable


def _set_threads(num_threads: int | None) -> None:
    if num_threads is None:
        num_threads = free_cores()
        logger.info("using %d torch thread(s): the idle cores now (set num_threads to override)", num_threads)
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
    torch.set_num_threads(num_threads)


def _entries(
    datalist: str | os.PathLike | None,
    dataset_dir: str | os.PathLike | None,
    demo_dir: str | os.PathLike | None,
    demo: Mapping[str, Any] | None,
) -> list[SubjectEntry]:
    path, base = resolve_datalist(datalist, dataset_dir, demo_dir, demo)
    entries = load_datalist(path, base)
    for entry in entries:
        if not _SAFE_ID.match(entry.id):
            raise ValueError(
                f"subject '{entry.id}': field 'id' is used as a folder name and may only hold letters, digits, '.', "
                f"'_' and '-' (not starting with '.', '_' or '-'), got {entry.id!r}."
            )
    logger.info("datalist %s: %d subject(s)", path, len(entries))
    return entries


# ----------------------------------------------------------------------------------------------------------------------
# writing


def time_tag(time: float) -> str:
    """File-name tag of a time: ``"t"`` + Python's shortest repr (``t2.1``, ``t7.0``, ``t1e-05``)."""
    return f"t{float(time)!r}"


def _atomic_write(path: str, data: bytes) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _write_json(document: Any, path: str) -> str:
    return _atomic_write(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _atomic_write(path, text.getvalue().encode("utf-8"))


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _tensorboard_writer(enabled: bool | None, log_dir: str) -> Any:
    """A ``SummaryWriter`` when ``enabled`` (or None and tensorboard is installed), else None."""
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if enabled:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
        return None
    return SummaryWriter(log_dir=log_dir)


def _epoch_logger(subject: str, total_epochs: int, writer: Any) -> Callable[[dict], None]:
    every = max(1, total_epochs // 10)

    def log(record: dict) -> None:
        epoch = record["epoch"]
        if writer is not None:
            for term in ("total", "similarity", "smoothness", "boundary"):
                writer.add_scalar(f"loss/{term}", record[term], epoch)
        if epoch % every == 0 or epoch == total_epochs - 1:
            logger.info(
                "%s epoch %d/%d level %d loss %.5f (similarity %.5f)",
                subject, epoch + 1, total_epochs, record["level"], record["total"], record["similarity"],
            )

    return log


def _check_grid(subject: FittedSubject, shape: Sequence[int], affine: torch.Tensor, where: str) -> None:
    subject.check_spatial_size(shape, where)
    if not torch.allclose(affine.to(torch.float64), subject.affine, atol=_AFFINE_ATOL):
        raise ValueError(f"{where} has affine {affine.tolist()}, but subject '{subject.subject}' was fitted on affine "
                         f"{subject.affine.tolist()}.")


def _load_subject(output_dir: str, entry: SubjectEntry, device: torch.device) -> FittedSubject:
    path = os.path.join(output_dir, entry.id, "model.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subject '{entry.id}': fitted model '{path}' not found; run training with this output_dir first.")
    subject = FittedSubject.load(path, map_location=device)
    if subject.subject != entry.id:
        raise ValueError(f"subject '{entry.id}': '{path}' holds subject '{subject.subject}'.")
    if subject.times.tolist() != [float(t) for t in entry.times]:
        logger.warning("subject '%s': the datalist's scan times %s differ from the fitted times %s",
                       entry.id, entry.times, subject.times.tolist())
    return subject


# ----------------------------------------------------------------------------------------------------------------------
# jobs


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
        datalist: datalist file (format: ``noder_monai.data.datalist``); see :func:`resolve_datalist`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`resolve_datalist`.
        output_dir: where each subject's folder is written.
        network: :class:`NODER` keyword arguments other than ``spatial_size``.
        fit: :class:`FitConfig` fields (or a ``FitConfig``).
        pretrained: deformation-autoencoder file initialising the encoder/decoder; ``"auto"`` uses the one shipped
            with the package for the data's spatial dims (``engines.pretrain.default_autoencoder_path``) when it is
            installed; None starts from random weights.
        device: torch device; None uses cuda when available.
        seed: random seed of every fit.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        skip_existing: keep subjects whose ``model.pt`` already exists (resume an interrupted cohort).
        tensorboard: write loss scalars to ``<output_dir>/tensorboard/<id>``; None does so if tensorboard is installed.
        progress: show a progress bar per subject.
        reader: image reader, ``"itk"``, ``"nibabel"`` or None (MONAI's choice).

    Returns:
        ``{subject id: {"model", "epochs", "final_loss", "seconds", "fitted"}}``, also written to
        ``<output_dir>/training_summary.json``.
    """
    _set_threads(num_threads)
    output_dir = os.path.abspath(os.fspath(output_dir))
    device = resolve_device(device)
    config = _fit_config(fit)
    network = _network_kwargs(network)
    if pretrained not in (None, "auto") and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained autoencoder file '{pretrained}' not found.")
    entries = _entries(datalist, dataset_dir, demo_dir, demo)
    summary: dict[str, dict] = {}
    for entry in entries:
        folder = os.path.join(output_dir, entry.id)
        model_path = os.path.join(folder, "model.pt")
        if skip_existing and os.path.isfile(model_path):
            logger.info("%s: %s exists, skipped", entry.id, model_path)
            continue
        sequence = entry.load(reader)
        writer = _tensorboard_writer(tensorboard, os.path.join(output_dir, "tensorboard", entry.id))
        logger.info("%s: fitting %d scans of size %s on %s", entry.id, len(entry.scans), sequence.spatial_size, device)
        start = timer.perf_counter()
        try:
            subject = fit_sequence(
                sequence, config, network, _pretrained(pretrained, sequence.spatial_dims), device, seed, progress,
                callback=_epoch_logger(entry.id, config.epochs, writer),
            )
        finally:
            if writer is not None:
                writer.close()
        seconds = timer.perf_counter() - start
        subject.save(model_path)
        _write_json(subject.history, os.path.join(folder, "loss.json"))
        _write_csv(subject.history, ["epoch", "level", "total", "similarity", "smoothness", "boundary"],
                   os.path.join(folder, "loss.csv"))
        fitted = subject.predict(sequence.times)
        paths = [
            save_image(image, sequence.affine, os.path.join(folder, "fitted", f"image_{time_tag(t)}.nii.gz"))
            for image, t in zip(fitted.images, sequence.times.tolist())
        ]
        final = subject.history[-1]["total"]
        summary[entry.id] = {"model": model_path, "epochs": len(subject.history), "final_loss": final,
                             "seconds": round(seconds, 3), "fitted": paths}
        logger.info("%s: %d epochs in %.1f s, final loss %.5f -> %s", entry.id, len(subject.history), seconds, final,
                    model_path)
    _write_json(summary, os.path.join(output_dir, "training_summary.json"))
    return summary


def _label_volumes(labels: torch.Tensor, times: Sequence[float], affine: torch.Tensor) -> list[dict]:
    voxel_mm3 = abs(float(torch.det(affine[:3, :3]))) if labels.ndim == 5 else abs(float(torch.det(affine[:2, :2])))
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
        datalist: datalist file; see :func:`resolve_datalist`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`resolve_datalist`.
        output_dir: the folder :func:`train` wrote to; predictions go to ``<output_dir>/<id>/predictions``.
        predict_times: query times for subjects without their own ``predict_times``.
        device: torch device; None uses cuda when available.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        batch_size: time points decoded and warped at once.
        reader: image reader for label maps.

    Returns:
        ``{subject id: predictions.json content}`` (times and file lists), also written to
        ``<output_dir>/inference_summary.json``.
    """
    _set_threads(num_threads)
    output_dir = os.path.abspath(os.fspath(output_dir))
    device = resolve_device(device)
    if predict_times is not None:
        predict_times = [float(t) for t in predict_times]
    summary: dict[str, dict] = {}
    for entry in _entries(datalist, dataset_dir, demo_dir, demo):
        subject = _load_subject(output_dir, entry, device)
        times = entry.predict_times or predict_times or sorted({*entry.times, *(t for _, t in entry.heldout)})
        times = sorted(set(times))
        labels = None
        if entry.label is not None:
            labels, affine = load_image(entry.label, reader)
            _check_grid(subject, labels.shape[1:], affine, f"subject '{entry.id}': field 'label' ({entry.label})")
        prediction = subject.predict(times, labels=labels, batch_size=batch_size)
        folder = os.path.join(output_dir, entry.id, "predictions")
        record: dict[str, Any] = {"subject": entry.id, "times": times, "images": [], "ddfs": [], "jacobians": [],
                                  "labels": []}
        for index, t in enumerate(times):
            tag = time_tag(t)
            record["images"].append(save_image(prediction.images[index], prediction.affine,
                                               os.path.join(folder, f"image_{tag}.nii.gz")))
            record["ddfs"].append(save_image(prediction.ddfs[index], prediction.affine,
                                             os.path.join(folder, f"ddf_{tag}.nii.gz")))
            record["jacobians"].append(save_image(prediction.jacobians[index], prediction.affine,
                                                  os.path.join(folder, f"jacobian_{tag}.nii.gz")))
            if prediction.labels is not None:
                record["labels"].append(save_image(prediction.labels[index], prediction.affine,
                                                   os.path.join(folder, f"label_{tag}.nii.gz"), dtype=np.int32))
        if prediction.labels is not None:
            _write_csv(_label_volumes(prediction.labels, times, prediction.affine),
                       ["time", "label", "voxels", "volume_mm3"], os.path.join(folder, "label_volumes.csv"))
        _write_json(record, os.path.join(folder, "predictions.json"))
        summary[entry.id] = record
        logger.info("%s: %d time point(s) -> %s", entry.id, len(times), folder)
    _write_json(summary, os.path.join(output_dir, "inference_summary.json"))
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# evaluation report


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (zlib + struct, no imaging library needed)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"rgb must be a non-empty (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}.")
    height, width = rgb.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _middle_slice(volume: torch.Tensor) -> np.ndarray:
    """``(1, *S)`` -> 2D array for display: the middle slice of the last axis (3D), first axis horizontal, second up."""
    array = volume[0].detach().cpu().to(torch.float64).numpy()
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2]
    return np.flipud(array.T)


def _grey(array: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0)
    return np.repeat((scaled * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _diverging(array: np.ndarray, limit: float) -> np.ndarray:
    """Blue (negative) - white (0) - red (positive), saturating at +-limit."""
    value = np.clip(array / max(limit, 1e-12), -1.0, 1.0)
    rgb = np.ones(array.shape + (3,))
    rgb[..., 1] -= np.abs(value)
    rgb[..., 0] -= np.clip(-value, 0, 1)
    rgb[..., 2] -= np.clip(value, 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def _montage(observed: torch.Tensor, predicted: torch.Tensor, min_panel: int = 128, gap: int = 4) -> np.ndarray:
    """Rows = time points; columns = observed, predicted, predicted - observed. Inputs ``(T, 1, *S)``."""
    shown_obs = [_middle_slice(v) for v in observed]
    shown_pred = [_middle_slice(v) for v in predicted]
    low, high = np.percentile(np.concatenate([s.ravel() for s in shown_obs]), [1, 99])
    differences = [p - o for p, o in zip(shown_pred, shown_obs)]
    limit = float(np.percentile(np.abs(np.concatenate([d.ravel() for d in differences])), 99)) or 1.0
    zoom = max(1, math.ceil(min_panel / max(shown_obs[0].shape)))
    rows = []
    for obs, pred, diff in zip(shown_obs, shown_pred, differences):
        panels = [_grey(obs, low, high), _grey(pred, low, high), _diverging(diff, limit)]
        panels = [panel.repeat(zoom, axis=0).repeat(zoom, axis=1) for panel in panels]
        spacer = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], spacer, panels[1], spacer, panels[2]], axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, spacer)][:-1], axis=0)


def _mean(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
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
        datalist: datalist file; see :func:`resolve_datalist`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`resolve_datalist`.
        output_dir: the folder :func:`train` wrote to.
        eval_dir: where the report is written.
        device: torch device; None uses cuda when available.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        montage: write the PNG montages.
        reader: image reader for the held-out scans.

    Returns:
        the ``metrics.json`` content.

    Raises:
        ValueError: no subject of the datalist has held-out scans.
    """
    _set_threads(num_threads)
    output_dir = os.path.abspath(os.fspath(output_dir))
    eval_dir = os.path.abspath(os.fspath(eval_dir))
    device = resolve_device(device)
    entries = [entry for entry in _entries(datalist, dataset_dir, demo_dir, demo) if entry.heldout]
    if not entries:
        raise ValueError("no subject of the datalist has a 'heldout' field: there is nothing to evaluate.")
    report: dict[str, Any] = {"metrics": list(METRICS), "subjects": {}}
    all_rows: list[dict] = []
    for entry in entries:
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
        values = {
            "nrmse": nrmse(prediction.images, target),
            "ssim": ssim(prediction.images, target),
            "psnr": psnr(prediction.images, target),
            "percent_folded": percent_folded(prediction.ddfs),
        }
        first, last = float(subject.times[0]), float(subject.times[-1])
        rows = []
        for index, (path, t) in enumerate(scans):
            row = {"time": t, "split": "interpolation" if first <= t <= last else "extrapolation", "image": path}
            row.update({name: _finite_or_none(float(values[name][index])) for name in METRICS})
            rows.append(row)
        all_rows.extend(rows)
        result: dict[str, Any] = {"scans": rows, "mean": _mean(rows)}
        if montage:
            result["montage"] = _atomic_write(os.path.join(eval_dir, f"{entry.id}_montage.png"),
                                              png_bytes(_montage(target, prediction.images)))
        report["subjects"][entry.id] = result
        logger.info("%s: %s", entry.id, ", ".join(f"{k} {v:.4g}" for k, v in result["mean"].items() if v is not None))
    report["splits"] = {
        split: {"count": len(rows), **_mean(rows)}
        for split in ("interpolation", "extrapolation")
        if (rows := [row for row in all_rows if row["split"] == split])
    }
    report["overall"] = {"count": len(all_rows), **_mean(all_rows)}
    _write_json(report, os.path.join(eval_dir, "metrics.json"))
    _atomic_write(os.path.join(eval_dir, "metrics.md"), markdown_table(report).encode("utf-8"))
    logger.info("metrics -> %s\n%s", os.path.join(eval_dir, "metrics.json"), markdown_table(report))
    return report


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
