"""Where a run writes: one subject's files under ``output_dir`` and ``eval_dir``, named once for every stage::

    <output_dir>/<id>/model.pt                          the fitted subject (FittedSubject.save)
    <output_dir>/<id>/template.nii.gz                   the subject template, when the fit built one (the default)
    <output_dir>/<id>/loss.csv, loss.json               the loss curve, one record per epoch
    <output_dir>/<id>/fitted/image_<time>.nii.gz        the fit at every observed time
    <output_dir>/<id>/predictions/{image,ddf,ddf_itk,jacobian,label}_<time>.nii.gz, predictions.json,
        label_volumes.csv; with uncertainty also {image_std,log_jacobian_std}_<time>.nii.gz
    <output_dir>/<id>/report.html                       the subject's HTML report
    <output_dir>/tensorboard/<id>/                      loss scalars
    <eval_dir>/<id>/subject_metrics.json                held-out metrics (and MetricsSaver's CSVs in the bundle)
    <eval_dir>/<id>_montage.png                         observed / predicted / difference per held-out time

``<time>`` is :func:`~noder_monai.utils.time_tag` (``t2.1``, ``t7.0``, ``t-0.5``, ``t1.0000001``): distinct times get
distinct names; each image's header (``descrip``) and ``predictions.json`` hold the exact time.
"""

from __future__ import annotations

import os
import torch

from noder_monai.data import SubjectEntry
from noder_monai.model import FittedSubject
from noder_monai.utils import PathLike, time_tag

__all__ = ["SubjectPaths"]


class SubjectPaths:
    """The files of one subject of a run.

    Args:
        output_dir: the run's output folder (models, predictions, reports).
        subject: the subject id (a safe folder name, see :func:`~noder_monai.data.datalist_subjects`).
        eval_dir: the evaluation's folder; None uses ``<output_dir>/eval``.

    Attributes:
        folder, model, template, report, predictions, predictions_json, label_volumes, tensorboard: under
            ``output_dir`` (see the module docstring); evaluation (``<eval_dir>/<id>``), subject_metrics, montage:
            under ``eval_dir``. All absolute.
    """

    def __init__(self, output_dir: PathLike, subject: str, eval_dir: PathLike | None = None) -> None:
        root = os.path.abspath(os.fspath(output_dir))
        self.subject = subject
        self.folder = os.path.join(root, subject)
        self.model, self.template, self.report = (os.path.join(self.folder, name) for name in
                                                  ("model.pt", "template.nii.gz", "report.html"))
        self.predictions = os.path.join(self.folder, "predictions")
        self.predictions_json, self.label_volumes = (os.path.join(self.predictions, name) for name in
                                                     ("predictions.json", "label_volumes.csv"))
        self.tensorboard = os.path.join(root, "tensorboard", subject)
        evaluation_root = os.path.join(root, "eval") if eval_dir is None else os.path.abspath(os.fspath(eval_dir))
        self.evaluation = os.path.join(evaluation_root, subject)
        self.subject_metrics = os.path.join(self.evaluation, "subject_metrics.json")
        self.montage = f"{self.evaluation}_montage.png"

    def loss(self, suffix: str) -> str:
        """``loss.json`` or ``loss.csv`` (``suffix`` ``"json"`` or ``"csv"``)."""
        return os.path.join(self.folder, f"loss.{suffix}")

    def fitted(self, time: float) -> str:
        """The fit at an observed time, ``fitted/image_<time>.nii.gz``."""
        return os.path.join(self.folder, "fitted", f"image_{time_tag(time)}.nii.gz")

    def prediction(self, kind: str, time: float) -> str:
        """``<predictions>/<kind>_<time>.nii.gz``, ``kind`` one of image, ddf, ddf_itk, jacobian, label, image_std,
        log_jacobian_std (:data:`~noder_monai.workflows.subject.PREDICTION_KINDS`)."""
        return os.path.join(self.predictions, f"{kind}_{time_tag(time)}.nii.gz")

    def require_model(self) -> str:
        """The model's path, checked to exist: the one model-exists check of inference, evaluation and the report.

        Raises:
            FileNotFoundError: naming the subject and the file.
        """
        if not os.path.isfile(self.model):
            raise FileNotFoundError(f"subject '{self.subject}': fitted model '{self.model}' not found; run training "
                                    "with this output_dir first.")
        return self.model

    def load_model(self, entry: SubjectEntry, device: str | torch.device = "cpu") -> FittedSubject:
        """The subject's fitted model, checked to be this subject's and to match its scan files and times now.

        Raises:
            FileNotFoundError: the model does not exist.
            ValueError: naming the model file, if it holds another subject or is stale (its scans or times changed).
        """
        subject = FittedSubject.load(self.require_model(), map_location=device)
        if subject.subject != entry.id:
            raise ValueError(f"subject '{entry.id}': '{self.model}' holds subject '{subject.subject}'.")
        reasons = subject.stale_reasons(paths=[path for path, _ in entry.scans], times=entry.times)
        if reasons:
            raise ValueError(f"subject '{entry.id}': model '{self.model}' is stale: {'; '.join(reasons)}. Fit the "
                             "subject again (noder fit, or train() with skip_existing=True refits stale models).")
        return subject
