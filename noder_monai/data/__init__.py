"""A cohort's data: datalists, one subject's sequence of scans, the user's inputs (scans, cine, BIDS) as a datalist,
the intensity mapping of a subject, synthetic sequences with known truth, the demo dataset and the deformation
fields the autoencoder is pretrained on."""

from noder_monai._deprecated import deprecated_getattr
from noder_monai.data.datalist import SPLITS, SubjectEntry, load_datalist, select_subject
from noder_monai.data.deformation_fields import (
    DeformationFieldGenerator,
    DisplacementFieldPatches,
    GeneratedDeformationFields,
    load_displacement_field,
)
from noder_monai.data.demo import demo_labels, demo_volume, make_demo_dataset
from noder_monai.data.inputs import datalist_subjects, inputs_datalist
from noder_monai.data.intensity import IntensityMapping
from noder_monai.data.sequence import SubjectSequence, load_sequence, load_series, read_label_map
from noder_monai.data.synthetic import SyntheticSequence, synthetic_sequence

__all__ = [
    "SPLITS",
    "DeformationFieldGenerator",
    "DisplacementFieldPatches",
    "GeneratedDeformationFields",
    "IntensityMapping",
    "SubjectEntry",
    "SubjectSequence",
    "SyntheticSequence",
    "datalist_subjects",
    "demo_labels",
    "demo_volume",
    "inputs_datalist",
    "load_datalist",
    "load_displacement_field",
    "load_sequence",
    "load_series",
    "make_demo_dataset",
    "read_label_map",
    "select_subject",
    "synthetic_sequence",
]

__getattr__ = deprecated_getattr(__name__)
