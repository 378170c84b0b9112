"""The per-image metrics as MONAI cumulative metrics, for ``IgniteMetricHandler`` and ``MetricsSaver`` in bundles."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from noder_monai.metrics.image import nrmse, psnr, ssim
from noder_monai.metrics.jacobian import percent_folded

__all__ = ["SequenceMetric", "METRIC_FUNCTIONS"]

METRIC_FUNCTIONS = {
    "nrmse": lambda pred, target: nrmse(pred, target),
    "ssim": lambda pred, target: ssim(pred, target),
    "psnr": lambda pred, target: psnr(pred, target),
    "percent_folded": lambda ddf, _: percent_folded(ddf),
}
"""``name -> f(y_pred, y)`` giving one value per batch item; ``percent_folded`` takes the field as ``y_pred``."""


class SequenceMetric(CumulativeIterationMetric):
    """One of :data:`METRIC_FUNCTIONS` per image (each held-out scan's own intensity range), reduced over images.

    Args:
        name: ``"nrmse"``, ``"ssim"``, ``"psnr"`` (predicted image vs held-out scan) or ``"percent_folded"``
            (``y_pred`` is the displacement field, ``y`` ignored).
        reduction: MONAI metric reduction over the images. Defaults to ``"mean"``.
    """

    def __init__(self, name: str, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        if name not in METRIC_FUNCTIONS:
            raise ValueError(f"name must be one of {sorted(METRIC_FUNCTIONS)}, got {name!r}.")
        self.name = name
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        y_pred = torch.as_tensor(y_pred, dtype=torch.float32)
        y = y_pred if y is None else torch.as_tensor(y, dtype=torch.float32)
        return METRIC_FUNCTIONS[self.name](y_pred, y).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Any:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        value, _ = do_metric_reduction(data, reduction or self.reduction)
        return value
