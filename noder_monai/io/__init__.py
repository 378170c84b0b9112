"""Scans and displacement fields on disk: NIfTI, NRRD and MetaImage through MONAI's ``LoadImage`` (ITK or nibabel),
written back as NIfTI in the input's exact geometry, and fields in the ITK / ANTs convention.

One loader owns geometry: :func:`load_scan` returns every image with its :class:`Geometry` (header forms, 2D layout,
the affine ITK reads), and :func:`save_image` / :func:`save_itk_displacement` write outputs with it.
"""

from noder_monai.io.image import (
    GEOMETRY_META_KEY,
    READERS,
    Geometry,
    GeometryNiftiWriter,
    check_image_file,
    check_output_dir,
    label_dtype,
    load_image,
    load_label_map,
    load_scan,
    parse_times,
    save_image,
    scan_shape,
    time_description,
    voxel_volume_mm3,
)
from noder_monai.io.itk_field import ddf_to_itk, save_itk_displacement

__all__ = [
    "GEOMETRY_META_KEY",
    "READERS",
    "Geometry",
    "GeometryNiftiWriter",
    "check_image_file",
    "check_output_dir",
    "ddf_to_itk",
    "label_dtype",
    "load_image",
    "load_label_map",
    "load_scan",
    "parse_times",
    "save_image",
    "save_itk_displacement",
    "scan_shape",
    "time_description",
    "voxel_volume_mm3",
]
