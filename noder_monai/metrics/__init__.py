"""Metrics of noder-monai: image similarity per batch item and Jacobian-determinant maps of displacement fields."""

from noder_monai.metrics.cumulative import SequenceMetric
from noder_monai.metrics.image import nrmse, psnr, ssim
from noder_monai.metrics.jacobian import jacobian_determinant, percent_folded

__all__ = ["SequenceMetric", "jacobian_determinant", "nrmse", "percent_folded", "psnr", "ssim"]
