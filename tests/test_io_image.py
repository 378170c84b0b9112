import os

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from noder_monai.io.image import load_image, save_image

READERS = ["itk", "nibabel", None]


def _affine(spacing=(1.5, 2.0, 2.5), origin=(-10.0, 4.0, 7.5)):
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = origin
    return torch.as_tensor(affine, dtype=torch.float64)


@pytest.mark.parametrize("reader", READERS)
def test_scalar_3d_round_trip(tmp_path, reader):
    image = torch.rand(1, 6, 7, 5)
    affine = _affine()
    path = save_image(image, affine, tmp_path / "scan.nii.gz")
    loaded, loaded_affine = load_image(path, reader=reader)
    assert loaded.shape == (1, 6, 7, 5)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, image)
    assert loaded_affine.dtype == torch.float64
    assert torch.allclose(loaded_affine, affine, atol=1e-6)


@pytest.mark.parametrize("reader", READERS)
def test_oblique_affine_round_trip(tmp_path, reader):
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 0.9, 2.0])
    affine[:3, 3] = [3.0, -4.0, 5.0]
    image = torch.rand(1, 5, 4, 3)
    path = save_image(image, affine, tmp_path / "oblique.nii")
    loaded, loaded_affine = load_image(path, reader=reader)
    assert torch.equal(loaded, image)
    assert np.allclose(loaded_affine.numpy(), affine, atol=1e-6)


@pytest.mark.parametrize("reader", READERS)
def test_ddf_3d_round_trip_and_channel_last_layout(tmp_path, reader):
    ddf = torch.randn(3, 6, 5, 4)
    path = save_image(ddf, _affine(), tmp_path / "ddf.nii.gz")
    stored = nib.load(path)
    assert stored.shape == (6, 5, 4, 1, 3)
    assert stored.header.get_intent()[0] == "vector"
    assert np.array_equal(np.asarray(stored.dataobj)[2, 3, 1, 0], ddf[:, 2, 3, 1].numpy())
    loaded, loaded_affine = load_image(path, reader=reader)
    assert loaded.shape == (3, 6, 5, 4)
    assert torch.equal(loaded, ddf)
    assert torch.allclose(loaded_affine, _affine(), atol=1e-6)


def test_ddf_is_an_itk_vector_image(tmp_path):
    ddf = torch.randn(3, 6, 5, 4)
    path = save_image(ddf, _affine(), tmp_path / "ddf.nii.gz")
    image = itk.imread(path)
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert tuple(itk.size(image)) == (6, 5, 4)
    array = itk.array_view_from_image(image)  # (z, y, x, component)
    assert np.allclose(array[1, 3, 2], ddf[:, 2, 3, 1].numpy())
    assert np.allclose(np.asarray(image.GetSpacing()), [1.5, 2.0, 2.5])


@pytest.mark.parametrize("reader", READERS)
def test_2d_image_and_ddf_round_trip(tmp_path, reader):
    affine = _affine(spacing=(0.5, 0.7, 1.0), origin=(1.0, 2.0, 0.0))
    image = torch.rand(1, 8, 9)
    ddf = torch.randn(2, 8, 9)
    loaded, loaded_affine = load_image(save_image(image, affine, tmp_path / "slice.nii.gz"), reader=reader)
    assert loaded.shape == (1, 8, 9)
    assert torch.equal(loaded, image)
    assert torch.allclose(loaded_affine[:2], affine[:2], atol=1e-6)
    loaded_ddf, _ = load_image(save_image(ddf, affine, tmp_path / "ddf2d.nii.gz"), reader=reader)
    assert loaded_ddf.shape == (2, 8, 9)
    assert torch.equal(loaded_ddf, ddf)


def test_integer_dtype_rounds_and_stores_uint8(tmp_path):
    labels = torch.tensor([[[0.2, 1.0], [2.6, 3.0]]])
    path = save_image(labels, _affine(), tmp_path / "label.nii.gz", dtype=np.uint8)
    assert nib.load(path).get_data_dtype() == np.uint8
    loaded, _ = load_image(path)
    assert loaded.flatten().tolist() == [0.0, 1.0, 3.0, 3.0]


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "nested" / "scan.nii.gz"
    save_image(torch.zeros(1, 4, 4, 4), _affine(), target)
    save_image(torch.ones(1, 4, 4, 4), _affine(), target)
    loaded, _ = load_image(target)
    assert float(loaded.sum()) == 64.0
    assert sorted(os.listdir(target.parent)) == ["scan.nii.gz"]


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"path must end with '.nii' or '.nii.gz', got '.*scan.png'"):
        save_image(torch.zeros(1, 4, 4, 4), _affine(), tmp_path / "scan.png")
    with pytest.raises(ValueError, match=r"array must be \(C, \*spatial\).*got shape \(4, 4\)"):
        save_image(torch.zeros(4, 4), _affine(), tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match=r"affine must be a \(4, 4\) matrix, got shape \(3, 3\)"):
        save_image(torch.zeros(1, 4, 4, 4), torch.eye(3), tmp_path / "scan.nii.gz")
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(FileNotFoundError, match=r"image file not found: '.*missing.nii.gz'"):
        load_image(missing)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    for reader in READERS:
        with pytest.raises(ValueError, match=r"cannot read image '.*broken.nii.gz'"):
            load_image(broken, reader=reader)
    with pytest.raises(ValueError, match=r"reader must be one of 'itk', 'nibabel' or None, got 'pil'"):
        load_image(broken, reader="pil")
