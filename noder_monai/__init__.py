"""noder-monai: NODER image-sequence regression for MONAI."""

__version__ = "0.1.0"
