"""A linear intensity mapping fitted jointly over a subject's scans, invertible and storable as plain floats."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.transforms.utils_pytorch_numpy_unification import percentile

__all__ = ["IntensityMapping"]


class IntensityMapping:
    """Map intensities linearly so that ``lower -> 0`` and ``upper -> 1``: ``y = (x - lower) / (upper - lower)``.

    No clipping is applied, so :meth:`inverse` recovers the input exactly (up to float rounding) and outputs of a
    model trained on mapped images come back in the scanner's intensity units.

    Args:
        lower: intensity mapped to 0.
        upper: intensity mapped to 1, strictly greater than ``lower``.
    """

    def __init__(self, lower: float, upper: float) -> None:
        lower, upper = float(lower), float(upper)
        if not (math.isfinite(lower) and math.isfinite(upper)) or upper <= lower:
            raise ValueError(f"upper must be finite and greater than lower, got lower={lower!r}, upper={upper!r}.")
        self.lower = lower
        self.upper = upper

    @classmethod
    def fit(
        cls,
        images: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        name: str = "images",
    ) -> IntensityMapping:
        """Fit ``lower`` and ``upper`` as percentiles of all voxels of all scans together.

        The percentiles are MONAI's (``monai.transforms.utils_pytorch_numpy_unification.percentile``, the function
        ``ScaleIntensityRangePercentiles`` calls), computed on the values in their own dtype, so a mapping fitted on
        one tensor is the range MONAI's ``ScaleIntensityRangePercentiles(lower, upper, 0, 1)`` scales that tensor by.

        Args:
            images: ``(T, 1, *spatial)`` scans, or a sequence of arrays of any shape, pooled jointly.
            lower_percentile: percentile in ``[0, 100)`` giving ``lower``.
            upper_percentile: percentile in ``(lower_percentile, 100]`` giving ``upper``. When the two percentiles
                coincide (sparse content: a few bright voxels on a constant background, where MONAI's transform
                would divide by zero) the minimum and maximum are used instead.
            name: what the images are, for messages (e.g. "subject 'sub-01' scans 'a.nii.gz', 'b.nii.gz'").

        Returns:
            The fitted mapping.

        Raises:
            ValueError: percentiles out of range or not increasing, no voxels, NaN/Inf voxels, or every voxel has
                the same intensity; the message starts with ``name``.
        """
        if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
            raise ValueError(
                "percentiles must satisfy 0 <= lower_percentile < upper_percentile <= 100, got "
                f"lower_percentile={lower_percentile!r}, upper_percentile={upper_percentile!r}."
            )
        arrays = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else list(images)
        if not arrays or sum(int(np.prod(array.shape)) for array in arrays) == 0:
            raise ValueError("images must contain at least one voxel, got none.")
        values = torch.cat([torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a).detach().cpu().reshape(-1)
                            for a in arrays])
        if not values.is_floating_point():
            values = values.to(torch.float64)
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contain NaN or Inf voxels; cannot fit an intensity mapping.")
        lower, upper = (float(percentile(values, q)) for q in (lower_percentile, upper_percentile))
        if upper <= lower:
            # sparse content (a few bright voxels on a constant background): the percentiles coincide, the extremes
            # do not; fall back to the minimum and maximum
            lower, upper = float(values.min()), float(values.max())
        if upper <= lower:
            raise ValueError(
                f"{name} have a constant intensity (every voxel is {lower:g}); cannot fit an intensity mapping."
            )
        return cls(lower, upper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map intensities: ``(x - lower) / (upper - lower)``, same shape and dtype as ``x``."""
        return (x - self.lower) / (self.upper - self.lower)

    __call__ = forward

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`forward`: ``y * (upper - lower) + lower``, same shape and dtype as ``y``."""
        return y * (self.upper - self.lower) + self.lower

    def to_dict(self) -> dict[str, float]:
        """Plain-float description for checkpoints: ``{"lower": float, "upper": float}``."""
        return {"lower": self.lower, "upper": self.upper}

    @classmethod
    def from_dict(cls, state: Mapping[str, float]) -> IntensityMapping:
        """Rebuild a mapping from :meth:`to_dict`'s output.

        Raises:
            ValueError: a key ``"lower"`` or ``"upper"`` is missing.
        """
        missing = [key for key in ("lower", "upper") if key not in state]
        if missing:
            raise ValueError(f"state is missing key(s) {missing}, got keys {sorted(state)}.")
        return cls(state["lower"], state["upper"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lower={self.lower!r}, upper={self.upper!r})"
