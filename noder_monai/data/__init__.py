"""Reading, checking and normalising image sequences; synthetic sequences with known truth; the demo dataset."""

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
from noder_monai.data.io import load_image, save_image
from noder_monai.data.sequence import SubjectSequence, load_sequence
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
    "list_displacement_fields",
    "load_datalist",
    "load_displacement_field",
    "load_image",
    "load_sequence",
    "make_demo_dataset",
    "save_image",
    "synthetic_sequence",
]
