"""The bundle's per-subject configs over a datalist: where the bundle is, which subject a run is, a cohort runner.

``bundle/configs/train.json`` (and ``inference.json``, ``evaluate.json``) describe one subject's run; the subject is
``subject_id`` of the datalist (or its first subject). :class:`CohortWorkflow` runs such a config once per subject::

    python -m monai.bundle run_workflow noder_monai.engines.CohortWorkflow \\
        --config_file "['bundle/configs/common.json','bundle/configs/train.json']" --datalist my_datalist.json
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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
                "`python -m monai.bundle run_workflow noder_monai.engines.CohortWorkflow ...` or `noder fit`.",
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


_CONFIG_ERROR = "Failed to evaluate"


@contextlib.contextmanager
def package_error() -> Iterator[None]:
    """Re-raise the error a config expression raised, not MONAI's wrapper around it.

    MONAI wraps an exception raised while a config expression is evaluated in ``RuntimeError("Failed to evaluate
    ConfigExpression: ...")`` (once per level of ``@`` references), which ``python -m monai.bundle run_workflow``
    prints last. Inside this context such a wrapper is replaced by a new exception of the original type and message
    (the whole chain stays in the traceback), so the package's message is the last line the user reads.
    Exceptions of types that cannot be rebuilt from their message are left as they are.
    """
    try:
        yield
    except RuntimeError as error:
        cause: BaseException = error
        while (isinstance(cause, RuntimeError) and str(cause).startswith(_CONFIG_ERROR)
               and cause.__cause__ is not None):
            cause = cause.__cause__
        if cause is error or not isinstance(cause, Exception):
            raise
        try:
            replacement = type(cause)(*cause.args)
        except Exception:
            replacement = None
        if replacement is None or str(replacement) != str(cause):
            raise
        raise replacement from error


class CohortWorkflow(ConfigWorkflow):
    """A ``ConfigWorkflow`` that runs a per-subject config once for every subject of its ``subjects`` (the datalist).

    Every subject gets a fresh ``ConfigWorkflow`` of the same files and overrides plus ``subject_id``: its own
    network, optimizer and handlers (and its own MLflow run, named by the subject id, with ``--tracking mlflow``).

    Args:
        config_file: the config files, e.g. ``['bundle/configs/common.json', 'bundle/configs/train.json']``.
        skip_existing: skip subjects whose ``model_path`` already exists (resume an interrupted cohort).
        kwargs: other ``ConfigWorkflow`` arguments and config overrides (``workflow_type``, ``tracking``,
            ``datalist``, ``fit#epochs``, ...).
    """

    def __init__(self, config_file: str | Sequence[str], skip_existing: bool = False, **kwargs: Any) -> None:
        super().__init__(config_file=config_file, **kwargs)
        self._subject_args = {"config_file": config_file, **kwargs}
        self.skip_existing = bool(skip_existing)
        self.results: dict[str, Any] = {}

    def initialize(self) -> Any:
        """``ConfigWorkflow.initialize``; a package error is re-raised with its own message (see :func:`package_error`)."""
        with package_error():
            return super().initialize()

    def run(self) -> dict[str, Any]:
        """Initialize, run and finalize the config for every subject. Returns ``{subject id: run result}``.

        A package error inside a subject's config (a stale model, a bad scan, an unwritable ``output_dir``) is
        re-raised with the package's message, so it is the last line of the traceback (see :func:`package_error`).
        """
        with package_error():
            for entry in self.parser.get_parsed_content("subjects"):
                workflow = ConfigWorkflow(**{**self._subject_args, "subject_id": entry.id})
                if self.skip_existing and "model_path" in workflow.parser:
                    workflow.parser.parse(reset=True)
                    path = workflow.parser.get_parsed_content("model_path")
                    if os.path.isfile(path):
                        logger.info("%s: %s exists, skipped", entry.id, path)
                        continue
                workflow.initialize()
                self.results[entry.id] = workflow.run()
                workflow.finalize()
        return self.results
