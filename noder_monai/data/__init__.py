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
from noder_monai.data.io import (
    GEOMETRY_META_KEY,
    Geometry,
    GeometryNiftiWriter,
    atomic_write,
    check_output_dir,
    clean_stale_temporaries,
    load_image,
    load_label_map,
    load_scan,
    parse_times,
    save_image,
    voxel_volume_mm3,
)
from noder_monai.data.itk_field import ddf_to_itk, save_itk_displacement
from noder_monai.data.sequence import SubjectSequence, file_fingerprint, load_sequence, load_series
from noder_monai.data.synthetic import DEFAULT_TIMES, SyntheticSequence, synthetic_sequence

__all__ = [
    "DEFAULT_TIMES",
    "DEMO_HELDOUT_TIMES",
    "DEMO_PREDICT_TIMES",
    "DEMO_TIMES",
    "DeformationFieldGenerator",
    "DisplacementFieldPatches",
    "GEOMETRY_META_KEY",
    "Geometry",
    "GeometryNiftiWriter",
    "GeneratedDeformationFields",
    "IntensityMapping",
    "SubjectEntry",
    "SubjectSequence",
    "SyntheticSequence",
    "atomic_write",
    "build_demo_assets",
    "check_output_dir",
    "clean_stale_temporaries",
    "compose_displacements",
    "ddf_to_itk",
    "demo_labels",
    "demo_volume",
    "file_fingerprint",
    "list_displacement_fields",
    "load_datalist",
    "load_displacement_field",
    "load_image",
    "load_label_map",
    "load_scan",
    "load_sequence",
    "load_series",
    "make_demo_dataset",
    "parse_times",
    "save_image",
    "save_itk_displacement",
    "synthetic_sequence",
    "voxel_volume_mm3",
]
