"""The bundle's per-subject configs over a datalist: where the bundle is, which subject a run is, a cohort runner.

``bundle/configs/train.json`` (and ``inference.json``, ``evaluate.json``) describe one subject's run; the subject is
``subject_id`` of the datalist (or its first subject). :class:`CohortWorkflow` runs such a config once per subject::

    python -m monai.bundle run_workflow noder_monai.workflows.CohortWorkflow \\
        --config_file "['bundle/configs/common.json','bundle/configs/train.json']" --datalist my_datalist.json
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from noder_monai.data import SubjectEntry, load_datalist, make_demo_dataset

__all__ = ["CohortWorkflow", "package_error", "bundle_root", "datalist_subjects", "select_subject", "subject_item", "query_items"]

logger = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def bundle_root() -> str:
    """The bundle folder (the one holding ``configs/metadata.json``) for a run that does not set ``bundle_root``.

    Looks in the current folder, then ``./bundle`` (the runner started from ``bundle/`` or from the repository
    root), then the ``bundle/`` folder of the checkout this package is imported from. Override it with
    ``--bundle_root DIR`` (or ``ConfigWorkflow(..., bundle_root=DIR)``) anywhere else.

    Raises:
        FileNotFoundError: none of these holds ``configs/metadata.json``.
    """
    candidates = [Path.cwd(), Path.cwd() / "bundle", Path(__file__).resolve().parents[2] / "bundle"]
    for candidate in candidates:
        if _is_bundle(candidate):
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"cannot find the bundle folder (one holding configs/metadata.json) in {[str(c) for c in candidates]}; "
        "run from the repository root or bundle/, or pass --bundle_root."
    )


def datalist_subjects(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo: Mapping[str, Any] | None = None,
) -> list[SubjectEntry]:
    """The subjects of a datalist (format: ``noder_monai.data.datalist``), their ids checked as folder names.

    Args:
        datalist: the datalist file; its relative paths start at ``dataset_dir``, or at its own folder if None.
        dataset_dir: the data folder; with no ``datalist``, the datalist is ``<dataset_dir>/datalist.json``.
        demo_dir: with neither of the above, the demo dataset in this folder (made on first use).
        demo: keyword arguments of :func:`noder_monai.data.make_demo_dataset` for the demo dataset.

    Raises:
        ValueError: none of ``datalist``, ``dataset_dir`` and ``demo_dir`` is given, or an id is not a safe
            folder name.
    """
    if datalist is not None:
        path, base = os.fspath(datalist), None if dataset_dir is None else os.fspath(dataset_dir)
    elif dataset_dir is not None:
        path, base = os.path.join(os.fspath(dataset_dir), "datalist.json"), os.fspath(dataset_dir)
    elif demo_dir is not None:
        if not os.path.isfile(os.path.join(os.fspath(demo_dir), "datalist.json")):
            logger.info("making the demo dataset in %s", demo_dir)
        path, base = make_demo_dataset(demo_dir, **dict(demo or {})), None
    else:
        raise ValueError("give datalist (a datalist file) or dataset_dir (a folder holding datalist.json), got neither.")
    entries = load_datalist(path, base)
    for entry in entries:
        if not _SAFE_ID.match(entry.id):
            raise ValueError(
                f"subject '{entry.id}': field 'id' is used as a folder name and may only hold letters, digits, '.', "
                f"'_' and '-' (not starting with '.', '_' or '-'), got {entry.id!r}."
            )
    logger.info("datalist %s: %d subject(s)", path, len(entries))
    return entries


def select_subject(subjects: Sequence[SubjectEntry], subject_id: str | None = None) -> SubjectEntry:
    """The subject ``subject_id`` of ``subjects``; None takes the first (and says how to run all of them).

    Raises:
        ValueError: naming the datalist's ids, if ``subject_id`` is not one of them or the datalist is empty.
    """
    if not subjects:
        raise ValueError("the datalist has no subjects.")
    if subject_id is None:
        if len(subjects) > 1:
            logger.warning(
                "subject_id not given: running subject '%s', the first of %d; run every subject with "
                "`python -m monai.bundle run_workflow noder_monai.workflows.CohortWorkflow ...` or `noder fit`.",
                subjects[0].id, len(subjects),
            )
        return subjects[0]
    for entry in subjects:
        if entry.id == str(subject_id):
            return entry
    raise ValueError(f"subject_id {subject_id!r} is not in the datalist; its ids are {[e.id for e in subjects]}.")


def subject_item(entry: SubjectEntry) -> dict[str, Any]:
    """The training item of a subject: ``{"image": [scan paths], "time": [times], "subject": id}``."""
    return {"image": [path for path, _ in entry.scans], "time": list(entry.times), "subject": entry.id}


def query_items(
    entry: SubjectEntry, predict_times: Sequence[float] | None = None, heldout: bool = False
) -> list[dict[str, Any]]:
    """One inference item per query time: ``{"image": baseline path, "time": t[, "label": path][, "target": path]}``.

    Args:
        entry: the subject.
        predict_times: query times when the subject has no ``predict_times`` of its own; None uses its observed and
            held-out times.
        heldout: one item per held-out scan instead, with the scan's path as ``target``.
    """
    baseline = entry.scans[0][0]
    extra = {"label": entry.label} if entry.label is not None else {}
    if heldout:
        return [{"image": baseline, "time": float(t), "target": path, **extra} for path, t in sorted(entry.heldout, key=lambda s: s[1])]
    times = entry.predict_times or predict_times or [*entry.times, *(t for _, t in entry.heldout)]
    return [{"image": baseline, "time": float(t), **extra} for t in sorted(set(float(t) for t in times))]


_CONFIG_ERRORS = ("Failed to evaluate", "Failed to instantiate component")


def _config_cause(error: BaseException) -> BaseException:
    """The exception a config expression or component raised, under MONAI's ``Failed to evaluate`` / ``Failed to
    instantiate component`` wrappers (itself if none)."""
    cause = error
    while isinstance(cause, RuntimeError) and str(cause).startswith(_CONFIG_ERRORS) and cause.__cause__ is not None:
        cause = cause.__cause__
    return cause


def install_error_hook() -> None:
    """Make the package's own message the last line of an uncaught error in ``python -m monai.bundle run``.

    Python prints MONAI's ``Failed to evaluate ConfigExpression`` (or ``Failed to instantiate component``) wrapper
    last; the hook prints the usual traceback and then, when the wrapper hides another error, that error's type and
    message once more as the final line.
    ``common.json``'s ``initialize`` installs it; it changes nothing for errors without such a wrapper.
    """
    if getattr(sys.excepthook, "noder_package_error", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        previous(kind, error, trace)
        cause = _config_cause(error)
        if cause is not error:
            print(f"{type(cause).__name__}: {cause}", file=sys.stderr)

    hook.noder_package_error = True  # type: ignore[attr-defined]
    sys.excepthook = hook


@contextlib.contextmanager
def package_error() -> Iterator[None]:
    """Re-raise the error a config expression or component raised, not MONAI's wrapper around it.

    MONAI wraps an exception raised while a config expression is evaluated in ``RuntimeError("Failed to evaluate
    ConfigExpression: ...")`` (once per level of ``@`` references), and one raised by a ``_target_`` in
    ``RuntimeError("Failed to instantiate component ...")``, which ``python -m monai.bundle run_workflow``
    prints last. Inside this context such a wrapper is replaced by a new exception of the original type and message
    (the whole chain stays in the traceback), so the package's message is the last line the user reads.
    Exceptions of types that cannot be rebuilt from their message are left as they are.
    """
    try:
        yield
    except RuntimeError as error:
        cause = _config_cause(error)
        if cause is error or not isinstance(cause, Exception):
            raise
        try:
            replacement = type(cause)(*cause.args)
        except Exception:
            replacement = None
        if replacement is None or str(replacement) != str(cause):
            raise
        raise replacement from error


# config keys that do not change a subject's result: left out of the done-marker's config hash
RESULT_FREE_KEYS = ("imports", "bundle_root", "device", "num_threads", "distributed", "subject_id", "subject",
                    "run_name", "tracking_uri", "experiment_name", "save_execute_config", "is_not_rank0",
                    "output_dir", "eval_dir", "demo_dir")


def _stage(parser: Any) -> str:
    if "train" in parser:
        return "train"
    return "evaluate" if "key_metric" in parser else "inference"


class CohortWorkflow(ConfigWorkflow):
    """A ``ConfigWorkflow`` that runs a per-subject config once for every subject of its ``subjects`` (the datalist).

    Every subject gets a fresh ``ConfigWorkflow`` of the same files and overrides plus ``subject_id``: its own
    network, optimizer and handlers (and its own MLflow run, named by the subject id, with ``--tracking mlflow``).
    The subjects run through :func:`noder_monai.workflows.cohort.run_cohort`: under ``torchrun`` (with
    ``configs/multi_gpu_*.json``) each rank takes a cost-balanced share; a subject whose done-marker matches the
    config and its input files is skipped (a rerun resumes); a failing subject is recorded in
    ``cohort_summary_<stage>.json`` and the others go on; rank 0 writes ``cohort_label_volumes.csv`` (inference)
    and ``cohort_metrics.csv`` (evaluation), one row per subject and time.

    Args:
        config_file: the config files, e.g. ``['bundle/configs/common.json', 'bundle/configs/train.json']``.
        skip_existing: also keep subjects whose ``model_path`` exists without a done-marker (older outputs).
        exit_on_failure: ``finalize`` exits the process with the number of failed subjects (capped at 100) when
            any failed, so ``python -m monai.bundle run_workflow`` reports them in its exit status (under torchrun:
            rank 0, after every rank finished).
        kwargs: other ``ConfigWorkflow`` arguments and config overrides (``workflow_type``, ``tracking``,
            ``datalist``, ``fit#epochs``, ...).
    """

    def __init__(self, config_file: str | Sequence[str], skip_existing: bool = False, exit_on_failure: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(config_file=config_file, **kwargs)
        self._subject_args = {"config_file": config_file, **kwargs}
        self.skip_existing = bool(skip_existing)
        self.exit_on_failure = bool(exit_on_failure)
        self.results: dict[str, Any] = {}
        self.cohort: Any = None

    def initialize(self) -> Any:
        """``ConfigWorkflow.initialize``; a package error is re-raised with its own message (see :func:`package_error`)."""
        with package_error():
            return super().initialize()

    def run(self) -> dict[str, Any]:
        """Run the config for every subject of this rank's share. Returns ``{subject id: record}`` (``status``:
        done, skipped, failed or locked; on rank 0 for the whole cohort). A package error inside a
        subject's config is re-raised with the package's message, its last line (see :func:`package_error`)."""
        with package_error():
            from noder_monai.workflows import cohort

            parser = self.parser
            stage = _stage(parser)
            subjects = parser.get_parsed_content("subjects")
            output_dir = os.path.abspath(parser.get_parsed_content("output_dir"))
            eval_dir = os.path.abspath(parser.get_parsed_content("eval_dir")) if "eval_dir" in parser else output_dir
            summary_dir = eval_dir if stage == "evaluate" else output_dir
            config = {k: v for k, v in parser.get().items() if k not in RESULT_FREE_KEYS}
            predict_times = parser.get_parsed_content("predict_times") if "predict_times" in parser else None

            def folder(entry: SubjectEntry) -> str:
                return os.path.join(summary_dir, entry.id)

            def inputs(entry: SubjectEntry) -> tuple[list[str], Any]:
                model = os.path.join(output_dir, entry.id, "model.pt")
                if stage == "train":
                    return [path for path, _ in entry.scans], entry.times
                if stage == "inference":
                    return [model, *([entry.label] if entry.label else [])], [entry.predict_times, predict_times]
                return [model, *(path for path, _ in entry.heldout)], [t for _, t in entry.heldout]

            def work(entry: SubjectEntry) -> dict[str, Any]:
                return _run_subject(self._subject_args, entry, stage, predict_times)

            def check(entry: SubjectEntry) -> None:
                cohort.check_subject(entry)
                model = os.path.join(output_dir, entry.id, "model.pt")
                if stage != "train" and not os.path.isfile(model):
                    raise FileNotFoundError(f"subject '{entry.id}': fitted model '{model}' not found; run training first.")

            def merge(entries: Sequence[SubjectEntry], records: dict[str, dict]) -> None:
                if stage == "inference":
                    cohort.cohort_label_volumes(entries, lambda e: os.path.join(output_dir, e.id, "predictions"),
                                                     os.path.join(output_dir, "cohort_label_volumes.csv"))
                elif stage == "evaluate":
                    from noder_monai.reporting.tables import METRICS

                    cohort.cohort_metrics(entries, lambda e: os.path.join(eval_dir, e.id, "subject_metrics.json"),
                                               os.path.join(eval_dir, "cohort_metrics.csv"), METRICS)

            def legacy(entry: SubjectEntry, _: str) -> dict | None:
                model = os.path.join(output_dir, entry.id, "model.pt")
                return {"model": model, "legacy": True} if os.path.isfile(model) else None

            self.cohort = cohort.run_cohort(
                subjects, stage, work, folder, summary_dir, config, inputs, merge=merge, check=check,
                legacy=legacy if self.skip_existing and stage == "train" else None,
                distributed=parser.get_parsed_content("distributed") if "distributed" in parser else None,
            )
            self.results = self.cohort.records
        return self.results

    def finalize(self) -> Any:
        """``ConfigWorkflow.finalize``; then, under torchrun, rank 0 waits until every rank finished (torchrun stops
        all processes once one exits non-zero) and only rank 0, whose records cover the cohort, exits with the
        number of failed subjects."""
        result = super().finalize()
        if self.cohort is None:
            return result
        if self.cohort.world_size > 1:
            from noder_monai.workflows.cohort import wait_for_ranks

            wait_for_ranks(self.cohort.stage)
        if self.exit_on_failure and self.cohort.rank == 0 and self.cohort.failed:
            raise SystemExit(self.cohort.exit_code)
        return result


def _run_subject(args: Mapping[str, Any], entry: SubjectEntry, stage: str, predict_times: Any) -> dict[str, Any]:
    """One subject's ConfigWorkflow: initialize, run, finalize; its record with the files it wrote."""
    workflow = ConfigWorkflow(**{**args, "subject_id": entry.id})
    workflow.initialize()
    try:
        workflow.run()
        parser = workflow.parser
        if stage == "train":
            model = parser.get_parsed_content("model_path")
            return {"model": model, "outputs": [model]}
        if stage == "inference":
            return _inference_outputs(parser.get_parsed_content("prediction_dir"), entry, predict_times)
        return _evaluation_outputs(parser.get_parsed_content("metric_dir"), entry,
                                   parser.get_parsed_content("evaluator").state.metric_details)
    finally:
        workflow.finalize()


def _inference_outputs(folder: str, entry: SubjectEntry, predict_times: Any) -> dict[str, Any]:
    """The files the inference config wrote for ``entry`` and, with a label, its ``label_volumes.csv``."""
    import torch

    from noder_monai.io import load_image
    from noder_monai.workflows.jobs import _label_volumes
    from noder_monai.engines.evaluator import time_tag
    from noder_monai.utils import write_csv

    times = [item["time"] for item in query_items(entry, predict_times)]
    outputs = [os.path.join(folder, f"{kind}_{time_tag(t)}.nii.gz") for t in times for kind in ("image", "ddf", "jacobian")]
    if entry.label is not None:
        labels = [os.path.join(folder, f"label_{time_tag(t)}.nii.gz") for t in times]
        maps = [load_image(path) for path in labels]
        rows = _label_volumes(torch.stack([m for m, _ in maps]), times, maps[0][1])
        outputs += [*labels, write_csv(rows, ["time", "label", "voxels", "volume_mm3"],
                                       os.path.join(folder, "label_volumes.csv"))]
    return {"times": times, "prediction_dir": folder, "outputs": outputs}


def _evaluation_outputs(folder: str, entry: SubjectEntry, details: Mapping[str, Any]) -> dict[str, Any]:
    """``<metric_dir>/subject_metrics.json`` (as ``noder evaluate`` writes it) from the evaluator's metric details."""
    import math

    from noder_monai.reporting.tables import METRICS, mean_metrics
    from noder_monai.utils import write_json

    first, last = entry.times[0], entry.times[-1]
    rows = []
    for index, item in enumerate(query_items(entry, heldout=True)):
        t = item["time"]
        row = {"time": t, "split": "interpolation" if first <= t <= last else "extrapolation", "image": item["target"]}
        for name in METRICS:
            value = float(details[name].reshape(-1)[index]) if name in details else float("nan")
            row[name] = value if math.isfinite(value) else None
        rows.append(row)
    path = write_json({"scans": rows, "mean": mean_metrics(rows)}, os.path.join(folder, "subject_metrics.json"))
    outputs = [path, *(os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".csv"))]
    return {"mean": mean_metrics(rows), "outputs": outputs}
