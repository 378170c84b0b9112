"""Tests for noder_monai.baselines: nearest scan, linear interpolation and geodesic regression."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import DVF2DDF, Warp

from noder_monai.baselines import GeodesicRegression, linear_interpolation, nearest_scan
from noder_monai.metrics import jacobian_determinant, nrmse, percent_folded

OBSERVED = [0.0, 1.0, 2.0, 4.0]
HELD_OUT = [-0.5, 0.5, 3.0, 5.5, 7.0]  # before, inside (two), after the observed span


def _constant_scans(values: list[float], spatial: tuple[int, ...] = (3, 4, 5)) -> torch.Tensor:
    return torch.tensor(values).reshape((-1, 1) + (1,) * len(spatial)).expand(-1, 1, *spatial).clone()


def _grid(size: int, spatial_dims: int) -> list[torch.Tensor]:
    return list(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij"))


def _blob_image(size: int, spatial_dims: int = 3) -> torch.Tensor:
    """(1, 1, *S) smooth phantom in [0, 1]: a large Gaussian plus three small off-centre ones (texture)."""
    grid = _grid(size, spatial_dims)
    image = torch.exp(-sum((x - (size - 1) / 2) ** 2 for x in grid) / (2 * (size / 5) ** 2))
    for centre, sigma in (((0.3, 0.6, 0.45), 2.0), ((0.65, 0.35, 0.6), 2.5), ((0.5, 0.5, 0.25), 1.8)):
        image = image + 0.6 * torch.exp(-sum((x - c * (size - 1)) ** 2 for x, c in zip(grid, centre)) / (2 * sigma**2))
    return (image / image.max())[None, None]


def _true_velocity(size: int, spatial_dims: int = 3, amplitude: float = 0.8) -> torch.Tensor:
    """(1, D, *S) smooth stationary velocity (voxels per unit time): a local expansion plus a shift along axis 0."""
    grid = _grid(size, spatial_dims)
    centre, sigma = (size - 1) / 2, size / 4
    weight = torch.exp(-sum((x - centre) ** 2 for x in grid) / (2 * sigma**2))
    velocity = torch.stack([amplitude * (x - centre) / sigma * weight for x in grid])
    velocity[0] += 0.5 * amplitude * weight
    return velocity[None]


def _constant_velocity_sequence(size: int, times: list[float], spatial_dims: int = 3):
    """Images I_0 ∘ exp(t v) at ``times`` (the geodesic model itself), the velocity and the fields."""
    image, velocity = _blob_image(size, spatial_dims), _true_velocity(size, spatial_dims)
    t = torch.tensor(times).reshape((-1, 1) + (1,) * spatial_dims)
    ddf = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(t * velocity)
    images = Warp(mode="bilinear", padding_mode="border")(image.expand(len(times), -1, *image.shape[2:]), ddf)
    return images, velocity, ddf


@pytest.fixture(scope="module")
def sequence_3d():
    return _constant_velocity_sequence(16, OBSERVED + HELD_OUT)


@pytest.fixture(scope="module")
def fitted_3d(sequence_3d):
    images = sequence_3d[0]
    model = GeodesicRegression(spatial_dims=3, iterations=150, ncc_kernel_size=9, smoothing_kernel=7)
    return model.fit(images[: len(OBSERVED)], OBSERVED)


# ---------------------------------------------------------------- nearest scan / linear interpolation


def test_nearest_scan_values_ties_and_outside_span():
    scans = _constant_scans([10.0, 20.0, 30.0])
    out = nearest_scan(scans, [0.0, 1.0, 3.0], [-1.0, 0.5, 0.6, 2.0, 2.1, 3.0, 9.0])
    assert out.shape == (7, 1, 3, 4, 5)
    assert out[:, 0, 0, 0, 0].tolist() == [10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 30.0]  # ties -> earlier scan


def test_nearest_scan_single_scan_and_scalar_query_2d():
    scans = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(0))
    out = nearest_scan(scans, [2.0], 5.0)
    assert out.shape == (1, 1, 6, 7)
    assert torch.equal(out[0], scans[0])


def test_linear_interpolation_values_and_held_ends():
    scans = _constant_scans([10.0, 20.0, 40.0])
    out = linear_interpolation(scans, torch.tensor([0.0, 1.0, 3.0]), [-1.0, 0.0, 0.25, 1.0, 2.0, 3.0, 100.0])
    assert out.shape == (7, 1, 3, 4, 5)
    assert out[:, 0, 0, 0, 0].tolist() == pytest.approx([10.0, 10.0, 12.5, 20.0, 30.0, 40.0, 40.0], abs=1e-6)


def test_linear_interpolation_returns_observed_scans_exactly():
    scans = torch.rand(3, 1, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    times = [0.3, 1.7, 2.2]
    assert torch.equal(linear_interpolation(scans, times, times), scans)
    midpoint = linear_interpolation(scans, times, [1.0])[0]
    assert torch.allclose(midpoint, 0.5 * (scans[0] + scans[1]), atol=1e-6)


@pytest.mark.parametrize(
    "images, times, query, message",
    [
        (torch.zeros(3, 1, 4, 4, 4), [0.0, 2.0, 1.0], [0.5], r"strictly increasing, got \[0.0, 2.0, 1.0\]"),
        (torch.zeros(3, 1, 4, 4, 4), [0.0, 1.0, 1.0], [0.5], r"times must be strictly increasing"),
        (torch.zeros(3, 1, 4, 4, 4), [0.0, 1.0], [0.5], r"times must have one entry per scan \(3\), got 2"),
        (torch.zeros(3, 2, 4, 4, 4), [0.0, 1.0, 2.0], [0.5], r"images must be a tensor of shape \(T, 1, \*spatial\)"),
        (torch.zeros(3, 1, 4), [0.0, 1.0, 2.0], [0.5], r"got \(3, 1, 4\)"),
        (torch.zeros(2, 1, 4, 4), [0.0, float("nan")], [0.5], r"times must be finite numbers, got \[0.0, nan\]"),
        (torch.zeros(2, 1, 4, 4), [0.0, 1.0], [[0.5]], r"query_times must be a non-empty 1-D sequence"),
        (torch.zeros(2, 1, 4, 4), [0.0, 1.0], [float("inf")], r"query_times must be finite numbers, got \[inf\]"),
    ],
)
def test_interpolation_errors_name_argument_and_value(images, times, query, message):
    for baseline in (nearest_scan, linear_interpolation):
        with pytest.raises(ValueError, match=message):
            baseline(images, times, query)


def test_linear_interpolation_needs_two_scans():
    with pytest.raises(ValueError, match=r"images must hold at least 2 scans, got 1"):
        linear_interpolation(torch.zeros(1, 1, 4, 4), [0.0], [0.5])


# ---------------------------------------------------------------- geodesic regression


def test_geodesic_recovers_its_own_model_better_than_nearest_scan(sequence_3d, fitted_3d):
    images = sequence_3d[0]
    observed, truth = images[: len(OBSERVED)], images[len(OBSERVED) :]
    predicted = fitted_3d.predict(HELD_OUT)
    assert predicted.shape == (len(HELD_OUT), 1, 16, 16, 16)
    error = nrmse(predicted, truth)
    error_nearest = nrmse(nearest_scan(observed, OBSERVED, HELD_OUT), truth)
    # measured: error 0.007-0.13, 0.09-0.32x the nearest scan's (the smoothness term is the main bias)
    assert (error < 0.4 * error_nearest).all(), (error, error_nearest)
    assert error.max() < 0.16, error
    assert fitted_3d.loss_history[-1] < fitted_3d.loss_history[0] - 0.01


def test_geodesic_velocity_matches_truth_where_image_has_gradient(sequence_3d, fitted_3d):
    images, velocity = sequence_3d[0], sequence_3d[1]
    assert fitted_3d.velocity.shape == (1, 3, 16, 16, 16)
    assert fitted_3d.registration_velocities.shape == (3, 3, 16, 16, 16)
    gradient = torch.stack(torch.gradient(images[0, 0]), 0).norm(dim=0)
    mask = gradient > 0.1 * gradient.max()
    estimated, true = fitted_3d.velocity[0][:, mask], velocity[0][:, mask]
    cosine = (estimated * true).sum() / (estimated.norm() * true.norm())
    assert cosine > 0.97, cosine  # measured 0.988
    assert (estimated - true).norm() / true.norm() < 0.25  # measured 0.16


def test_geodesic_fields_fold_free_and_baseline_time_is_identity(sequence_3d, fitted_3d):
    ddf = fitted_3d.predict_ddf(HELD_OUT + [0.0, 12.0])
    assert ddf.shape == (len(HELD_OUT) + 2, 3, 16, 16, 16)
    determinant = jacobian_determinant(ddf)
    assert determinant.min() > 0.3, determinant.min()  # measured 0.60 (at t = 12)
    assert percent_folded(ddf).max() == 0.0
    assert torch.count_nonzero(ddf[len(HELD_OUT)]) == 0
    assert (fitted_3d.predict([0.0])[0] - sequence_3d[0][0]).abs().max() < 1e-5


def test_geodesic_negative_time_is_the_inverse(fitted_3d):
    forward = fitted_3d.predict_ddf([2.0])
    backward = fitted_3d.predict_ddf([-2.0])
    composed = backward + Warp(mode="bilinear", padding_mode="border")(forward, backward)
    assert composed.abs().max() < 0.05 * forward.abs().max()  # measured 0.03


def _translation_sequence_2d(size: int = 24) -> torch.Tensor:
    """(4, 1, size, size) blob translated by (1, -0.5) voxels per unit time at times 0, 1, 2, 3."""
    image = _blob_image(size, spatial_dims=2)
    shift = torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1).expand(1, 2, size, size)
    t = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(-1, 1, 1, 1)
    return Warp(mode="bilinear", padding_mode="border")(image.expand(4, -1, -1, -1), t * shift)


def test_geodesic_2d_pyramid_and_coarse_integration_recover_translation():
    sequence = _translation_sequence_2d()
    model = GeodesicRegression(
        spatial_dims=2, iterations=100, ncc_kernel_size=9, pyramid_levels=2, integration_stride=2
    )
    model.fit(sequence[:3], [0.0, 1.0, 2.0])
    centre = model.velocity[0, :, 8:16, 8:16].mean(dim=(1, 2))
    assert centre.tolist() == pytest.approx([1.0, -0.5], abs=0.03)  # measured within 0.002
    assert nrmse(model.predict([3.0]), sequence[3:]) < 0.05 * nrmse(sequence[2:3], sequence[3:])  # measured 0.007x
    assert len(model.loss_history) == 200


def test_geodesic_any_image_size():
    images = torch.rand(3, 1, 9, 11, 14, generator=torch.Generator().manual_seed(2))
    model = GeodesicRegression(iterations=2, ncc_kernel_size=5, smoothing_kernel=3, pyramid_levels=2).fit(
        images, [1.0, 2.0, 4.0]
    )
    assert model.velocity.shape == (1, 3, 9, 11, 14)
    assert model.registration_velocities.shape == (2, 3, 9, 11, 14)
    assert model.predict_ddf([0.0, 5.0]).shape == (2, 3, 9, 11, 14)
    assert model.predict(3.0).shape == (1, 1, 9, 11, 14)
    assert model.time0 == 1.0 and len(model.loss_history) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_geodesic_cuda_matches_cpu():
    sequence = _translation_sequence_2d()
    kwargs = {"spatial_dims": 2, "iterations": 30, "ncc_kernel_size": 9}
    cpu = GeodesicRegression(**kwargs).fit(sequence[:3], [0.0, 1.0, 2.0])
    cuda = GeodesicRegression(**kwargs, device="cuda").fit(sequence[:3], [0.0, 1.0, 2.0])
    predicted = cuda.predict([3.0])
    assert predicted.device.type == "cuda"
    assert (cuda.velocity.cpu() - cpu.velocity).abs().max() < 0.02
    assert (predicted.cpu() - cpu.predict([3.0])).abs().max() < 0.02


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 1}, r"spatial_dims must be 2 or 3, got 1"),
        ({"iterations": 0}, r"iterations must be a positive integer, got 0"),
        ({"lr": -1.0}, r"lr must be positive, got -1.0"),
        ({"ncc_kernel_size": 8}, r"ncc_kernel_size must be an odd integer >= 3, got 8"),
        ({"smoothness_weight": float("nan")}, r"smoothness_weight must be >= 0, got nan"),
        ({"grid_stride": 0}, r"grid_stride must be a positive integer, got 0"),
        ({"smoothing_kernel": 4}, r"smoothing_kernel must be a positive odd integer, got 4"),
        ({"pyramid_levels": 0}, r"pyramid_levels must be a positive integer, got 0"),
        ({"integration_stride": 1.5}, r"integration_stride must be a positive integer, got 1.5"),
    ],
)
def test_geodesic_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeodesicRegression(**kwargs)


def test_geodesic_rejects_bad_inputs_and_unfitted_use():
    model = GeodesicRegression(spatial_dims=3, iterations=1)
    with pytest.raises(RuntimeError, match=r"not fitted"):
        model.predict([1.0])
    with pytest.raises(ValueError, match=r"images must have 3 spatial dims \(spatial_dims\), got shape \(2, 1, 8, 8\)"):
        model.fit(torch.zeros(2, 1, 8, 8), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"images must hold at least 2 scans, got 1"):
        model.fit(torch.zeros(1, 1, 8, 8, 8), [0.0])
    with pytest.raises(ValueError, match=r"pyramid_levels=3 makes the coarsest level \[3, 3, 3\]"):
        GeodesicRegression(pyramid_levels=3, iterations=1).fit(torch.zeros(2, 1, 10, 10, 10), [0.0, 1.0])
