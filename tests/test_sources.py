"""Inverse maps, the subject template and the prediction sources (baseline, template, nearest scans)."""

from __future__ import annotations

import pytest
import torch

from noder_monai.data import SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.model import FittedSubject
from noder_monai.functional import compose_displacements, invert_displacement
from noder_monai.metrics import nrmse

SMALL = {"levels": (2, 1), "level_fractions": (0.5, 0.5), "ncc_kernel_size": 7}
NETWORK = {"smoothing_kernel": 5}


def _sequence(noise: float = 0.0, size: int = 32, seed: int = 0):
    truth = synthetic_sequence(spatial_dims=2, size=size, kind="cardiac", times=[0.0, 0.15, 0.3, 0.45, 0.6],
                               noise=noise, seed=seed, amplitude=2.0)
    return truth, SubjectSequence.from_tensors(truth.images, truth.times, subject="sub-src")


@pytest.fixture(scope="module")
def fitted_template():
    torch.manual_seed(0)
    truth, sequence = _sequence(noise=0.08)
    config = FitConfig(epochs=60, source="template", template_rounds=2, **SMALL)
    return truth, fit_sequence(sequence, config, network=NETWORK, progress=False)


def test_inverse_of_fitted_map_composed_with_map_is_identity(fitted_template):
    _, fitted = fitted_template
    scaled = fitted.scaled_time(fitted.times[1:])
    with torch.no_grad():
        forward = fitted.model.displacement(scaled)
        inverse = fitted.model.displacement(scaled, inverse=True)
    assert forward.norm(dim=1).amax() > 1.0  # a real deformation (measured about 2 voxels)
    # Warp(Warp(x, forward), inverse) = x: the order the template and the nearest-scan source rely on
    assert compose_displacements(forward, inverse).norm(dim=1)[:, 4:-4, 4:-4].max() < 0.1
    # the other order holds to interpolation error (measured mean 0.03, max 0.14 voxel)
    assert compose_displacements(inverse, forward).norm(dim=1)[:, 4:-4, 4:-4].mean() < 0.1


def test_fixed_point_inverse_of_a_translation_is_its_negation():
    ddf = torch.zeros(1, 2, 16, 16)
    ddf[:, 0] = 1.5
    ddf[:, 1] = -0.5
    assert torch.allclose(invert_displacement(ddf), -ddf, atol=1e-6)
    with pytest.raises(ValueError, match="iterations"):
        invert_displacement(ddf, iterations=0)


def test_template_is_closer_to_the_clean_baseline_than_any_single_scan(fitted_template):
    truth, fitted = fitted_template
    assert fitted.template is not None and fitted.default_source == "template"
    template = fitted.intensity.inverse(fitted.template)
    template_error = nrmse(template, truth.clean[:1]).item()
    scan_errors = nrmse(truth.images, truth.clean)
    assert template_error < scan_errors.min().item()
    prediction = fitted.predict(truth.times[2:3])
    assert torch.allclose(
        prediction.images, fitted.intensity.inverse(fitted.model.warp(fitted.template, prediction.ddfs)), atol=1e-5
    )


def test_nearest_source_reproduces_each_observed_scan_at_its_own_time(fitted_template):
    truth, fitted = fitted_template
    prediction = fitted.predict(truth.times, source="nearest")
    assert torch.allclose(prediction.images, truth.images, atol=1e-5)
    between = fitted.predict([0.2], source="nearest").images
    # between two scans the blend is neither one of them
    assert not torch.allclose(between, truth.images[1:2], atol=1e-3)
    assert not torch.allclose(between, truth.images[2:3], atol=1e-3)


def test_sources_survive_save_and_load(fitted_template, tmp_path):
    truth, fitted = fitted_template
    loaded = FittedSubject.load(fitted.save(tmp_path / "sub.pt"))
    assert loaded.default_source == "template"
    for source in ("baseline", "template", "nearest"):
        assert torch.equal(loaded.predict([0.2, 0.7], source=source).images,
                           fitted.predict([0.2, 0.7], source=source).images)


def test_unknown_or_missing_source_is_refused(fitted_template):
    _, fitted = fitted_template
    with pytest.raises(ValueError, match="source must be one of"):
        fitted.predict([0.1], source="average")
    bare = FittedSubject(fitted.model, fitted.baseline, fitted.times, fitted.affine, fitted.intensity, subject="bare")
    with pytest.raises(ValueError, match="fitted without a template"):
        bare.predict([0.1], source="template")
    with pytest.raises(ValueError, match="holds no observed scans"):
        bare.predict([0.1], source="nearest")
    with pytest.raises(ValueError, match="source must be one of"):
        FitConfig(source="average")
    with pytest.raises(ValueError, match="template_rounds"):
        FitConfig(template_rounds=0)


@pytest.mark.parametrize("preset, source", [("longitudinal-mri", "auto"), ("cine", "nearest")])
def test_each_preset_fits_and_predicts_with_its_source(preset, source):
    truth, sequence = _sequence(noise=0.05, size=24)
    config = FitConfig.preset(preset, epochs=8, **SMALL)
    assert config.source == source
    fitted = fit_sequence(sequence, config, network=NETWORK, progress=False)
    assert fitted.default_source == source
    assert (fitted.template is not None) == (source == "auto")
    assert (fitted.source_choice is not None) == (source == "auto")
    prediction = fitted.predict([0.2, 0.8])
    assert prediction.images.shape == (2, 1, 24, 24) and torch.isfinite(prediction.images).all()
    with pytest.raises(ValueError, match="preset must be one of"):
        FitConfig.preset("ultrasound")


def test_nearest_source_beats_warping_the_first_frame_on_a_speckle_cine():
    times = [k / 12 for k in range(12)]
    truth = synthetic_sequence(spatial_dims=2, size=32, kind="cardiac", times=times, noise=0.01,
                               noise_model="speckle", amplitude=2.0, seed=1)
    observed = [0, 1, 2, 4, 5, 7, 8, 9, 10]
    heldout = [3, 6, 11]
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject="cine")
    torch.manual_seed(0)
    fitted = fit_sequence(sequence, FitConfig.preset("cine", epochs=30, **SMALL), network=NETWORK, progress=False)
    target = truth.images[heldout]  # the speckle is the signal: score against the held-out frames themselves
    nearest = nrmse(fitted.predict(truth.times[heldout]).images, target)
    baseline = nrmse(fitted.predict(truth.times[heldout], source="baseline").images, target)
    assert (nearest < baseline).all(), (nearest, baseline)
