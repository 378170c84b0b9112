import pytest
import torch
from monai.networks.blocks import Warp

from noder_monai.data.synthetic import DEFAULT_TIMES, synthetic_sequence



def _jacobian_determinant(ddf):
    """det(I + grad ddf) per voxel, central differences (one-sided at the borders): (T, D, *S) -> (T, *S)."""
    dims = ddf.shape[1]
    gradient = torch.stack(torch.gradient(ddf, dim=tuple(range(2, 2 + dims))), dim=2)  # (T, D, D, *S)
    matrix = gradient.movedim((1, 2), (-2, -1)) + torch.eye(dims)
    return torch.linalg.det(matrix)


def _mean_magnitude(ddfs):
    return ddfs.pow(2).sum(1).sqrt().flatten(1).mean(1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["brain", "cardiac"])
def test_shapes_dtypes_and_truth(dims, kind):
    times = DEFAULT_TIMES[kind]
    result = synthetic_sequence(spatial_dims=dims, size=16, kind=kind, noise=0.05, seed=3)
    count, spatial = len(times), (16,) * dims
    assert result.images.shape == (count, 1) + spatial
    assert result.clean.shape == (count, 1) + spatial
    assert result.ddfs.shape == (count, dims) + spatial
    assert result.label.shape == (1,) + spatial
    assert result.label_sequence.shape == (count, 1) + spatial
    assert result.times.dtype == torch.float64
    assert result.times.tolist() == pytest.approx(list(times))
    assert result.images.dtype == result.ddfs.dtype == torch.float32
    assert result.label.dtype == result.label_sequence.dtype == torch.int64
    assert sorted(result.label.unique().tolist()) == [0, 1, 2, 3]
    assert float(result.ddfs[0].abs().max()) == 0.0
    assert torch.equal(result.label_sequence[0], result.label)
    base = result.clean[:1].expand_as(result.clean)
    assert torch.allclose(Warp()(base, result.ddfs), result.clean, atol=1e-5)
    noise = (result.images - result.clean).std()
    assert float(noise) == pytest.approx(0.05 * float(result.clean[0].max() - result.clean[0].min()), rel=0.05)


def test_deterministic_for_a_seed_and_seed_dependent():
    first = synthetic_sequence(spatial_dims=3, size=16, noise=0.02, seed=7)
    second = synthetic_sequence(spatial_dims=3, size=16, noise=0.02, seed=7)
    other = synthetic_sequence(spatial_dims=3, size=16, noise=0.02, seed=8)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.ddfs, second.ddfs)
    assert float((first.ddfs - other.ddfs).abs().max()) > 0.05
    assert float((first.images - other.images).abs().max()) > 0.05
    noiseless = synthetic_sequence(spatial_dims=3, size=16, noise=0.0, seed=7)
    assert torch.equal(noiseless.images, noiseless.clean)
    assert torch.equal(noiseless.ddfs, first.ddfs)


@pytest.mark.parametrize("kind, dims, seed", [("brain", 3, 0), ("brain", 3, 1), ("brain", 2, 2), ("cardiac", 3, 0),
                                              ("cardiac", 2, 1)])
def test_true_fields_have_no_folds_and_a_few_voxels_magnitude(kind, dims, seed):
    result = synthetic_sequence(spatial_dims=dims, size=32, kind=kind, seed=seed)
    determinant = _jacobian_determinant(result.ddfs)
    assert int((determinant <= 0).sum()) == 0
    assert float(determinant.min()) > 0.1
    largest = float(result.ddfs.pow(2).sum(1).sqrt().max())
    assert 1.5 < largest < 3.0  # about size / 16 = 2 voxels


def test_magnitude_scales_with_size_and_amplitude():
    small = synthetic_sequence(spatial_dims=2, size=32, seed=0)
    large = synthetic_sequence(spatial_dims=2, size=64, seed=0)
    half = synthetic_sequence(spatial_dims=2, size=64, seed=0, amplitude=0.5)
    peak = [float(r.ddfs.pow(2).sum(1).sqrt().max()) for r in (small, large, half)]
    assert peak[1] / peak[0] == pytest.approx(2.0, rel=0.1)
    assert 3.0 < peak[1] < 4.5
    assert peak[2] / peak[1] == pytest.approx(0.5, rel=0.1)


def test_brain_dynamics_are_not_linear_in_time():
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    magnitude = _mean_magnitude(synthetic_sequence(spatial_dims=3, size=24, times=times, seed=0).ddfs)
    end = float(magnitude[-1])
    for index in (3, 4):  # 3 and 4 years: well above the straight line from 0 to 6 years
        linear = end * times[index] / times[-1]
        assert float(magnitude[index]) - linear > 0.1 * end
    assert float(magnitude[1]) < 0.75 * end * times[1] / times[-1]  # slow start
    later = _mean_magnitude(synthetic_sequence(spatial_dims=3, size=24, times=[6.0, 9.0], seed=0).ddfs)
    assert float(later[0]) == pytest.approx(end, rel=1e-4)
    assert float(later[1]) > float(later[0])  # the linear component keeps growing after saturation


def test_cardiac_dynamics_are_periodic():
    result = synthetic_sequence(spatial_dims=2, size=24, kind="cardiac", times=[0.0, 0.25, 0.5, 0.75, 1.0])
    magnitude = _mean_magnitude(result.ddfs)
    assert float(magnitude[0]) == 0.0
    assert float(magnitude[4]) < 1e-4
    assert float(magnitude[2]) > 1.5 * float(magnitude[1])  # half-way through systole is not half the peak
    assert float((result.ddfs[1] - result.ddfs[3]).abs().max()) < 1e-4
    blood = [int((labels == 3).sum()) for labels in result.label_sequence]
    assert blood[2] < 0.8 * blood[0]  # contraction empties the ventricles


def test_base_image_is_warped_and_labels_follow():
    base = torch.zeros(1, 20, 20, 20)
    base[:, 6:14, 6:14, 6:14] = 100.0
    labels = (base > 50).long() * 2
    result = synthetic_sequence(spatial_dims=3, times=[0.0, 3.0, 6.0], base_image=base, base_label=labels, seed=1)
    assert torch.equal(result.clean[0], base)
    assert torch.equal(result.label, labels)
    assert sorted(result.label_sequence.unique().tolist()) == [0, 2]
    changed = (result.label_sequence[2] != result.label).sum()
    assert int(changed) > 10
    masked = synthetic_sequence(spatial_dims=3, times=[0.0, 1.0], base_image=base)
    assert torch.equal(masked.label, (base > 10).long())


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3, got 4"):
        synthetic_sequence(spatial_dims=4)
    with pytest.raises(ValueError, match=r"kind must be one of \('brain', 'cardiac'\), got 'lung'"):
        synthetic_sequence(kind="lung")
    with pytest.raises(ValueError, match=r"noise must be >= 0, got -0.1"):
        synthetic_sequence(noise=-0.1)
    with pytest.raises(ValueError, match=r"amplitude must be a finite number >= 0, got nan"):
        synthetic_sequence(amplitude=float("nan"))
    with pytest.raises(ValueError, match=r"size must be an integer >= 8, got 4"):
        synthetic_sequence(size=4)
    with pytest.raises(ValueError, match=r"times must be a non-empty sequence of finite numbers, got \[0.0, inf\]"):
        synthetic_sequence(times=[0.0, float("inf")])
    with pytest.raises(ValueError, match=r"base_image must be \(1, \*spatial\) with 3 spatial axes, got shape "
                       r"\(8, 8, 8\)"):
        synthetic_sequence(base_image=torch.zeros(8, 8, 8))
    with pytest.raises(ValueError, match=r"base_label must have base_image's shape \(1, 8, 8, 8\), got \(1, 8, 8\)"):
        synthetic_sequence(base_image=torch.zeros(1, 8, 8, 8), base_label=torch.zeros(1, 8, 8))


def test_supersampled_base_keeps_the_fine_detail():
    """A base on a 2x finer grid is warped there and block-averaged: at t=0 the clean image is the block mean, the
    true fields are those drawn on the sequence's grid, and a warped edge stays sharper than one interpolated on the
    coarse grid."""
    fine = torch.zeros(1, 32, 32, 32)
    fine[:, 8:24, 8:24, 8:24] = 1.0
    result = synthetic_sequence(spatial_dims=3, times=[0.0, 4.0], base_image=fine, supersample=2, seed=2)
    assert result.images.shape == (2, 1, 16, 16, 16) and result.ddfs.shape == (2, 3, 16, 16, 16)
    assert torch.allclose(result.clean[0], torch.nn.functional.avg_pool3d(fine, 2))
    assert result.label.shape == (1, 16, 16, 16)
    direct = synthetic_sequence(spatial_dims=3, times=[0.0, 4.0], base_image=torch.nn.functional.avg_pool3d(fine, 2),
                                seed=2)
    assert torch.equal(direct.ddfs, result.ddfs)  # the same true fields, drawn on the sequence's grid
    # the direct warp interpolates the coarse edge once more: its edge is blurrier (lower gradient energy)
    energy = [float(torch.stack(torch.gradient(r.clean[1, 0])).pow(2).sum()) for r in (result, direct)]
    assert energy[0] > energy[1]


def test_local_width_sets_the_extent_of_the_local_changes():
    extents = []
    for width in (1.5, 3.0):
        result = synthetic_sequence(spatial_dims=3, size=32, times=[0.0, 6.0], amplitude=0.0, local=2.0,
                                    local_width=width, seed=0)
        magnitude = result.ddfs[1].norm(dim=0)
        assert abs(float(magnitude.max()) - 2.0) < 0.5
        extents.append(int((magnitude > 0.5).sum()))
    assert extents[1] > 2 * extents[0]


def test_supersample_and_local_width_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"local_width must be a finite number > 0 \(voxels\), got 0"):
        synthetic_sequence(local_width=0)
    with pytest.raises(ValueError, match=r"supersample must be an integer >= 1, got 1.5"):
        synthetic_sequence(supersample=1.5)
    with pytest.raises(ValueError, match=r"supersample > 1 needs a base_image"):
        synthetic_sequence(supersample=2)
    with pytest.raises(ValueError, match=r"base_image's size \(9, 8, 8\) must be a multiple of supersample=2"):
        synthetic_sequence(base_image=torch.zeros(1, 9, 8, 8), supersample=2)
