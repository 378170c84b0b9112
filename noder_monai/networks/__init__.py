"""Networks: the deformation autoencoder, the latent dynamics and the NODER trajectory module."""

from noder_monai.networks.autoencoder import (
    DECODER_STRIDE,
    ENCODER_STRIDE,
    DeformationAutoencoder,
    DeformationDecoder,
    DeformationEncoder,
    pad_to_multiple,
    smooth_upsample,
)
from noder_monai.networks.dynamics import LatentDynamics
from noder_monai.networks.noder import ARGUMENT_BOUNDS, FIELD_TYPES, LEVELS, NODER, check_noder_arguments, scale_window

__all__ = [
    "ARGUMENT_BOUNDS",
    "DECODER_STRIDE",
    "ENCODER_STRIDE",
    "FIELD_TYPES",
    "LEVELS",
    "DeformationAutoencoder",
    "DeformationDecoder",
    "DeformationEncoder",
    "LatentDynamics",
    "NODER",
    "check_noder_arguments",
    "pad_to_multiple",
    "scale_window",
    "smooth_upsample",
]
