"""ODEWarp / ODEWarpd: same result as FittedSubject.predict, inside Compose and DataLoader workers, metadata kept."""

import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, SaveImaged

from noder_monai.data import SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.model import load_fitted_subject
from noder_monai.transforms import ODEWarp, ODEWarpd

TIMES = (0.0, 0.5, 1.0)
QUERY = [0.25, 0.75, 1.6]
AFFINE = torch.tensor([[2.0, 0, 0, -10], [0, 1.5, 0, 4], [0, 0, 3.0, 7], [0, 0, 0, 1]], dtype=torch.float64)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch.manual_seed(0)
    synthetic = synthetic_sequence(spatial_dims=3, size=16, times=TIMES, seed=1)
    sequence = SubjectSequence.from_tensors(synthetic.images * 40.0 + 100.0, torch.tensor(TIMES), AFFINE, subject="s1")
    subject = fit_sequence(sequence, FitConfig(epochs=2, levels=(2, 1), level_fractions=(0.5, 0.5)), progress=False)
    # two epochs barely move the baseline: scale the decoder's output layer (the field is linear in it) so that
    # the largest displacement is 2 voxels and interpolation differences show.
    head = subject.model.decoder.net[-1].conv
    head.weight.data.mul_(2.0 / float(subject.displacement([1.6]).abs().max()))
    path = tmp_path_factory.mktemp("transforms") / "s1.pt"
    subject.save(path)
    return {"path": str(path), "subject": subject, "sequence": sequence, "label": synthetic.label}


def test_array_transform_equals_predict(fitted):
    subject, baseline = fitted["subject"], fitted["sequence"].images[0]
    warp = ODEWarp(fitted["path"])
    expected = subject.predict(QUERY, source="baseline").images
    for index, time in enumerate(QUERY):
        out = warp(baseline, time)
        assert out.shape == (1, 16, 16, 16) and out.dtype == torch.float32
        assert torch.allclose(out, expected[index], atol=1e-3), float((out - expected[index]).abs().max())
    assert float((warp(baseline, 1.6) - baseline).abs().max()) > 1e-3  # it does move the image


def test_numpy_input_returns_numpy_and_time_zero_is_identity(fitted):
    baseline = fitted["sequence"].images[0].numpy()
    out = ODEWarp(fitted["subject"])(baseline, 0.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.abs(out - baseline).max() < 1e-4


def test_dictionary_transform_in_dataloader_workers_matches_predict(fitted):
    subject, baseline, label = fitted["subject"], fitted["sequence"].images[0], fitted["label"]
    expected = subject.predict(QUERY, labels=label, source="baseline")
    items = [
        {"image": MetaTensor(baseline.clone(), affine=AFFINE), "label": MetaTensor(label.clone().to(torch.int16), affine=AFFINE),
         "time": time}
        for time in QUERY
    ]
    transform = Compose([ODEWarpd(["image", "label"], subject=fitted["path"], time="time", mode=["bilinear", "nearest"])])
    loader = DataLoader(Dataset(items, transform), batch_size=1, num_workers=2, shuffle=False)
    outputs = list(loader)
    assert len(outputs) == 3
    for index, batch in enumerate(outputs):
        image, warped_label = batch["image"][0], batch["label"][0]
        assert torch.allclose(image.as_tensor(), expected.images[index], atol=1e-3)
        assert warped_label.dtype == torch.int16
        assert torch.equal(warped_label.as_tensor().float(), expected.labels[index])
        assert torch.allclose(image.affine.to(torch.float64), AFFINE)
    assert len(torch.unique(outputs[-1]["label"])) == len(torch.unique(label))


def test_saveimaged_writes_input_affine(fitted, tmp_path):
    item = {"image": MetaTensor(fitted["sequence"].images[0].clone(), affine=AFFINE, meta={"filename_or_obj": "scan.nii.gz"}),
            "time": 0.75}
    out = ODEWarpd("image", subject=fitted["path"])(item)
    SaveImaged("image", output_dir=str(tmp_path), output_postfix="t0.75", resample=False, separate_folder=False)(out)
    written = nib.load(str(tmp_path / "scan_t0.75.nii.gz"))
    np.testing.assert_allclose(written.affine, AFFINE.numpy(), atol=1e-5)
    np.testing.assert_allclose(written.get_fdata(), out["image"][0].numpy(), atol=1e-4)


def test_subject_key_and_ddf_key(fitted):
    subject = fitted["subject"]
    item = {"image": fitted["sequence"].images[0], "model": fitted["path"], "t": torch.tensor(0.75)}
    out = ODEWarpd("image", subject_key="model", time="t", ddf_key="ddf")(item)
    assert out["ddf"].shape == (3, 16, 16, 16)
    assert torch.allclose(out["ddf"].as_tensor(), subject.displacement([0.75])[0], atol=1e-6)
    assert torch.allclose(out["ddf"].affine.to(torch.float64), AFFINE)
    fixed_time = ODEWarpd("image", subject=subject, time=0.75)({"image": fitted["sequence"].images[0]})
    assert torch.allclose(fixed_time["image"], out["image"], atol=1e-6)


def test_jacobian_key_stores_the_determinant_map_with_the_affine(fitted):
    from noder_monai.metrics import jacobian_determinant

    item = {"image": fitted["sequence"].images[0], "time": 2.0}
    out = ODEWarpd("image", subject=fitted["subject"], ddf_key="ddf", jacobian_key="jacobian")(item)
    assert out["jacobian"].shape == (1, 16, 16, 16) and out["jacobian"].meta["time"] == 2.0
    assert torch.allclose(out["jacobian"].as_tensor(), jacobian_determinant(out["ddf"].as_tensor()[None])[0])
    assert torch.allclose(out["jacobian"].affine.to(torch.float64), AFFINE)
    assert not torch.allclose(out["jacobian"].as_tensor(), torch.ones(1))  # the fit moved something


def test_intensity_mapping_equals_monai_percentile_scaling_and_inverts():
    from monai.transforms import ScaleIntensityRangePercentilesd

    from noder_monai.data import IntensityMapping
    from noder_monai.transforms import IntensityMappingd

    scans = torch.rand(4, 9, 8, 7, generator=torch.Generator().manual_seed(0)) * 300 + 20
    item = {"image": MetaTensor(scans.clone(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))}
    ours = IntensityMappingd("image")(item)
    monai = ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=False)(item)
    torch.testing.assert_close(ours["image"].as_tensor(), monai["image"].as_tensor(), rtol=1e-5, atol=1e-6)
    assert ours["intensity"] == IntensityMapping.fit(scans).to_dict()
    assert torch.equal(ours["image"].affine, item["image"].affine)
    restored = IntensityMappingd("image").inverse(ours)
    torch.testing.assert_close(restored["image"].as_tensor(), scans, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="0 <= lower < upper <= 100"):
        IntensityMappingd("image", lower=50, upper=10)


def test_size_mismatch_names_key_and_sizes(fitted):
    transform = ODEWarpd("image", subject=fitted["path"], time=0.5)
    with pytest.raises(ValueError, match=r"data\['image'\] has spatial size \(12, 16, 16\).*\(16, 16, 16\)"):
        transform({"image": torch.zeros(1, 12, 16, 16)})
    with pytest.raises(ValueError, match=r"img must be channel-first .* got shape \(16, 16, 16\)"):
        ODEWarp(fitted["path"])(torch.zeros(16, 16, 16), 0.5)


def test_bad_time_and_arguments(fitted):
    transform = ODEWarpd("image", subject=fitted["path"], time="time")
    with pytest.raises(ValueError, match=r"data\['time'\] must be a single number .* 'soon'"):
        transform({"image": torch.zeros(1, 16, 16, 16), "time": "soon"})
    with pytest.raises(ValueError, match=r"data\['time'\] must be a finite number"):
        transform({"image": torch.zeros(1, 16, 16, 16), "time": float("nan")})
    with pytest.raises(KeyError, match="time key 'time'"):
        transform({"image": torch.zeros(1, 16, 16, 16)})
    with pytest.raises(ValueError, match="exactly one of subject and subject_key"):
        ODEWarpd("image")
    with pytest.raises(ValueError, match="mode must be one of .* got 'cubic'"):
        ODEWarpd("image", subject=fitted["path"], mode="cubic")
    with pytest.raises(ValueError, match="bicubic' is only available for 2D"):
        ODEWarp(fitted["path"], mode="bicubic")(torch.zeros(1, 16, 16, 16), 0.5)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ODEWarp("missing.pt")(torch.zeros(1, 16, 16, 16), 0.5)


def test_path_transform_pickles_small_and_loads_once(fitted):
    transform = ODEWarpd(["image"], subject=fitted["path"], time="time")
    blob = pickle.dumps(transform)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    assert clone.warper.subject is load_fitted_subject(fitted["path"])
    assert load_fitted_subject(fitted["path"]) is load_fitted_subject(os.path.relpath(fitted["path"]))


def test_source_option_returns_the_subjects_own_prediction(fitted):
    subject = fitted["subject"]
    image = torch.zeros(1, *subject.spatial_size)
    for source in ("baseline", "template", "nearest", "default"):
        item = ODEWarpd(keys="image", subject=subject, time=QUERY[0], source=source)({"image": image})
        expected = subject.predict(QUERY[:1], source=None if source == "default" else source).images[0]
        assert torch.allclose(torch.as_tensor(item["image"]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="source"):
        ODEWarpd(keys="image", subject=subject, source="average")


def test_transform_on_the_device_equals_the_cpu_result(fitted, device):
    baseline = fitted["sequence"].images[0]
    expected = ODEWarp(fitted["path"])(baseline, 0.75)
    out = ODEWarp(fitted["path"], device=device)(baseline.to(device), 0.75)
    assert out.device == baseline.to(device).device
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)
