"""The stages over a datalist from Python and the ``noder`` command: :func:`train`, :func:`infer`, :func:`evaluate`
(stage names and verbs: :mod:`~noder_monai.workflows.stages`), and :func:`run_demo`.

Each runs its stage's per-subject function (:mod:`~noder_monai.workflows.subject`) through
:func:`~noder_monai.workflows.cohort.run_cohort`: under ``torchrun`` each rank takes a cost-balanced share; finished
subjects are skipped, failing ones recorded; rank 0 writes the cohort files. The fit is the bundle's training run
(:func:`~noder_monai.engines.fit_sequence` passes the same checks and builds the same trainer and handlers as
``bundle/configs/train.json``); predictions equal those of ``bundle/configs/inference.json``. Files are named by
:class:`~noder_monai.workflows.paths.SubjectPaths`. Every job first checks that the folder it writes to is writable
(:func:`~noder_monai.io.check_output_dir`) and removes the temporaries a killed run left there.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time as timer
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from noder_monai.data import datalist_subjects, make_demo_dataset
from noder_monai.engines import FitConfig
from noder_monai.io import check_output_dir, parse_times
from noder_monai.networks import NODER, check_noder_arguments
from noder_monai.reporting.tables import METRICS, markdown_table
from noder_monai.utils import clean_stale_temporaries, set_threads, tensorboard_available
from noder_monai.workflows.cohort import run_cohort
from noder_monai.workflows.shares import rank_device, rank_threads
from noder_monai.workflows.stages import EvaluationJob, InferenceJob, TrainingJob
from noder_monai.workflows.subject import evaluate_subject, infer_subject, train_subject

__all__ = ["evaluate", "infer", "prepare_output_dir", "run_demo", "split_settings", "train"]

logger = logging.getLogger(__name__)


def _settings(values: Mapping[str, Any] | None, allowed: Sequence[str], name: str) -> dict[str, Any]:
    values = dict(values or {})
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown setting(s) {unknown}; allowed: {sorted(allowed)}.")
    return values


def split_settings(**settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort flat settings into :class:`FitConfig` fields and :class:`NODER` arguments (the names do not overlap).

    Returns:
        ``(fit, network)`` dictionaries, their values checked (:class:`FitConfig`,
        :func:`~noder_monai.networks.check_noder_arguments`).

    Raises:
        ValueError: naming the settings that are neither, or a setting whose value is refused.
    """
    fit_names = {f.name for f in dataclasses.fields(FitConfig)}
    network_names = set(inspect.signature(NODER).parameters) - {"spatial_size"}
    unknown = sorted(set(settings) - fit_names - network_names)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown}; FitConfig fields: {sorted(fit_names)}; NODER arguments: {sorted(network_names)}."
        )
    fit = {k: v for k, v in settings.items() if k in fit_names}
    network = network_kwargs({k: v for k, v in settings.items() if k in network_names})
    fit_config(fit)
    return fit, network


def fit_config(fit: Mapping[str, Any] | FitConfig | None) -> FitConfig:
    """A :class:`FitConfig` from its fields (unknown ones named in the error)."""
    if isinstance(fit, FitConfig):
        return fit
    return FitConfig(**_settings(fit, [f.name for f in dataclasses.fields(FitConfig)], "fit"))


def network_kwargs(network: Mapping[str, Any] | None) -> dict[str, Any]:
    """:class:`NODER` keyword arguments other than ``spatial_size``, checked (unknown ones and values out of bounds
    named in the error, :func:`~noder_monai.networks.check_noder_arguments`)."""
    allowed = [name for name in inspect.signature(NODER).parameters if name != "spatial_size"]
    return check_noder_arguments(_settings(network, allowed, "network"), "network")


def check_pretrained(pretrained: str | os.PathLike | None) -> None:
    """Check the ``pretrained`` setting of :func:`train` before any work.

    Raises:
        FileNotFoundError: naming the file, when ``pretrained`` is a path (not None or ``"auto"``) that is no file.
    """
    if pretrained not in (None, "auto") and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained autoencoder file '{pretrained}' not found.")


def prepare_output_dir(path: str | os.PathLike) -> str:
    """:func:`check_output_dir` (fail before any work if ``path`` cannot be written), then remove the temporaries a
    killed run left there. Returns the absolute path."""
    path = check_output_dir(path)
    removed = clean_stale_temporaries(path)
    if removed:
        logger.info("removed %d temporary file(s) a killed run left in %s", len(removed), path)
    return path


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
        datalist: datalist file (format: ``noder_monai.data.datalist``); see :func:`~noder_monai.data.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.data.datalist_subjects`.
        output_dir: where each subject's folder is written.
        network: :class:`NODER` keyword arguments other than ``spatial_size``.
        fit: :class:`FitConfig` fields (or a ``FitConfig``).
        pretrained: deformation-autoencoder file initialising the encoder/decoder; ``"auto"`` uses the one shipped
            with the package for the data's spatial dims (:func:`~noder_monai.model.default_autoencoder_path`) when it is
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
        the whole cohort on rank 0 (also in ``<output_dir>/cohort_summary_training.json``), for the rank's share on
        other ranks.

    Raises:
        ValueError: ``output_dir`` exists and is not a folder or is not writable (before any subject is fitted).
    """
    set_threads(rank_threads(num_threads))
    device = rank_device(device)
    config, network = fit_config(fit), network_kwargs(network)
    check_pretrained(pretrained)
    if tensorboard:  # a missing package is the run's error, not each subject's
        tensorboard_available(required=True)
    entries = datalist_subjects(datalist, dataset_dir, demo_dir, demo)
    output_dir = prepare_output_dir(output_dir)  # after the datalist checks, before the first fit
    settings = {"fit": dataclasses.asdict(config), "network": network, "seed": seed,
                "pretrained": _file_identity(pretrained)}
    job = TrainingJob(output_dir, lambda entry: train_subject(entry, job.paths(entry), config, network, pretrained,
                                                             device, seed, progress, tensorboard, reader),
                      settings, skip_existing=skip_existing)
    return run_cohort(entries, job).records


def _file_identity(path: Any) -> Any:
    """A file setting as it enters the config hash: its path, size and modification time (None, "auto" as is)."""
    if path in (None, "auto") or not os.path.isfile(path):
        return path
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


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
    uncertainty: bool = False,
) -> dict[str, dict]:
    """Predict every fitted subject of a datalist at its query times; write images, fields, Jacobians and labels.

    Query times per subject: its datalist ``predict_times``, else ``predict_times`` given here, else its observed
    and held-out times. The baseline label map is carried along when the subject has a ``label``.

    Args:
        datalist: datalist file; see :func:`~noder_monai.data.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.data.datalist_subjects`.
        output_dir: the folder :func:`train` wrote to; predictions go to ``<output_dir>/<id>/predictions``.
        predict_times: query times for subjects without their own ``predict_times`` (anything
            :func:`~noder_monai.io.image.parse_times` accepts, e.g. ``[1.0, 2.5]`` or ``"[1.0, 2.5]"``).
        device: torch device; None uses cuda when available.
        num_threads: torch CPU threads (None: the cores idle at start, see :func:`noder_monai.utils.free_cores`).
        demo_dir: demo dataset folder used when neither ``datalist`` nor ``dataset_dir`` is given.
        demo: keyword arguments of ``make_demo_dataset`` for the demo dataset.
        batch_size: time points decoded and warped at once.
        reader: image reader for label maps.
        uncertainty: also write each time's calibrated standard deviation maps of the image and of log det J
            (``image_std_t<time>.nii.gz``, ``log_jacobian_std_t<time>.nii.gz``) and the 90 % bands of the label
            volumes; a subject whose model file holds no uncertainty ensemble gets one fitted and stored in it first
            (:func:`~noder_monai.workflows.subject.ensure_ensemble`).

    Raises:
        ValueError: ``output_dir`` cannot be written, a fitted model is stale (its scan files or times changed; the
            message names the model file and the change), or a label map is not one volume of integer labels.

    Returns:
        ``{subject id: predictions.json content and "status"}`` (as :func:`train`; also in
        ``<output_dir>/cohort_summary_inference.json``); ``<output_dir>/cohort_label_volumes.csv`` holds one row per
        subject and time.
    """
    set_threads(rank_threads(num_threads))
    device = rank_device(device)
    if predict_times is not None:
        predict_times = parse_times(predict_times, name="predict_times")
    entries = datalist_subjects(datalist, dataset_dir, demo_dir, demo)
    output_dir = prepare_output_dir(output_dir)
    job = InferenceJob(output_dir, lambda entry: infer_subject(entry, job.paths(entry), predict_times, device,
                                                              batch_size, reader, uncertainty),
                       {"predict_times": predict_times, **({"uncertainty": True} if uncertainty else {})},
                       predict_times=predict_times)
    return run_cohort(entries, job).records


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
        datalist: datalist file; see :func:`~noder_monai.data.datalist_subjects`.
        dataset_dir: folder the datalist's relative paths start from; see :func:`~noder_monai.data.datalist_subjects`.
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
    set_threads(rank_threads(num_threads))
    device = rank_device(device)
    entries = [entry for entry in datalist_subjects(datalist, dataset_dir, demo_dir, demo) if entry.heldout]
    if not entries:
        raise ValueError("no subject of the datalist has a 'heldout' field: there is nothing to evaluate.")
    eval_dir = prepare_output_dir(eval_dir)
    job = EvaluationJob(os.path.abspath(os.fspath(output_dir)),
                        lambda entry: evaluate_subject(entry, job.paths(entry), device, montage, reader),
                        {"montage": montage}, eval_dir)
    result = run_cohort(entries, job)
    if result.rank != 0:  # the cohort report is rank 0's; other ranks return their share's failures
        return {"metrics": list(METRICS), "failed": result.failed}
    return job.report


def run_demo(
    directory: str | os.PathLike = "noder_demo",
    n_subjects: int = 2,
    size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    **training: Any,
) -> dict[str, Any]:
    """Make the demo dataset (if absent) in ``<directory>/data``, then train, infer and evaluate.

    Args:
        directory: folder of ``data/``, ``outputs/`` and ``eval/``.
        n_subjects, size: the demo dataset (:func:`~noder_monai.data.make_demo_dataset`).
        seed: seed of the dataset and of every fit.
        device, num_threads: as for :func:`train`.
        training: other :func:`train` arguments (``network``, ``fit``, ``pretrained``, ``progress``).

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
    results: dict[str, Any] = {}
    for stage, run in (("training", lambda: train(seed=seed, **training, **common)), ("inference", lambda: infer(**common)),
                       ("evaluation", lambda: evaluate(eval_dir=eval_dir, **common))):
        start = timer.perf_counter()
        results[stage] = run()
        seconds[stage] = timer.perf_counter() - start
    return {"datalist": datalist, "output_dir": output_dir, "eval_dir": eval_dir, "training": results["training"],
            "inference": results["inference"], "metrics": results["evaluation"],
            "table": markdown_table(results["evaluation"]), "seconds": {k: round(v, 2) for k, v in seconds.items()}}
