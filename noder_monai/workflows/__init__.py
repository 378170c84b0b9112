"""Stages over a cohort: training, inference and evaluation of every subject of a datalist, across processes, from
Python, the ``noder`` command and the bundle's ``CohortWorkflow``."""

from noder_monai.workflows.bundle import (
    CohortWorkflow,
    bundle_root,
    datalist_subjects,
    install_error_hook,
    package_error,
    query_items,
    select_subject,
    subject_item,
)
from noder_monai.workflows.cohort import partition_subjects, rank_device, rank_threads, run_cohort
from noder_monai.workflows.jobs import evaluate, infer, run_demo, split_settings, train

__all__ = [
    "CohortWorkflow",
    "bundle_root",
    "datalist_subjects",
    "evaluate",
    "infer",
    "install_error_hook",
    "package_error",
    "partition_subjects",
    "query_items",
    "rank_device",
    "rank_threads",
    "run_cohort",
    "run_demo",
    "select_subject",
    "split_settings",
    "subject_item",
    "train",
]
