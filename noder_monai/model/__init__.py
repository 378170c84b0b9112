"""A fitted subject: its trajectory model, its one-file format and the pretrained weights a fit starts from.

What transforms, predictors and the report need, without the training code.
"""

from noder_monai.model.subject import (
    AUTOENCODER_FORMAT,
    PREDICT_SOURCES,
    SUBJECT_FORMAT,
    FittedSubject,
    Prediction,
    atomic_torch_save,
    load_autoencoder_weights,
    read_checkpoint,
    validate_subject_checkpoint,
)

__all__ = [
    "AUTOENCODER_FORMAT",
    "PREDICT_SOURCES",
    "SUBJECT_FORMAT",
    "FittedSubject",
    "Prediction",
    "atomic_torch_save",
    "load_autoencoder_weights",
    "read_checkpoint",
    "validate_subject_checkpoint",
]
