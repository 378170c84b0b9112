"""The evaluator of ``bundle/configs/inference.json``: its preprocessing (``ODEWarpd``) makes the predictions."""

from __future__ import annotations

from typing import Any

from monai.engines import IterationEvents, SupervisedEvaluator
from monai.utils import CommonKeys as Keys

__all__ = ["PredictionEvaluator"]


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
