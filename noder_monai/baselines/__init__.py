"""Baselines NODER is compared with: geodesic regression (linear dynamics), nearest scan, linear interpolation."""

from noder_monai.baselines.geodesic import GeodesicRegression
from noder_monai.baselines.interpolation import linear_interpolation, nearest_scan

__all__ = ["GeodesicRegression", "linear_interpolation", "nearest_scan"]
