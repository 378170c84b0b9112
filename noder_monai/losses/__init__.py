"""Losses of noder-monai: local NCC with running-sum windows, field regularizers and the NODER objective."""

from noder_monai.losses.lncc import LocalNCCLoss
from noder_monai.losses.noder_loss import NODERLoss
from noder_monai.losses.regularizers import BoundaryLoss, GradientSmoothnessLoss

__all__ = ["BoundaryLoss", "GradientSmoothnessLoss", "LocalNCCLoss", "NODERLoss"]
