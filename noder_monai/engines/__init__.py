"""Engines: fit a subject's trajectory, save/load it as one file, predict at any time."""

from noder_monai.engines.fit import FitConfig, downsample_image, fit_sequence
from noder_monai.engines.subject import (
    AUTOENCODER_FORMAT,
    SUBJECT_FORMAT,
    FittedSubject,
    Prediction,
    atomic_torch_save,
    load_autoencoder_weights,
)

__all__ = [
    "AUTOENCODER_FORMAT",
    "SUBJECT_FORMAT",
    "FitConfig",
    "FittedSubject",
    "Prediction",
    "atomic_torch_save",
    "downsample_image",
    "fit_sequence",
    "load_autoencoder_weights",
]
