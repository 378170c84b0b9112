"""The bundle's per-subject configs over a datalist: where the bundle is, which items a run reads, errors that end
with the package's message, and :class:`CohortWorkflow`, which runs a config once per subject::

    python -m monai.bundle run_workflow noder_monai.workflows.CohortWorkflow \\
        --config_file bundle/configs/train.json --datalist my_datalist.json
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from noder_monai.data import SubjectEntry
from noder_monai.io import load_label_map
from noder_monai.model import FittedSubject
from noder_monai.workflows.cohort import CohortResult, exit_status, run_cohort
from noder_monai.workflows.paths import SubjectPaths
from noder_monai.workflows.stages import EvaluationJob, InferenceJob, Job, TrainingJob
from noder_monai.workflows.subject import UNCERTAINTY_KINDS, write_label_volumes, write_subject_metrics

__all__ = ["CohortWorkflow", "bundle_root", "install_error_hook", "package_error", "query_items", "subject_item"]

logger = logging.getLogger(__name__)


def bundle_root() -> str:
    """The bundle folder of the running config: the folder holding its ``configs/``.

    It is the folder MONAI's ``ConfigWorkflow`` derives from the config file's path (``config_root_path``: the first
    config file's folder, its parent when that folder is ``configs``), read from the workflow that is evaluating
    this expression (``python -m monai.bundle run``, ``run_workflow``, ``ConfigWorkflow(...)``). So the runner may
    start from the repository root, from ``bundle/`` or anywhere, and a copy of ``bundle/`` uses its own
    ``models/`` and writes under its own root. Outside a workflow (e.g. a bare ``ConfigParser``), the current folder
    or its ``bundle/`` when it holds ``configs/metadata.json``. ``--bundle_root DIR`` overrides it.

    Raises:
        FileNotFoundError: no workflow is running and neither folder is a bundle.
    """
    frame = inspect.currentframe()
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            folder = Path(workflow.config_root_path)
            return os.path.abspath(folder.parent if folder.name == "configs" else folder)
        frame = frame.f_back
    for candidate in (Path.cwd(), Path.cwd() / "bundle"):
        if (candidate / "configs" / "metadata.json").is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(f"cannot find the bundle folder (one holding configs/metadata.json) in {Path.cwd()} or "
                            f"{Path.cwd() / 'bundle'}; pass --bundle_root.")


def subject_item(entry: SubjectEntry) -> dict[str, Any]:
    """The training item of a subject before loading: ``{"image": [scan paths], "time": [times], "subject": id[,
    "label": path]}`` (``LoadSequenced`` reads it and checks the label map before the fit)."""
    item = {"image": [path for path, _ in entry.scans], "time": list(entry.times), "subject": entry.id}
    return {**item, "label": entry.label} if entry.label is not None else item


def query_items(
    entry: SubjectEntry, predict_times: Sequence[float] | None = None, heldout: bool = False
) -> list[dict[str, Any]]:
    """One inference item per query time (:meth:`SubjectEntry.query_times`): ``{"image": baseline path, "time":
    t[, "label": path]}``; with ``heldout``, one per held-out scan, its path as ``"target"``."""
    baseline = entry.scans[0][0]
    extra = {"label": entry.label} if entry.label is not None else {}
    if heldout:
        return [{"image": baseline, "time": float(t), "target": path, **extra}
                for path, t in sorted(entry.heldout, key=lambda scan: scan[1])]
    return [{"image": baseline, "time": t, **extra} for t in entry.query_times(predict_times)]


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
    The configs' ``initialize`` installs it; it changes nothing for errors without such a wrapper.
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
                    "output_dir", "eval_dir", "demo_dir", "paths", "model_path", "initialize", "run", "training",
                    "inference", "evaluation", "finalize")


class CohortWorkflow(ConfigWorkflow):
    """A ``ConfigWorkflow`` that runs a per-subject config once for every subject of its ``subjects`` (the datalist).

    Every subject gets a fresh ``ConfigWorkflow`` of the same files and overrides plus ``subject_id``: its own
    network, optimizer and handlers (and its own MLflow run, named by the subject id, with ``--tracking mlflow``).
    The stage is the config's: ``training`` (``train.json``), ``evaluation`` (``evaluate.json`` on
    ``inference.json``) or ``inference``. The subjects run through
    :func:`~noder_monai.workflows.cohort.run_cohort`, with the stage's :class:`~noder_monai.workflows.stages.Job`
    (the same as ``noder fit/predict/evaluate``'s): under ``torchrun`` (with ``configs/multi_gpu_*.json``) each rank
    takes a cost-balanced share; finished subjects are skipped; a failing subject is recorded in
    ``cohort_summary_<stage>.json`` and the others go on; rank 0 writes the cohort tables.

    Args:
        config_file: the config files, e.g. ``bundle/configs/train.json``.
        skip_existing: also keep subjects whose ``model.pt`` exists without a done-marker (older outputs).
        exit_on_failure: ``finalize`` exits the process with the number of failed subjects (capped at 100) when
            any failed (:func:`~noder_monai.workflows.cohort.exit_status`), so ``python -m monai.bundle
            run_workflow`` reports them in its exit status (under torchrun: rank 0, after every rank finished).
        kwargs: other ``ConfigWorkflow`` arguments and config overrides (``workflow_type``, ``tracking``,
            ``datalist``, ``epochs``, ...).
    """

    def __init__(self, config_file: str | Sequence[str], skip_existing: bool = False, exit_on_failure: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(config_file=config_file, **kwargs)
        self._subject_args = {"config_file": config_file, **kwargs}
        self.skip_existing = bool(skip_existing)
        self.exit_on_failure = bool(exit_on_failure)
        self.results: dict[str, Any] = {}
        self.cohort: CohortResult | None = None

    def initialize(self) -> Any:
        """``ConfigWorkflow.initialize``; a package error is re-raised with its own message (see :func:`package_error`)."""
        with package_error():
            return super().initialize()

    def run(self) -> dict[str, Any]:
        """Run the config for every subject of this rank's share. Returns ``{subject id: record}`` (``status``:
        done, skipped, failed or locked; on rank 0 for the whole cohort). A package error inside a
        subject's config is re-raised with the package's message, its last line (see :func:`package_error`)."""
        with package_error():
            parser = self.parser
            job = self._job(parser)
            distributed = parser.get_parsed_content("distributed") if "distributed" in parser else None
            self.cohort = run_cohort(parser.get_parsed_content("subjects"), job, distributed=distributed)
            self.results = self.cohort.records
        return self.results

    def _job(self, parser: Any) -> Job:
        output_dir = os.path.abspath(parser.get_parsed_content("output_dir"))
        eval_dir = os.path.abspath(parser.get_parsed_content("eval_dir")) if "eval_dir" in parser else None
        config = {k: v for k, v in parser.get().items() if k not in RESULT_FREE_KEYS}
        if "train" in parser:
            return TrainingJob(output_dir, self._work(parser, "training"), config, skip_existing=self.skip_existing)
        predict_times = parser.get_parsed_content("predict_times") if "predict_times" in parser else None
        if "key_metric" in parser:
            return EvaluationJob(output_dir, self._work(parser, "evaluation"), config, eval_dir)
        return InferenceJob(output_dir, self._work(parser, "inference", predict_times), config,
                            predict_times=predict_times)

    def _work(self, parser: Any, stage: str, predict_times: Any = None) -> Any:
        def work(entry: SubjectEntry) -> dict[str, Any]:
            return _run_subject(self._subject_args, entry, stage, predict_times)

        return work

    def finalize(self) -> Any:
        """``ConfigWorkflow.finalize``; then the exit status of the stage (:func:`~noder_monai.workflows.cohort.
        exit_status`): rank 0 waits until every rank finished and exits with the number of failed subjects."""
        result = super().finalize()
        if self.cohort is None:
            return result
        code = exit_status(self.cohort.stage, self.cohort.records)
        if self.exit_on_failure and code:
            raise SystemExit(code)
        return result


def _run_subject(args: Mapping[str, Any], entry: SubjectEntry, stage: str, predict_times: Any) -> dict[str, Any]:
    """One subject's ConfigWorkflow: initialize, run, finalize; its record with the files it wrote."""
    workflow = ConfigWorkflow(**{**args, "subject_id": entry.id})
    workflow.initialize()
    try:
        workflow.run()
        parser = workflow.parser
        paths = parser.get_parsed_content("paths")
        if stage == "training":
            return {"model": paths.model, "outputs": [p for p in (paths.model, paths.template) if os.path.isfile(p)]}
        if stage == "inference":
            uncertainty = bool(parser.get_parsed_content("uncertainty")) if "uncertainty" in parser else False
            return _inference_outputs(paths, entry, predict_times, parser.get_parsed_content("fitted").subject,
                                      uncertainty, parser.get_parsed_content("reader"))
        return _evaluation_outputs(paths, entry, parser.get_parsed_content("evaluator").state.metric_details,
                                   parser.get_parsed_content("fitted").subject.source_choice)
    finally:
        workflow.finalize()


def _inference_outputs(paths: SubjectPaths, entry: SubjectEntry, predict_times: Any, subject: FittedSubject,
                       uncertainty: bool, reader: str | None) -> dict[str, Any]:
    """The files the inference config wrote for ``entry`` (with ``uncertainty``, the standard deviation maps too)
    and, with a label, its ``label_volumes.csv`` (:func:`~noder_monai.workflows.subject.write_label_volumes`, as
    ``noder predict``; voxel counts from the label maps the config wrote)."""
    times = entry.query_times(predict_times)
    kinds = ("image", "ddf", "jacobian", *(UNCERTAINTY_KINDS if uncertainty else ()))
    outputs = [paths.prediction(kind, t) for t in times for kind in kinds]
    if entry.label is not None:
        labels = [paths.prediction("label", t) for t in times]
        carried = torch.stack([load_label_map(path)[0] for path in labels])
        baseline = subject.read_labels(entry.label, reader)[0]
        outputs += [*labels, write_label_volumes(paths, subject, baseline, times, carried, uncertainty)]
    return {"times": times, "prediction_dir": paths.predictions, "outputs": outputs}


def _evaluation_outputs(paths: SubjectPaths, entry: SubjectEntry, details: Mapping[str, Any],
                        appearance: Any = None) -> dict[str, Any]:
    """``subject_metrics.json`` (as ``noder evaluate`` writes it) from the evaluator's metric details and the fitted
    subject's appearance choice."""
    values = {name: detail.reshape(-1).tolist() for name, detail in details.items()}
    result = write_subject_metrics(entry, paths, values, appearance=appearance)
    folder = paths.evaluation
    outputs = [paths.subject_metrics, *(os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".csv"))]
    return {"mean": result["mean"], "outputs": outputs}
