"""MONAI transforms: a subject's scans as one training item, its intensity mapping, and warps along a fitted NODER
trajectory for any image or label map."""

from noder_monai._deprecated import deprecated_getattr
from noder_monai.transforms.intensity import IntensityMappingd
from noder_monai.transforms.loading import LoadLabelMapd, LoadScand
from noder_monai.transforms.naming import TimeNameFormatter
from noder_monai.transforms.ode_warp import PADDING_MODES, WARP_MODES, ODEWarp, ODEWarpd, ODEWarpD, ODEWarpDict
from noder_monai.transforms.sequence import LoadSequenced, sequence_item

__all__ = [
    "IntensityMappingd",
    "LoadLabelMapd",
    "LoadScand",
    "LoadSequenced",
    "ODEWarp",
    "ODEWarpD",
    "ODEWarpDict",
    "ODEWarpd",
    "PADDING_MODES",
    "TimeNameFormatter",
    "WARP_MODES",
    "sequence_item",
]

__getattr__ = deprecated_getattr(__name__)
