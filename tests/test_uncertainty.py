"""The uncertainty ensemble (noder_monai.model.uncertainty, noder_monai.engines.fit_ensemble): calibration, the
behaviour of the intervals, Jacobian-integrated volumes and the fitted-file round trip."""

from __future__ import annotations

import pytest
import torch

from noder_monai.data import SubjectSequence
from noder_monai.engines import FitConfig, fit_ensemble, fit_sequence
from noder_monai.engines.ensemble import left_out_scans
from noder_monai.model import FittedSubject
from noder_monai.model.uncertainty import (
    Ensemble,
    calibrate_scale,
    fit_error_model,
    interpolation_variance,
    jacobian_volumes,
)

TIMES = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
FIT = FitConfig(epochs=12, levels=(2, 1), level_fractions=(0.5, 0.5), ncc_kernel_size=5)


def disk(radius: float, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(1, 32, 32): a bright disk of ``radius`` voxels with a soft edge, plus Gaussian noise."""
    y, x = torch.meshgrid(torch.arange(32.0) - 15.5, torch.arange(32.0) - 15.5, indexing="ij")
    image = torch.sigmoid(1.5 * (radius - (x**2 + y**2).sqrt()))
    return (image + noise * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)))[None]


RADII = 10.0 - 0.8 * TIMES  # a shrinking structure: its true area falls at every step


def _fitted(noise: float) -> FittedSubject:
    images = torch.stack([disk(float(r), noise, seed) for seed, r in enumerate(RADII)])
    subject = fit_sequence(SubjectSequence.from_tensors(images, TIMES, subject=f"noise {noise}"), FIT, seed=0,
                           progress=False)
    fit_ensemble(subject, members=3, epochs=4)
    return subject


@pytest.fixture(scope="module")
def subjects() -> dict:
    return {noise: _fitted(noise) for noise in (0.01, 0.08)}


def test_noisier_subject_gets_wider_intervals(subjects):
    quiet, loud = (subjects[noise].predict([2.5], uncertainty=True) for noise in (0.01, 0.08))
    assert quiet.image_std.shape == quiet.images.shape == (1, 1, 32, 32)
    assert float(loud.image_std.mean()) > 2 * float(quiet.image_std.mean())


def test_intervals_at_an_observed_time_are_narrower_than_far_after_the_last_scan(subjects):
    subject = subjects[0.01]
    prediction = subject.predict([2.0, 12.0], uncertainty=True)  # an observed time; 2 spans after the last scan
    assert float(prediction.image_std[0].mean()) < float(prediction.image_std[1].mean())
    assert float(prediction.log_jacobian_std[0].mean()) < float(prediction.log_jacobian_std[1].mean())


def test_calibration_reaches_its_nominal_coverage_on_the_left_out_scans(subjects):
    for subject in subjects.values():
        assert subject.ensemble.left_out == [1, 3, 4]  # 3 members over 4 visits: spread out, the last kept
        assert len(subject.ensemble.states) == 3
        assert subject.ensemble.coverage >= 0.9 - 0.01  # calibrated to 90 %, or wider where the fit holds more
        assert subject.ensemble.noise_scale >= 1.0  # never narrower than the likelihood's fit
        assert subject.ensemble.scale >= subject.ensemble.noise_scale  # the members' spread is at least face value


def test_ensemble_round_trips_through_the_fitted_file(subjects, tmp_path):
    subject = subjects[0.01]
    path = subject.save(tmp_path / "model.pt")
    loaded = FittedSubject.load(path)
    assert loaded.ensemble.to_dict()["scale"] == subject.ensemble.scale
    assert loaded.ensemble.left_out == subject.ensemble.left_out
    before = subject.predict([2.5, 5.0], uncertainty=True)
    after = loaded.predict([2.5, 5.0], uncertainty=True)
    torch.testing.assert_close(after.image_std, before.image_std)
    torch.testing.assert_close(after.log_jacobian_std, before.log_jacobian_std)


def test_a_damaged_ensemble_is_refused_naming_the_field(subjects, tmp_path):
    state = subjects[0.01].state()
    state["ensemble"]["scale"] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="field 'ensemble' is malformed: scale, edge_scale and noise_scale"):
        FittedSubject.load(tmp_path / "nan.pt")
    state = subjects[0.01].state()
    key = next(iter(state["ensemble"]["states"][0]))
    state["ensemble"]["states"][0][key] = torch.zeros(3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=f"member 0: weight '{key}' must have shape"):
        FittedSubject.load(tmp_path / "shape.pt")


def test_uncertainty_without_an_ensemble_says_how_to_fit_one(subjects):
    subject = subjects[0.01]
    bare = FittedSubject.from_checkpoint({**subject.state(), "ensemble": None}, subject.model)
    with pytest.raises(ValueError, match=r"holds no uncertainty ensemble: fit one with noder_monai.engines.fit_ensemble"):
        bare.predict([1.5], uncertainty=True)
    with pytest.raises(ValueError, match="holds no uncertainty ensemble"):
        bare.structure_volumes([1.5], torch.ones(32, 32, dtype=torch.int64), uncertainty=True)


def test_volume_curve_from_the_jacobian_is_monotone_where_the_true_change_is(subjects):
    subject = subjects[0.01]
    labels = (disk(float(RADII[0]))[0] > 0.5).to(torch.int64) * 4
    grid = torch.linspace(0.0, 4.0, 17)
    volumes = subject.structure_volumes(grid, labels, uncertainty=True)
    assert volumes["labels"] == [4] and volumes["volume"].shape == (17, 1)
    assert bool((volumes["volume"][:, 0].diff() < 0).all())  # falls at every step, as the true area does
    assert bool((volumes["lower"] <= volumes["volume"]).all()) and bool((volumes["volume"] <= volumes["upper"]).all())
    assert float((volumes["upper"] - volumes["lower"])[-1, 0]) > 0
    far = subject.structure_volumes([4.0, 40.0], labels, uncertainty=True)  # 9 spans after the last scan
    assert bool((far["lower"] > 0).all())  # the band is on log volume: never below zero
    assert float(far["upper"][1, 0] / far["lower"][1, 0]) > float(far["upper"][0, 0] / far["lower"][0, 0])


def test_calibrate_scale_recovers_the_scale_of_gaussian_residuals():
    generator = torch.Generator().manual_seed(0)
    spread = torch.rand(200_000, generator=generator) * 0.02
    residual = torch.randn(200_000, generator=generator) * (4 * spread**2 + 1e-4).sqrt()
    scale, coverage = calibrate_scale(residual, spread, torch.full_like(spread, 1e-4))
    assert abs(scale - 2.0) < 0.05 and abs(coverage - 0.9) < 1e-3
    s, e, k, coverage = fit_error_model(residual, spread**2, torch.zeros_like(spread), torch.zeros_like(spread),
                                        torch.full_like(spread, 1e-4))
    assert 1.95 < s < 2.6 and e == 0.0 and k >= 1.0 and coverage >= 0.9 - 1e-3  # the likelihood's grid value, or wider
    assert calibrate_scale(torch.zeros(10), torch.ones(10), torch.ones(10)) == (0.0, 1.0)  # noise alone covers
    with pytest.raises(ValueError, match="coverage must be in"):
        calibrate_scale(residual, spread, spread, coverage=1.0)


def test_interpolation_variance_and_jacobian_volumes_on_known_fields():
    whole = torch.zeros(1, 2, 8, 8)
    half = torch.full((1, 2, 8, 8), 0.5)
    assert float(interpolation_variance(whole).min()) == 1.0
    assert float(interpolation_variance(half).max()) == pytest.approx(0.25)
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"))[None]
    expansion = 0.1 * (grid - 7.5)  # x -> 1.1 x about the centre: every area grows by 1.21
    labels = torch.zeros(16, 16, dtype=torch.int64)
    labels[4:12, 4:12] = 3
    volumes = jacobian_volumes(expansion, labels, [3], voxel_mm3=2.0)
    assert volumes.tolist() == pytest.approx([64 * 2.0 * 1.21])


def test_left_out_scans_spread_over_the_visits_and_keep_the_last():
    assert left_out_scans([True] * 6, 5) == [1, 2, 3, 4, 5]
    assert left_out_scans([True] * 11, 3) == [1, 5, 10]
    assert left_out_scans([True, True, False, True], 5) == [1, 3]
    with pytest.raises(ValueError, match="at least 3 non-constant observed scans"):
        left_out_scans([True, True, False], 2)
    with pytest.raises(ValueError, match="members must be an integer >= 2"):
        left_out_scans([True] * 4, 1)


def test_ensemble_from_dict_checks_the_left_out_indices(subjects):
    subject = subjects[0.01]
    state = {**subject.ensemble.to_dict(), "left_out": [0, 3, 4]}
    with pytest.raises(ValueError, match=r"left_out \[0, 3, 4\] must index observed scans 1 .. 4"):
        Ensemble.from_dict(state, subject.model.state_dict(), 5)
