"""ODEWarp / ODEWarpd: same result as FittedSubject.predict, inside Compose and DataLoader workers, metadata kept."""

import json
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, InvertibleTransform, SaveImaged

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


def test_intensity_mapping_is_monais_percentile_scaling_bit_for_bit_and_inverts():
    """IntensityMappingd is ScaleIntensityRangePercentilesd (a subclass, the same values exactly) plus an inverse:
    Invertd maps a prediction made on the scaled scans back to the input's units, which MONAI's own transform cannot
    (Invertd skips it: it is not invertible)."""
    from monai.transforms import Invertd, ScaleIntensityRangePercentilesd

    from noder_monai.data import IntensityMapping
    from noder_monai.transforms import IntensityMappingd

    scans = torch.rand(4, 9, 8, 7, generator=torch.Generator().manual_seed(0)) * 300 + 20
    item = {"image": MetaTensor(scans.clone(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))}
    mapping = IntensityMappingd("image")
    ours = mapping(item)
    monai = ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=False)(item)
    assert isinstance(IntensityMappingd("image"), ScaleIntensityRangePercentilesd)
    assert torch.equal(ours["image"].as_tensor(), monai["image"].as_tensor())
    assert ours["intensity"] == IntensityMapping.fit(scans).to_dict()
    assert torch.equal(ours["image"].affine, item["image"].affine)
    restored = mapping.inverse(dict(ours))
    torch.testing.assert_close(restored["image"].as_tensor(), scans, rtol=1e-5, atol=1e-4)
    pipeline = Compose([IntensityMappingd("image")])
    out = pipeline({"image": MetaTensor(scans.clone())})
    out["pred"] = out["image"] * 0.5  # a prediction in the scaled units
    back = Invertd("pred", transform=pipeline, orig_keys="image")(out)["pred"]
    torch.testing.assert_close(back.as_tensor(), IntensityMapping.from_dict(out["intensity"]).inverse(out["image"] * 0.5)
                               .as_tensor(), rtol=1e-6, atol=1e-4)
    assert not isinstance(ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0), InvertibleTransform)
    with pytest.raises(ValueError, match="0 <= lower < upper <= 100"):
        IntensityMappingd("image", lower=50, upper=10)


def test_predictions_stay_in_the_input_units_with_monais_percentiles():
    """CT-like units (-1024..3000 HU): the range MONAI's percentile gives equals the float64 numpy percentile used
    before to float32 rounding, and the mapping stored in the fitted file (IntensityMapping.to_dict) maps the scaled
    scans, and so every prediction, back to the input's units."""
    from noder_monai.data import IntensityMapping
    from noder_monai.transforms import IntensityMappingd

    scans = torch.rand(3, 12, 10, 8, generator=torch.Generator().manual_seed(1)) * 4024.0 - 1024.0
    item = IntensityMappingd("image")({"image": MetaTensor(scans.clone())})
    stored = IntensityMapping.from_dict(json.loads(json.dumps(item["intensity"])))  # as the fitted file keeps it
    reference = np.percentile(scans.numpy().astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose([stored.lower, stored.upper], reference, rtol=1e-6)
    assert -0.01 < float(item["image"].min()) < 0.0 and 1.0 < float(item["image"].max()) < 1.01  # not clipped
    back = stored.inverse(item["image"].as_tensor())
    torch.testing.assert_close(back, scans, rtol=0, atol=4024.0 * 1e-6)


def test_intensity_mapping_scales_sparse_scans_where_monais_transform_divides_by_zero():
    """12 bright voxels of 2x4096: the 0.5/99.5 percentiles coincide; MONAI returns the input shifted, unscaled,
    with a warning; IntensityMappingd falls back to the minimum and maximum."""
    from monai.transforms import ScaleIntensityRangePercentilesd

    from noder_monai.transforms import IntensityMappingd

    scans = torch.zeros(2, 16, 16, 16)
    scans.view(2, -1)[:, :12] = 100.0
    with pytest.warns(Warning, match="Divide by zero"):
        monai = ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0)({"image": scans.clone()})["image"]
    assert float(monai.max()) == 100.0  # not scaled to [0, 1]
    ours = IntensityMappingd("image")({"image": scans.clone()})
    assert (float(ours["image"].min()), float(ours["image"].max())) == (0.0, 1.0)
    assert ours["intensity"] == {"lower": 0.0, "upper": 100.0}


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


# --- frames, inverse and file names (issue 17) ---------------------------------------------------------------------


def _smooth_image(sigma=8.0, size=16):
    """A broad Gaussian blob (1, size, size, size) on 20..120: interpolation errors stay small on it."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    return (torch.exp(-((grid - (size - 1) / 2) ** 2).sum(0) / (2 * sigma**2)) * 100.0 + 20.0)[None]


def _world_field(subject, ddf, affine):
    """A field (3, *S) in voxels of a frame with ``affine`` as world displacements (mm), a MetaTensor on that frame."""
    return MetaTensor(torch.einsum("ij,j...->i...", affine[:3, :3].float(), ddf.float()), affine=affine)


@pytest.mark.parametrize("frame", ["orientation PSL", "orientation LPI", "spacing"])
def test_odewarpd_after_orientation_or_spacing_is_the_same_warp_in_world_space(fitted, frame):
    """Orientationd/Spacingd then ODEWarpd equals ODEWarpd then the same Orientationd/Spacingd: the field is resampled
    into the image's voxel frame (same world displacement); the image agrees up to interpolation on a smooth image."""
    from monai.transforms import Orientationd, Spacingd

    subject = fitted["subject"]
    regrid = (Orientationd(["image", "ddf"], axcodes=frame.split()[1]) if frame.startswith("orientation")
              else Spacingd(["image", "ddf"], pixdim=(4.0, 3.0, 6.0)))  # every second voxel: grids coincide
    warp = ODEWarpd("image", subject=fitted["path"], time=1.6, ddf_key="ddf")
    image = MetaTensor(_smooth_image(), affine=AFFINE)
    warped_then_regridded = regrid(warp({"image": image.clone()}))
    regridded = regrid({"image": image.clone(), "ddf": MetaTensor(torch.zeros(3, 16, 16, 16), affine=AFFINE)})
    regridded_then_warped = warp({"image": regridded["image"]})
    out, reference = regridded_then_warped["image"], warped_then_regridded["image"]
    assert out.shape == reference.shape and torch.allclose(out.affine, reference.affine)
    # the field: the same world displacement at every voxel of the new frame
    world = regrid({"image": image.clone(), "ddf": _world_field(subject, subject.displacement([1.6])[0], AFFINE)})
    ddf = regridded_then_warped["ddf"]
    assert torch.allclose(ddf.affine, out.affine)  # the field carries the frame it is in
    torch.testing.assert_close(_world_field(subject, ddf.as_tensor(), out.affine).as_tensor(),
                               world["ddf"].as_tensor(), atol=1e-4, rtol=0)
    change = float((reference - regridded["image"]).abs().max())
    error = float((out - reference).abs().max())
    if frame.startswith("orientation"):  # same voxel centres: only float rounding
        assert error < 1e-3 * change
        ignored = ODEWarpd("image", subject=subject, time=1.6)({"image": regridded["image"].as_tensor()})["image"]
        assert float((ignored - reference).abs().max()) > 0.5 * change  # warping in the fitted frame is wrong
    else:  # a 2x coarser image: bilinear interpolation of the smooth image, largest at the border voxels
        interior = (slice(None), *[slice(1, -1)] * 3)
        error = float((out - reference)[interior].abs().max())
        assert error < 0.2 * change, (error, change)


def test_odewarp_refuses_another_2d_grid_and_a_3d_image_outside_the_fitted_grid(fitted):
    from noder_monai.data import IntensityMapping
    from noder_monai.model import FittedSubject
    from noder_monai.networks import NODER

    affine_2d = torch.tensor([[1.0, 0, 0, 3], [0, 2.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    flat = FittedSubject(NODER((12, 10)), torch.zeros(1, 1, 12, 10), torch.tensor([0.0, 1.0]), affine_2d,
                         IntensityMapping(0.0, 1.0), subject="flat")
    moved = affine_2d.clone()
    moved[0, 3] += 5.0
    with pytest.raises(ValueError, match=r"data\['image'\] \(affine \[\[1.0, 0.0, 0.0, 8.0\].*is not on the grid "
                                         r"subject 'flat' was fitted on \(affine \[\[1.0, 0.0, 0.0, 3.0\]"):
        ODEWarpd("image", subject=flat, time=0.5)({"image": MetaTensor(torch.zeros(1, 12, 10), affine=moved)})
    same = ODEWarpd("image", subject=flat, time=0.5)({"image": MetaTensor(torch.ones(1, 12, 10), affine=affine_2d[[0, 1, 3]][:, [0, 1, 3]])})
    assert same["image"].shape == (1, 12, 10)  # a (3, 3) affine of the fitted plane is the fitted grid
    far = AFFINE.clone()
    far[:3, 3] += 1000.0
    with pytest.raises(ValueError, match=r"does not overlap the grid subject 's1' was fitted on \(affine \[\[2.0"):
        ODEWarp(fitted["path"])(MetaTensor(torch.zeros(1, 16, 16, 16), affine=far), 0.5)
    flipped = AFFINE.clone()
    flipped[0] *= -1.0  # another orientation: warped in its frame, but a source prediction exists on the fitted grid only
    with pytest.raises(ValueError, match=r"data\['image'\] \(affine \[\[-2.0.*source 'baseline' predicts on the fitted grid"):
        ODEWarpd("image", subject=fitted["path"], time=0.5, source="baseline")(
            {"image": MetaTensor(torch.zeros(1, 16, 16, 16), affine=flipped)})


def test_invertd_undoes_odewarpd_with_the_inverse_field(fitted):
    """Invertd warps back with the inverse map's field at the time recorded in the trace (not the item's 'time' key,
    which Invertd does not pass on): back to the input up to interpolation error, away from the border."""
    from monai.transforms import Invertd, Orientationd

    subject = fitted["subject"]
    image = MetaTensor(_smooth_image(), affine=AFFINE)
    pipeline = Compose([ODEWarpd("image", subject=fitted["path"], time="time")])
    out = pipeline({"image": image.clone(), "time": 1.6})
    assert out["image"].applied_operations[-1]["extra_info"]["time"] == 1.6
    restored = Invertd("image", transform=pipeline, orig_keys="image", nearest_interp=False)(out)["image"]
    assert not restored.applied_operations
    interior = (slice(None), *[slice(3, -3)] * 3)
    change = float((out["image"] - image)[interior].abs().max())
    error = float((restored - image)[interior].abs().max())
    assert change > 10.0 and error < 0.15 * change, (error, change)
    # exactly the two warps: forward field, then the inverse map's field
    with torch.inference_mode():
        forward = subject.displacement([1.6])
        backward = subject.model.displacement(subject.scaled_time([1.6]), inverse=True)
    from monai.networks.blocks import Warp

    expected = Warp("bilinear", "border")(Warp("bilinear", "border")(image.as_tensor()[None], forward), backward)[0]
    torch.testing.assert_close(restored.as_tensor(), expected, atol=1e-4, rtol=0)
    # in a pipeline after Orientationd both are undone, and the array transform inverts too
    oriented = Compose([Orientationd("image", axcodes="PSL"), ODEWarpd("image", subject=fitted["path"], time=1.6)])
    back = Invertd("image", transform=oriented, orig_keys="image", nearest_interp=False)(
        oriented({"image": image.clone()}))["image"]
    assert back.shape == image.shape and torch.allclose(back.affine, image.affine)
    assert float((back - image)[interior].abs().max()) < 0.15 * change
    warp = ODEWarp(fitted["path"])
    torch.testing.assert_close(warp.inverse(warp(image.clone(), 1.6)).as_tensor(), expected, atol=1e-4, rtol=0)
    # Invertd's default (nearest_interp=True) maps a segmentation made in the warped frame back with nearest
    # sampling, although the image was warped bilinearly: it stays a label map
    out = pipeline({"image": image.clone(), "time": 1.6})
    out["pred"] = (out["image"] > 60).to(torch.int16)
    assert out["image"].applied_operations[-1]["extra_info"]["mode"] == "bilinear"
    inverted = Invertd("pred", transform=pipeline, orig_keys="image")(out)["pred"]
    assert set(torch.unique(inverted).tolist()) == {0, 1} and inverted.shape == image.shape


def test_saveimaged_with_time_names_writes_one_file_per_query_time(fitted, tmp_path):
    """Two query times, one SaveImaged: two files (the time in the name), not one overwritten."""
    from noder_monai.transforms import TimeNameFormatter

    pipeline = Compose([
        ODEWarpd("image", subject=fitted["path"], time="time"),
        SaveImaged("image", output_dir=str(tmp_path), output_postfix="warped", resample=False, separate_folder=False,
                   output_name_formatter=TimeNameFormatter(), print_log=False),
    ])
    for time in (0.25, 1.6):
        image = MetaTensor(fitted["sequence"].images[0].clone(), affine=AFFINE, meta={"filename_or_obj": "flair.nii.gz"})
        pipeline({"image": image, "time": time})
    assert sorted(os.listdir(tmp_path)) == ["flair_warped_t0.25.nii.gz", "flair_warped_t1.6.nii.gz"]
    with pytest.raises(KeyError, match="TimeNameFormatter: the item's metadata has no 'time'"):
        TimeNameFormatter()({"filename_or_obj": "flair.nii.gz"})


def test_transform_on_the_device_equals_the_cpu_result(fitted, device):
    baseline = fitted["sequence"].images[0]
    expected = ODEWarp(fitted["path"])(baseline, 0.75)
    out = ODEWarp(fitted["path"], device=device)(baseline.to(device), 0.75)
    assert out.device == baseline.to(device).device
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)
