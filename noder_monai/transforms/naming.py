"""File names per query time for MONAI ``SaveImaged``: one file per time, never one file overwritten by the next."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.data.folder_layout import default_name_formatter

from noder_monai.utils import time_tag

__all__ = ["TimeNameFormatter"]


class TimeNameFormatter:
    """``SaveImaged(output_name_formatter=TimeNameFormatter())``: the file name ends with the item's query time.

    ``ODEWarpd`` stores the time in each output's metadata (``meta["time"]``); this formatter makes the file name
    ``<stem>[_<postfix>]_<time_tag(time)>`` (``flair_warped_t2.5.nii.gz``, ``image_t-0.5.nii.gz``), so warping one
    image to several times writes one file per time. Without a time in the metadata it raises instead of writing
    every time to the same name.

    Args:
        name: the file name's stem (e.g. ``"image"``, ``"ddf"``); None (default) takes MONAI's default, the stem of
            the item's ``filename_or_obj``.

    Raises:
        KeyError: when called on metadata without ``"time"``.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = None if name is None else str(name)

    def __call__(self, metadict: Mapping[str, Any], saver: Any = None) -> dict[str, Any]:
        if "time" not in (metadict or {}):
            raise KeyError("TimeNameFormatter: the item's metadata has no 'time' (warp it with ODEWarpd first); "
                           f"metadata keys: {sorted(metadict or {})}.")
        subject = default_name_formatter(dict(metadict), saver)["subject"] if self.name is None else self.name
        return {"subject": subject, "idx": time_tag(metadict["time"])}
