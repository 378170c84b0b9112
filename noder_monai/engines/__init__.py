"""Engines: one subject's fit as a MONAI trainer with its handlers, the evaluator of the bundle's inference, and the
pretraining of the deformation autoencoder."""

from noder_monai._deprecated import deprecated_getattr
from noder_monai.engines.evaluator import PredictionEvaluator, TimeNameFormatter, fitted_subject_from_checkpoint, time_tag
from noder_monai.engines.fit import PRESETS, FitConfig, check_fit_inputs, fit_sequence
from noder_monai.engines.pretrain import (
    PretrainConfig,
    PretrainResult,
    default_autoencoder_path,
    evaluate_autoencoder,
    load_autoencoder,
    mean_endpoint_error,
    pretrain_autoencoder,
)
from noder_monai.engines.trainer import (
    MIN_LEVEL_VOXELS,
    CoarseToFineHandler,
    EpochCallbackHandler,
    FittedSubjectSaver,
    NODERTrainer,
    TemplateHandler,
    cosine_schedule,
    downsample_image,
    fitted_subject,
    init_network,
    level_window,
    prepare_sequence_batch,
    subject_template,
)

__all__ = [
    "CoarseToFineHandler",
    "EpochCallbackHandler",
    "FitConfig",
    "FittedSubjectSaver",
    "MIN_LEVEL_VOXELS",
    "NODERTrainer",
    "PRESETS",
    "PredictionEvaluator",
    "PretrainConfig",
    "PretrainResult",
    "TemplateHandler",
    "TimeNameFormatter",
    "check_fit_inputs",
    "cosine_schedule",
    "default_autoencoder_path",
    "downsample_image",
    "evaluate_autoencoder",
    "fit_sequence",
    "fitted_subject",
    "fitted_subject_from_checkpoint",
    "init_network",
    "level_window",
    "load_autoencoder",
    "mean_endpoint_error",
    "prepare_sequence_batch",
    "pretrain_autoencoder",
    "subject_template",
    "time_tag",
]

__getattr__ = deprecated_getattr(__name__)
