"""The evaluator of ``bundle/configs/inference.json``: its preprocessing (``ODEWarpd``) makes the predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.engines import IterationEvents, SupervisedEvaluator
from monai.utils import CommonKeys as Keys

from noder_monai.utils import time_tag

__all__ = ["PredictionEvaluator", "TimeNameFormatter"]


class TimeNameFormatter:
    """``SaveImaged(output_name_formatter=...)``: file names ``<name>_<time_tag(time)>`` from the item's ``time``
    metadata (``image_t2.1.nii.gz``, ``ddf_t-0.5.nii.gz``).

    Args:
        name: the file name's stem, e.g. the key (``"image"``, ``"ddf"``, ``"jacobian"``, ``"label"``).
    """

    def __init__(self, name: str) -> None:
        self.name = str(name)

    def __call__(self, metadict: Mapping[str, Any], saver: Any = None) -> dict[str, Any]:
        return {"subject": self.name, "idx": time_tag(metadict["time"])}


class PredictionEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose predictions come from its preprocessing: ``ODEWarpd`` warps the loaded baseline
    (and label map) with ``network`` (the fitted subject's NODER, weights loaded by a :class:`~noder_monai.model.FittedSubjectLoader` handler)
    and stores the field and Jacobian map. The iteration passes the batch on: ``pred`` is the warped ``image``,
    every other key (``ddf``, ``jacobian``, ``label``, ``target``, ``time``) is kept for postprocessing and metrics.
    """

    def _iteration(self, engine: PredictionEvaluator, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        engine.state.output = {**batchdata, Keys.PRED: batchdata[Keys.IMAGE]}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
