"""Reading, checking and normalising image sequences; synthetic sequences with known truth; the demo dataset."""

from noder_monai._deprecated import deprecated_getattr
from noder_monai.data.datalist import SubjectEntry, load_datalist
from noder_monai.data.deformation_fields import (
    DeformationFieldGenerator,
    DisplacementFieldPatches,
    GeneratedDeformationFields,
    compose_displacements,
    list_displacement_fields,
    load_displacement_field,
)
from noder_monai.data.demo import (
    DEMO_HELDOUT_TIMES,
    DEMO_PREDICT_TIMES,
    DEMO_TIMES,
    build_demo_assets,
    demo_labels,
    demo_volume,
    make_demo_dataset,
)
from noder_monai.data.intensity import IntensityMapping
from noder_monai.data.sequence import SubjectSequence, file_fingerprint, load_sequence, load_series
from noder_monai.data.synthetic import DEFAULT_TIMES, SyntheticSequence, synthetic_sequence

__all__ = [
    "DEFAULT_TIMES",
    "DEMO_HELDOUT_TIMES",
    "DEMO_PREDICT_TIMES",
    "DEMO_TIMES",
    "DeformationFieldGenerator",
    "DisplacementFieldPatches",
    "GeneratedDeformationFields",
    "IntensityMapping",
    "SubjectEntry",
    "SubjectSequence",
    "SyntheticSequence",
    "build_demo_assets",
    "compose_displacements",
    "demo_labels",
    "demo_volume",
    "file_fingerprint",
    "list_displacement_fields",
    "load_datalist",
    "load_displacement_field",
    "load_sequence",
    "load_series",
    "make_demo_dataset",
    "synthetic_sequence",
]

__getattr__ = deprecated_getattr(__name__)
