"""The evaluator of ``bundle/configs/inference.json``: its preprocessing (``ODEWarpd``) makes the predictions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import IterationEvents, SupervisedEvaluator
from monai.utils import CommonKeys as Keys

from noder_monai.model.subject import SUBJECT_FORMAT, FittedSubject, read_checkpoint, validate_subject_checkpoint

__all__ = ["PredictionEvaluator", "fitted_subject_from_checkpoint", "TimeNameFormatter", "time_tag"]


def fitted_subject_from_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], network: torch.nn.Module, device: str | torch.device = "cpu"
) -> FittedSubject:
    """A :class:`FittedSubject` around ``network`` with the baseline, times, affine and intensity of a fitted-subject
    file; the weights are left to a ``CheckpointLoader(load_dict={"state_dict": network})`` handler."""
    path = "<memory>"
    if not isinstance(checkpoint, Mapping):
        path, checkpoint = checkpoint, read_checkpoint(checkpoint, SUBJECT_FORMAT, map_location=device)
    validate_subject_checkpoint(dict(checkpoint), path)
    return FittedSubject.from_checkpoint(dict(checkpoint), network, path, device)


def time_tag(time: float) -> str:
    """File-name tag of a time: ``"t"`` + the shortest repr of the time rounded to 6 decimals (``t2.1``, ``t7.0``,
    ``t-0.5``); rounding makes a time that went through float32 metadata give the same tag."""
    return f"t{round(float(time), 6)!r}"


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
    (and label map) with ``network`` (the fitted subject's NODER, weights loaded by a ``CheckpointLoader`` handler)
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
