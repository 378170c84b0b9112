"""Old import paths of names that moved, kept for one release.

Each package whose names moved ends with ``__getattr__ = deprecated_getattr(__name__)``: an attribute the package no
longer has is looked up in :data:`MOVED`, imported from its new home with a ``DeprecationWarning`` that names the new
path, and returned. So ``"_target_": "noder_monai.engines.CohortWorkflow"`` in a user's config, ``from
noder_monai.engines import jobs`` and ``noder_monai.data.load_image`` keep working until the next release.
The new modules are imported by name (``importlib``) only when an old path is used, so a package never imports a
package above it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["MOVED", "deprecated_getattr"]

REMOVED_IN = "0.3.0"


def _names(module: str, *names: str) -> dict[str, str]:
    return {name: f"{module}:{name}" for name in names}


#: ``{old package: {old name: "new.module:name"}}``; a new path without ``:name`` is a module (an old submodule).
MOVED: dict[str, dict[str, str]] = {
    "noder_monai.engines": {
        **_names("noder_monai.model", "AUTOENCODER_FORMAT", "SUBJECT_FORMAT", "FittedSubject", "PREDICT_SOURCES",
                 "Prediction", "default_autoencoder_path", "load_autoencoder", "load_autoencoder_weights",
                 "read_checkpoint"),
        **_names("noder_monai.model.checkpoint", "atomic_torch_save"),
        **_names("noder_monai.model.loader", "fitted_subject_from_checkpoint"),
        **_names("noder_monai.engines.levels", "MIN_LEVEL_VOXELS", "downsample_image", "level_window"),
        **_names("noder_monai.engines.trainer", "fitted_subject", "prepare_sequence_batch", "subject_template"),
        **_names("noder_monai.engines.pretrain", "evaluate_autoencoder", "mean_endpoint_error"),
        **_names("noder_monai.utils", "time_tag"),
        **_names("noder_monai.transforms", "TimeNameFormatter"),
        **_names("noder_monai.workflows", "CohortWorkflow", "bundle_root", "install_error_hook", "package_error",
                 "query_items", "rank_device", "rank_threads", "run_cohort", "subject_item"),
        **_names("noder_monai.data", "datalist_subjects", "select_subject"),
        **_names("noder_monai.workflows.shares", "partition_subjects"),
        "subject": "noder_monai.model.subject",
        "predictor": "noder_monai.engines.evaluator",
        "report": "noder_monai.reporting.tables",
        "report_html": "noder_monai.reporting.html",
        "jobs": "noder_monai.workflows.jobs",
        "cohort": "noder_monai.workflows.bundle",
        "distributed": "noder_monai.workflows.cohort",
    },
    "noder_monai.transforms": _names("noder_monai.model", "load_fitted_subject"),
    "noder_monai.data": {
        **_names("noder_monai.io", "GEOMETRY_META_KEY", "Geometry", "GeometryNiftiWriter", "check_output_dir",
                 "ddf_to_itk", "load_image", "load_label_map", "load_scan", "parse_times", "save_image",
                 "save_itk_displacement", "voxel_volume_mm3"),
        **_names("noder_monai.utils", "atomic_write", "clean_stale_temporaries"),
        **_names("noder_monai.functional", "compose_displacements"),
        **_names("noder_monai.data.demo", "DEMO_HELDOUT_TIMES", "DEMO_PREDICT_TIMES", "DEMO_TIMES", "build_demo_assets"),
        **_names("noder_monai.data.synthetic", "DEFAULT_TIMES"),
        **_names("noder_monai.data.sequence", "file_fingerprint"),
        **_names("noder_monai.data.deformation_fields", "list_displacement_fields"),
        "io": "noder_monai.io.image",
        "itk_field": "noder_monai.io.itk_field",
    },
}


def _resolve(old: str, target: str) -> Any:
    module, _, name = target.partition(":")
    new = f"{module}.{name}" if name else module
    warnings.warn(f"{old} has moved to {new}; the old path is removed in noder-monai {REMOVED_IN}.",
                  DeprecationWarning, stacklevel=3)
    value = importlib.import_module(module)
    return getattr(value, name) if name else value


def deprecated_getattr(package: str) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: resolves the old names in :data:`MOVED` with a warning."""
    moved = MOVED.get(package, {})

    def __getattr__(name: str) -> Any:
        if name in moved:
            return _resolve(f"{package}.{name}", moved[name])
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
