"""The appearance of predicted images, chosen per subject from its own scans.

A prediction at time ``t`` is a combination of the observed scans, each carried to ``t`` through one composed map
(``I_k o phi_k^-1 o phi_t``: one displacement ``ddf_t + inverse_k(x + ddf_t)``, so one interpolation per scan), with
weights ``w_k(t) ∝ exp(-((t - t_k) / (h * span))^2 / 2) / sigma_k^2``: a Gaussian kernel in time of bandwidth ``h``
(a fraction of the observed span; ``inf`` weighs every scan alike) over each scan's noise variance ``sigma_k^2``
(:func:`noise_std`). Small ``h`` keeps the texture and sharpness of the nearest scans; large ``h`` averages their
noise away but carries far scans through the fitted maps, whose errors blur fine anatomy. Which is better depends
on the subject (anatomy, noise, how well its fields fit), so :func:`select_source` decides by leave-one-visit-out
validation: each observed scan after the first is predicted from the others by every candidate (the first scan
warped, the two bracketing scans blended, the legacy subject template, and the kernel family) and the candidate
with the lowest mean validation NRMSE is used.

Magnitude images (non-negative, with a background of pure Rician noise, as MRI magnitude data) are averaged in
power and the background's noise power is subtracted (:func:`magnitude_noise_floor`): averaging magnitudes keeps the
noise floor (about 1.25 sigma where there is no signal), while ``sqrt(sum_k w_k I_k^2 - floor)`` estimates the
noise-free magnitude (the power-averaging bias correction of Gudbjartsson and Patz, Magn. Reson. Med. 34(6), 1995).

Everything here works on tensors (the fitted maps are passed in) and imports nothing from the training code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from noder_monai.functional import compose_displacements, warp_border

__all__ = [
    "BANDWIDTHS",
    "SourceChoice",
    "candidate_names",
    "candidate_weights",
    "carry_scans",
    "combine",
    "informative",
    "magnitude_noise_floor",
    "noise_std",
    "select_source",
    "time_weights",
]

BANDWIDTHS = (0.1, 0.2, 0.35, 0.6, math.inf)
"""Kernel bandwidths tried by :func:`select_source`, in fractions of the observed span (``inf``: equal weights)."""

def noise_std(image: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Standard deviation of the white noise of one image ``(1, *S)`` (2D or 3D), robust to anatomy.

    The image is filtered by the separable second difference ``[1, -2, 1]`` along every axis, which removes
    linear trends and multiplies the variance of white noise by ``6^D``; the median absolute deviation of the result,
    times 1.4826 and over ``sqrt(6^D)``, is then the noise standard deviation (Immerkaer, Comput. Vis. Image Underst.
    64(2), 1996, with a robust scale in place of the mean absolute value so that edges do not count).

    Args:
        image: ``(1, *S)``.
        mask: ``(*S)`` bool: estimate over these voxels only (e.g. the foreground of magnitude images, whose
            background noise is Rayleigh, narrower than the Rician noise on the anatomy); None: every voxel.

    Raises:
        ValueError: if ``image`` is not ``(1, *S)`` with 2 or 3 spatial axes of at least 3 voxels.
    """
    if image.ndim not in (3, 4) or image.shape[0] != 1 or min(image.shape[1:]) < 3:
        raise ValueError(f"noise_std: image must be (1, *S) with 2 or 3 axes of >= 3 voxels, got {tuple(image.shape)}.")
    x = image.to(torch.float64)
    for axis in range(1, x.ndim):
        n = x.shape[axis]
        x = x.narrow(axis, 0, n - 2) - 2 * x.narrow(axis, 1, n - 2) + x.narrow(axis, 2, n - 2)
    values = x.flatten() if mask is None else x[0][mask[(slice(1, -1),) * mask.ndim].to(x.device)]
    if values.numel() == 0:
        values = x.flatten()
    mad = (values - values.median()).abs().median()
    return float(1.4826 * mad / math.sqrt(6 ** (image.ndim - 1)))


def informative(scans: torch.Tensor) -> list[bool]:
    """Which of the scans ``(T, 1, *S)`` carry an image: a constant scan (blank, all one value) is left out of every
    combination and of the validation, as it is of the fit's similarity."""
    flat = scans.flatten(1)
    return (flat.amax(dim=1) > flat.amin(dim=1)).tolist()


def magnitude_noise_floor(scans: torch.Tensor, noise: Sequence[float], window: int = 5,
                          min_fraction: float = 0.05) -> float:
    """Mean noise power ``E[I^2]`` of the pure-noise background of magnitude images, or 0 if they are not such.

    Background voxels are those whose local mean (``window``-wide box) is below 3 noise standard deviations and
    between 1.5 and 2.5 local standard deviations (a Rayleigh distribution, the magnitude of noise with no signal,
    has mean / std = 1.91). The images count as magnitude images when no voxel is negative and at least
    ``min_fraction`` of every scan is such background; the floor is then the median over scans of the background's
    mean power (``2 sigma^2`` for Rician noise).

    Args:
        scans: ``(T, 1, *S)`` in the input's intensity units (zero means no signal).
        noise: each scan's noise standard deviation (:func:`noise_std`), same units.

    Returns:
        the floor in squared intensity units, 0 for signed images or images without such a background.
    """
    if float(scans.min()) < 0:
        return 0.0
    pool = F.avg_pool3d if scans.ndim == 5 else F.avg_pool2d
    powers = []
    for image, std in zip(scans.to(torch.float32), noise):
        mean = pool(image[None], window, 1, window // 2, count_include_pad=False)[0]
        square = pool(image[None] ** 2, window, 1, window // 2, count_include_pad=False)[0]
        local_std = (square - mean**2).clamp_min(0).sqrt()
        background = (mean < 3 * std) & (mean > 1.5 * local_std) & (mean < 2.5 * local_std)
        if float(background.float().mean()) < min_fraction:
            return 0.0
        powers.append(float((image**2)[background].mean()))
    return float(torch.tensor(powers).median())


def carry_scans(scans: torch.Tensor, inverse: torch.Tensor | None, ddf: torch.Tensor,
                observed: Sequence[float], time: float, used: Sequence[bool]) -> list[torch.Tensor | None]:
    """The observed scans that are ``used``, each carried to one query time through one composed map
    (``I_k o phi_k^-1 o phi_t``: displacement ``ddf + inverse_k(x + ddf)``, one interpolation).

    Args:
        scans: ``(T, 1, *S)`` observed scans.
        inverse: ``(T, D, *S)`` displacements of the inverse maps of the observed times (voxels); may be None when
            only the first scan is used (the first time's map is the identity).
        ddf: ``(1, D, *S)`` displacement at the query time (voxels).
        observed: the ``T`` observed times; a scan observed exactly at ``time`` is returned unwarped.
        time: the query time, same unit as ``observed``.
        used: which scans to carry (the others' entries are None).

    Returns:
        ``T`` entries of ``(1, *S)`` or None.
    """
    carried: list[torch.Tensor | None] = []
    for index, use in enumerate(used):
        if not use:
            carried.append(None)
        elif float(observed[index]) == time:
            carried.append(scans[index])
        else:
            composed = ddf if index == 0 else compose_displacements(inverse[index:index + 1], ddf)
            carried.append(warp_border(scans[index:index + 1], composed)[0])
    return carried


def time_weights(time: float, observed: Sequence[float], bandwidth: float, noise: Sequence[float]) -> torch.Tensor:
    """Normalised weights ``(T,)`` of the observed scans at ``time`` (see the module docstring).

    Args:
        time: query time.
        observed: the scans' times (any order), same unit.
        bandwidth: kernel width in fractions of the observed span (> 0; ``inf`` for equal weights).
        noise: each scan's noise standard deviation (> 0).
    """
    times = torch.as_tensor(observed, dtype=torch.float64)
    span = float(times.max() - times.min())
    if math.isinf(bandwidth):
        kernel = torch.ones_like(times)
    else:
        kernel = torch.exp(-0.5 * ((time - times) / (bandwidth * span)) ** 2)
        if float(kernel.sum()) == 0.0:  # far outside the span every weight underflows: keep the closest scans
            kernel = (times - time).abs().eq((times - time).abs().min()).to(torch.float64)
    weights = kernel / torch.as_tensor(noise, dtype=torch.float64).clamp_min(1e-12) ** 2
    return weights / weights.sum()


def combine(carried: Sequence[torch.Tensor | None], weights: torch.Tensor, floor: float = 0.0,
            to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
            from_input: Callable[[torch.Tensor], torch.Tensor] | None = None, subtract: bool = True) -> torch.Tensor:
    """Weighted combination of carried scans ``(1, *S)``; entries that are None or have zero weight are skipped.

    With ``floor > 0`` the scans are averaged in power in the input's units (``to_input`` / ``from_input`` map the
    normalised intensities there and back) and ``floor`` is subtracted (``subtract=False`` keeps it, which is what a
    noisy held-out scan is compared with during validation).
    """
    used = [(float(w), image) for w, image in zip(weights, carried) if image is not None and float(w) > 0]
    total = sum(w for w, _ in used)
    if floor > 0:
        power = sum(w * to_input(image).clamp_min(0) ** 2 for w, image in used) / total
        return from_input((power - floor).clamp_min(0).sqrt() if subtract else power.sqrt())
    return sum(w * image for w, image in used) / total


def _name(bandwidth: float) -> str:
    return f"weighted:{'inf' if math.isinf(bandwidth) else f'{bandwidth:g}'}"


def candidate_names(with_template: bool = True) -> tuple[str, ...]:
    """The candidates :func:`select_source` validates: ``baseline``, ``nearest``, ``template`` (when the legacy
    template is comparable, i.e. without a noise floor) and ``weighted:<h>`` for every bandwidth of
    :data:`BANDWIDTHS`."""
    return ("baseline", "nearest", *(("template",) if with_template else ()), *map(_name, BANDWIDTHS))


def candidate_weights(name: str, time: float, observed: Sequence[float], noise: Sequence[float],
                      available: Sequence[bool] | None = None) -> torch.Tensor:
    """Weights ``(T,)`` of candidate ``name`` (``baseline``, ``nearest`` or ``weighted:<h>``) at ``time``, over the
    observed scans that are ``available`` (all by default; the others get weight 0).

    ``baseline``: the first scan alone. ``nearest``: the two scans bracketing ``time``, blended linearly in time
    (before the first and after the last available scan, that scan alone). ``weighted:<h>``: :func:`time_weights`.

    Raises:
        ValueError: for an unknown name, or ``baseline`` without the first scan available.
    """
    observed = [float(t) for t in observed]
    available = [True] * len(observed) if available is None else list(available)
    weights = torch.zeros(len(observed), dtype=torch.float64)
    kept = [k for k, keep in enumerate(available) if keep]
    if name == "baseline":
        if not available[0]:
            raise ValueError("candidate_weights: 'baseline' needs the first scan.")
        weights[0] = 1.0
    elif name == "nearest":
        before = [k for k in kept if observed[k] <= time]
        after = [k for k in kept if observed[k] > time]
        if before and after:
            b, a = before[-1], after[0]
            fraction = (time - observed[b]) / (observed[a] - observed[b])
            weights[b], weights[a] = 1 - fraction, fraction
        else:
            weights[(before or after)[-1 if before else 0]] = 1.0
    elif name.startswith("weighted:"):
        bandwidth = float(name.split(":", 1)[1])
        weights[kept] = time_weights(time, [observed[k] for k in kept], bandwidth, [noise[k] for k in kept])
    else:
        raise ValueError(f"candidate_weights: unknown candidate {name!r}; expected baseline, nearest or weighted:<h>.")
    return weights


@dataclasses.dataclass
class SourceChoice:
    """What :func:`select_source` chose for one subject, and why (stored as plain values in the fitted file).

    Attributes:
        source: the chosen candidate (``baseline``, ``nearest``, ``template`` or ``weighted:<h>``).
        noise_floor: noise power (input units squared) subtracted from power averages; 0: linear averages.
        noise_std: each observed scan's noise standard deviation (normalised intensities).
        errors: candidate -> mean validation NRMSE (each scan after the first predicted from the others).
        references: the same for ``linear interpolation`` and ``nearest scan`` (intensity-only methods).
    """

    source: str
    noise_floor: float
    noise_std: list[float]
    errors: dict[str, float]
    references: dict[str, float]

    @property
    def beats_references(self) -> bool:
        """Whether the chosen candidate validated better than both intensity-only references."""
        return all(self.errors[self.source] < value for value in self.references.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping) -> "SourceChoice":
        """The choice of :meth:`to_dict`'s dictionary.

        Raises:
            ValueError: an unknown source, a negative or non-finite floor or noise level, a non-finite error.
            KeyError / TypeError: a missing or mistyped entry.
        """
        choice = cls(source=str(state["source"]), noise_floor=float(state["noise_floor"]),
                     noise_std=[float(v) for v in state["noise_std"]],
                     errors={str(k): float(v) for k, v in state["errors"].items()},
                     references={str(k): float(v) for k, v in state["references"].items()})
        if choice.source not in candidate_names(with_template=True):
            raise ValueError(f"source must be one of {candidate_names(True)}, got {choice.source!r}")
        values = [choice.noise_floor, *choice.noise_std, *choice.errors.values(), *choice.references.values()]
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError("noise_floor, noise_std, errors and references must be finite, non-negative numbers")
        return choice

    def summary(self) -> str:
        """One line for logs: the choice, its validation NRMSE and the references'."""
        if not self.errors:
            return f"appearance {self.source} (fewer than 3 non-constant scans: none left out to validate a choice)"
        refs = ", ".join(f"{name} {value:.4f}" for name, value in self.references.items())
        flag = "" if self.beats_references else " WARNING: not better than an intensity-only method"
        return f"appearance {self.source} (validation NRMSE {self.errors[self.source]:.4f}; {refs}){flag}"


def _nrmse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(prediction - target) / torch.linalg.vector_norm(target).clamp_min(1e-12))


@torch.inference_mode()
def select_source(scans: torch.Tensor, times: Sequence[float], ddfs: torch.Tensor, inverse: torch.Tensor,
                  to_input: Callable[[torch.Tensor], torch.Tensor],
                  from_input: Callable[[torch.Tensor], torch.Tensor]) -> SourceChoice:
    """Choose the appearance of a subject's predictions by leave-one-visit-out validation (module docstring).

    Args:
        scans: ``(T, 1, *S)`` observed scans, normalised intensities, T >= 3.
        times: ``(T,)`` their times, strictly increasing.
        ddfs: ``(T, D, *S)`` fitted displacement at each observed time (zero at the first).
        inverse: ``(T, D, *S)`` displacements of the inverse maps.
        to_input / from_input: the subject's intensity mapping (normalised -> input units and back).

    Returns:
        the :class:`SourceChoice`; errors are NRMSEs in input units, averaged over the validated scans.

    Raises:
        ValueError: a constant first scan, or fewer than 3 non-constant scans (nothing is left to validate a scan
            against but the baseline); constant scans (:func:`informative`) are otherwise left out.
    """
    count = scans.shape[0]
    usable = informative(scans)
    if sum(usable) < 3 or not usable[0]:
        raise ValueError(f"select_source: needs the first scan and at least 3 non-constant observed scans, got "
                         f"{sum(usable)} of {count}.")
    targets = [k for k in range(1, count) if usable[k]]
    times = [float(t) for t in times]
    noise = [noise_std(scan) for scan in scans]
    raw = to_input(scans)
    floor = magnitude_noise_floor(raw, [noise_std(scan) for scan in raw])
    names = candidate_names(with_template=floor == 0)
    errors = {name: 0.0 for name in names}
    references = {"linear interpolation": 0.0, "nearest scan": 0.0}
    pulled = warp_border(scans, inverse) if "template" in names else None
    for k in targets:
        available = [j != k and usable[j] for j in range(count)]
        carried = carry_scans(scans, inverse, ddfs[k:k + 1], times, times[k], available)
        target = raw[k]
        for name in names:
            if name == "template":
                template = pulled[[j for j in range(count) if available[j]]].median(dim=0).values[None]
                prediction = to_input(warp_border(template, ddfs[k:k + 1])[0])
            else:
                weights = candidate_weights(name, times[k], times, noise, available)
                prediction = to_input(combine(carried, weights, floor, to_input, from_input, subtract=False))
            errors[name] += _nrmse(prediction, target) / len(targets)
        for name in references:
            weights = candidate_weights("nearest", times[k], times, noise, available)
            if name == "nearest scan":
                weights = torch.nn.functional.one_hot(weights.argmax(), count).to(weights.dtype)
            prediction = sum(float(w) * raw[j] for j, w in enumerate(weights) if float(w) > 0) / float(weights.sum())
            references[name] += _nrmse(prediction, target) / len(targets)
    source = min(errors, key=errors.get)
    return SourceChoice(source=source, noise_floor=floor, noise_std=noise, errors=errors, references=references)
