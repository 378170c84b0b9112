"""An intensity transform for a subject's scans that keeps its inverse: percentile range to [0, 1], no clipping."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange

from noder_monai.data import IntensityMapping

__all__ = ["IntensityMappingd"]


class IntensityMappingd(MapTransform):
    """``ScaleIntensityRangePercentilesd(lower, upper, b_min=0, b_max=1, clip=False)`` that records its inverse.

    The percentiles are taken over all voxels of all channels of the item (all scans of a subject, stacked as
    channels, share one mapping), so the values equal MONAI's ``ScaleIntensityRangePercentilesd`` with
    ``channel_wise=False``; the fitted range is stored as ``IntensityMapping.to_dict()`` under ``mapping_key`` so
    that predictions can be mapped back to the input's units (``IntensityMapping.from_dict(d[mapping_key]).inverse``).

    Args:
        keys: keys of the items to map (the first key's values fit the mapping; every key uses it).
        lower: lower percentile, mapped to 0. Defaults to 0.5.
        upper: upper percentile, mapped to 1. Defaults to 99.5.
        mapping_key: where the mapping is stored. Defaults to ``"intensity"``.
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        mapping_key: str = "intensity",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower!r}, upper={upper!r}.")
        self.lower = float(lower)
        self.upper = float(upper)
        self.mapping_key = mapping_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mapping = None
        for key in self.key_iterator(d):
            if mapping is None:
                mapping = IntensityMapping.fit(d[key], self.lower, self.upper)
            d[key] = ScaleIntensityRange(mapping.lower, mapping.upper, 0.0, 1.0, clip=False)(d[key])
        if mapping is not None:
            d[self.mapping_key] = mapping.to_dict()
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map ``keys`` back to the input's units with the mapping stored under ``mapping_key``."""
        d = dict(data)
        mapping = IntensityMapping.from_dict(d[self.mapping_key])
        for key in self.key_iterator(d):
            d[key] = mapping.inverse(d[key])
        return d
