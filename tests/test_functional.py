"""Tests of noder_monai.functional: the running-sum box filter, the argument checks, nearest-neighbour warps of
label IDs and the fold correction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from noder_monai.functional import (
    box_filter,
    check_ddf,
    check_odd_kernel_size,
    check_spatial_dims,
    jacobian_determinant,
    unfold_displacement,
    warp_nearest,
)
from noder_monai.metrics import percent_folded


def brute_force_box_mean(x: torch.Tensor, kernel_size: int, padding_mode: str) -> torch.Tensor:
    """Average of the ``kernel_size ** d`` shifted copies of the padded input, in float64."""
    dims = x.ndim - 2
    radius = kernel_size // 2
    padded = F.pad(x.double(), [radius] * (2 * dims), mode="constant" if padding_mode == "zeros" else "replicate")
    total = torch.zeros_like(x, dtype=torch.float64)
    for offsets in itertools.product(range(kernel_size), repeat=dims):
        index = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offsets, x.shape[2:]))
        total += padded[index]
    return total / kernel_size**dims


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("shape", [(2, 3, 11), (2, 3, 9, 12), (1, 2, 7, 8, 6)])
@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_box_filter_equals_brute_force_average(shape, kernel_size, padding_mode):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    out = box_filter(x, kernel_size, padding_mode)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, brute_force_box_mean(x, kernel_size, padding_mode), atol=1e-12, rtol=0)


def test_box_filter_known_values_1d():
    x = torch.tensor([[[3.0, 0.0, 0.0, 6.0]]])
    torch.testing.assert_close(box_filter(x, 3), torch.tensor([[[1.0, 1.0, 2.0, 2.0]]]))
    torch.testing.assert_close(box_filter(x, 3, "replicate"), torch.tensor([[[2.0, 1.0, 2.0, 4.0]]]))


def test_box_filter_kernel_one_is_identity():
    x = torch.rand(2, 1, 5, 6, 7)
    assert torch.equal(box_filter(x, 1), x)
    assert torch.equal(box_filter(x, 1, "replicate"), x)


def test_box_filter_of_constant_is_constant_with_replicate_padding():
    x = torch.full((1, 1, 8, 8, 8), 2.5)
    torch.testing.assert_close(box_filter(x, 15, "replicate"), x)
    corner = box_filter(x, 3, "zeros")[0, 0, 0, 0, 0]
    assert corner.item() == pytest.approx(2.5 * 8 / 27)


def test_box_filter_float32_accuracy_at_64_cubed():
    torch.manual_seed(0)
    x = 1000.0 + torch.rand(1, 1, 64, 64, 64)
    reference = box_filter(x.double(), 21)
    out = box_filter(x, 21)
    assert out.dtype == torch.float32
    assert (out.double() - reference).abs().max().item() < 1e-3  # 1e-6 relative to the 1000 offset
    y = torch.rand(1, 1, 64, 64, 64)
    assert (box_filter(y, 15).double() - box_filter(y.double(), 15)).abs().max().item() < 1e-5


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("shape,kernel_size", [((1, 2, 5, 6), 3), ((2, 1, 3, 4, 2), 5), ((1, 1, 4), 9)])
def test_box_filter_gradient(shape, kernel_size, padding_mode):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, kernel_size, padding_mode), (x,))


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
def test_box_filter_double_backward(padding_mode):
    torch.manual_seed(0)
    x = torch.rand(1, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: box_filter(t, 3, padding_mode), (x,))


def test_box_filter_gradient_known_values():
    x = torch.ones(1, 1, 7, requires_grad=True)
    box_filter(x, 5).sum().backward()  # voxel j is in the windows of outputs j-2..j+2 that lie in the image
    torch.testing.assert_close(x.grad, torch.tensor([[[3.0, 4.0, 5.0, 5.0, 5.0, 4.0, 3.0]]]) / 5)
    x.grad = None
    box_filter(x, 5, "replicate").sum().backward()  # plus the copies of the end voxels beyond the border
    torch.testing.assert_close(x.grad, torch.tensor([[[6.0, 4.0, 5.0, 5.0, 5.0, 4.0, 6.0]]]) / 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_box_filter_cuda_matches_cpu():
    x = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(box_filter(x.cuda(), 9).cpu(), box_filter(x, 9), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [0, -3, 4, 2.0, True, "5"])
def test_box_filter_rejects_bad_kernel_size(kernel_size):
    with pytest.raises(ValueError, match=f"kernel_size must be a positive odd integer, got {kernel_size!r}"):
        box_filter(torch.zeros(1, 1, 8, 8), kernel_size)


def test_box_filter_rejects_bad_padding_mode_and_input():
    with pytest.raises(ValueError, match="padding_mode must be one of .*, got 'reflect'"):
        box_filter(torch.zeros(1, 1, 8, 8), 3, "reflect")
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, C, \*spatial\).*got \(8, 8\)"):
        box_filter(torch.zeros(8, 8), 3)
    with pytest.raises(ValueError, match="got ndarray"):
        box_filter(torch.zeros(1, 1, 8).numpy(), 3)


def test_checks():
    assert check_odd_kernel_size(7) == 7
    with pytest.raises(ValueError, match="ncc_kernel_size must be a positive odd integer, got 8"):
        check_odd_kernel_size(8, "ncc_kernel_size")
    assert check_spatial_dims(2) == 2
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        check_spatial_dims(4)
    check_ddf(torch.zeros(2, 3, 4, 4, 4), min_size=4)
    with pytest.raises(ValueError, match=r"field must have one channel per spatial axis, \(N, 3, \*spatial\), got "
                       r"\(2, 2, 4, 4, 4\)"):
        check_ddf(torch.zeros(2, 2, 4, 4, 4), "field")
    with pytest.raises(ValueError, match=r"ddf must have at least 3 voxels along every spatial axis,"
                       r" got \(1, 2, 2, 5\)"):
        check_ddf(torch.zeros(1, 2, 2, 5), min_size=3)
    with pytest.raises(ValueError, match=r"ddf must be a tensor of shape \(N, D, \*spatial\).*got \(1, 2\)"):
        check_ddf(torch.zeros(1, 2))


def test_warp_equals_monai_warp_to_the_last_bit(device):
    from monai.networks.blocks import Warp

    from noder_monai.functional import warp

    torch.manual_seed(0)
    for shape in ((3, 1, 12, 10, 9), (2, 2, 14, 11)):
        image = torch.rand(*shape, device=device)
        ddf = 3 * torch.randn(shape[0], len(shape) - 2, *shape[2:], device=device)
        for mode in ("bilinear", "nearest"):
            assert torch.equal(warp(image, ddf, mode), Warp(mode, "border")(image, ddf))


def test_warp_on_a_box_equals_the_box_of_the_whole_warp_and_checks_it():
    from noder_monai.functional import warp

    torch.manual_seed(0)
    image, ddf = torch.rand(2, 1, 12, 10, 9), 2 * torch.randn(2, 3, 12, 10, 9)
    box = (slice(2, 9), slice(0, 10), slice(4, 6))
    assert torch.equal(warp(image, ddf[(..., *box)], origin=(2, 0, 4)), warp(image, ddf)[(..., *box)])
    with pytest.raises(ValueError, match=r"warp: a field of size \(7, 10, 2\) at \(2, 1, 4\) leaves the image"):
        warp(image, ddf[(..., *box)], origin=(2, 1, 4))
    with pytest.raises(ValueError, match=r"warp: ddf must have shape \(2, 3, \*box\)"):
        warp(image, ddf[:, :2])


def test_integrate_velocity_equals_monai_dvf2ddf(device):
    from monai.networks.blocks import DVF2DDF

    from noder_monai.functional import integrate_velocity

    velocity = 2 * torch.randn(2, 3, 10, 9, 8, device=device)
    expected = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocity)
    assert torch.equal(integrate_velocity(velocity, 7), expected)


def test_separable_filter_equals_monai_separable_filtering(device):
    from monai.networks.layers import separable_filtering
    from monai.networks.layers.convutils import gaussian_1d

    from noder_monai.functional import separable_filter

    x = 100 * torch.rand(3, 1, 13, 11, 9, device=device)
    for sigma, mode, padding in ((0.5, "replicate", "replicate"), (1.0, "constant", "zeros")):
        kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0, approx="erf")
        expected = separable_filtering(x, [kernel.to(x)] * 3, mode=mode)
        torch.testing.assert_close(separable_filter(x, kernel, padding), expected, atol=1e-4, rtol=1e-6)
    with pytest.raises(ValueError, match="kernel must be 1D with an odd length"):
        separable_filter(x, torch.ones(4))


@pytest.mark.parametrize("spatial_size, factor, kernel", [((17, 14, 11), 4, 5), ((20, 9), 2, 1)])
def test_separable_field_regularisers_equal_those_of_the_dense_field(device, spatial_size, factor, kernel):
    from noder_monai.losses import BoundaryLoss, GradientSmoothnessLoss
    from noder_monai.networks.autoencoder import smooth_upsample_field

    torch.manual_seed(0)
    coarse_size = [-(-s // factor) for s in spatial_size]
    coarse = torch.randn(2, len(spatial_size), *coarse_size, device=device, requires_grad=True)
    field = smooth_upsample_field(coarse, factor, spatial_size, kernel)
    dense = field.dense()
    assert tuple(dense.shape) == field.shape == (2, len(spatial_size), *spatial_size)
    for loss in (GradientSmoothnessLoss(), BoundaryLoss()):
        value, expected = loss(field), loss(dense)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
        gradient, = torch.autograd.grad(value, coarse)
        expected_gradient, = torch.autograd.grad(loss(field.dense()), coarse)
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-7)
    box = (slice(3, 9), slice(0, 5), slice(2, 10))[: len(spatial_size)]
    torch.testing.assert_close(field.dense(box), dense[(..., *box)], rtol=1e-6, atol=1e-6)


def test_separable_field_checks_its_matrices():
    from noder_monai.functional import SeparableField

    with pytest.raises(ValueError, match="do not map a coarse field of shape"):
        SeparableField(torch.zeros(1, 2, 4, 5), (torch.zeros(8, 4), torch.zeros(8, 4)))
    with pytest.raises(ValueError, match="smoothness: every axis needs >= 3 voxels"):
        SeparableField(torch.zeros(1, 2, 4, 5), (torch.zeros(2, 4), torch.zeros(8, 5))).smoothness()


@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
def test_labels_warp_nearest_copies_ids_exactly_and_picks_monai_warps_voxel(padding_mode):
    generator = torch.Generator().manual_seed(7)
    for spatial in ((9, 11), (7, 9, 6)):
        small = torch.randint(0, 40, (2, 1, *spatial), generator=generator)
        ddf = torch.randn(2, len(spatial), *spatial, generator=generator) * 3
        expected = Warp(mode="nearest", padding_mode=padding_mode)(small.float(), ddf).long()
        assert torch.equal(warp_nearest(small, ddf, padding_mode), expected)
        # IDs that float32 (and even float64, above 2**53) cannot hold: the same voxels, the IDs unchanged
        ids = torch.tensor([0, 2**53 + 1, 2**53 + 2, 3_000_000_001], dtype=torch.int64)
        big = ids[small % 4]
        warped = warp_nearest(big, ddf, padding_mode)
        assert warped.dtype == torch.int64 and torch.equal(warped, ids[expected % 4])


def test_folds_unfold_displacement_removes_a_known_fold_and_keeps_a_fold_free_field():
    axis = torch.arange(32, dtype=torch.float64)
    wave = torch.sin(2 * math.pi * axis / 16).view(-1, 1).expand(32, 32)
    folding = torch.stack([4.0 * wave, torch.zeros(32, 32, dtype=torch.float64)])[None]  # d u / dx down to -1.57
    assert percent_folded(folding).item() > 10.0
    unfolded, corrected = unfold_displacement(folding, min_jacobian=0.05)
    assert jacobian_determinant(unfolded).min().item() > 0.05 and percent_folded(unfolded).item() == 0.0
    assert 0.0 < corrected.item() < 100.0 and unfolded.dtype == folding.dtype
    smooth = torch.stack([0.5 * wave, wave.T * 0.3])[None].expand(2, 2, 32, 32)
    kept, none = unfold_displacement(smooth)
    assert torch.equal(kept, smooth) and none.tolist() == [0.0, 0.0]
    volume = torch.zeros(1, 3, 12, 12, 12)
    volume[0, 0, :6] = 3.0  # a 3-voxel drop along x: folds at the step in 3D
    assert percent_folded(volume).item() > 0.0
    assert percent_folded(unfold_displacement(volume)[0]).item() == 0.0
    with pytest.raises(ValueError, match=r"min_jacobian must be in \[0, 1\)"):
        unfold_displacement(volume, min_jacobian=1.0)
