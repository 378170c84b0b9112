import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from noder_monai.data.datalist import load_datalist
from noder_monai.data.demo import (
    ASSET_DIR,
    DEMO_HELDOUT_TIMES,
    DEMO_PREDICT_TIMES,
    DEMO_TIMES,
    build_demo_assets,
    demo_labels,
    demo_volume,
    make_demo_dataset,
)
from noder_monai.io.image import load_image

SOURCE = "/usr/share/mricron/templates"



def _field_of_view(affine, size):
    """World coordinates of the two outer voxel corners, (2, 3)."""
    corners = torch.tensor([[-0.5] * 3 + [1.0], [size - 0.5] * 3 + [1.0]], dtype=torch.float64)
    return (corners @ affine.T)[:, :3]


def test_assets_are_small_and_stored_as_uint8():
    for name in ("colin27_64.nii.gz", "colin27_64_labels.nii.gz"):
        path = os.path.join(ASSET_DIR, name)
        assert os.path.getsize(path) < 300_000
        assert nib.load(path).get_data_dtype() == np.uint8


def test_demo_volume_shape_affine_and_intensities():
    volume, affine = demo_volume()
    assert volume.shape == (1, 64, 64, 64)
    assert volume.dtype == torch.float32
    assert affine.dtype == torch.float64
    assert torch.allclose(affine[:3, :3], torch.eye(3, dtype=torch.float64) * 3.34375, atol=1e-6)
    assert torch.allclose(affine[:3, 3], torch.tensor([-104.828125, -120.828125, -87.828125], dtype=torch.float64))
    assert 0.0 <= float(volume.min()) and 200.0 < float(volume.max()) <= 255.0
    centre = volume[0, 24:40, 24:40, 24:40].mean()
    corner = volume[0, :8, :8, :8].mean()
    assert float(centre) > 50.0 > float(corner)


def test_demo_labels_match_intensity_classes():
    volume, affine = demo_volume()
    labels, label_affine = demo_labels()
    assert labels.shape == (1, 64, 64, 64)
    assert labels.dtype == torch.int64
    assert torch.equal(label_affine, affine)
    counts = torch.bincount(labels.flatten(), minlength=4)
    assert counts.numel() == 4 and bool((counts > 1000).all())
    means = [float(volume[labels == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # CSF-like < grey-like < white-like on T1


@pytest.mark.parametrize("size", [16, 24, 80])
def test_resampled_demo_keeps_the_field_of_view(size):
    volume, affine = demo_volume(size)
    labels, label_affine = demo_labels(size)
    _, reference = demo_volume()
    assert volume.shape == labels.shape == (1, size, size, size)
    assert torch.allclose(label_affine, affine)
    assert torch.allclose(affine[0, 0], torch.tensor(214.0 / size, dtype=torch.float64))
    assert torch.allclose(_field_of_view(affine, size), _field_of_view(reference, 64), atol=1e-6)
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"size must be an integer >= 8, got 4"):
        demo_volume(4)


def test_make_demo_dataset_writes_a_loadable_datalist(tmp_path):
    path = make_demo_dataset(tmp_path / "demo", n_subjects=2, size=16, noise=0.02, seed=0)
    assert path == str(tmp_path / "demo" / "datalist.json")
    entries = load_datalist(path)
    assert [entry.id for entry in entries] == ["sub-001", "sub-002"]
    observed = [time for time in DEMO_TIMES if time not in DEMO_HELDOUT_TIMES]
    _, affine = demo_volume(16)
    for entry in entries:
        assert entry.times == observed
        assert [time for _, time in entry.heldout] == list(DEMO_HELDOUT_TIMES)
        assert max(time for _, time in entry.heldout) > max(entry.times)  # one extrapolation time
        assert entry.predict_times == list(DEMO_PREDICT_TIMES)
        sequence = entry.load()
        assert sequence.images.shape == (len(observed), 1, 16, 16, 16)
        assert torch.allclose(sequence.affine, affine, atol=1e-6)
        label, label_affine = load_image(entry.label)
        assert sorted(label.unique().tolist()) == [0.0, 1.0, 2.0, 3.0]
        assert torch.allclose(label_affine, affine, atol=1e-6)
        last, _ = load_image(entry.heldout[-1][0])
        assert float((last - sequence.images[-1]).abs().mean()) > 0.5
    first, second = (load_image(entry.scans[-1][0])[0] for entry in entries)
    assert float((first - second).abs().mean()) > 0.5


def test_make_demo_dataset_skips_an_identical_dataset(tmp_path):
    path = make_demo_dataset(tmp_path, n_subjects=1, size=16)
    scan = load_datalist(path)[0].scans[0][0]
    stamps = (os.stat(path).st_mtime_ns, os.stat(scan).st_mtime_ns)
    assert make_demo_dataset(tmp_path, n_subjects=1, size=16) == path
    assert (os.stat(path).st_mtime_ns, os.stat(scan).st_mtime_ns) == stamps
    make_demo_dataset(tmp_path, n_subjects=1, size=16, seed=5)
    with open(path, encoding="utf-8") as handle:
        assert json.load(handle)["generator"]["arguments"]["seed"] == 5
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
    with pytest.raises(ValueError, match=r"n_subjects must be an integer >= 1, got 0"):
        make_demo_dataset(tmp_path, n_subjects=0)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SOURCE, "ch2.nii.gz")), reason="needs Debian mricron-data")
def test_build_demo_assets_reproduces_the_shipped_assets(tmp_path):
    image_path, label_path = build_demo_assets(SOURCE, tmp_path)
    for built, shipped in ((image_path, "colin27_64.nii.gz"), (label_path, "colin27_64_labels.nii.gz")):
        new, old = nib.load(built), nib.load(os.path.join(ASSET_DIR, shipped))
        assert np.array_equal(np.asarray(new.dataobj), np.asarray(old.dataobj))
        assert np.allclose(new.affine, old.affine, atol=1e-6)
