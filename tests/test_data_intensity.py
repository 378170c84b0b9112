import numpy as np
import pytest
import torch

from noder_monai.data.intensity import IntensityMapping


def test_forward_and_inverse_are_exact_linear_maps():
    mapping = IntensityMapping(lower=10.0, upper=50.0)
    x = torch.tensor([10.0, 30.0, 50.0, 70.0])
    y = mapping(x)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert torch.equal(mapping.forward(x), y)
    assert torch.allclose(mapping.inverse(y), x, atol=1e-6)
    assert y.dtype == torch.float32


def test_fit_uses_all_scans_jointly():
    first = torch.arange(0, 100, dtype=torch.float32).view(1, 1, 10, 10)
    second = first + 100.0
    images = torch.cat([first, second])
    mapping = IntensityMapping.fit(images, lower_percentile=0.0, upper_percentile=100.0)
    assert (mapping.lower, mapping.upper) == (0.0, 199.0)
    joint = IntensityMapping.fit([first, second], lower_percentile=25.0, upper_percentile=75.0)
    assert joint.lower == pytest.approx(float(np.percentile(np.arange(200.0), 25)))
    assert joint.upper == pytest.approx(float(np.percentile(np.arange(200.0), 75)))
    default = IntensityMapping.fit(images)
    assert default.lower == pytest.approx(0.995, rel=1e-6)  # MONAI percentile on float32 scans: float32 values
    assert default.upper == pytest.approx(198.005, rel=1e-6)


def test_dict_round_trip_uses_plain_floats():
    mapping = IntensityMapping.fit(torch.rand(3, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0)))
    state = mapping.to_dict()
    assert set(state) == {"lower", "upper"}
    assert all(type(value) is float for value in state.values())
    restored = IntensityMapping.from_dict(state)
    assert (restored.lower, restored.upper) == (mapping.lower, mapping.upper)
    assert repr(restored).startswith("IntensityMapping(lower=")


def test_errors_name_the_argument_and_value():
    with pytest.raises(ValueError, match=r"upper must be finite and greater than lower, got lower=2.0, upper=1.0"):
        IntensityMapping(2.0, 1.0)
    with pytest.raises(ValueError, match=r"lower_percentile=50, upper_percentile=50"):
        IntensityMapping.fit(torch.rand(2, 1, 4, 4), lower_percentile=50, upper_percentile=50)
    with pytest.raises(ValueError, match=r"^subject 's1' scans have a constant intensity \(every voxel is 3\)"):
        IntensityMapping.fit(torch.full((2, 1, 4, 4), 3.0), name="subject 's1' scans")
    with pytest.raises(ValueError, match=r"images must contain at least one voxel"):
        IntensityMapping.fit([])
    with pytest.raises(ValueError, match=r"state is missing key\(s\) \['upper'\]"):
        IntensityMapping.from_dict({"lower": 0.0})


def test_sparse_scans_fall_back_to_min_max():
    """12 bright voxels of 4096: the 0.5/99.5 percentiles coincide, the mapping uses min and max instead."""
    images = torch.zeros(2, 1, 16, 16, 16)
    images.view(2, -1)[:, :12] = 100.0
    mapping = IntensityMapping.fit(images)
    assert (mapping.lower, mapping.upper) == (0.0, 100.0)
    assert float(mapping(images).max()) == 1.0


def test_non_finite_voxels_are_named():
    images = torch.rand(2, 1, 4, 4)
    images[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^scan 'b.nii' contain NaN or Inf"):
        IntensityMapping.fit(images, name="scan 'b.nii'")
