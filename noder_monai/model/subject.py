"""A fitted subject: the trajectory model plus everything needed to predict in the user's space, as one file."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from noder_monai import __version__
from noder_monai.data import IntensityMapping
from noder_monai.data.sequence import AFFINE_ATOL, file_fingerprint, read_label_map
from noder_monai.functional import unfold_displacement, warp_nearest
from noder_monai.io import Geometry, parse_times, save_image
from noder_monai.metrics import jacobian_determinant
from noder_monai.model.appearance import SourceChoice, candidate_weights, carry_scans, combine, informative
from noder_monai.model.appearance import noise_std as estimate_noise
from noder_monai.model.checkpoint import SUBJECT_FORMAT, atomic_torch_save, read_checkpoint, validate_subject_checkpoint
from noder_monai.model.uncertainty import Ensemble, member_spread, structure_volumes
from noder_monai.networks import NODER

__all__ = ["PREDICT_SOURCES", "FittedSubject", "Prediction"]

PREDICT_SOURCES = ("auto", "baseline", "template", "nearest")
"""The appearance of predicted images: see :meth:`FittedSubject.predict`."""



@dataclasses.dataclass
class Prediction:
    """Predictions at ``times`` (user units), in the subject's world space and intensity units.

    Attributes:
        times: (Q,) float64.
        images: (Q, 1, *S) the predicted images (see ``source`` of :meth:`FittedSubject.predict`), in the input's
            intensity units.
        ddfs: (Q, D, *S) displacement fields in voxels (MONAI ``Warp`` convention, pull-back).
        jacobians: (Q, 1, *S) determinant of the Jacobian of x -> x + ddf(x) (local volume change).
        labels: (Q, 1, *S) int64: the given baseline label map carried along (nearest neighbour, every ID exact),
            or None.
        affine: (4, 4) voxel-to-world matrix shared by every output.
        geometry: the scans' :class:`~noder_monai.io.image.Geometry`; pass it as ``affine`` of ``save_image`` so the
            outputs keep the input's header forms and 2D layout.
        corrected: (Q,) percentage of voxels of each field changed by the fold correction of ``field="velocity"``
            models (:meth:`FittedSubject.displacement`); zeros for other models.
        image_std: (Q, 1, *S) predictive standard deviation of ``images`` (input's intensity units), or None
            (``uncertainty=False``); ``images +- 1.645 * image_std`` is the calibrated 90 % interval.
        log_jacobian_std: (Q, 1, *S) standard deviation of ``log(jacobians)``, or None.
    """

    times: torch.Tensor
    images: torch.Tensor
    ddfs: torch.Tensor
    jacobians: torch.Tensor
    labels: torch.Tensor | None
    affine: torch.Tensor
    geometry: Geometry | None = None
    corrected: torch.Tensor | None = None
    image_std: torch.Tensor | None = None
    log_jacobian_std: torch.Tensor | None = None


class FittedSubject:
    """One subject's fitted trajectory; ``save``/``load`` it as a single file, ``predict`` at any times.

    Args:
        model: the fitted :class:`NODER`.
        baseline: (1, 1, *S) first scan, normalised intensities.
        times: (T,) observed times in the user's unit; time is scaled as (t - times[0]) / (times[-1] - times[0]).
        affine: (4, 4) voxel-to-world matrix of the scans.
        intensity: the intensity mapping used for every scan of the subject; predictions are mapped back with it.
        subject: subject identifier.
        fit_config: the plain optimisation settings used.
        history: per-epoch loss records.
        scans: (T, 1, *S) every observed scan, normalised (needed by ``source="auto"`` and ``"nearest"``); None if
            not kept.
        template: (1, 1, *S) the subject template (``FitConfig(source="template")`` or ``"auto"``), or None.
        geometry: the scans' :class:`~noder_monai.io.image.Geometry`; ``None`` builds one from ``affine``.
        fitted_on: what the model was fitted on (``SubjectSequence.fitted_on()``: grid, affine, times, scan file
            fingerprints), compared by :meth:`stale_reasons` on every reuse.
        source_choice: the appearance chosen for this subject by validation on its own scans
            (:func:`~noder_monai.model.appearance.select_source`), used by ``source="auto"``; None if not chosen.
        ensemble: the calibrated uncertainty ensemble (:mod:`~noder_monai.model.uncertainty`; fitted by
            :func:`~noder_monai.engines.fit_ensemble`), used by ``predict(..., uncertainty=True)``; None if not fitted.

    Query times are bounded (:meth:`query_times`): beyond ``warn_extrapolation`` fitted spans outside the observed
    times a warning is given, beyond ``max_extrapolation`` spans the query is refused (the ODE is integrated from the
    first scan, so the cost grows with the distance). Both are instance attributes, settable per subject.
    """

    #: Warn for query times more than this many fitted spans before the first or after the last observed time.
    WARN_EXTRAPOLATION = 1.0
    #: Refuse query times more than this many fitted spans outside the observed times (bounds the ODE's cost).
    MAX_EXTRAPOLATION = 10.0

    def __init__(
        self,
        model: NODER,
        baseline: torch.Tensor,
        times: torch.Tensor,
        affine: torch.Tensor,
        intensity: IntensityMapping,
        subject: str = "subject",
        fit_config: dict | None = None,
        history: list[dict] | None = None,
        scans: torch.Tensor | None = None,
        template: torch.Tensor | None = None,
        geometry: Geometry | None = None,
        fitted_on: dict | None = None,
        source_choice: SourceChoice | None = None,
        ensemble: Ensemble | None = None,
    ):
        self.model = model
        self.source_choice = source_choice
        self.ensemble = ensemble
        self._observed_inverse: torch.Tensor | None = None
        self._noise: list[float] | None = None
        self.baseline = baseline
        self.scans = scans
        self.template = template
        self.times = torch.as_tensor(times, dtype=torch.float64).cpu()
        self.affine = torch.as_tensor(affine, dtype=torch.float64).cpu()
        self.intensity = intensity
        self.subject = subject
        self.fit_config = fit_config or {}
        self.history = history or []
        self.geometry = geometry if geometry is not None else Geometry.from_affine(self.affine, model.spatial_size)
        self.fitted_on = fitted_on
        self.warn_extrapolation = self.WARN_EXTRAPOLATION
        self.max_extrapolation = self.MAX_EXTRAPOLATION
        self.path: str | None = None  # the file it was loaded from, for messages
        self._warned: set[float] = set()

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return self.model.spatial_size

    @property
    def device(self) -> torch.device:
        return self.baseline.device

    def query_times(self, times: Any) -> torch.Tensor:
        """Check query times (numbers, finite, within the extrapolation bounds) and return them as (Q,) float64.

        Raises:
            ValueError: an entry is not a finite number (the message names it), or lies more than
                ``max_extrapolation`` fitted spans outside the observed times.
        Warns:
            UserWarning: once per time, for times more than ``warn_extrapolation`` spans outside.
        """
        values = torch.tensor(parse_times(times, name="times"), dtype=torch.float64)
        first, last = float(self.times[0]), float(self.times[-1])
        span = last - first
        for value in values.tolist():
            beyond = max(first - value, value - last, 0.0) / span
            if beyond > self.max_extrapolation:
                raise ValueError(
                    f"subject {self.subject!r}: time {value:g} is {beyond:.3g} fitted spans outside the observed times "
                    f"[{first:g}, {last:g}] (span {span:g}); the limit is max_extrapolation={self.max_extrapolation:g} "
                    f"spans. Check the time unit (days given for years?) or raise the limit."
                )
            if beyond > self.warn_extrapolation and value not in self._warned:
                self._warned.add(value)
                warnings.warn(
                    f"subject {self.subject!r}: time {value:g} is {beyond:.3g} fitted spans outside the observed times "
                    f"[{first:g}, {last:g}]; predictions that far from the data are extrapolations of the fitted "
                    f"trajectory and may fold (check percent_folded).",
                    UserWarning,
                    stacklevel=3,
                )
        return values

    def scaled_time(self, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """User times (Q,) -> scaled times (Q,) float32, 0 at the first scan and 1 at the last."""
        times = self.query_times(times)
        scaled = (times - self.times[0]) / (self.times[-1] - self.times[0])
        return scaled.to(device=self.device, dtype=torch.float32)

    def check_spatial_size(self, shape: Sequence[int], name: str) -> None:
        """Raise a ValueError naming ``name`` if ``shape`` (spatial only) is not the fitted image size."""
        if tuple(int(s) for s in shape) != tuple(self.spatial_size):
            raise ValueError(
                f"{name} has spatial size {tuple(int(s) for s in shape)}, but subject {self.subject!r} was fitted to "
                f"{len(self.spatial_size)}D images of size {tuple(self.spatial_size)}."
            )

    def check_grid(self, shape: Sequence[int], affine: Any, where: str) -> None:
        """Raise a ValueError naming ``where`` unless an image of spatial ``shape`` and (4, 4) ``affine`` lies on the
        fitted grid (same size; same affine up to 1e-4 mm)."""
        self.check_spatial_size(shape, where)
        matrix = torch.as_tensor(affine, dtype=torch.float64).cpu()
        if matrix.shape != (4, 4) or not torch.allclose(matrix, self.affine, atol=AFFINE_ATOL, rtol=0.0):
            raise ValueError(f"{where} has affine {matrix.tolist()}, but subject '{self.subject}' was fitted on affine "
                             f"{self.affine.tolist()}.")

    def read_labels(self, path: str | os.PathLike, reader: str | None = None) -> tuple[torch.Tensor, Geometry]:
        """Read a label map for this subject: one volume of finite integers on the fitted grid in world space
        (:func:`~noder_monai.data.read_label_map`, the label check of every stage), for ``noder predict`` and the
        bundle.

        Returns:
            ``(labels (1, *S) int64, geometry)``.

        Raises:
            ValueError: naming the file: several channels, non-integer or non-finite values, another grid.
        """
        return read_label_map(path, self.spatial_size, self.affine, f"subject '{self.subject}': field 'label'", reader)

    @property
    def default_source(self) -> str:
        """The fit's ``source`` setting (``FitConfig.source``); ``"baseline"`` for files that record none, and for
        ``"auto"`` without a recorded choice."""
        source = self.fit_config.get("source", "baseline")
        if source == "auto" and self.source_choice is None:
            return "baseline"
        return source if source in PREDICT_SOURCES else "baseline"

    #: Every voxel of a predicted ``field="velocity"`` field has a Jacobian determinant above this.
    MIN_JACOBIAN = 0.01

    @torch.inference_mode()
    def displacement(self, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Displacement fields (Q, D, *S) in voxels at user ``times`` (Q,); see :meth:`fields`."""
        return self.fields(times)[0]

    @torch.inference_mode()
    def fields(self, times: Sequence[float] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Displacement fields (Q, D, *S) in voxels at user ``times`` (Q,), and (Q,) the percentage of voxels the
        fold correction changed.

        A ``field="velocity"`` model integrates a velocity on the decoder grid, where the map is a diffeomorphism up
        to discretisation, and upsamples it linearly, which can fold where the motion is large for that grid (far
        extrapolations, large rotations). Its fields are therefore checked after upsampling and corrected where they
        fold (:func:`~noder_monai.functional.unfold_displacement`: local smoothing until every Jacobian determinant
        exceeds :attr:`MIN_JACOBIAN`), so its predictions never fold; a warning names the times corrected. Fields of
        ``field="displacement"`` models (the paper's) are returned as decoded, folds included.
        """
        values = self.query_times(times)
        ddf = self.model.displacement(self.scaled_time(values))
        if self.model.field != "velocity":
            return ddf, torch.zeros(len(ddf))
        ddf, corrected = unfold_displacement(ddf, self.MIN_JACOBIAN)
        changed = [(t, c) for t, c in zip(values.tolist(), corrected.tolist()) if c]
        if changed:
            warnings.warn(
                f"subject {self.subject!r}: the upsampled field folded at time(s) "
                f"{', '.join(f'{t:g}' for t, _ in changed)}; corrected by local smoothing ({', '.join(f'{c:.2g}%' for _, c in changed)} "
                f"of the voxels changed).", UserWarning, stacklevel=3)
        return ddf, corrected.cpu()

    def check_source(self, source: str | None) -> str:
        """``source`` (None: :attr:`default_source`) after checking that it is known and that this subject holds it.

        Raises:
            ValueError: naming the source and the subject otherwise.
        """
        source = self.default_source if source is None else source
        if source not in PREDICT_SOURCES:
            raise ValueError(f"source must be one of {PREDICT_SOURCES}, got {source!r}.")
        if source == "auto" and self.source_choice is None:
            raise ValueError(f"source='auto': subject {self.subject!r} records no appearance choice (fitted with "
                             f"another source or by an older version); use baseline, template or nearest.")
        if source == "auto" and self.source_choice.source == "template":
            source = "template"
        if source == "template" and self.template is None:
            raise ValueError(f"source='template': subject {self.subject!r} was fitted without a template.")
        if source in ("nearest", "auto") and self.scans is None:
            raise ValueError(f"source='nearest': the file of subject {self.subject!r} holds no observed scans.")
        return source

    def appearance_weights(self, source: str, time: float, leave_out: int | None = None) -> torch.Tensor:
        """Weights ``(T,)`` of the observed scans in the image predicted at user ``time`` by a checked ``source``
        (:meth:`check_source`); the template counts as the equal-weight average of the scans it is the median of.
        ``leave_out``: the index of an observed scan to predict without (validation)."""
        count = len(self.times)
        usable = informative(self.scans) if self.scans is not None else [True] + [False] * (count - 1)
        if leave_out is not None:
            usable[leave_out] = False
        candidate = {"auto": self.source_choice.source if self.source_choice else "baseline",
                     "template": "weighted:inf"}.get(source, source)
        return candidate_weights(candidate, time, self.times.tolist(), self.noise_std(), usable)

    def noise_std(self) -> list[float]:
        """Each observed scan's noise standard deviation (normalised intensities) as the appearance choice
        recorded it, else estimated (:func:`~noder_monai.model.appearance.noise_std`; 0 for scans the file does not
        hold)."""
        if self.source_choice is not None:
            return self.source_choice.noise_std
        if self._noise is None:
            scans = self.scans if self.scans is not None else self.baseline
            self._noise = [estimate_noise(scan) for scan in scans] + [0.0] * (len(self.times) - len(scans))
        return self._noise

    @torch.inference_mode()
    def appearance(self, times: torch.Tensor, ddf: torch.Tensor, source: str | None = None,
                   leave_out: int | None = None) -> torch.Tensor:
        """Predicted images (Q, 1, *S) in the input's intensity units at user ``times`` (Q,) float64, given their
        fields ``ddf`` (Q, D, *S) from :meth:`displacement`; ``source`` as in :meth:`predict`; ``leave_out`` as in
        :meth:`appearance_weights` (not for the template, which is built from every scan)."""
        source = self.check_source(source)
        if source == "template":
            return self.intensity.inverse(self.model.warp(self.template.expand(len(times), *self.template.shape[1:]),
                                                          ddf))
        floor = self.source_choice.noise_floor if source == "auto" else 0.0
        observed = self.times.tolist()
        scans = self.scans if self.scans is not None else self.baseline
        images = []
        for index, time in enumerate(times.tolist()):
            weights = self.appearance_weights(source, time, leave_out)
            used = (weights > 0).tolist()
            inverse = self.observed_inverse() if any(used[1:]) else None
            carried = carry_scans(scans, inverse, ddf[index:index + 1], observed, time, used)
            images.append(combine(carried, weights, floor, self.intensity.inverse, self.intensity.forward))
        return self.intensity.inverse(torch.stack(images))

    def member(self, index: int) -> "FittedSubject":
        """Member ``index`` of :attr:`ensemble` as a subject of its own (its weights; this subject's scans, appearance
        and time scale), for :mod:`~noder_monai.model.uncertainty`.

        Raises:
            ValueError: if the subject has no ensemble or ``index`` is not one of its members.
        """
        if self.ensemble is None or not 0 <= index < len(self.ensemble.states):
            raise ValueError(f"subject {self.subject!r} has no uncertainty member {index}.")
        network = copy.deepcopy(self.model)
        network.load_state_dict(self.ensemble.states[index], strict=False)
        member = FittedSubject(network.eval(), self.baseline, self.times, self.affine, self.intensity,
                               f"{self.subject} member {index}", self.fit_config, scans=self.scans,
                               template=self.template, geometry=self.geometry, source_choice=self.source_choice)
        member.warn_extrapolation, member.max_extrapolation = math.inf, self.max_extrapolation
        return member

    def check_uncertainty(self) -> Ensemble:
        """The subject's :attr:`ensemble`; raises a ValueError saying how to fit one if there is none."""
        if self.ensemble is None:
            where = f"model '{self.path}'" if self.path else f"subject {self.subject!r}"
            raise ValueError(f"{where} holds no uncertainty ensemble: fit one with noder_monai.engines.fit_ensemble("
                             f"subject) (or `noder predict --uncertainty`, which fits and stores it).")
        return self.ensemble

    def observed_inverse(self) -> torch.Tensor:
        """``(T, D, *S)`` displacements of the inverse maps of the observed times (computed once, then kept)."""
        if self._observed_inverse is None:
            with torch.inference_mode():
                self._observed_inverse = self.model.displacement(self.scaled_time(self.times), inverse=True)
        return self._observed_inverse

    @torch.inference_mode()
    def predict(
        self,
        times: Sequence[float] | torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 8,
        source: str | None = None,
        uncertainty: bool = False,
    ) -> Prediction:
        """Images, fields, Jacobian maps and (optionally) carried labels at any user ``times``.

        Args:
            times: (Q,) query times in the user's unit, inside or outside the observed span, any order.
            labels: optional baseline label map (*S), (1, *S) or (1, 1, *S) of integers (any integer dtype up to
                int64, or floats holding integers), carried by nearest-neighbour gathering
                (:func:`~noder_monai.functional.warp_nearest`), so every ID stays exact.
            batch_size: time points decoded and warped at once (bounds the working memory on the device, whatever
                the number of times; the returned tensors hold every time).
            source: the appearance of the predicted images: ``"auto"`` combines the observed scans, each carried
                to the time through one composed map, as chosen for this subject by validation on its own scans
                (:attr:`source_choice`, :mod:`~noder_monai.model.appearance`); ``"baseline"`` warps the first scan
                (the paper); ``"template"`` warps the subject template built by the fit; ``"nearest"`` carries the
                two observed scans that bracket each time and blends them linearly in time; None (default) uses
                :attr:`default_source`. The fields, Jacobian maps and labels do not depend on it.
            uncertainty: also return ``image_std`` and ``log_jacobian_std``, the calibrated predictive standard
                deviations from the subject's :attr:`ensemble` (:mod:`~noder_monai.model.uncertainty`); each member
                predicts every time, so this costs about one prediction per member more.

        Returns:
            a :class:`Prediction` on the CPU.

        Raises:
            ValueError: for an empty ``times``, an unknown ``source``, a source this subject does not hold, labels
                that are not finite integers, or ``uncertainty`` without an ensemble (:meth:`check_uncertainty`).
        """
        times = self.query_times(times)
        outputs: dict[str, torch.Tensor] = {}
        first = 0
        for chunk in self.predict_chunks(times, labels, batch_size, source, uncertainty):
            for key in ("times", "images", "ddfs", "jacobians", "labels", "corrected", "image_std", "log_jacobian_std"):
                value = getattr(chunk, key)
                if value is None:
                    continue
                if key not in outputs:  # allocated once and filled chunk by chunk (no concatenation copy)
                    outputs[key] = value.new_empty((len(times), *value.shape[1:]))
                outputs[key][first:first + len(value)] = value
            first += len(chunk.times)
            del chunk, value  # free this chunk before the next is made
        return Prediction(times=outputs["times"], images=outputs["images"], ddfs=outputs["ddfs"],
                          jacobians=outputs["jacobians"], labels=outputs.get("labels"), affine=self.affine.clone(),
                          geometry=self.geometry, corrected=outputs["corrected"], image_std=outputs.get("image_std"),
                          log_jacobian_std=outputs.get("log_jacobian_std"))

    def predict_chunks(
        self,
        times: Sequence[float] | torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 8,
        source: str | None = None,
        uncertainty: bool = False,
    ) -> Iterator[Prediction]:
        """:meth:`predict` one chunk of at most ``batch_size`` times after another (in the order of ``times``), so
        that any number of times fits in memory when each chunk is written or reduced before the next.

        Raises:
            ValueError: as :meth:`predict`, before the first chunk; for ``batch_size`` < 1.
        """
        times = self.query_times(times)
        if times.numel() == 0:
            raise ValueError("times must contain at least one time point.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        source = self.check_source(source)
        if uncertainty:
            self.check_uncertainty()
        if labels is not None:
            labels = self.label_map(labels)[None, None]
        return self._chunks(times, labels, batch_size, source, uncertainty)

    def _chunks(
        self, times: torch.Tensor, labels: torch.Tensor | None, batch_size: int, source: str, uncertainty: bool
    ) -> Iterator[Prediction]:
        for chunk in times.split(batch_size):
            # nothing of a chunk is held while the next is made
            yield self._predict_chunk(chunk, labels, source, uncertainty)

    @torch.inference_mode()  # on this function, not the generator: torch's generator wrapper holds the last chunk
    def _predict_chunk(self, times: torch.Tensor, labels: torch.Tensor | None, source: str,
                       uncertainty: bool) -> Prediction:
        ddf, corrected = self.fields(times)
        carried = None if labels is None else warp_nearest(labels, ddf).cpu()
        image_std, log_jacobian_std = member_spread(self, times, ddf, source) if uncertainty else (None, None)
        return Prediction(
            times=times,
            images=self.appearance(times, ddf, source).cpu(),
            ddfs=ddf.cpu(),
            jacobians=jacobian_determinant(ddf).cpu(),
            labels=carried,
            affine=self.affine.clone(),
            geometry=self.geometry,
            corrected=corrected,
            image_std=image_std,
            log_jacobian_std=log_jacobian_std,
        )

    @torch.inference_mode()
    def structure_volumes(self, times: Sequence[float] | torch.Tensor, labels: torch.Tensor,
                          uncertainty: bool = False) -> dict[str, Any]:
        """Every structure's volume at user ``times``, from the Jacobian determinant integrated over the baseline
        label map (:func:`~noder_monai.model.uncertainty.structure_volumes`), with the ensemble's 90 % band when
        ``uncertainty``.

        Args:
            times: (Q,) query times.
            labels: baseline label map as for :meth:`predict`.
            uncertainty: add ``lower`` and ``upper``: the calibrated central 90 % band (needs :attr:`ensemble`).

        Returns:
            ``{"labels": [L ids], "volume": (Q, L) mm^3}`` plus ``"lower"``/``"upper"`` (Q, L) with ``uncertainty``.

        Raises:
            ValueError: as :meth:`predict`.
        """
        times = self.query_times(times)
        if uncertainty:
            self.check_uncertainty()
        return structure_volumes(self, times, self.label_map(labels), uncertainty)

    def label_map(self, labels: Any) -> torch.Tensor:
        """A baseline label map given as (*S), (1, *S) or (1, 1, *S) integers (or floats holding integers) as (*S)
        int64 on the subject's device.

        Raises:
            ValueError: another spatial size, or values that are not finite integers.
        """
        labels = torch.as_tensor(labels)
        while labels.ndim > self.model.spatial_dims and labels.shape[0] == 1:
            labels = labels[0]
        self.check_spatial_size(labels.shape, "labels")
        return _integer_labels(labels).to(self.device)

    def state(self) -> dict:
        """The plain, ``weights_only``-loadable dictionary that :meth:`save` writes."""
        return {
            "format": SUBJECT_FORMAT,
            "package_version": __version__,
            "subject": self.subject,
            "network": dict(self.model.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "baseline": self.baseline.detach().cpu(),
            "scans": None if self.scans is None else self.scans.detach().cpu(),
            "template": None if self.template is None else self.template.detach().cpu(),
            "times": self.times.tolist(),
            "time_origin": float(self.times[0]),
            "time_scale": float(self.times[-1] - self.times[0]),
            "spatial_size": list(self.spatial_size),
            "affine": self.affine.tolist(),
            "intensity": self.intensity.to_dict(),
            "fit_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fit_config.items()},
            "history": self.history,
            "geometry": self.geometry.to_dict(),
            "fitted_on": self.fitted_on,
            "source_choice": None if self.source_choice is None else self.source_choice.to_dict(),
            "ensemble": None if self.ensemble is None else self.ensemble.to_dict(),
        }

    def stale_reasons(
        self,
        paths: Sequence[str] | None = None,
        times: Sequence[float] | None = None,
        spatial_size: Sequence[int] | None = None,
        affine: torch.Tensor | None = None,
    ) -> list[str]:
        """Why this model does not match the given inputs any more (empty list: it does).

        Compares with what the model recorded at fitting time: the observed times, the grid size and affine, and each
        scan file (same path, and same size and modification time or else the same SHA-256). Call it before reusing
        a model (``--skip_existing``, ``predict``, ``evaluate``).

        Args:
            paths: the subject's observed scan files now.
            times: their acquisition times now.
            spatial_size: the grid size of the scans now (e.g. ``sequence.spatial_size``).
            affine: their (4, 4) affine now.
        """
        reasons: list[str] = []
        if times is not None:
            now = [float(t) for t in times]
            if now != [float(t) for t in self.times.tolist()]:
                reasons.append(f"times changed from {self.times.tolist()} to {now}")
        if spatial_size is not None and tuple(int(s) for s in spatial_size) != tuple(self.spatial_size):
            reasons.append(f"grid size changed from {tuple(self.spatial_size)} to {tuple(int(s) for s in spatial_size)}")
        if affine is not None:
            current = torch.as_tensor(affine, dtype=torch.float64).cpu()
            if current.shape != (4, 4) or not torch.allclose(current, self.affine, atol=1e-4, rtol=0.0):
                reasons.append(f"affine changed from {self.affine.tolist()} to {current.tolist()}")
        if paths is not None:
            recorded = (self.fitted_on or {}).get("scans")
            if not recorded:
                reasons.append("the model records no scan files (written by an older version); refit to be sure")
                return reasons
            names = [os.path.abspath(os.fspath(p)) for p in paths]
            before = [item["path"] for item in recorded]
            if names != before:
                reasons.append(f"scan files changed from {before} to {names}")
                return reasons
            for name, item in zip(names, recorded):
                if not os.path.isfile(name):
                    reasons.append(f"scan '{name}' no longer exists")
                    continue
                stat = os.stat(name)
                if stat.st_size == item["size"] and stat.st_mtime_ns == item["mtime_ns"]:
                    continue
                if stat.st_size != item["size"] or file_fingerprint(name)["sha256"] != item["sha256"]:
                    reasons.append(f"scan '{name}' changed since the fit (size {item['size']} -> {stat.st_size} bytes)")
        return reasons

    def check_inputs(self, **inputs: Any) -> None:
        """Raise a ValueError naming the model file and every difference if :meth:`stale_reasons` finds any."""
        reasons = self.stale_reasons(**inputs)
        if reasons:
            where = f"model '{self.path}'" if self.path else f"the model of subject {self.subject!r}"
            raise ValueError(f"{where} is stale: {'; '.join(reasons)}. Fit the subject again.")

    def save_template(self, path: str | Path) -> str | None:
        """Write the subject template (in the input's intensity units and geometry) as NIfTI; None if there is none.

        Returns:
            the path written, or None when the fit built no template (``FitConfig.source`` other than "template").
        """
        if self.template is None:
            return None
        return save_image(self.intensity.inverse(self.template)[0].cpu(), self.geometry, path)

    def save(self, path: str | Path) -> Path:
        """Write the subject to ``path`` atomically (temporary name, then rename). Returns the path."""
        return atomic_torch_save(self.state(), path)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict, model: NODER, path: str | Path = "<memory>", map_location: str | torch.device = "cpu"
    ) -> "FittedSubject":
        """The subject of a read and validated fitted-subject ``checkpoint`` around ``model`` (whose weights the
        caller loads: :meth:`load`, which the bundle's inference calls through ``FittedSubjectLoader``).

        Raises:
            ValueError: naming ``path``, if the stored geometry or appearance choice is malformed.
        """
        geometry = None
        if checkpoint.get("geometry") is not None:
            try:
                geometry = Geometry.from_dict(checkpoint["geometry"])
            except ValueError as error:
                raise ValueError(f"checkpoint {str(path)!r}: field 'geometry': {error}") from error
        images = {key: None if checkpoint.get(key) is None else checkpoint[key].to(map_location)
                  for key in ("scans", "template")}
        choice = None
        if checkpoint.get("source_choice") is not None:
            try:
                choice = SourceChoice.from_dict(checkpoint["source_choice"])
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"checkpoint {str(path)!r}: field 'source_choice' is malformed: {error!r}") from error
        ensemble = None
        if checkpoint.get("ensemble") is not None:
            try:
                ensemble = Ensemble.from_dict(checkpoint["ensemble"], model.state_dict(), len(checkpoint["times"]))
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"checkpoint {str(path)!r}: field 'ensemble' is malformed: {error}") from error
        return cls(
            model=model,
            baseline=checkpoint["baseline"].to(map_location),
            **images,
            times=torch.tensor(checkpoint["times"], dtype=torch.float64),
            affine=torch.tensor(checkpoint["affine"], dtype=torch.float64),
            intensity=IntensityMapping.from_dict(checkpoint["intensity"]),
            subject=checkpoint["subject"],
            fit_config=checkpoint["fit_config"],
            history=checkpoint["history"],
            geometry=geometry,
            fitted_on=checkpoint.get("fitted_on"),
            source_choice=choice,
            ensemble=ensemble,
        )

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device = "cpu", network: NODER | None = None
    ) -> "FittedSubject":
        """Load a file written by :meth:`save` with ``torch.load(weights_only=True)``.

        Args:
            path: the fitted-subject file.
            map_location: device of the loaded tensors.
            network: the :class:`NODER` to load the weights into (e.g. the one a bundle config defines); it must have
                the arguments the file records. None builds it from the file.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming the file, if it is not a fitted subject, ``network`` differs from the recorded one, or
                the weights do not fit the recorded size.
        """
        checkpoint = read_checkpoint(path, SUBJECT_FORMAT, map_location)
        validate_subject_checkpoint(checkpoint, path)
        recorded = dict(checkpoint["network"])
        if network is None:
            network = NODER(**recorded)
        differences = {key: (value, network.config.get(key)) for key, value in recorded.items()
                       if _plain(network.config.get(key)) != _plain(value)}
        if differences:
            raise ValueError(
                f"checkpoint {str(path)!r} was fitted with other network arguments than the given network: "
                + ", ".join(f"{key}: {old!r} in the file, {new!r} given" for key, (old, new) in differences.items())
                + "; define the network with the file's arguments."
            )
        try:
            network.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise ValueError(
                f"checkpoint {str(path)!r}: weights do not fit a model for images of size {recorded['spatial_size']}: {error}"
            ) from error
        baseline = checkpoint["baseline"]
        if list(baseline.shape[2:]) != list(recorded["spatial_size"]):
            raise ValueError(
                f"checkpoint {str(path)!r}: baseline of size {list(baseline.shape[2:])} does not match the recorded "
                f"image size {recorded['spatial_size']}."
            )
        subject = cls.from_checkpoint(checkpoint, network.to(map_location).eval(), path, map_location)
        subject.path = str(path)
        return subject


def _integer_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as int64, exactly; a floating tensor must hold finite integers (ValueError otherwise)."""
    if not labels.is_floating_point():
        return labels.to(torch.int64)
    if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
        raise ValueError("labels must be finite integers (a label map, e.g. from noder_monai.io.load_label_map).")
    return labels.to(torch.int64)


def _plain(value: Any) -> Any:
    """Tuples as lists, so a network argument compares equal to its JSON/``torch.save`` round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
