"""Networks: shapes for any size, exact identity at time 0, the fast smoothing equals the reference ops."""

import pytest
import torch
import torch.nn.functional as F

from noder_monai.functional import box_filter
from noder_monai.networks import (
    NODER,
    DeformationAutoencoder,
    DeformationDecoder,
    DeformationEncoder,
    LatentDynamics,
    scale_window,
    smooth_upsample,
)


@pytest.mark.parametrize("spatial_size", [(13, 18), (17, 20, 11)])
def test_smooth_upsample_equals_interpolate_then_box_filter(spatial_size):
    torch.manual_seed(0)
    dims = len(spatial_size)
    coarse = torch.randn(2, dims, *[(s + 3) // 4 for s in spatial_size], dtype=torch.float64)
    mode = "trilinear" if dims == 3 else "bilinear"
    upsampled = F.interpolate(coarse, scale_factor=4, mode=mode, align_corners=False)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial_size)
    reference = box_filter(upsampled[crop], 7)
    assert torch.allclose(smooth_upsample(coarse, 4, spatial_size, 7), reference, atol=1e-12)


def test_smooth_upsample_rejects_a_size_beyond_the_upsampled_grid():
    with pytest.raises(ValueError, match=r"spatial_size\[1\] must be in \[1, 8\], got 9"):
        smooth_upsample(torch.zeros(1, 2, 2, 2), 4, (8, 9))


def test_scale_window_keeps_odd_widths_of_the_same_extent():
    assert [scale_window(15, level) for level in (1, 2, 4)] == [15, 7, 3]
    assert [scale_window(21, level) for level in (1, 2, 4)] == [21, 11, 5]
    assert scale_window(3, 4) == 1


@pytest.mark.parametrize("spatial_size", [(20, 27), (9, 16, 12)])
def test_autoencoder_shapes_for_sizes_that_are_not_multiples_of_the_stride(spatial_size):
    dims = len(spatial_size)
    ddf = torch.randn(2, dims, *spatial_size)
    encoder = DeformationEncoder(dims)
    z = encoder(ddf)
    assert z.shape == (2, 4, *[-(-s // 8) for s in spatial_size])
    assert DeformationDecoder(dims)(z).shape == (2, dims, *[2 * -(-s // 8) for s in spatial_size])
    assert DeformationAutoencoder(dims)(ddf).shape == ddf.shape


def test_encoder_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"ddf must have shape \(N, 3, \*spatial\)"):
        DeformationEncoder(3)(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        DeformationEncoder(4)


def test_latent_dynamics_starts_at_zero_and_checks_its_input():
    dynamics = LatentDynamics((4, 3, 3, 3))
    z = torch.randn(2, 4, 3, 3, 3)
    assert torch.count_nonzero(dynamics(torch.tensor(0.3), z)) == 0
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, 3, 3, 3\)"):
        dynamics(torch.tensor(0.0), torch.zeros(1, 4, 2, 3, 3))


def _perturbed_model(spatial_size, field="displacement"):
    torch.manual_seed(1)
    model = NODER(spatial_size, field=field)
    model.set_initial_state()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("field", ["displacement", "velocity"])
@pytest.mark.parametrize("spatial_size", [(24, 20), (16, 12, 20)])
def test_noder_field_is_identity_at_time_zero_and_sized_per_level(spatial_size, field):
    model = _perturbed_model(spatial_size, field)
    with torch.no_grad():
        for level in (1, 2, 4):
            ddf = model.displacement(torch.tensor([0.0, 0.5, 1.0]), level)
            assert ddf.shape == (3, len(spatial_size), *[-(-s // level) for s in spatial_size])
            assert torch.count_nonzero(ddf[0]) == 0
            assert ddf[2].abs().max() > 0


def test_noder_trajectory_does_not_depend_on_query_order():
    model = _perturbed_model((16, 16, 16))
    with torch.no_grad():
        together = model.latent_trajectory(torch.tensor([0.7, -0.4, 0.0, 1.3, 0.7]))
        single = torch.stack([model.latent_trajectory(torch.tensor([t]))[0] for t in (0.7, -0.4, 0.0, 1.3)])
    assert torch.allclose(together[:4], single, atol=1e-5)
    assert torch.equal(together[0], together[4])


def test_noder_warps_by_zero_field_exactly_and_checks_image_shape():
    model = _perturbed_model((12, 12))
    image = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        warped, _ = model(image, torch.tensor([0.0]))
    assert torch.allclose(warped[0], image[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"image must have shape \(1, C, 6, 6\)"):
        model(image, torch.tensor([0.5]), level=2)


def test_noder_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"field 'field' must be one of \('displacement', 'velocity'\)"):
        NODER((8, 8), field="spline")
    with pytest.raises(ValueError, match=r"field 'step_size' must be a number in \[0.0001, 10\], got 0\."):
        NODER((8, 8), step_size=0)
    with pytest.raises(ValueError, match="level must be one of"):
        NODER((8, 8)).displacement(torch.tensor([0.5]), level=3)
    with pytest.raises(ValueError, match="times must be finite"):
        NODER((8, 8)).latent_trajectory(torch.tensor([float("nan")]))


@pytest.mark.parametrize("field", ["velocity", "displacement"])
def test_noder_separable_field_is_the_displacement_and_gives_its_regularisers(field):
    from noder_monai.losses import BoundaryLoss, GradientSmoothnessLoss

    torch.manual_seed(0)
    model = NODER((20, 18, 13), field=field)
    model.set_initial_state()
    with torch.no_grad():
        model.dynamics.head.weight.normal_(0, 0.05)
        model.decoder.net[-1].conv.weight.normal_(0, 0.05)
    times = torch.tensor([0.3, 1.0])
    for level in (1, 2, 4):
        separable = model.displacement_field(times, level)
        dense = model.displacement(times, level)
        assert torch.equal(separable.dense(), dense) and dense.abs().max() > 1e-5
        for loss in (GradientSmoothnessLoss(), BoundaryLoss()):
            torch.testing.assert_close(loss(separable), loss(dense), rtol=1e-5, atol=1e-9)
