"""A fitted subject: the trajectory model plus everything needed to predict in the user's space, as one file."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.networks.blocks import Warp

from noder_monai import __version__
from noder_monai.data import IntensityMapping, compose_displacements
from noder_monai.io.image import Geometry, parse_times, save_image
from noder_monai.data.sequence import file_fingerprint
from noder_monai.metrics import jacobian_determinant
from noder_monai.networks import NODER
from noder_monai.utils import atomic_write

__all__ = [
    "AUTOENCODER_FORMAT",
    "PREDICT_SOURCES",
    "SUBJECT_FORMAT",
    "FittedSubject",
    "Prediction",
    "atomic_torch_save",
    "load_autoencoder_weights",
    "read_checkpoint",
    "validate_subject_checkpoint",
]

SUBJECT_FORMAT = "noder-monai/fitted-subject"
PREDICT_SOURCES = ("baseline", "template", "nearest")
"""The appearance of predicted images: see :meth:`FittedSubject.predict`."""
AUTOENCODER_FORMAT = "noder-monai/deformation-autoencoder"


def atomic_torch_save(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename: no half-written file is ever visible."""
    return Path(atomic_write(path, lambda temporary: torch.save(obj, temporary)))


def read_checkpoint(path: str | Path, expected_format: str, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` a package file and check its ``format`` entry.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if it is not a torch file or not of ``expected_format``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable torch file: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != expected_format:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not a {expected_format!r} file (format: {found!r}).")
    return checkpoint


def load_autoencoder_weights(model: NODER, path: str | Path) -> None:
    """Copy a pretrained deformation autoencoder's encoder and decoder weights into ``model``.

    The file holds ``{"format": AUTOENCODER_FORMAT, "config": {...}, "state_dict": DeformationAutoencoder state}``.

    Raises:
        ValueError: naming the file, if it is another kind of file or its networks differ from ``model``'s.
    """
    checkpoint = read_checkpoint(path, AUTOENCODER_FORMAT, map_location=model.initial_state.device)
    config = checkpoint.get("config", {})
    if config.get("spatial_dims") != model.spatial_dims:
        raise ValueError(
            f"autoencoder {str(path)!r} is for spatial_dims={config.get('spatial_dims')}, the model has {model.spatial_dims}."
        )
    for part in ("encoder", "decoder"):
        prefix = f"{part}."
        weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        try:
            getattr(model, part).load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"autoencoder {str(path)!r}: its {part} does not match the model's: {error}") from error


@dataclasses.dataclass
class Prediction:
    """Predictions at ``times`` (user units), in the subject's world space and intensity units.

    Attributes:
        times: (Q,) float64.
        images: (Q, 1, *S) baseline warped to each time, intensities in the input's units.
        ddfs: (Q, D, *S) displacement fields in voxels (MONAI ``Warp`` convention, pull-back).
        jacobians: (Q, 1, *S) determinant of the Jacobian of x -> x + ddf(x) (local volume change).
        labels: (Q, 1, *S) the given baseline label map carried along (nearest neighbour), or None.
        affine: (4, 4) voxel-to-world matrix shared by every output.
        geometry: the scans' :class:`~noder_monai.io.image.Geometry`; pass it as ``affine`` of ``save_image`` so the
            outputs keep the input's header forms and 2D layout.
    """

    times: torch.Tensor
    images: torch.Tensor
    ddfs: torch.Tensor
    jacobians: torch.Tensor
    labels: torch.Tensor | None
    affine: torch.Tensor
    geometry: Geometry | None = None


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
        scans: (T, 1, *S) every observed scan, normalised (needed by ``source="nearest"``); None if not kept.
        template: (1, 1, *S) the subject template the fit warped (``FitConfig(source="template")``), or None.
        geometry: the scans' :class:`~noder_monai.io.image.Geometry`; ``None`` builds one from ``affine``.
        fitted_on: what the model was fitted on (``SubjectSequence.fitted_on()``: grid, affine, times, scan file
            fingerprints), compared by :meth:`stale_reasons` on every reuse.

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
    ):
        self.model = model
        self.baseline = baseline
        self.scans = scans
        self.template = template
        self.times = torch.as_tensor(times, dtype=torch.float64).cpu()
        self.affine = torch.as_tensor(affine, dtype=torch.float64).cpu()
        self.intensity = intensity
        self.subject = subject
        self.fit_config = fit_config or {}
        self.history = history or []
        self._label_warp = Warp(mode="nearest", padding_mode="border")
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

    @property
    def default_source(self) -> str:
        """The fit's ``source`` setting (``FitConfig.source``); ``"baseline"`` for files that record none."""
        source = self.fit_config.get("source", "baseline")
        return source if source in PREDICT_SOURCES else "baseline"

    @torch.inference_mode()
    def displacement(self, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Displacement fields (Q, D, *S) in voxels at user ``times`` (Q,)."""
        return self.model.displacement(self.scaled_time(times))

    def check_source(self, source: str | None) -> str:
        """``source`` (None: :attr:`default_source`) after checking that it is known and that this subject holds it.

        Raises:
            ValueError: naming the source and the subject otherwise.
        """
        source = self.default_source if source is None else source
        if source not in PREDICT_SOURCES:
            raise ValueError(f"source must be one of {PREDICT_SOURCES}, got {source!r}.")
        if source == "template" and self.template is None:
            raise ValueError(f"source='template': subject {self.subject!r} was fitted without a template.")
        if source == "nearest" and self.scans is None:
            raise ValueError(f"source='nearest': the file of subject {self.subject!r} holds no observed scans.")
        return source

    @torch.inference_mode()
    def appearance(self, times: torch.Tensor, ddf: torch.Tensor, source: str | None = None) -> torch.Tensor:
        """Predicted images (Q, 1, *S) in the input's intensity units at user ``times`` (Q,) float64, given their
        fields ``ddf`` (Q, D, *S) from :meth:`displacement`; ``source`` as in :meth:`predict`."""
        source = self.check_source(source)
        if source == "nearest":
            return self.intensity.inverse(self._nearest_scans(times, ddf))
        image = self.template if source == "template" else self.baseline
        return self.intensity.inverse(self.model.warp(image.expand(len(times), *image.shape[1:]), ddf))

    def _nearest_scans(self, times: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Appearance from the observed scans that bracket each time (``source="nearest"``), normalised (Q, 1, *S).

        Scan k is carried to time t through the fitted maps, ``I_k o phi_k^-1 o phi_t`` (one displacement,
        ``ddf_t + inverse_k(x + ddf_t)``, so one interpolation), and the two bracketing scans are blended linearly in
        time; before the first and after the last scan only that scan is used. At an observed time the composed map
        is the identity, so that scan is returned unchanged.
        """
        observed = self.times.to(times.dtype)
        after = torch.searchsorted(observed, times, right=True).clamp(1, len(observed) - 1)
        before = after - 1
        weight = ((times - observed[before]) / (observed[after] - observed[before])).clamp(0, 1)
        inverse = self.model.displacement(self.scaled_time(observed), inverse=True)
        blended = torch.zeros(len(times), 1, *self.spatial_size, device=self.device)
        for index, weights in ((before, 1 - weight), (after, weight)):
            carried = compose_displacements(inverse[index], ddf)
            exact = observed[index] == times
            carried[exact.to(carried.device)] = 0.0
            scans = self.model.warp(self.scans[index], carried)
            blended += scans * weights.to(device=self.device, dtype=scans.dtype).view(-1, *[1] * (scans.ndim - 1))
        return blended

    @torch.inference_mode()
    def predict(
        self,
        times: Sequence[float] | torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 8,
        source: str | None = None,
    ) -> Prediction:
        """Images, fields, Jacobian maps and (optionally) carried labels at any user ``times``.

        Args:
            times: (Q,) query times in the user's unit, inside or outside the observed span, any order.
            labels: optional baseline label map (*S), (1, *S) or (1, 1, *S), warped with nearest-neighbour sampling.
            batch_size: time points decoded and warped at once (bounds memory on large images).
            source: the appearance of the predicted images: ``"baseline"`` warps the first scan (the paper),
                ``"template"`` warps the subject template built by the fit, ``"nearest"`` carries the observed
                scans that bracket each time to it and blends them by time distance (for sequences whose texture
                changes, e.g. ultrasound speckle); None (default) uses :attr:`default_source`. The fields, Jacobian
                maps and labels do not depend on it.

        Returns:
            a :class:`Prediction` on the CPU.

        Raises:
            ValueError: for an empty ``times``, an unknown ``source``, or a source this subject does not hold.
        """
        times = self.query_times(times)
        if times.numel() == 0:
            raise ValueError("times must contain at least one time point.")
        source = self.check_source(source)
        if labels is not None:
            labels = torch.as_tensor(labels)
            while labels.ndim > self.model.spatial_dims and labels.shape[0] == 1:
                labels = labels[0]
            self.check_spatial_size(labels.shape, "labels")
            labels = labels.to(device=self.device, dtype=torch.float32)[None, None]
        images, ddfs, jacobians, warped_labels = [], [], [], []
        for chunk in times.split(batch_size):
            ddf = self.model.displacement(self.scaled_time(chunk))
            images.append(self.appearance(chunk, ddf, source).cpu())
            ddfs.append(ddf.cpu())
            jacobians.append(jacobian_determinant(ddf).cpu())
            if labels is not None:
                carried = self._label_warp(labels.expand(len(chunk), *labels.shape[1:]), ddf)
                warped_labels.append(carried.round().cpu())
        return Prediction(
            times=times,
            images=torch.cat(images),
            ddfs=torch.cat(ddfs),
            jacobians=torch.cat(jacobians),
            labels=torch.cat(warped_labels) if labels is not None else None,
            affine=self.affine.clone(),
            geometry=self.geometry,
        )

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
        caller loads: :meth:`load`, or MONAI's ``CheckpointLoader`` in the bundle's inference).

        Raises:
            ValueError: naming ``path``, if the stored geometry is malformed.
        """
        geometry = None
        if checkpoint.get("geometry") is not None:
            try:
                geometry = Geometry.from_dict(checkpoint["geometry"])
            except ValueError as error:
                raise ValueError(f"checkpoint {str(path)!r}: field 'geometry': {error}") from error
        images = {key: None if checkpoint.get(key) is None else checkpoint[key].to(map_location)
                  for key in ("scans", "template")}
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
        )

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "FittedSubject":
        """Load a file written by :meth:`save` with ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming the file, if it is not a fitted subject or its weights do not fit its recorded size.
        """
        checkpoint = read_checkpoint(path, SUBJECT_FORMAT, map_location)
        validate_subject_checkpoint(checkpoint, path)
        network = dict(checkpoint["network"])
        model = NODER(**network)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise ValueError(
                f"checkpoint {str(path)!r}: weights do not fit a model for images of size {network['spatial_size']}: {error}"
            ) from error
        baseline = checkpoint["baseline"]
        if list(baseline.shape[2:]) != list(network["spatial_size"]):
            raise ValueError(
                f"checkpoint {str(path)!r}: baseline of size {list(baseline.shape[2:])} does not match the recorded "
                f"image size {network['spatial_size']}."
            )
        subject = cls.from_checkpoint(checkpoint, model.to(map_location).eval(), path, map_location)
        subject.path = str(path)
        return subject


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_subject_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Check every field of a fitted-subject file before it is used; a ValueError names the file and the field.

    Required: ``network`` (dict with a 2-3 entry positive ``spatial_size``), ``state_dict`` (dict of tensors),
    ``baseline`` (finite tensor ``(1, 1, *spatial)``, its size checked against the weights when loading), ``times`` (>= 2 finite, strictly increasing numbers),
    ``affine`` (finite 4x4), ``intensity`` (finite ``lower`` < ``upper``), ``subject`` (string), ``fit_config``
    (dict), ``history`` (list). Optional: ``geometry`` and ``fitted_on`` (dicts, or None), ``scans``
    (``(T, 1, *spatial)``) and ``template`` (``(1, 1, *spatial)``) tensors or None.
    """
    where = f"checkpoint {str(path)!r}"
    required = ("network", "state_dict", "baseline", "times", "affine", "intensity", "subject", "fit_config", "history")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"{where}: field(s) {missing} missing; the file is damaged or not a fitted subject.")

    def bad(field: str, expected: str, value: Any) -> ValueError:
        shown = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        return ValueError(f"{where}: field {field!r} must be {expected}, got {shown}.")

    network = checkpoint["network"]
    if not isinstance(network, dict):
        raise bad("network", "a dictionary of NODER arguments", network)
    size = network.get("spatial_size")
    if not isinstance(size, (list, tuple)) or len(size) not in (2, 3) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise bad("network.spatial_size", "2 or 3 positive integers", size)
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("state_dict", "a non-empty dictionary of tensors", type(state).__name__)
    baseline = checkpoint["baseline"]
    if not isinstance(baseline, torch.Tensor) or baseline.ndim != 2 + len(size) or tuple(baseline.shape[:2]) != (1, 1):
        raise bad("baseline", f"a tensor of shape (1, 1, {', '.join('S' * len(size))})", baseline)
    if not bool(torch.isfinite(baseline).all()):
        raise ValueError(f"{where}: field 'baseline' contains NaN or Inf.")
    times = checkpoint["times"]
    if not isinstance(times, (list, tuple)) or len(times) < 2 or not all(_is_number(t) for t in times):
        raise bad("times", "a list of at least 2 finite numbers", times)
    if any(b <= a for a, b in zip(times, times[1:])):
        raise bad("times", "strictly increasing", times)
    affine = checkpoint["affine"]
    try:
        matrix = torch.as_tensor(affine, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise bad("affine", "a finite 4x4 matrix", affine) from None
    if matrix.shape != (4, 4) or not bool(torch.isfinite(matrix).all()):
        raise bad("affine", "a finite 4x4 matrix", affine)
    intensity = checkpoint["intensity"]
    if not isinstance(intensity, dict) or not all(_is_number(intensity.get(k)) for k in ("lower", "upper")) \
            or not intensity["upper"] > intensity["lower"]:
        raise bad("intensity", "{'lower': finite, 'upper': finite > lower}", intensity)
    if not isinstance(checkpoint["subject"], str):
        raise bad("subject", "a string", checkpoint["subject"])
    if not isinstance(checkpoint["fit_config"], dict):
        raise bad("fit_config", "a dictionary", checkpoint["fit_config"])
    if not isinstance(checkpoint["history"], list):
        raise bad("history", "a list", type(checkpoint["history"]).__name__)
    for key in ("geometry", "fitted_on"):
        if checkpoint.get(key) is not None and not isinstance(checkpoint[key], dict):
            raise bad(key, "a dictionary or None", checkpoint[key])
    for key, count in (("scans", len(times)), ("template", 1)):
        image = checkpoint.get(key)
        expected = (count, 1, *size)
        if image is not None and (not isinstance(image, torch.Tensor) or tuple(image.shape) != expected):
            raise bad(key, f"None or a tensor of shape {expected}", image)
        if image is not None and not bool(torch.isfinite(image).all()):
            raise ValueError(f"{where}: field {key!r} contains NaN or Inf.")
