"""A fitted subject: its trajectory model, its one-file format and validation, and the weights a fit starts from.

What transforms, predictors and the report need, without the training code.
"""

from noder_monai.model.checkpoint import AUTOENCODER_FORMAT, SUBJECT_FORMAT, read_checkpoint
from noder_monai.model.loader import FittedSubjectLoader, load_fitted_subject
from noder_monai.model.pretrained import default_autoencoder_path, load_autoencoder, load_autoencoder_weights
from noder_monai.model.subject import PREDICT_SOURCES, FittedSubject, Prediction

__all__ = [
    "AUTOENCODER_FORMAT",
    "PREDICT_SOURCES",
    "SUBJECT_FORMAT",
    "FittedSubject",
    "FittedSubjectLoader",
    "Prediction",
    "default_autoencoder_path",
    "load_autoencoder",
    "load_autoencoder_weights",
    "load_fitted_subject",
    "read_checkpoint",
]
