"""Engines: fit a subject's trajectory (a MONAI trainer), save/load it as one file, predict at any time.

Names are imported on first use, so ``noder_monai.engines.subject`` (the fitted-subject file format) loads without
the training code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fit": ("PRESETS", "FitConfig", "check_fit_inputs", "fit_sequence"),
    "trainer": (
        "CoarseToFineHandler",
        "EpochCallbackHandler",
        "FittedSubjectSaver",
        "NODERTrainer",
        "downsample_image",
        "fitted_subject",
        "init_network",
        "cosine_schedule",
        "prepare_sequence_batch",
        "level_window",
        "subject_template",
        "TemplateHandler",
        "MIN_LEVEL_VOXELS",
    ),
    "pretrain": (
        "PretrainConfig",
        "PretrainResult",
        "default_autoencoder_path",
        "evaluate_autoencoder",
        "load_autoencoder",
        "mean_endpoint_error",
        "pretrain_autoencoder",
    ),
    "subject": (
        "AUTOENCODER_FORMAT",
        "SUBJECT_FORMAT",
        "FittedSubject",
        "PREDICT_SOURCES",
        "Prediction",
        "atomic_torch_save",
        "load_autoencoder_weights",
        "read_checkpoint",
    ),
    "cohort": (
        "CohortWorkflow", "bundle_root", "datalist_subjects", "install_error_hook", "package_error", "query_items",
        "select_subject", "subject_item",
    ),
    "distributed": ("partition_subjects", "rank_device", "rank_threads", "run_cohort"),
    "predictor": ("PredictionEvaluator", "TimeNameFormatter", "fitted_subject_from_checkpoint", "time_tag"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
