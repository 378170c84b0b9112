"""Engines: one subject's fit as a MONAI trainer with its handlers (the wiring ``train.json`` and
:func:`fit_sequence` share), the evaluator of the bundle's inference, and the pretraining of the deformation
autoencoder."""

from noder_monai._deprecated import deprecated_getattr
from noder_monai.engines.config import PRESETS, FitConfig, check_fit_inputs, tracking_params
from noder_monai.engines.ensemble import fit_ensemble
from noder_monai.engines.evaluator import PredictionEvaluator
from noder_monai.engines.fit import fit_sequence
from noder_monai.engines.handlers import CoarseToFineHandler, EpochCallbackHandler, FittedSubjectSaver, TemplateHandler
from noder_monai.engines.pretrain import PretrainConfig, PretrainResult, pretrain_autoencoder
from noder_monai.engines.trainer import NODERTrainer, cosine_schedule, init_network, subject_collate

__all__ = [
    "CoarseToFineHandler",
    "EpochCallbackHandler",
    "FitConfig",
    "FittedSubjectSaver",
    "NODERTrainer",
    "PRESETS",
    "PredictionEvaluator",
    "PretrainConfig",
    "PretrainResult",
    "TemplateHandler",
    "check_fit_inputs",
    "cosine_schedule",
    "fit_ensemble",
    "fit_sequence",
    "init_network",
    "pretrain_autoencoder",
    "tracking_params",
    "subject_collate",
]

__getattr__ = deprecated_getattr(__name__)
