"""How sure a fitted subject's predictions are: an ensemble of trajectory members and a calibrated error model.

Each member is the subject's fitted trajectory fine-tuned without one of its observed scans (a leave-one-visit-out
resample; :func:`~noder_monai.engines.fit_ensemble` fits them). At a query time every member predicts the image
(with the subject's appearance, :mod:`~noder_monai.model.appearance`) and the field; the members' spread is the
uncertainty that the data leave in the trajectory. The predictive standard deviation of the image is

``std(x, t) = sqrt(s^2 spread(x, t)^2 + e^2 |grad I(x, t)|^2 d(t)^2 + k^2 sum_j w_j(t)^2 sigma_j^2)``

- ``spread``: the members' per-voxel standard deviation of the predicted image;
- ``|grad I| d``: the error a misalignment that grows with the distance ``d(t)`` to the nearest observed time (in
  fractions of the observed span) makes at an edge of the predicted image ``I`` (gradient per voxel); it covers the
  error every member shares, which their spread does not show;
- the sum: the noise the prediction carries from the observed scans it combines (weights ``w_j``, noise
  ``sigma_j`` over the foreground: :func:`foreground_noise`).

The weights are calibrated on the subject's own scans (:func:`calibrate`, :func:`fit_error_model`): the member
fitted without scan ``k`` predicts it; ``s >= 1`` and ``e >= 0`` maximise the Gaussian likelihood of these residuals
(the left-out scan's own noise added: it is a noisy observation of the image the interval is for), then the three
terms are scaled together so that the central 90 % intervals (``+- 1.645 std``) hold 90 % of the left-out scans'
foreground voxels (:func:`calibrate_scale`), or left as fitted where they hold more (the members start from the
subject's fit, which saw the scan each leaves out, so their residuals understate the error: the intervals are never
made narrower than the likelihood's fit). ``s`` also scales the members' spread of ``log det J`` and of
structure volumes.

Nothing here imports the training code. The functions that take a subject take a
:class:`~noder_monai.model.FittedSubject` (its methods are called; the type is not imported, as that module imports
this one).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from noder_monai.functional import compose_displacements, jacobian_determinant
from noder_monai.io import voxel_volume_mm3
from noder_monai.model.appearance import informative, noise_std

__all__ = ["COVERAGE", "MEMBER_PREFIXES", "MIN_JACOBIAN", "Z90", "Ensemble", "calibrate", "calibrate_scale", "coverage_at",
           "edge_term", "fit_error_model", "foreground", "foreground_noise", "interpolation_variance", "jacobian_volumes", "member_spread", "member_state",
           "prediction_variance", "structure_volumes", "time_distance"]

COVERAGE = 0.9
"""Nominal coverage of every interval and band (central, two-sided)."""

Z90 = 1.6448536269514722
"""The standard normal's 95 % quantile: ``mean +- Z90 * std`` is a central 90 % interval."""

MIN_JACOBIAN = 1e-3
"""Jacobian determinants are clamped to at least this before their logarithm is taken."""

MEMBER_PREFIXES = ("dynamics.", "decoder.")
"""The weights a member changes (the encoder and the initial state are the subject's)."""


def member_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a :class:`~noder_monai.networks.NODER` state dict that a member stores (detached, on the CPU)."""
    return {key: value.detach().cpu().clone() for key, value in state_dict.items() if key.startswith(MEMBER_PREFIXES)}


def foreground(scans: torch.Tensor, threshold: float = 0.1, window: int = 3) -> torch.Tensor:
    """Where the subject's anatomy is: the mean of the normalised scans ``(T, 1, *S)`` (0 at the intensity
    mapping's lower and 1 at its upper percentile), box-averaged over ``window`` voxels, above ``threshold``.

    Returns:
        ``(*S)`` bool; every voxel when no voxel passes (e.g. an image without background).
    """
    mean = scans.to(torch.float32).mean(dim=0, keepdim=True)
    pool = F.avg_pool3d if scans.ndim == 5 else F.avg_pool2d
    mask = pool(mean, window, 1, window // 2, count_include_pad=False)[0, 0] > threshold
    return mask if bool(mask.any()) else torch.ones_like(mask)


def coverage_at(residual: torch.Tensor, spread: torch.Tensor, variance: torch.Tensor, scale: float,
                coverage: float = COVERAGE) -> float:
    """The fraction of ``residual`` (N,) inside the central ``coverage`` intervals of standard deviation
    ``sqrt(scale^2 spread^2 + variance)`` (all (N,))."""
    z = math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(coverage, dtype=torch.float64)))
    squared = (residual.to(torch.float64) / z) ** 2
    return float((squared <= scale**2 * spread.to(torch.float64) ** 2 + variance.to(torch.float64)).double().mean())


def calibrate_scale(residual: torch.Tensor, spread: torch.Tensor, variance: torch.Tensor,
                    coverage: float = COVERAGE, max_scale: float = 1e4) -> tuple[float, float]:
    """The scale ``s`` of the members' spread whose central intervals hold ``coverage`` of the residuals.

    A residual ``r`` is inside when ``|r| <= z * sqrt(s^2 spread^2 + variance)``, ``z`` the standard normal quantile
    of ``(1 + coverage) / 2``; the fraction inside grows with ``s``, which is found by bisection.

    Args:
        residual, spread, variance: (N,) per voxel: prediction minus observation, the members' standard deviation,
            the variance that does not scale (the noise of the prediction and of the observation).
        coverage: the nominal coverage, in (0, 1).
        max_scale: the largest scale returned.

    Returns:
        ``(s, achieved coverage at s)``: ``s = 0`` when the noise alone covers enough, ``max_scale`` when not even
        that does.

    Raises:
        ValueError: for inputs of different lengths, none, or a coverage outside (0, 1).
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage!r}.")
    if residual.numel() == 0 or not residual.shape == spread.shape == variance.shape:
        raise ValueError(f"residual, spread and variance must be (N,) of one length N >= 1, got "
                         f"{tuple(residual.shape)}, {tuple(spread.shape)} and {tuple(variance.shape)}.")

    def inside(scale: float) -> float:
        return coverage_at(residual, spread, variance, scale, coverage)

    if inside(0.0) >= coverage:
        return 0.0, inside(0.0)
    if inside(max_scale) < coverage:
        return max_scale, inside(max_scale)
    low, high = 0.0, max_scale
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if inside(middle) >= coverage else (middle, high)
    return high, inside(high)


def jacobian_volumes(inverse: torch.Tensor, labels: torch.Tensor, values: Sequence[int],
                     voxel_mm3: float) -> torch.Tensor:
    """Structure volumes at one time from the Jacobian determinant of the forward map, integrated over the
    baseline label map: ``vol_l(t) = sum over baseline voxels y of label l of det J(phi_t)(y) * voxel volume``, with
    ``phi_t(y) = y + inverse(y)`` carrying the baseline to time ``t``. This is the volume of the warped label without
    counting voxels (each baseline voxel counts by how much its volume changes), so it varies smoothly in time.

    Args:
        inverse: ``(1, D, *S)`` displacement of the forward map (the inverse of the pull-back field), in voxels.
        labels: ``(*S)`` integer baseline label map.
        values: the label values to measure.
        voxel_mm3: one voxel's volume in mm^3.

    Returns:
        ``(len(values),)`` float64 volumes in mm^3.
    """
    jacobian = jacobian_determinant(inverse)[0, 0].to(torch.float64)
    return torch.stack([jacobian[labels == value].sum() * voxel_mm3 for value in values]) if values \
        else torch.zeros(0, dtype=torch.float64)


@dataclasses.dataclass
class Ensemble:
    """A subject's uncertainty ensemble (stored as plain values in the fitted file, ``weights_only`` loadable).

    Attributes:
        left_out: for each member, the index of the observed scan it was fitted without (1 .. T - 1).
        states: for each member, its weights that differ from the subject's (:func:`member_state`).
        scale: the calibrated scale ``s`` of the members' spread (module docstring).
        edge_scale: the calibrated weight ``e`` of the edge term (module docstring).
        noise_scale: the calibrated factor ``k`` of the carried noise (module docstring).
        coverage: the fraction of the left-out scans' foreground voxels inside their 90 % intervals at ``scale``.
        epochs: fine-tuning epochs of each member.
        level: resolution level of the fine-tuning (image voxels per level voxel).
    """

    left_out: list[int]
    states: list[dict[str, torch.Tensor]]
    scale: float
    edge_scale: float
    noise_scale: float
    coverage: float
    epochs: int
    level: int

    def to_dict(self) -> dict:
        return {"left_out": list(self.left_out), "states": [dict(state) for state in self.states],
                "scale": float(self.scale), "edge_scale": float(self.edge_scale),
                "noise_scale": float(self.noise_scale), "coverage": float(self.coverage), "epochs": int(self.epochs),
                "level": int(self.level)}

    @classmethod
    def from_dict(cls, state: Mapping, weights: Mapping[str, torch.Tensor], observed: int) -> "Ensemble":
        """The ensemble of :meth:`to_dict`'s dictionary, checked against the subject's ``weights`` (state dict) and
        its number of ``observed`` scans.

        Raises:
            ValueError: naming the entry: a missing entry, a left-out index outside 1 .. observed - 1, member weights the network
                does not have (or of another shape, or not finite), a negative or non-finite scale, coverage outside
                [0, 1], or as many members as left-out indices missing.
            TypeError: a mistyped entry.
        """
        missing = [key for key in ("left_out", "states", "scale", "edge_scale", "noise_scale", "coverage", "epochs",
                                    "level") if key not in state]
        if missing:
            raise ValueError(f"missing entries {missing}")
        ensemble = cls(left_out=[int(k) for k in state["left_out"]], states=[dict(s) for s in state["states"]],
                       scale=float(state["scale"]), edge_scale=float(state["edge_scale"]),
                       noise_scale=float(state["noise_scale"]), coverage=float(state["coverage"]), epochs=int(state["epochs"]),
                       level=int(state["level"]))
        if len(ensemble.states) != len(ensemble.left_out) or len(ensemble.states) < 2:
            raise ValueError(f"needs at least 2 members and one left-out index per member, got "
                             f"{len(ensemble.states)} members and {len(ensemble.left_out)} indices")
        if any(not 1 <= k < observed for k in ensemble.left_out):
            raise ValueError(f"left_out {ensemble.left_out} must index observed scans 1 .. {observed - 1}")
        scales = (ensemble.scale, ensemble.edge_scale, ensemble.noise_scale)
        if not (all(math.isfinite(v) and v >= 0 for v in scales) and 0 <= ensemble.coverage <= 1):
            raise ValueError(f"scale, edge_scale and noise_scale must be finite and >= 0 and coverage in [0, 1], got {scales} and "
                             f"{ensemble.coverage!r}")
        for index, member in enumerate(ensemble.states):
            for key, value in member.items():
                if not key.startswith(MEMBER_PREFIXES) or key not in weights:
                    raise ValueError(f"member {index}: weight {key!r} is not one of the network's {MEMBER_PREFIXES}")
                if not isinstance(value, torch.Tensor) or value.shape != weights[key].shape:
                    raise ValueError(f"member {index}: weight {key!r} must have shape {tuple(weights[key].shape)}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"member {index}: weight {key!r} contains NaN or Inf")
        return ensemble

    def summary(self) -> str:
        """One line for logs."""
        return (f"uncertainty: {len(self.states)} members (scans {self.left_out} left out), scales {self.scale:.3g} (spread), "
                f"{self.edge_scale:.3g} (edges) and {self.noise_scale:.3g} (noise), "
                f"90% intervals hold {100 * self.coverage:.1f}% of the left-out scans' foreground voxels")


def foreground_noise(subject: FittedSubject) -> torch.Tensor:
    """``(T,)`` float64: each observed scan's noise standard deviation over the :func:`foreground` (normalised
    intensities; :func:`~noder_monai.model.appearance.noise_std`), 0 for scans the file does not hold."""
    if subject.scans is None:
        return torch.tensor([noise_std(subject.baseline[0])] + [0.0] * (len(subject.times) - 1), dtype=torch.float64)
    mask = foreground(subject.scans)
    return torch.tensor([noise_std(scan, mask) for scan in subject.scans], dtype=torch.float64)


def interpolation_variance(ddf: torch.Tensor) -> torch.Tensor:
    """``(N, 1, *S)``: the factor by which linear interpolation at ``x + ddf(x)`` (``ddf`` ``(N, D, *S)`` in
    voxels) scales the variance of white noise: ``prod_d ((1 - f_d)^2 + f_d^2)``, ``f_d`` the fractional part of the
    displacement along axis ``d`` (1 at whole-voxel shifts, down to ``2^-D`` halfway between voxels)."""
    fraction = ddf - ddf.floor()
    return ((1 - fraction) ** 2 + fraction**2).prod(dim=1, keepdim=True)


def prediction_variance(subject: FittedSubject, times: torch.Tensor, ddf: torch.Tensor, source: str,
                        leave_out: int | None = None) -> torch.Tensor:
    """``(Q, 1, *S)`` the noise variance (input intensity units squared) that the prediction at each user time
    (fields ``ddf`` (Q, D, *S) of the subject or member that predicts) carries from the observed scans it combines:
    ``sum_k w_k^2 sigma_k^2 c_k(x)`` with the appearance weights (:meth:`FittedSubject.appearance_weights`), the
    scans' :func:`foreground_noise` and ``c_k`` the :func:`interpolation_variance` of scan ``k``'s composed map to
    the time (1 for a scan observed at that time). The template source counts as an average of the scans carried
    through the query time's field."""
    units = (subject.intensity.upper - subject.intensity.lower) ** 2
    noise = foreground_noise(subject) ** 2 * units
    observed = subject.times.tolist()
    out = []
    for index, time in enumerate(times.tolist()):
        weights = subject.appearance_weights(source, time, leave_out)
        field = ddf[index:index + 1]
        total = torch.zeros_like(field[:, :1])
        for k in (weights > 0).nonzero().flatten().tolist():
            if observed[k] == time:
                total += float(weights[k] ** 2 * noise[k])
                continue
            composed = field if k == 0 or source == "template" else \
                compose_displacements(subject.observed_inverse()[k:k + 1], field)
            total += float(weights[k] ** 2 * noise[k]) * interpolation_variance(composed)
        out.append(total)
    return torch.cat(out)


def _member_fields(member: FittedSubject, times: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # a member's fold corrections are part of its spread, not news for the user
        warnings.simplefilter("ignore", UserWarning)
        return member.fields(times)[0]


def time_distance(subject: FittedSubject, time: float, leave_out: int | None = None) -> float:
    """The distance from user ``time`` to the nearest observed scan that is not constant (nor ``leave_out``), in
    fractions of the observed span."""
    times = subject.times.tolist()
    usable = informative(subject.scans) if subject.scans is not None else [True] + [False] * (len(times) - 1)
    nearest = min(abs(time - t) for k, (t, use) in enumerate(zip(times, usable)) if use and k != leave_out)
    return nearest / (times[-1] - times[0])


def edge_term(images: torch.Tensor, distance: float) -> torch.Tensor:
    """``|grad I|^2 d^2``: the squared gradient magnitude (central differences, per voxel) of ``images``
    ``(Q, 1, *S)`` times the squared time ``distance``."""
    gradients = torch.gradient(images.to(torch.float32), dim=tuple(range(2, images.ndim)))
    return sum(g**2 for g in gradients) * distance**2


def member_spread(subject: FittedSubject, times: torch.Tensor, ddf: torch.Tensor,
                  source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibrated predictive standard deviations at user ``times`` (Q,) of the subject's prediction with fields
    ``ddf`` (Q, D, *S) (module docstring).

    Returns:
        ``(image_std, log_jacobian_std)``, each ``(Q, 1, *S)`` on the CPU; the image's in input intensity units.

    Raises:
        ValueError: if the subject has no ensemble.
    """
    ensemble = subject.check_uncertainty()
    images, logs = [], []
    for index in range(len(ensemble.states)):
        member = subject.member(index)
        field = _member_fields(member, times)
        images.append(member.appearance(times, field, source).cpu())
        logs.append(jacobian_determinant(field).clamp_min(MIN_JACOBIAN).log().cpu())
        del member, field
    images = torch.stack(images)
    center = images.mean(dim=0)
    edges = torch.cat([edge_term(center[q:q + 1], time_distance(subject, t)) for q, t in enumerate(times.tolist())])
    variance = prediction_variance(subject, times, ddf, source).cpu()
    image_std = (ensemble.scale**2 * images.var(dim=0) + ensemble.edge_scale**2 * edges
                 + ensemble.noise_scale**2 * variance).sqrt()
    return image_std, ensemble.scale * torch.stack(logs).std(dim=0)


def fit_error_model(residual: torch.Tensor, spread2: torch.Tensor, edge2: torch.Tensor, noise2: torch.Tensor,
                    observation2: torch.Tensor, coverage: float = COVERAGE,
                    samples: int = 200_000) -> tuple[float, float, float, float]:
    """Calibrate ``var = k^2 (s^2 spread2 + e^2 edge2 + noise2)`` on residuals against noisy observations.

    ``s`` (at least 1: the members' spread is taken at least at face value) and ``e`` (at least 0) maximise the
    Gaussian likelihood of ``residual`` with variance ``var + observation2`` (a grid of 10^-3 .. 10^3, on at most
    ``samples`` evenly spaced voxels); then ``k >= 1`` is the smallest factor with which the central intervals of that variance
    plus ``observation2`` hold ``coverage`` of the residuals (:func:`calibrate_scale`). ``k`` does not go below 1
    because the residuals understate the error at times no fit has seen: each member starts from the subject's fit,
    which saw the scan the member leaves out.

    Args:
        residual: (N,) prediction minus observation, per voxel.
        spread2, edge2: (N,) the members' variance and the edge term (:func:`edge_term`).
        noise2: (N,) the noise variance the prediction carries (:func:`prediction_variance`).
        observation2: (N,) the observation's own noise variance.

    Returns:
        ``(k s, k e, k, achieved coverage)``.
    """
    step = max(1, residual.numel() // samples)
    r2, a, b, c, d = (x[::step].to(torch.float64) for x in (residual**2, spread2, edge2, noise2, observation2))
    grid = torch.logspace(-3, 3, 31, dtype=torch.float64).tolist()
    best = (math.inf, 1.0, 0.0)
    for s in [v for v in grid if v >= 1]:
        for e in [0.0, *grid]:
            total = (s**2 * a + e**2 * b + c + d).clamp_min(1e-30)
            best = min(best, (float((total.log() + r2 / total).mean()), s, e))
    _, s, e = best
    model = (s**2 * spread2 + e**2 * edge2 + noise2).sqrt()
    factor, achieved = calibrate_scale(residual, model, observation2, coverage)
    if factor < 1:  # never narrower than the likelihood's fit (the members saw the scan they leave out before)
        factor, achieved = 1.0, coverage_at(residual, model, observation2, 1.0, coverage)
    return factor * s, factor * e, factor, achieved


@torch.inference_mode()
def calibrate(subject: FittedSubject, ensemble: Ensemble) -> tuple[float, float, float, float]:
    """The weights ``(s, e, k)`` of ``ensemble``'s error model for ``subject`` and the coverage they reach
    (:func:`fit_error_model`), from the left-out scans: the member fitted without scan ``k`` predicts it (without it
    in the appearance either), every member's prediction gives the spread and the edge term, the prediction's noise
    is the noise it carries, and scan ``k``'s own noise is the observation's. Voxels outside the :func:`foreground`
    do not count."""
    holder = copy.copy(subject)
    holder.ensemble = ensemble
    source = subject.check_source(None)
    mask = foreground(subject.scans)[None].to(subject.device)
    raw = subject.intensity.inverse(subject.scans)
    noise = foreground_noise(subject) * (subject.intensity.upper - subject.intensity.lower)
    members = [holder.member(index) for index in range(len(ensemble.states))]
    columns: list[list[torch.Tensor]] = [[], [], [], [], []]
    for index, left in enumerate(ensemble.left_out):
        time = subject.times[left:left + 1]
        fields = [_member_fields(member, time) for member in members]
        predictions = torch.stack([member.appearance(time, field, source, left)[0]
                                   for member, field in zip(members, fields)])
        residual = (predictions[index] - raw[left])[mask]
        carried = prediction_variance(members[index], time, fields[index], source, left)[0][mask]
        edges = edge_term(predictions.mean(dim=0)[None], time_distance(subject, float(time), left))[0]
        for column, value in zip(columns, (residual, predictions.var(dim=0)[mask], edges[mask],
                                           carried,
                                           torch.full_like(residual, float(noise[left]) ** 2))):
            column.append(value.cpu())
    return fit_error_model(*(torch.cat(column) for column in columns))


@torch.inference_mode()
def structure_volumes(subject: FittedSubject, times: torch.Tensor, labels: torch.Tensor,
                      uncertainty: bool) -> dict:
    """:meth:`FittedSubject.structure_volumes`: :func:`jacobian_volumes` of every non-zero label of ``labels``
    (*S) at user ``times`` (Q,), by the subject's fit and, with ``uncertainty``, by every member, whose spread of
    ``log`` volume times the calibrated scale ``s`` gives the central 90 % band ``volume * exp(+- 1.645 s spread)``
    (positive, and the fit's volume is its median)."""
    values = [int(v) for v in torch.unique(labels).tolist() if v != 0]
    voxel_mm3 = voxel_volume_mm3(subject.affine)

    def volumes(fitted: FittedSubject) -> torch.Tensor:
        inverses = fitted.model.inverse_displacements(subject.scaled_time(times))
        return torch.stack([jacobian_volumes(inverse, labels, values, voxel_mm3).cpu() for inverse in inverses])

    result = {"labels": values, "volume": volumes(subject)}
    if uncertainty:
        members = torch.stack([volumes(subject.member(index)) for index in range(len(subject.ensemble.states))])
        half = Z90 * subject.ensemble.scale * members.clamp_min(1e-12).log().std(dim=0)
        result.update(lower=result["volume"] * (-half).exp(), upper=result["volume"] * half.exp())
    return result
