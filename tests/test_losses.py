"""Tests of noder_monai.losses: LNCC against MONAI, the field regularizers and the NODER objective."""

from __future__ import annotations

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from noder_monai.losses import BoundaryLoss, GradientSmoothnessLoss, LocalNCCLoss, NODERLoss


def coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel coordinates of a grid, shape ``(1, D, *shape)``, channel ``i`` = index along axis ``i``."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grids).unsqueeze(0)


@pytest.mark.parametrize("spatial_dims,size", [(2, 24), (3, 16)])
@pytest.mark.parametrize("kernel_size", [3, 9, 21])
def test_lncc_equals_monai(spatial_dims, size, kernel_size):
    torch.manual_seed(0)
    target = torch.rand(2, 1, *(size,) * spatial_dims)
    smooth = torch.rand(2, 1, *(size,) * spatial_dims)
    pred_ours = (0.5 * target + 0.5 * smooth).requires_grad_(True)
    pred_monai = pred_ours.detach().clone().requires_grad_(True)
    ours = LocalNCCLoss(spatial_dims, kernel_size)(pred_ours, target)
    monai = LocalNormalizedCrossCorrelationLoss(
        spatial_dims, kernel_size, kernel_type="rectangular", smooth_nr=0.0, smooth_dr=1e-5
    )(pred_monai, target)
    assert -1.0 < monai.item() < -0.1
    assert ours.item() == pytest.approx(monai.item(), abs=1e-5)
    ours.backward()
    monai.backward()
    scale = pred_monai.grad.abs().max().item()
    assert (pred_ours.grad - pred_monai.grad).abs().max().item() < 1e-3 * scale


def test_lncc_of_an_image_with_itself_is_minus_one():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 12, 12, 12)
    assert LocalNCCLoss(3, 5)(image, image).item() == pytest.approx(-1.0, abs=1e-5)
    # a scaling keeps it (an offset would not, near the zero-padded border)
    assert LocalNCCLoss(3, 5, smooth_nr=0.0)(3.0 * image, image).item() == pytest.approx(-1.0, abs=1e-5)
    assert LocalNCCLoss(2, 7)(image[:, :, 0], -image[:, :, 0]).item() == pytest.approx(-1.0, abs=1e-5)


def test_lncc_of_flat_windows_is_zero_and_clipped_at_one():
    ones = torch.ones(1, 1, 8, 8)
    # a 1-voxel window has variance 0 -> both clamped at smooth_dr and cross = 0: ncc = smooth_nr / smooth_dr ** 2
    assert LocalNCCLoss(2, 1)(ones, ones).item() == 0.0
    assert LocalNCCLoss(2, 1, smooth_nr=1e-15, smooth_dr=1e-5)(ones, ones).item() == pytest.approx(-1e-5, rel=1e-5)
    assert LocalNCCLoss(2, 1, smooth_nr=1e-5, smooth_dr=1e-5)(ones, ones).item() == -1.0  # 1e5, clipped at 1


def test_lncc_rejects_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        LocalNCCLoss(spatial_dims=4)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got 10"):
        LocalNCCLoss(kernel_size=10)
    with pytest.raises(ValueError, match="smooth_nr must be a finite number >= 0, got -1.0"):
        LocalNCCLoss(smooth_nr=-1.0)
    with pytest.raises(ValueError, match="smooth_dr must be a finite number > 0, got nan"):
        LocalNCCLoss(smooth_dr=float("nan"))
    with pytest.raises(ValueError, match="smooth_dr must be a finite number > 0, got 0.0"):
        LocalNCCLoss(smooth_dr=0.0)
    loss = LocalNCCLoss(3, 3)
    with pytest.raises(ValueError, match=r"pred must have shape \(N, C, \*spatial\) with 3 spatial dimensions, "
                       r"got \(1, 1, 8, 8\)"):
        loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"target must have the shape of pred \(1, 1, 8, 8, 8\),"
                       r" got \(1, 1, 8, 8, 7\)"):
        loss(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 7))


@pytest.mark.parametrize("shape", [(10, 12), (8, 9, 10)])
def test_smoothness_of_constant_and_linear_fields(shape):
    dims = len(shape)
    loss = GradientSmoothnessLoss()
    assert loss(torch.full((2, dims, *shape), 3.0)).item() == 0.0
    ramp = torch.zeros(1, dims, *shape)
    ramp[:, 0] = 0.5 * coordinates(shape)[:, 0]  # u_0 = a x_0 with a = 0.5
    assert loss(ramp).item() == pytest.approx(0.25 / dims, rel=1e-6)
    scaling = 0.5 * coordinates(shape)  # u = a x: every component has gradient a along its own axis
    assert loss(scaling).item() == pytest.approx(0.25, rel=1e-6)


def test_smoothness_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"ddf must have one channel per spatial axis, \(N, 3, \*spatial\), got "
                       r"\(1, 2, 8, 8, 8\)"):
        GradientSmoothnessLoss()(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"ddf must have at least 3 voxels along every spatial axis,"
                       r" got \(1, 2, 8, 2\)"):
        GradientSmoothnessLoss()(torch.zeros(1, 2, 8, 2))


def test_boundary_loss_known_values():
    loss = BoundaryLoss()
    field = torch.zeros(2, 3, 6, 7, 8)
    field[:, :, [0, -1]] = 1.0
    field[:, :, :, [0, -1]] = 1.0
    field[:, :, :, :, [0, -1]] = 1.0
    assert loss(field).item() == pytest.approx(1.0)
    field[:, :, 1:-1, 1:-1, 1:-1] = 7.0  # the interior does not count
    assert loss(field).item() == pytest.approx(1.0)
    # 2D, 4 x 5: component 0 is 1 on the row x0 = 0 only. Planes: x0=0 (5 voxels, all 1), x0=3 (5, none),
    # x1=0 (4, one), x1=4 (4, one) -> 7 ones over 2 components x 18 plane voxels.
    one_face = torch.zeros(1, 2, 4, 5)
    one_face[0, 0, 0] = 1.0
    assert loss(one_face).item() == pytest.approx(7 / 36)
    assert loss(3.0 * one_face).item() == pytest.approx(9 * 7 / 36)


def test_boundary_loss_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"ddf must have one channel per spatial axis, \(N, 2, \*spatial\), got "
                       r"\(1, 3, 4, 4\)"):
        BoundaryLoss()(torch.zeros(1, 3, 4, 4))


def test_noder_loss_terms_and_total():
    torch.manual_seed(0)
    warped, target = torch.rand(3, 1, 12, 12, 12), torch.rand(3, 1, 12, 12, 12)
    ddf = torch.randn(3, 3, 12, 12, 12, requires_grad=True)
    loss = NODERLoss(3, ncc_kernel_size=5, similarity_weight=2.0, smoothness_weight=0.5, boundary_weight=0.25)
    terms = loss(warped, target, ddf)
    assert sorted(terms) == ["boundary", "similarity", "smoothness", "total"]
    assert all(value.shape == () for value in terms.values())
    assert terms["similarity"].item() == pytest.approx(LocalNCCLoss(3, 5)(warped, target).item())
    assert terms["smoothness"].item() == pytest.approx(GradientSmoothnessLoss()(ddf).item())
    assert terms["boundary"].item() == pytest.approx(BoundaryLoss()(ddf).item())
    expected = 2.0 * terms["similarity"] + 0.5 * terms["smoothness"] + 0.25 * terms["boundary"]
    assert terms["total"].item() == pytest.approx(expected.item())
    per_item = [loss(warped[i : i + 1], target[i : i + 1], ddf[i : i + 1])["total"].item() for i in range(3)]
    assert terms["total"].item() == pytest.approx(sum(per_item) / 3, rel=1e-5)  # a mean over time points
    terms["total"].backward()
    assert ddf.grad.abs().sum().item() > 0


def test_noder_loss_2d_defaults():
    warped = torch.rand(2, 1, 16, 16)
    terms = NODERLoss(spatial_dims=2)(warped, warped, torch.zeros(2, 2, 16, 16))
    assert terms["similarity"].item() == pytest.approx(-1.0, abs=1e-5)
    assert terms["smoothness"].item() == 0.0 and terms["boundary"].item() == 0.0
    assert terms["total"].item() == pytest.approx(-1.0, abs=1e-5)


def test_noder_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smoothness_weight must be a finite number >= 0, got -0.05"):
        NODERLoss(smoothness_weight=-0.05)
    with pytest.raises(ValueError, match="ncc_kernel_size must be a positive odd integer, got 20"):
        NODERLoss(ncc_kernel_size=20)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 0"):
        NODERLoss(spatial_dims=0)
    loss = NODERLoss(spatial_dims=3, ncc_kernel_size=3)
    image = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"ddf must have 3 spatial dimensions, got \(2, 2, 8, 8\)"):
        loss(image[..., 0], image[..., 0], torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"warped must have the batch size and spatial shape of ddf "
                       r"\(3, 3, 8, 8, 8\), got \(2, 1, 8, 8, 8\)"):
        loss(image, image, torch.zeros(3, 3, 8, 8, 8))


def test_lncc_reuses_target_statistics_only_while_the_target_is_unchanged():
    torch.manual_seed(0)
    loss = LocalNCCLoss(spatial_dims=2, kernel_size=5)
    pred, target = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
    first = loss(pred, target)
    assert loss._target_cache[0] is target
    assert loss(pred, target).item() == first.item()
    target.mul_(0.5).add_(pred)
    assert loss(pred, target).item() == pytest.approx(LocalNCCLoss(2, 5)(pred, target.clone()).item(), abs=1e-6)
    assert loss(pred, target).item() != pytest.approx(first.item(), abs=1e-3)


def test_lncc_on_a_scored_box_equals_that_box_of_the_whole_image():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 20, 18, 16), torch.rand(2, 1, 20, 18, 16)
    loss = LocalNCCLoss(kernel_size=5)
    scored = (slice(6, 12), slice(4, 18), slice(0, 9))  # to the far edge of axis 1 and from the near edge of axis 2
    whole = loss(pred, target, scored)
    crop = (slice(None), slice(None), slice(4, 14), slice(2, 18), slice(0, 11))  # 2 voxels (the radius) around
    cropped = LocalNCCLoss(kernel_size=5)(pred[crop], target[crop], (slice(2, 8), slice(2, 16), slice(0, 9)))
    torch.testing.assert_close(cropped, whole, rtol=1e-6, atol=0)
    assert not torch.isclose(whole, loss(pred, target))
    with pytest.raises(ValueError, match="scored must be one non-empty slice per spatial axis"):
        loss(pred, target, (slice(3, 3), slice(None), slice(None)))
