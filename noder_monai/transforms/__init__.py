"""MONAI transforms that warp images and labels along a fitted NODER trajectory."""

from noder_monai.transforms.intensity import IntensityMappingd
from noder_monai.transforms.ode_warp import (
    PADDING_MODES,
    WARP_MODES,
    ODEWarp,
    ODEWarpd,
    ODEWarpD,
    ODEWarpDict,
    load_fitted_subject,
)

__all__ = ["IntensityMappingd", "ODEWarp", "ODEWarpd", "ODEWarpD", "ODEWarpDict", "load_fitted_subject", "WARP_MODES", "PADDING_MODES"]
