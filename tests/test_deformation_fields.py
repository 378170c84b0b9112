"""Generated fields are seeded, smooth, fold-free and a few voxels large; user fields load in every layout or fail
with a message that names the file."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from noder_monai.data.deformation_fields import (
    DeformationFieldGenerator,
    DisplacementFieldPatches,
    GeneratedDeformationFields,
    list_displacement_fields,
    load_displacement_field,
)
from noder_monai.functional import compose_displacements
from noder_monai.io import save_image
from noder_monai.metrics import jacobian_determinant


@pytest.mark.parametrize("spatial_size", [(32, 32, 32), (64, 64), (24, 20, 16)])
def test_generated_fields_are_fold_free_and_a_few_voxels_large(spatial_size):
    fields = DeformationFieldGenerator(spatial_size, max_displacement=(1.0, 5.0)).generate(8, seed=3)
    assert fields.shape == (8, len(spatial_size), *spatial_size)
    assert float(jacobian_determinant(fields).min()) > 0.0
    largest = fields.pow(2).sum(1).sqrt().flatten(1).amax(1)
    assert float(largest.min()) > 0.3
    assert float(largest.max()) < 12.0


def test_a_field_depends_on_its_key_only():
    generator = DeformationFieldGenerator((16, 16, 16))
    batch = generator.fields([(0, 5), (0, 6), (1, 5)])
    alone = generator.fields([(0, 6)])
    assert torch.allclose(batch[1], alone[0], atol=1e-6)
    assert float((batch[0] - batch[2]).abs().max()) > 0.1
    assert torch.equal(generator.generate(2, seed=0, start=5), generator.fields([(0, 5), (0, 6)]))


def test_background_only_fields_vanish_on_the_border():
    only_background = {"background": 1.0, "regions": 0.0, "cardiac": 0.0}
    fields = DeformationFieldGenerator((20, 20, 20), probabilities=only_background).generate(3)
    border = torch.cat([fields[:, :, 0], fields[:, :, -1], fields[..., 0], fields[..., -1]], dim=2)
    assert float(border.abs().max()) < 1e-5
    assert float(fields.abs().max()) > 0.3


def test_cardiac_motion_is_concentrated_around_the_centre():
    only_cardiac = {"background": 0.0, "regions": 0.0, "cardiac": 1.0}
    fields = DeformationFieldGenerator((48, 48), probabilities=only_cardiac).generate(4)
    length = fields.pow(2).sum(1).sqrt()
    centre, corner = length[:, 8:40, 8:40].flatten(1).amax(1), length[:, :4, :4].flatten(1).amax(1)
    assert torch.equal(centre, length.flatten(1).amax(1))
    assert float((corner / centre).max()) < 0.35


def test_compose_displacements_adds_translations_and_keeps_identity():
    shift_a = torch.zeros(1, 3, 8, 8, 8)
    shift_a[:, 0] = 0.5
    shift_b = torch.zeros(1, 3, 8, 8, 8)
    shift_b[:, 2] = -1.25
    assert torch.allclose(compose_displacements(shift_a, shift_b), shift_a + shift_b)
    field = DeformationFieldGenerator((16, 16, 16)).generate(1)
    assert torch.allclose(compose_displacements(field, torch.zeros_like(field)), field)
    with pytest.raises(ValueError, match="same shape"):
        compose_displacements(field, shift_a)


def test_generated_dataset_items_equal_batches_and_work_with_a_dataloader():
    dataset = GeneratedDeformationFields(6, (16, 16), seed=2, stream=1)
    loaded = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert loaded.shape == (4, 2, 16, 16)
    assert torch.allclose(loaded, dataset.batch(range(4)), atol=1e-6)
    assert torch.allclose(dataset[3], loaded[3], atol=1e-6)
    other_stream = GeneratedDeformationFields(6, (16, 16), seed=2, stream=0)
    assert float((other_stream[0] - dataset[0]).abs().max()) > 0.01
    with pytest.raises(IndexError, match="out of range for 6 fields"):
        dataset[6]


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"spatial_size must have 2 or 3 entries, each >= 8, got \(4, 4\)"):
        DeformationFieldGenerator((4, 4))
    with pytest.raises(ValueError, match="probabilities keys must be in"):
        DeformationFieldGenerator((16, 16), probabilities={"twist": 1.0})
    with pytest.raises(ValueError, match=r"max_displacement must be a pair \(min, max\)"):
        DeformationFieldGenerator((16, 16), max_displacement=(3.0, 1.0))


def _write(path, array, affine=None, vector=False):
    image = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4) if affine is None else affine)
    if vector:
        image.header.set_intent("vector")
    nib.save(image, str(path))
    return path


@pytest.fixture
def field3d():
    return DeformationFieldGenerator((12, 10, 8), max_displacement=(1.0, 2.0)).generate(1)[0]


def test_every_layout_loads_to_the_same_field(tmp_path, field3d):
    array = field3d.numpy()
    itk = save_image(field3d, torch.eye(4), tmp_path / "itk.nii.gz")
    last = _write(tmp_path / "last.nii.gz", np.moveaxis(array, 0, -1))
    first = _write(tmp_path / "first.nii.gz", array)
    for path in (itk, last, first):
        loaded, affine = load_displacement_field(path)
        assert loaded.shape == (3, 12, 10, 8)
        assert torch.allclose(loaded, field3d, atol=1e-6)
        assert affine.shape == (4, 4)


def test_2d_layouts_load(tmp_path):
    field = DeformationFieldGenerator((16, 12)).generate(1)[0]
    itk = save_image(field, torch.eye(4), tmp_path / "itk2d.nii.gz")
    last = _write(tmp_path / "last2d.nii.gz", np.moveaxis(field.numpy(), 0, -1))
    for path in (itk, last):
        assert torch.allclose(load_displacement_field(path, spatial_dims=2)[0], field, atol=1e-6)


def test_millimetre_fields_are_converted_with_the_affine(tmp_path):
    voxels = torch.zeros(3, 8, 8, 8)
    voxels[0], voxels[1], voxels[2] = 0.5, -0.25, 1.0
    affine = np.diag([2.0, 3.0, 1.5, 1.0])
    spacing, flip = np.array([2.0, 3.0, 1.5]).reshape(3, 1, 1, 1), np.array([-1.0, -1.0, 1.0]).reshape(3, 1, 1, 1)
    lps = voxels.numpy() * spacing * flip
    path = _write(tmp_path / "ants.nii.gz", np.moveaxis(lps, 0, -1)[..., None, :], affine, vector=True)
    loaded, _ = load_displacement_field(path, units="mm")
    assert torch.allclose(loaded, voxels, atol=1e-6)
    ras = _write(tmp_path / "ras.nii.gz", np.moveaxis(lps * flip, 0, -1), affine)
    assert torch.allclose(load_displacement_field(ras, units="mm", frame="RAS")[0], voxels, atol=1e-6)


def test_wrong_channel_count_names_the_file(tmp_path):
    path = _write(tmp_path / "two.nii.gz", np.zeros((8, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"two\.nii\.gz': expected 3 components .* got shape \(8, 8, 8, 2\)"):
        load_displacement_field(path)


def test_scalar_volume_and_bad_5d_shapes_are_rejected(tmp_path):
    scalar = _write(tmp_path / "scalar.nii.gz", np.zeros((8, 8, 8)))
    with pytest.raises(ValueError, match=r"scalar\.nii\.gz': expected 3 components"):
        load_displacement_field(scalar)
    series = _write(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 2, 3)))
    with pytest.raises(ValueError, match=r"series\.nii\.gz': a 5D file must be \(X, Y, Z, 1, 3\)"):
        load_displacement_field(series)
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"flat\.nii\.gz': shape \(3, 8, 8\) has 2 spatial axes, expected 3"):
        load_displacement_field(flat)


def test_non_finite_values_name_the_file(tmp_path, field3d):
    array = np.moveaxis(field3d.numpy(), 0, -1).copy()
    array[2, 3, 4, 1] = np.nan
    array[0, 0, 0, 0] = np.inf
    path = _write(tmp_path / "nan.nii.gz", array)
    with pytest.raises(ValueError, match=r"nan\.nii\.gz' has 2 non-finite values"):
        load_displacement_field(path)


def test_implausible_magnitude_suggests_millimetres(tmp_path):
    path = _write(tmp_path / "big.nii.gz", np.full((8, 8, 8, 3), 5.0))
    with pytest.raises(ValueError, match=r"big\.nii\.gz': largest displacement 8\.66 voxels exceeds .* units='mm'"):
        load_displacement_field(path)
    assert load_displacement_field(path, max_displacement=10.0)[0].shape == (3, 8, 8, 8)


def test_patches_crop_flip_and_check_sizes(tmp_path, field3d):
    path = save_image(field3d, torch.eye(4), tmp_path / "f.nii.gz")
    patches = DisplacementFieldPatches([path], patch_size=8, num_samples=5, flips=True, seed=1)
    assert len(patches) == 5
    assert patches.batch(range(5)).shape == (5, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"f\.nii\.gz' has spatial size \(12, 10, 8\), smaller than patch_size \(9, 9"):
        DisplacementFieldPatches([path], patch_size=9)


def _flip(field, axes):
    """Flip (D, *S) along the spatial ``axes`` and negate those components."""
    flipped = field.flip([axis + 1 for axis in axes]) if axes else field.clone()
    for axis in axes:
        flipped[axis] = -flipped[axis]
    return flipped


def test_a_flipped_field_warps_the_flipped_image(tmp_path, field3d):
    path = save_image(field3d, torch.eye(4), tmp_path / "f.nii.gz")
    patches = DisplacementFieldPatches([path], num_samples=8, flips=True, seed=0)
    combos = [[a for a in range(3) if mask >> a & 1] for mask in range(8)]
    found = [next(axes for axes in combos if torch.equal(patches[k], _flip(field3d, axes))) for k in range(8)]
    assert len({tuple(axes) for axes in found}) > 2
    image = torch.rand(1, 1, 12, 10, 8)
    warp = Warp(mode="bilinear", padding_mode="border")
    axes = max(found, key=len)
    dims = [axis + 2 for axis in axes]
    result = warp(image.flip(dims), _flip(field3d, axes)[None]).flip(dims)
    assert torch.allclose(result, warp(image, field3d[None]), atol=1e-5)


def test_list_fields_from_a_folder_and_a_datalist(tmp_path, field3d):
    for name in ("b.nii.gz", "a.nii"):
        save_image(field3d, torch.eye(4), tmp_path / name)
    assert [p.name for p in list_displacement_fields(tmp_path)["training"]] == ["a.nii", "b.nii.gz"]
    datalist = tmp_path / "fields.json"
    datalist.write_text(json.dumps({"training": ["a.nii"], "validation": [{"field": "b.nii.gz"}]}))
    lists = list_displacement_fields(datalist)
    assert [p.name for p in lists["training"]] == ["a.nii"] and [p.name for p in lists["validation"]] == ["b.nii.gz"]
    datalist.write_text(json.dumps({"training": ["missing.nii.gz"]}))
    with pytest.raises(FileNotFoundError, match=r"training\[0\] file '.*missing\.nii\.gz' does not exist"):
        list_displacement_fields(datalist)
