"""Engines: fit a subject's trajectory, save/load it as one file, predict at any time."""

from noder_monai.engines.fit import PRESETS, FitConfig, downsample_image, fit_sequence, subject_template
from noder_monai.engines.pretrain import (
    PretrainConfig,
    PretrainResult,
    default_autoencoder_path,
    evaluate_autoencoder,
    load_autoencoder,
    mean_endpoint_error,
    pretrain_autoencoder,
)
from noder_monai.engines.subject import (
    AUTOENCODER_FORMAT,
    SUBJECT_FORMAT,
    FittedSubject,
    PREDICT_SOURCES,
    Prediction,
    atomic_torch_save,
    load_autoencoder_weights,
    read_checkpoint,
)

__all__ = [
    "AUTOENCODER_FORMAT",
    "SUBJECT_FORMAT",
    "FitConfig",
    "PRESETS",
    "FittedSubject",
    "PREDICT_SOURCES",
    "Prediction",
    "PretrainConfig",
    "PretrainResult",
    "atomic_torch_save",
    "default_autoencoder_path",
    "downsample_image",
    "evaluate_autoencoder",
    "fit_sequence",
    "load_autoencoder",
    "load_autoencoder_weights",
    "mean_endpoint_error",
    "pretrain_autoencoder",
    "read_checkpoint",
    "subject_template",
]
