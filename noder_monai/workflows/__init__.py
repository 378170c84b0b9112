"""The stages over a cohort: training, inference and evaluation of every subject of a datalist
(:mod:`~noder_monai.workflows.stages` names them), one function per stage and subject, across processes, from
Python, the ``noder`` command and the bundle's :class:`CohortWorkflow`; the HTML report of a run."""

from noder_monai.workflows.bundle import (
    CohortWorkflow,
    bundle_root,
    install_error_hook,
    package_error,
    query_items,
    subject_item,
)
from noder_monai.workflows.cohort import exit_status, run_cohort
from noder_monai.workflows.jobs import (
    check_pretrained,
    evaluate,
    infer,
    prepare_output_dir,
    run_demo,
    split_settings,
    train,
)
from noder_monai.workflows.paths import SubjectPaths
from noder_monai.workflows.report import cohort_report
from noder_monai.workflows.shares import rank_device, rank_threads
from noder_monai.workflows.stages import STAGES
from noder_monai.workflows.subject import ensure_ensemble, remove_uncertainty_maps

__all__ = [
    "STAGES",
    "CohortWorkflow",
    "SubjectPaths",
    "bundle_root",
    "check_pretrained",
    "cohort_report",
    "ensure_ensemble",
    "remove_uncertainty_maps",
    "evaluate",
    "exit_status",
    "infer",
    "install_error_hook",
    "package_error",
    "prepare_output_dir",
    "query_items",
    "rank_device",
    "rank_threads",
    "run_cohort",
    "run_demo",
    "split_settings",
    "subject_item",
    "train",
]
