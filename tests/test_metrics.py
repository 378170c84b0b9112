"""Tests of noder_monai.metrics: NRMSE / PSNR / SSIM per item, Jacobian determinant and folded voxels."""

from __future__ import annotations

import math

import pytest
import torch

from noder_monai.metrics import jacobian_determinant, nrmse, percent_folded, psnr, ssim


def coordinates(shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel coordinates of a grid, shape ``(1, D, *shape)``, channel ``i`` = index along axis ``i``."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return torch.stack(grids).unsqueeze(0)


def test_nrmse_known_values():
    torch.manual_seed(0)
    target = torch.rand(3, 1, 6, 7, 8) + 0.1
    pred = target.clone()
    pred[0] *= 1.1
    pred[1] = 0.0
    value = nrmse(pred, target)
    assert value.shape == (3,)
    torch.testing.assert_close(value, torch.tensor([0.1, 1.0, 0.0]))
    two_d = nrmse(torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([[[[0.0, 1.0]]]]))
    assert two_d.item() == pytest.approx(math.sqrt(9 + 9))


def test_psnr_known_values():
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 0, 0] = 1.0  # range 1
    target[1, 0, 0, 0] = 2.0  # range 2
    pred = target + 0.1  # MSE 0.01 -> 20 dB at peak 1
    value = psnr(pred, target)
    assert value.shape == (2,)
    assert value.tolist() == pytest.approx([20.0, 20.0 + 20 * math.log10(2)], abs=1e-4)
    assert psnr(pred, target, data_range=10.0).tolist() == pytest.approx([40.0, 40.0], abs=1e-4)
    assert psnr(target, target).tolist() == [math.inf, math.inf]


def test_ssim_known_values():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 16, 16, 16)
    value = ssim(image, image)
    assert value.shape == (2,)
    torch.testing.assert_close(value, torch.ones(2))
    # constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1), c1 = (0.01 * data_range)^2
    a, b, c1 = 0.5, 0.25, 1e-4
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    constant = ssim(torch.full((1, 1, 12, 13), a), torch.full((1, 1, 12, 13), b), data_range=1.0)
    assert constant.item() == pytest.approx(expected, rel=1e-5)
    noisy = image + 0.2 * torch.rand(2, 1, 16, 16, 16)
    value = ssim(noisy, image)
    assert (value < 0.99).all()
    # the default data_range is each target item's max - min: scaling both images by 5 changes nothing
    torch.testing.assert_close(ssim(5.0 * noisy, 5.0 * image), value)
    ranges = (image.amax(dim=(1, 2, 3, 4)) - image.amin(dim=(1, 2, 3, 4))).tolist()
    explicit = [ssim(noisy[i : i + 1], image[i : i + 1], data_range=r).item() for i, r in enumerate(ranges)]
    assert value.tolist() == pytest.approx(explicit)


def test_image_metrics_reject_bad_arguments():
    image = torch.rand(1, 1, 12, 12)
    with pytest.raises(ValueError, match=r"pred must have the shape of target \(1, 1, 12, 12\), got \(1, 1, 12, 11\)"):
        nrmse(image[..., :11], image)
    with pytest.raises(ValueError, match=r"target must be a tensor of shape \(B, C, \*spatial\) with 1 or 2 or 3 "
                       r"spatial dimensions, got \(12, 12\)"):
        psnr(image[0, 0], image[0, 0])
    with pytest.raises(ValueError, match="data_range must be a finite number > 0 or None, got 0.0"):
        psnr(image, image, data_range=0.0)
    with pytest.raises(ValueError, match="data_range is None and target item 1 has max - min = 0.0"):
        ssim(torch.ones(2, 1, 12, 12), torch.cat([image, torch.ones(1, 1, 12, 12)]))
    with pytest.raises(ValueError, match=r"target must have at least 11 voxels along every spatial axis, "
                       r"got \(1, 1, 10, 12\)"):
        ssim(image[:, :, :10], image[:, :, :10])
    with pytest.raises(ValueError, match=r"with 2 or 3 spatial dimensions, got \(1, 1, 12\)"):
        ssim(image[:, :, 0], image[:, :, 0])


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7)])
def test_jacobian_of_zero_and_scaling_fields(shape):
    dims = len(shape)
    det = jacobian_determinant(torch.zeros(2, dims, *shape))
    assert det.shape == (2, 1, *shape)
    assert torch.equal(det, torch.ones(2, 1, *shape))
    centre = torch.tensor([(n - 1) / 2 for n in shape]).reshape(1, dims, *([1] * dims))
    for a in (0.3, -0.5):
        scaling = a * (coordinates(shape) - centre)  # x -> c + (1 + a)(x - c), borders included
        torch.testing.assert_close(jacobian_determinant(scaling), torch.full((1, 1, *shape), (1 + a) ** dims))
    shear = torch.zeros(1, dims, *shape)
    shear[:, 0] = 0.7 * coordinates(shape)[:, 1]
    torch.testing.assert_close(jacobian_determinant(shear), torch.ones(1, 1, *shape))
    assert percent_folded(scaling).tolist() == [0.0]


def test_jacobian_known_2d_matrix_and_gradient():
    # ddf = A x with A = [[0.2, 0.3], [-0.1, 0.4]] -> det(I + A) = 1.2 * 1.4 + 0.03 = 1.71
    coords = coordinates((5, 6))
    ddf = torch.stack([0.2 * coords[:, 0] + 0.3 * coords[:, 1], -0.1 * coords[:, 0] + 0.4 * coords[:, 1]], dim=1)
    ddf.requires_grad_(True)
    det = jacobian_determinant(ddf)
    torch.testing.assert_close(det.detach(), torch.full((1, 1, 5, 6), 1.71))
    det.sum().backward()
    assert ddf.grad.shape == ddf.shape and ddf.grad.abs().sum().item() > 0


def test_percent_folded_of_a_slab_fold():
    shape = (16, 16, 16)
    ddf = torch.zeros(2, 3, *shape)
    # in the slab 4 <= x1 < 8, u_0 = -2 (x0 - c): J_00 = -1 and the other rows are the identity -> det = -1
    ddf[0, 0, :, 4:8, :] = -2.0 * (coordinates(shape)[0, 0, :, 4:8, :] - 7.5)
    folded = percent_folded(ddf)
    assert folded.shape == (2,)
    assert folded.tolist() == [25.0, 0.0]
    det = jacobian_determinant(ddf)
    assert det[0, 0, :, 4:8].unique().tolist() == [-1.0]
    assert det[0, 0, :, :4].unique().tolist() == [1.0] and det[0, 0, :, 8:].unique().tolist() == [1.0]


def test_jacobian_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"ddf must have one channel per spatial axis, \(N, 3, \*spatial\), got "
                       r"\(1, 1, 4, 4, 4\)"):
        jacobian_determinant(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"ddf must have at least 2 voxels along every spatial axis,"
                       r" got \(1, 2, 4, 1\)"):
        percent_folded(torch.zeros(1, 2, 4, 1))


def test_constant_or_nan_held_out_scans_are_named():
    image = torch.rand(2, 1, 12, 12)
    flat = torch.cat([image[:1], torch.full((1, 1, 12, 12), 7.0)])
    names = ["sub-01/heldout/t2.nii.gz", "sub-01/heldout/t5.nii.gz"]
    for metric in (psnr, ssim):
        with pytest.raises(ValueError, match=r"^target 'sub-01/heldout/t5.nii.gz' is constant \(every voxel 7\): PSNR "
                                             r"and SSIM are undefined") as error:
            metric(image, flat, names=names)
        assert "data_range" not in str(error.value)  # no option to pass it where names are given (the jobs)
    broken = image.clone()
    broken[0, 0, 3, 3] = float("nan")
    for metric in (nrmse, psnr, ssim):
        with pytest.raises(ValueError, match=r"^target 'sub-01/heldout/t2.nii.gz' contains NaN or Inf voxels"):
            metric(image, broken, names=names)
    with pytest.raises(ValueError, match=r"names must give one name per batch item \(2\)"):
        nrmse(image, image, names=["one"])
