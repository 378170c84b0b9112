"""Inputs a scanner or a colleague hands over: geometry kept through fit -> predict -> outputs, sizes and content
checked before fitting, bounded prediction, stale and crafted models refused, fields in ITK's convention."""

import logging
import math
import os
import sys
import warnings

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from noder_monai.data import load_sequence
from noder_monai.engines import FitConfig, check_fit_inputs, fit_sequence
from noder_monai.engines.levels import level_window
from noder_monai.io import ddf_to_itk, save_image, save_itk_displacement, voxel_volume_mm3
from noder_monai.model import SUBJECT_FORMAT, FittedSubject
from noder_monai.transforms import sequence_item

sys.path.insert(0, os.path.dirname(__file__))
from test_io_geometry import assert_same_geometry, oblique_lps, write_qs  # noqa: E402

TINY = {"epochs": 6, "ncc_kernel_size": 9}


def _blob_scans(shape, count=3, seed=0):
    """Smooth blobs drifting along the first in-plane axis (float32 arrays of ``shape``)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    scans = []
    for index in range(count):
        centre = [s / 2 for s in shape]
        centre[0] += 0.6 * index
        radius2 = sum(((g - c) / max(s / 4, 1.0)) ** 2 for g, c, s in zip(grids, centre, shape))
        scans.append((100.0 * np.exp(-radius2) + 10.0).astype(np.float32))
    return scans


def write_disagreeing_subject(folder, count=3):
    """``count`` 16^3 blob scans and a label map whose qform (code 1, origin -8) and sform (code 2, origin
    (-18, -3, 7)) disagree, written to ``folder``; returns (scan paths, label path)."""
    from test_io_geometry import write_qs

    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    qform[:3, 3] = -8
    sform = qform.copy()
    sform[:3, 3] = [-18, -3, 7]
    scans = _blob_scans((16, 16, 16), count=count)
    paths = [write_qs(folder / f"t{i}.nii.gz", scan, qform, sform) for i, scan in enumerate(scans)]
    label = write_qs(folder / "label.nii.gz", (scans[0] > 60).astype(np.float32) * 3, qform, sform)
    return paths, label


def _write(tmp_path, scans, matrix, qform=None, name="t"):
    qform = matrix if qform is None else qform
    return [write_qs(tmp_path / f"{name}{i}.nii.gz", scan, qform, matrix, 1, 1 if qform is matrix else 2)
            for i, scan in enumerate(scans)]


@pytest.fixture(scope="module")
def oblique_fit(tmp_path_factory):
    """An oblique, anisotropic, LPS-stored 3D subject, fitted for a few epochs."""
    folder = tmp_path_factory.mktemp("oblique")
    paths = _write(folder, _blob_scans((16, 18, 12)), oblique_lps())
    sequence = load_sequence(paths, [0.0, 1.0, 2.0], subject="obl", reader="itk")
    fitted = fit_sequence(sequence, FitConfig(**TINY), progress=False)
    return folder, paths, sequence, fitted


def _itk_warp(moving_path, field_path):
    """Warp ``moving_path`` with ITK's own DisplacementFieldTransform and resampler, as ITK reads both files."""
    moving = itk.imread(str(moving_path), itk.F)
    field = itk.imread(str(field_path))
    dims = moving.GetImageDimension()
    displacement = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    displacement.CopyInformation(field)
    transform = itk.DisplacementFieldTransform[itk.D, dims].New()
    transform.SetDisplacementField(displacement)
    out = itk.resample_image_filter(moving, transform=transform, use_reference_image=True, reference_image=moving,
                                    interpolator=itk.LinearInterpolateImageFunction.New(moving))
    return itk.array_from_image(out).transpose(tuple(range(dims))[::-1])


def _inside(ddf):
    """Voxels whose sample point lies inside the grid (ITK pads with 0 outside, MONAI replicates the border)."""
    spatial = ddf.shape[1:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij"))
    points = grid + ddf
    inside = torch.ones(spatial, dtype=torch.bool)
    for axis, size in enumerate(spatial):
        inside &= (points[axis] >= 1e-3) & (points[axis] <= size - 1 - 1e-3)
    return inside.numpy()


def test_oblique_lps_fit_predict_outputs_keep_geometry(oblique_fit, tmp_path):
    folder, paths, sequence, fitted = oblique_fit
    labels = (sequence.images[0, 0] > 60).to(torch.float32)
    prediction = fitted.predict([0.5, 2.5], labels=labels)
    outputs = {
        "image": save_image(prediction.images[0], prediction.geometry, tmp_path / "image.nii.gz"),
        "ddf": save_image(prediction.ddfs[0], prediction.geometry, tmp_path / "ddf.nii.gz"),
        "jacobian": save_image(prediction.jacobians[0], prediction.geometry, tmp_path / "jac.nii.gz"),
        "labels": save_image(prediction.labels[0], prediction.geometry, tmp_path / "labels.nii.gz", dtype=np.uint8),
    }
    for out in outputs.values():
        assert_same_geometry(out, paths[0])
    # and after a save/load round trip of the model
    fitted.save(tmp_path / "model.pt")
    again = FittedSubject.load(tmp_path / "model.pt").predict([0.5])
    assert_same_geometry(save_image(again.images[0], again.geometry, tmp_path / "again.nii.gz"), paths[0])


def test_itk_displacement_field_warps_like_our_prediction(oblique_fit, tmp_path):
    folder, paths, sequence, fitted = oblique_fit
    prediction = fitted.predict([2.0, 3.0], source="baseline")
    for index in range(2):
        ddf = prediction.ddfs[index]
        assert float(ddf.abs().max()) > 0.05  # a real deformation, not the identity
        field = save_itk_displacement(ddf, prediction.geometry, tmp_path / f"field{index}.nii.gz")
        assert_same_geometry(field, paths[0])
        theirs = _itk_warp(paths[0], field)
        ours = prediction.images[index, 0].numpy()
        inside = _inside(ddf)
        assert inside.mean() > 0.5
        assert np.abs(ours - theirs)[inside].max() < 1e-3
        # the voxel-unit field read as if it were ITK's is wrong by far more
        voxel = save_image(ddf, prediction.geometry, tmp_path / f"voxel{index}.nii.gz")
        assert np.abs(ours - _itk_warp(paths[0], voxel))[inside].max() > 1e-2


def test_itk_vectors_are_lps_millimetres():
    matrix = np.diag([2.0, 3.0, 4.0, 1.0])
    ddf = torch.zeros(3, 4, 4, 4)
    ddf[0] = 1.0  # one voxel along axis 0 = +2 mm R = -2 mm in LPS x
    ddf[2] = -0.5  # half a voxel along axis 2 = -2 mm S
    vectors = ddf_to_itk(ddf, matrix)
    assert vectors.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(vectors[1, 2, 3], [-2.0, 0.0, -2.0])


def test_2d_slice_fit_predict_keeps_geometry_and_thickness(tmp_path):
    matrix = oblique_lps(spacing=(0.9, 3.0, 1.1))
    scans = [scan[:, None, :] for scan in _blob_scans((20, 18))]  # stored (20, 1, 18): axis 1 is 3 mm thick
    paths = _write(tmp_path, scans, matrix)
    for reader in ("nibabel", "itk"):
        sequence = load_sequence(paths, [0.0, 0.5, 1.0], subject="slice", reader=reader)
        assert sequence.spatial_size == (20, 18)
        assert voxel_volume_mm3(sequence.affine) == pytest.approx(0.9 * 3.0 * 1.1, abs=1e-6)
    fitted = fit_sequence(sequence, FitConfig(**TINY), progress=False)
    fitted.save(tmp_path / "model.pt")
    prediction = FittedSubject.load(tmp_path / "model.pt").predict([0.75], source="baseline")
    for name, array in {"image": prediction.images[0], "jac": prediction.jacobians[0]}.items():
        out = save_image(array, prediction.geometry, tmp_path / f"{name}.nii.gz")
        assert nib.load(out).shape == (20, 1, 18)
        assert_same_geometry(out, paths[0])
    field = save_itk_displacement(prediction.ddfs[0], prediction.geometry, tmp_path / "field.nii.gz")
    assert nib.load(field).shape == (20, 1, 18, 1, 3)
    theirs = _itk_warp(paths[0], field)[:, 0, :]
    inside = _inside(prediction.ddfs[0])
    assert np.abs(prediction.images[0, 0].numpy() - theirs)[inside].max() < 1e-3


def test_disagreeing_forms_fit_predict_both_readers(tmp_path):
    scans = _blob_scans((16, 16, 16))
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    qform[:3, 3] = -8
    sform = qform.copy()
    sform[:3, 3] = [-18, -3, 7]
    paths = _write(tmp_path, scans, sform, qform=qform)
    with pytest.warns(UserWarning, match="disagree"):
        sequence = load_sequence(paths, [0.0, 1.0, 2.0], subject="qs")
    fitted = fit_sequence(sequence, FitConfig(epochs=3, ncc_kernel_size=9), progress=False)
    prediction = fitted.predict([1.5])
    out = save_image(prediction.images[0], prediction.geometry, tmp_path / "image.nii.gz")
    header = nib.load(out).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)
    assert_same_geometry(out, paths[0])


# ---- sizes and levels -------------------------------------------------------------------------------------------


def _sequence(tmp_path, shape, scans=None):
    scans = scans if scans is not None else _blob_scans(shape)
    paths = _write(tmp_path, scans, np.diag([1.0, 1.0, 4.0, 1.0]))
    return load_sequence(paths, list(range(len(paths))), subject="s")


@pytest.mark.parametrize("shape,kept", [((32, 32, 8), (2, 1)), ((9, 11, 7), (2, 1)), ((16, 16, 16), (4, 2, 1))])
def test_levels_too_coarse_for_an_axis_are_dropped_and_logged(tmp_path, caplog, shape, kept):
    sequence = _sequence(tmp_path, shape)
    with caplog.at_level(logging.WARNING, logger="noder_monai.engines.config"):
        config = check_fit_inputs(sequence_item(sequence), FitConfig())
    assert config.levels == kept
    assert math.isclose(sum(config.level_fractions), 1.0)
    if kept != (4, 2, 1):
        assert f"has size {shape}: level 4 dropped (axis 2 would have 2 voxel(s)" in caplog.text
        assert "t0.nii.gz" in caplog.text


def test_thin_slab_fits_with_the_default_levels(tmp_path):
    """32x32x8 with (4, 2, 1) used to end in 'ddf must have at least 3 voxels'; now level 4 is dropped."""
    sequence = _sequence(tmp_path, (32, 32, 8))
    fitted = fit_sequence(sequence, FitConfig(epochs=4), progress=False)
    assert {record["level"] for record in fitted.history} == {2, 1}
    assert fitted.fit_config["levels"] == (2, 1)


def test_sizes_that_cannot_work_are_refused_up_front(tmp_path):
    sequence = _sequence(tmp_path, (16, 16, 2))
    with pytest.raises(ValueError, match=r"subject 's': scan '.*t0.nii.gz' has size \(16, 16, 2\): axis 2 has 2 "
                                         r"voxel\(s\), the fit needs at least 3"):
        fit_sequence(sequence, FitConfig(epochs=1), progress=False)


@pytest.mark.parametrize("kernel", [0, 4, -3, 1])
def test_ncc_kernel_size_is_validated(tmp_path, kernel):
    sequence = _sequence(tmp_path, (16, 16, 16))
    with pytest.raises(ValueError, match=rf"field 'ncc_kernel_size' must be an odd integer >= 3, got {kernel}"):
        fit_sequence(sequence, FitConfig(epochs=1, ncc_kernel_size=kernel), progress=False)


def test_ncc_window_is_clamped_per_level_so_the_fit_moves(tmp_path):
    assert [level_window(k, 4) for k in (5, 7, 21)] == [3, 3, 5]
    sequence = _sequence(tmp_path, (16, 16, 16))
    fitted = fit_sequence(sequence, FitConfig(epochs=4, ncc_kernel_size=5, levels=(4,), level_fractions=(1.0,)),
                          progress=False)
    similarity = [record["similarity"] for record in fitted.history]
    assert all(value < -0.05 for value in similarity)  # a 1-voxel window gave exactly 0 every epoch


# ---- content ----------------------------------------------------------------------------------------------------


def test_all_zero_baseline_is_refused_naming_the_file(tmp_path):
    scans = _blob_scans((16, 16, 16))
    scans[0] = np.zeros_like(scans[0])
    sequence = _sequence(tmp_path, (16, 16, 16), scans)
    with pytest.raises(ValueError, match=r"subject 's': scan '.*t0.nii.gz' \(the baseline, the only image warped\) "
                                         r"is constant \(every voxel 0\)"):
        fit_sequence(sequence, FitConfig(epochs=1), progress=False)


def test_sparse_scans_fit(tmp_path):
    scans = [np.zeros((16, 16, 16), np.float32) for _ in range(2)]
    scans[0].reshape(-1)[::341] = 100.0  # 12 bright voxels of 4096
    scans[1].reshape(-1)[1::341] = 100.0
    fitted = fit_sequence(_sequence(tmp_path, (16, 16, 16), scans), FitConfig(epochs=1), progress=False)
    assert (fitted.intensity.lower, fitted.intensity.upper) == (0.0, 100.0)


def test_diverging_fit_stops_with_a_clear_error(tmp_path):
    sequence = _sequence(tmp_path, (16, 16, 16))
    with pytest.raises(FloatingPointError, match=r"subject 's': the fit diverged: loss is (nan|inf).*nothing was "
                                                 r"saved. Lower learning_rate \(now 1e\+30\)"):
        fit_sequence(sequence, FitConfig(epochs=6, learning_rate=1e30, levels=(1,), level_fractions=(1.0,)),
                     progress=False)


# ---- prediction bounds and time values --------------------------------------------------------------------------


def test_prediction_times_are_bounded(oblique_fit):
    _, _, _, fitted = oblique_fit
    with pytest.raises(ValueError, match=r"subject 'obl': time 730 is 364 fitted spans outside the observed times "
                                         r"\[0, 2\].*max_extrapolation=10"):
        fitted.predict([1.0, 730.0])
    with pytest.raises(ValueError, match=r"time 1e\+06 is"):
        fitted.displacement([1e6])
    with pytest.warns(UserWarning, match=r"time 5 is 1.5 fitted spans outside"):
        fitted.predict([5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fitted.predict([-1.0, 3.9])  # within one span: no warning
    fitted.max_extrapolation = 400.0
    try:
        with pytest.warns(UserWarning, match="time 730"):
            assert fitted.predict([730.0], batch_size=1).images.shape[0] == 1
    finally:
        fitted.max_extrapolation = FittedSubject.MAX_EXTRAPOLATION


def test_prediction_times_must_be_numbers(oblique_fit):
    _, _, _, fitted = oblique_fit
    with pytest.raises(ValueError, match=r"times\[0\] is the string '1.0', not a number"):
        fitted.predict(["1.0"])


# ---- stale and crafted models -----------------------------------------------------------------------------------


def test_model_records_its_inputs_and_detects_changes(oblique_fit, tmp_path):
    folder, paths, sequence, fitted = oblique_fit
    fitted.save(tmp_path / "model.pt")
    loaded = FittedSubject.load(tmp_path / "model.pt")
    assert loaded.fitted_on["spatial_size"] == [16, 18, 12]
    assert [scan["size"] for scan in loaded.fitted_on["scans"]] == [os.path.getsize(p) for p in paths]
    assert loaded.stale_reasons(paths=paths, times=[0.0, 1.0, 2.0], spatial_size=(16, 18, 12),
                                affine=sequence.affine) == []
    os.utime(paths[1])  # touched, same content: still current
    assert loaded.stale_reasons(paths=paths) == []
    assert loaded.stale_reasons(times=[0.0, 1.0, 3.0]) == ["times changed from [0.0, 1.0, 2.0] to [0.0, 1.0, 3.0]"]
    bigger = str(tmp_path / "t1.nii.gz")
    write_qs(bigger, np.random.rand(24, 24, 24), np.eye(4), np.eye(4), 1, 1)
    changed = [paths[0], paths[1], paths[2]]
    os.replace(bigger, changed[2])  # the scan now holds a 24^3 image
    try:
        reasons = loaded.stale_reasons(paths=changed, spatial_size=(24, 24, 24))
        assert reasons[0] == "grid size changed from (16, 18, 12) to (24, 24, 24)"
        assert f"scan '{os.path.abspath(changed[2])}' changed since the fit" in reasons[1]
        with pytest.raises(ValueError, match=r"model '.*model.pt' is stale: grid size changed"):
            loaded.check_inputs(paths=changed, spatial_size=(24, 24, 24))
    finally:
        write_qs(changed[2], _blob_scans((16, 18, 12))[2], oblique_lps(), oblique_lps(), 1, 1)


def _crafted(fitted, **changes):
    state = fitted.state()
    state.update(changes)
    return {k: v for k, v in state.items() if v is not ...}


@pytest.mark.parametrize("changes,message", [
    ({"network": ..., "state_dict": ..., "baseline": ...},
     r"field\(s\) \['network', 'state_dict', 'baseline'\] missing"),
    ({"times": [1.0, 1.0, 1.0]}, r"field 'times' must be strictly increasing, got \[1.0, 1.0, 1.0\]"),
    ({"times": [0.0, float("inf")]}, r"field 'times' must be a list of at least 2 finite numbers"),
    ({"affine": [[1.0, 0.0], [0.0, 1.0]]}, r"field 'affine' must be a finite 4x4 matrix"),
    ({"intensity": {"lower": 1.0, "upper": 1.0}}, r"field 'intensity' must be \{'lower'"),
    ({"subject": 3}, r"field 'subject' must be a string, got 3"),
    ({"state_dict": {}}, r"field 'state_dict' must be a non-empty dictionary of tensors"),
    ({"geometry": {"affine": "x"}}, r"field 'geometry'"),
])
def test_crafted_checkpoints_are_refused_naming_the_file_and_field(oblique_fit, tmp_path, changes, message):
    _, _, _, fitted = oblique_fit
    torch.save(_crafted(fitted, **changes), tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"checkpoint '.*crafted.pt'.*" + message):
        FittedSubject.load(tmp_path / "crafted.pt")


def test_format_tag_alone_is_refused(tmp_path):
    torch.save({"format": SUBJECT_FORMAT}, tmp_path / "tag.pt")
    with pytest.raises(ValueError, match=r"checkpoint '.*tag.pt': field\(s\) \['network', 'state_dict', 'baseline', "
                                         r"'times', 'affine', 'intensity', 'subject', 'fit_config', 'history'\] "
                                         r"missing"):
        FittedSubject.load(tmp_path / "tag.pt")
