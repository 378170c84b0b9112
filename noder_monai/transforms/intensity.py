"""MONAI's percentile intensity scaling for a subject's scans, with its inverse kept (predictions go back to the
input's units)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, ScaleIntensityRange, ScaleIntensityRangePercentilesd
from monai.utils import TraceKeys

from noder_monai.data import IntensityMapping

__all__ = ["IntensityMappingd"]


class IntensityMappingd(ScaleIntensityRangePercentilesd, InvertibleTransform):
    """MONAI's ``ScaleIntensityRangePercentilesd(keys, lower, upper, b_min=0, b_max=1, clip=False)``, invertible.

    The values are MONAI's: the range is ``monai``'s ``percentile`` of all voxels of all channels of the first key
    (a subject's scans, stacked as channels, share one mapping; ``channel_wise=False``) and the scaling is
    ``ScaleIntensityRange``, so the output equals ``ScaleIntensityRangePercentilesd``'s bit for bit. What MONAI's
    transform lacks, and a fit needs, is added:

    - the inverse: the range is recorded in the transform trace (``inverse``, MONAI ``Invertd``) and, as
      ``IntensityMapping.to_dict()``, under ``mapping_key``, which the fitted subject's file stores so that every
      prediction is mapped back to the input's units (``IntensityMapping.inverse``);
    - sparse content: where the two percentiles coincide (a few bright voxels on a constant background) MONAI's
      transform divides by zero (it warns and returns ``x - lower``, unscaled); here the minimum and maximum are used
      (:meth:`IntensityMapping.fit`), and NaN/Inf voxels or a constant image are refused by name.

    Args:
        keys: keys of the items to map (the first key's values fit the mapping; every key uses it).
        lower: lower percentile, mapped to 0. Defaults to 0.5.
        upper: upper percentile, mapped to 1. Defaults to 99.5.
        mapping_key: where the mapping is stored. Defaults to ``"intensity"``.
        allow_missing_keys: do not raise if a key is missing.

    Raises:
        ValueError: percentiles not ``0 <= lower < upper <= 100``; when called, as :meth:`IntensityMapping.fit`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        mapping_key: str = "intensity",
        allow_missing_keys: bool = False,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower!r}, upper={upper!r}.")
        super().__init__(keys, float(lower), float(upper), b_min=0.0, b_max=1.0, clip=False,
                         allow_missing_keys=allow_missing_keys)
        self.mapping_key = mapping_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mapping = None
        for key in self.key_iterator(d):
            if mapping is None:
                mapping = IntensityMapping.fit(d[key], self.scaler.lower, self.scaler.upper, name=f"data[{key!r}]")
            scale = ScaleIntensityRange(mapping.lower, mapping.upper, 0.0, 1.0, clip=False, dtype=self.scaler.dtype)
            d[key] = scale(d[key])
            self.push_transform(d, key, extra_info=mapping.to_dict())
        if mapping is not None:
            d[self.mapping_key] = mapping.to_dict()
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map ``keys`` back to the input's units with the range recorded in their transform trace."""
        d = dict(data)
        for key in self.key_iterator(d):
            mapping = IntensityMapping.from_dict(self.pop_transform(d, key)[TraceKeys.EXTRA_INFO])
            d[key] = mapping.inverse(d[key])
        return d
