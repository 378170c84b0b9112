import numpy as np
import pytest
import torch

from noder_monai.io.image import save_image
from noder_monai.data.sequence import SubjectSequence, load_sequence


def _affine(offset=0.0):
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-8.0 + offset, 4.0, 1.0], dtype=torch.float64)
    return affine


def _write_scans(folder, count=3, shape=(6, 5, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((count, 1) + shape, generator=generator)
    paths = [save_image(images[i], _affine(), folder / f"t{i}.nii.gz") for i in range(count)]
    return images, paths


def test_from_tensors_builds_a_validated_sequence():
    images = torch.rand(4, 1, 8, 7, 6)
    sequence = SubjectSequence.from_tensors(images, [0, 0.5, 1.25, 3], subject="s1")
    assert sequence.spatial_dims == 3
    assert sequence.spatial_size == (8, 7, 6)
    assert sequence.times.dtype == torch.float64
    assert sequence.times.tolist() == [0.0, 0.5, 1.25, 3.0]
    assert torch.equal(sequence.affine, torch.eye(4, dtype=torch.float64))
    assert sequence.images.dtype == torch.float32
    assert sequence.paths is None
    flat = SubjectSequence.from_tensors(np.zeros((2, 1, 5, 6)), np.array([1.0, 2.0]), affine=_affine())
    assert flat.spatial_dims == 2
    assert flat.spatial_size == (5, 6)
    assert float(flat.affine[0, 3]) == -8.0


def test_from_tensors_errors_name_subject_field_and_values():
    images = torch.rand(3, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"subject 'a': field 'times' must be strictly increasing, duplicate values "
                       r"times\[1\]=1 and times\[2\]=1"):
        SubjectSequence.from_tensors(images, [0, 1, 1], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'times' must be strictly increasing, unsorted values "
                       r"times\[0\]=2 and times\[1\]=1"):
        SubjectSequence.from_tensors(images, [2, 1, 3], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'times' must be finite numbers, got \[0.0, nan, 2.0\]"):
        SubjectSequence.from_tensors(images, [0, float("nan"), 2], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'times' has 2 values for 3 scans"):
        SubjectSequence.from_tensors(images, [0, 1], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'images' needs at least 2 scans, got 1"):
        SubjectSequence.from_tensors(images[:1], [0], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'images' must be \(T, 1, \*spatial\).*\(3, 2, 4, 4\)"):
        SubjectSequence.from_tensors(torch.rand(3, 2, 4, 4), [0, 1, 2], subject="a")
    with pytest.raises(ValueError, match=r"subject 'a': field 'affine' must be a finite \(4, 4\) matrix"):
        SubjectSequence.from_tensors(images, [0, 1, 2], affine=torch.eye(3), subject="a")
    bad = images.clone()
    bad[2, 0, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"subject 'a': field 'images': scan 2 contains NaN or Inf voxels"):
        SubjectSequence.from_tensors(bad, [0, 1, 2], subject="a")


@pytest.mark.parametrize("reader", ["itk", "nibabel"])
def test_load_sequence_reads_scans_in_order(tmp_path, reader):
    images, paths = _write_scans(tmp_path)
    sequence = load_sequence(paths, [0.0, 1.5, 4.0], subject="sub-1", reader=reader)
    assert sequence.images.shape == (3, 1, 6, 5, 4)
    assert torch.equal(sequence.images, images)
    assert torch.allclose(sequence.affine, _affine(), atol=1e-6)
    assert sequence.times.tolist() == [0.0, 1.5, 4.0]
    assert sequence.paths == [str(path) for path in paths]
    assert sequence.subject == "sub-1"


def test_load_sequence_missing_or_unreadable_file(tmp_path):
    _, paths = _write_scans(tmp_path, count=2)
    with pytest.raises(FileNotFoundError, match=r"image file not found: '.*gone.nii.gz'"):
        load_sequence([paths[0], tmp_path / "gone.nii.gz"], [0, 1])
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.nii.gz'"):
        load_sequence([paths[0], broken], [0, 1])


def test_load_sequence_grid_mismatch_names_both_files(tmp_path):
    _, paths = _write_scans(tmp_path, count=2)
    other_shape = save_image(torch.rand(1, 6, 5, 3), _affine(), tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match=r"scan '.*small.nii.gz' has shape \(6, 5, 3\) but '.*t0.nii.gz' has "
                       r"\(6, 5, 4\)"):
        load_sequence([paths[0], other_shape], [0, 1], subject="s")
    shifted = save_image(torch.rand(1, 6, 5, 4), _affine(offset=1e-3), tmp_path / "shifted.nii.gz")
    with pytest.raises(ValueError, match=r"subject 's': scan '.*shifted.nii.gz' has affine .* but '.*t0.nii.gz' has"):
        load_sequence([paths[0], shifted], [0, 1], subject="s")
    nearly = save_image(torch.rand(1, 6, 5, 4), _affine(offset=1e-5), tmp_path / "nearly.nii.gz")
    assert load_sequence([paths[0], nearly], [0, 1]).images.shape == (2, 1, 6, 5, 4)
    ddf = save_image(torch.rand(3, 6, 5, 4), _affine(), tmp_path / "ddf.nii.gz")
    with pytest.raises(ValueError, match=r"scan '.*ddf.nii.gz' has 3 channels, shape \(6, 5, 4\) each; a scan must be one single-channel image"):
        load_sequence([paths[0], ddf], [0, 1])


def test_load_sequence_time_and_count_errors(tmp_path):
    _, paths = _write_scans(tmp_path, count=3)
    with pytest.raises(ValueError, match=r"subject 'x': field 'paths' needs at least 2 scans, got 1"):
        load_sequence(paths[:1], [0], subject="x")
    with pytest.raises(ValueError, match=r"subject 'x': 3 paths but 2 times"):
        load_sequence(paths, [0, 1], subject="x")
    with pytest.raises(ValueError, match=r"subject 'x': field 'times' entry 1 must be a finite number, got '1'"):
        load_sequence(paths, [0, "1", 2], subject="x")
    with pytest.raises(ValueError, match=r"subject 'x': field 'times' must be strictly increasing, duplicate"):
        load_sequence(paths, [0, 1, 1], subject="x")
    with pytest.raises(ValueError, match=r"subject 'x': field 'times' must be strictly increasing, unsorted"):
        load_sequence(paths, [0, 2, 1], subject="x")
    assert load_sequence(paths, torch.tensor([0.0, 1.0, 2.0])).times.tolist() == [0.0, 1.0, 2.0]


def test_load_sequence_nan_voxels_name_the_file(tmp_path):
    _, paths = _write_scans(tmp_path, count=2)
    image = torch.rand(1, 6, 5, 4)
    image[0, 2, 2, 2] = float("nan")
    bad = save_image(image, _affine(), tmp_path / "nan_scan.nii.gz")
    with pytest.raises(ValueError, match=r"subject 'y': field 'images': scan 1 \('.*nan_scan.nii.gz'\) contains NaN"):
        load_sequence([paths[0], bad], [0, 1], subject="y")
