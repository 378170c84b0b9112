"""Procedural image sequences with known true deformations, for tests, benchmarks and the demo.

Each time point's displacement is the exponential (scaling and squaring, MONAI ``DVF2DDF``) of a smooth stationary
velocity field scaled by a time amplitude, so every true field is smooth and fold-free, and equals zero at ``t = 0``.

``kind="brain"`` (time in years): a ventricle-like expansion plus a cortical shrink whose amplitude follows a sigmoid in
time (accelerates, then saturates: half of it is reached at 2.5 years, most by 5), plus a smooth random component
(drawn from ``seed``) whose amplitude grows linearly in time (its full size at 6 years).

``kind="cardiac"`` (time in fractions of a cycle, period 1): a contraction towards the centre plus a twist (rotation
about the last axis, opposite at the two ends of that axis; a plain rotation in 2D), both with amplitude
``(1 - cos(2 pi t)) / 2``: zero at end-diastole ``t = 0``, maximal at end-systole ``t = 0.5``.

``local`` adds deformations a few voxels wide on top (a Gaussian profile of about 3 voxels' width): for "brain", an
expansion of both lateral ventricles and a shrink of two hippocampus-like regions (their centres jittered by ``seed``),
accelerating in time ((t / 6 years)^1.5); for "cardiac", a thickening of the myocardium (its inner wall moving
inwards), peaking at end-systole.

Observations are ``Warp(base, ddf_t)`` (bilinear, border padding) plus Gaussian or Rician noise (the magnitude of a
complex signal with Gaussian noise in both channels, as in magnitude MRI) or a multiplicative speckle that moves
with the tissue and decorrelates over time (as in ultrasound); label maps are warped with
nearest-neighbour interpolation. Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp
from monai.transforms import GaussianSmooth

__all__ = ["DEFAULT_TIMES", "KINDS", "NOISE_MODELS", "SyntheticSequence", "synthetic_sequence"]

KINDS = ("brain", "cardiac")
NOISE_MODELS = ("gaussian", "rician", "speckle")
SPECKLE_CORRELATION_TIME = 0.1  # time units (fractions of a cycle): speckle correlation exp(-|dt| / this)
SPECKLE_GRAIN = 1.0  # voxels: Gaussian smoothing of the scatterer field

#: Default observation times of each kind: irregular visits over 6 years, and 10 frames of one cardiac cycle.
DEFAULT_TIMES = {
    "brain": (0.0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0),
    "cardiac": tuple(frame / 10 for frame in range(10)),
}

BRAIN_SIGMOID_CENTER = 2.5  # years: time of the fastest expansion / atrophy
BRAIN_SIGMOID_WIDTH = 0.6  # years
BRAIN_LINEAR_SPAN = 6.0  # years: the linear component reaches its full size here
CARDIAC_PERIOD = 1.0
VENTRICLE_CENTER = (0.0, 0.04, 0.08)  # normalised coordinates of the ventricles' centre
LOCAL_WIDTH = 3.0  # voxels: standard deviation of the Gaussian profile of the local deformations
LATERAL_VENTRICLES = ((0.1, 0.0, 0.0), (-0.1, 0.0, 0.0))  # normalised centres of the local expansions
HIPPOCAMPI = ((0.3, -0.1, -0.25), (-0.3, -0.1, -0.25))  # normalised centres of the local shrinks
MYOCARDIUM_INNER_RADIUS = 0.25  # normalised in-plane radius of the cardiac phantom's inner myocardial wall


@dataclass
class SyntheticSequence:
    """A synthetic sequence and its ground truth.

    Attributes:
        images: ``(T, 1, *spatial)`` float32 noisy observations.
        clean: ``(T, 1, *spatial)`` float32 noise-free images, ``clean[t] = Warp(base, ddfs[t])``.
        ddfs: ``(T, D, *spatial)`` float32 true displacement fields in voxels (MONAI ``Warp`` convention).
        label: ``(1, *spatial)`` int64 labels of the base image (brain phantom: 0 background and non-brain,
            1 CSF, 2 grey matter, 3 white matter; cardiac phantom: 0 background, 1 body, 2 myocardium, 3 blood).
        label_sequence: ``(T, 1, *spatial)`` int64 labels warped with each true field (nearest neighbour).
        times: ``(T,)`` float64 times.
    """

    images: torch.Tensor
    clean: torch.Tensor
    ddfs: torch.Tensor
    label: torch.Tensor
    label_sequence: torch.Tensor
    times: torch.Tensor


def _grid(shape: Sequence[int]) -> torch.Tensor:
    """Voxel-centre coordinates normalised to ``(-1, 1)`` along each axis, ``(D, *shape)`` float32."""
    axes = [(torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _norm(field: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the channel axis, ``(D, *S) -> (*S)``."""
    return field.pow(2).sum(0).sqrt()


def _unit_max(field: torch.Tensor) -> torch.Tensor:
    """Scale ``(D, *S)`` so that its largest vector has length 1."""
    return field / _norm(field).max().clamp_min(1e-12)


def _smooth_noise(shape: Sequence[int], channels: int, rng: np.random.Generator, modes: int = 6) -> torch.Tensor:
    """Smooth random field ``(channels, *shape)``: a sum of low-frequency cosines with random phases, max |.| = 1."""
    grid = _grid(shape).double()
    dims = len(shape)
    field = torch.zeros((channels, *shape), dtype=torch.float64)
    for channel in range(channels):
        for _ in range(modes):
            frequency = torch.from_numpy(rng.uniform(0.5, 2.0, dims) * rng.choice([-1.0, 1.0], dims))
            phase = float(rng.uniform(0.0, 2 * math.pi))
            weight = float(rng.normal())
            field[channel] += weight * torch.cos(math.pi * torch.einsum("d,d...->...", frequency, grid) + phase)
    return (field / field.abs().max().clamp_min(1e-12)).float()


def _ellipsoid(grid: torch.Tensor, center: Sequence[float], radii: Sequence[float]) -> torch.Tensor:
    """Normalised ellipsoidal radius ``(*S)``: < 1 inside the ellipsoid."""
    dims, shape = grid.shape[0], (-1,) + (1,) * (grid.ndim - 1)
    return _norm((grid - torch.tensor(center[:dims]).view(shape)) / torch.tensor(radii[:dims]).view(shape))


def _brain_regions(grid: torch.Tensor) -> list[tuple[torch.Tensor, int, float]]:
    """``(mask, label, intensity)`` of a T1-like head: scalp, skull, CSF, folded cortex, white matter, nuclei,
    ventricles."""
    head = _ellipsoid(grid, (0.0, 0.0, 0.0), (0.88, 0.94, 0.86))
    folds = torch.sin(9 * torch.atan2(grid[1], grid[0]))
    if grid.shape[0] == 3:
        folds = folds * torch.cos(6 * torch.atan2(grid[2], _norm(grid[:2])))
    return [
        (head < 1.0, 0, 0.55),  # scalp
        (head < 0.92, 0, 0.08),  # skull
        (head < 0.85, 1, 0.2),  # CSF around the brain
        (head < 0.78 * (1 + 0.05 * folds), 2, 0.5),  # cortex
        (head < 0.62 * (1 + 0.08 * folds), 3, 0.8),  # white matter
        (_ellipsoid(grid, (0.22, 0.0, -0.05), (0.11, 0.13, 0.11)) < 1, 2, 0.5),  # deep grey nuclei
        (_ellipsoid(grid, (-0.22, 0.0, -0.05), (0.11, 0.13, 0.11)) < 1, 2, 0.5),
        (_ellipsoid(grid, (0.1,) + VENTRICLE_CENTER[1:], (0.07, 0.26, 0.1)) < 1, 1, 0.2),  # ventricles
        (_ellipsoid(grid, (-0.1,) + VENTRICLE_CENTER[1:], (0.07, 0.26, 0.1)) < 1, 1, 0.2),
    ]


def _cardiac_regions(grid: torch.Tensor) -> list[tuple[torch.Tensor, int, float]]:
    """``(mask, label, intensity)`` of a cine-MRI-like chest: body, right ventricle, left ventricle wall and pool."""
    return [
        (_ellipsoid(grid, (0.0, 0.0, 0.0), (0.9, 0.8, 0.95)) < 1, 1, 0.45),  # body
        (_ellipsoid(grid, (-0.38, 0.05, 0.0), (0.22, 0.34, 0.5)) < 1, 3, 0.85),  # right ventricle blood
        (_ellipsoid(grid, (0.0, 0.0, 0.0), (0.36, 0.36, 0.62)) < 1, 2, 0.2),  # left ventricle myocardium
        (_ellipsoid(grid, (0.0, 0.0, 0.0), (0.22, 0.22, 0.48)) < 1, 3, 0.9),  # left ventricle blood pool
    ]


def _phantom(kind: str, shape: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Base image ``(1, *S)`` float32 in [0, 1] (classes painted in order, smoothed, times a smooth texture) and its
    labels ``(1, *S)`` int64."""
    label = torch.zeros(tuple(shape), dtype=torch.int64)
    intensity = torch.zeros(tuple(shape), dtype=torch.float32)
    for mask, value, level in (_brain_regions if kind == "brain" else _cardiac_regions)(_grid(shape)):
        label[mask] = value
        intensity[mask] = level
    texture = 1.0 + 0.05 * _smooth_noise(shape, 1, rng, modes=12)[0]
    image = GaussianSmooth(sigma=0.6)(intensity[None] * texture)
    return torch.as_tensor(image, dtype=torch.float32).clamp(0.0, 1.0), label[None]


def _brain_velocities(shape: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-max stationary velocities ``(D, *S)`` in normalised units: the sigmoid part and the linear part."""
    grid = _grid(shape)
    centre = torch.tensor(VENTRICLE_CENTER[: len(shape)]).view((-1,) + (1,) * len(shape))
    offset = grid - centre
    radius = _norm(offset).clamp_min(1e-6)
    # pull-back convention: a field pointing at the centre enlarges the central (ventricle) region
    ventricles = -offset * torch.exp(-radius**2 / (2 * 0.35**2))
    # a field pointing outwards at the cortex moves the brain surface inwards (atrophy)
    cortex = offset / radius * torch.exp(-((radius - 0.65) ** 2) / (2 * 0.12**2))
    sigmoid_part = _unit_max(_unit_max(ventricles) + 0.7 * _unit_max(cortex))
    window = torch.exp(-_norm(grid) ** 2 / (2 * 0.45**2))
    linear_part = _unit_max(_smooth_noise(shape, len(shape), rng) * window)
    return sigmoid_part, linear_part


def _cardiac_velocity(shape: Sequence[int]) -> torch.Tensor:
    """Unit-max stationary velocity ``(D, *S)`` in normalised units: contraction plus twist."""
    grid = _grid(shape)
    window = torch.exp(-_norm(grid[:2]) ** 2 / (2 * 0.4**2))
    # pull-back convention: a field pointing outwards shrinks what lies around the centre (contraction)
    contraction = grid.clone()
    contraction[2:] *= 0.3
    contraction = contraction * window
    rotation = torch.zeros_like(grid)
    rotation[0], rotation[1] = -grid[1], grid[0]
    if len(shape) == 3:
        rotation = rotation * grid[2]  # opposite rotation at the two ends of the long axis: a twist
    rotation = rotation * window
    return _unit_max(_unit_max(contraction) + 0.8 * _unit_max(rotation))


def _speckle(times: torch.Tensor, ddfs: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Unit-mean multiplicative speckle ``(T, 1, *S)`` that moves with the tissue and decorrelates in time.

    A complex Gaussian field of scatterers in the first time's (material) coordinates, smoothed to a grain of about
    2 voxels, is an AR(1) process in time with correlation ``exp(-|dt| / SPECKLE_CORRELATION_TIME)`` between
    consecutive times; its magnitude (Rayleigh distributed), normalised to mean 1, is carried by each true field.
    """
    shape = tuple(ddfs.shape[2:])
    order = torch.argsort(times)
    fields = torch.zeros((len(times), 1, *shape))
    state, previous = None, None
    smooth = GaussianSmooth(sigma=SPECKLE_GRAIN)
    for index in order.tolist():
        draw = torch.from_numpy(rng.standard_normal((2, *shape))).float()
        if state is None:
            state = draw
        else:
            rho = math.exp(-abs(float(times[index] - previous)) / SPECKLE_CORRELATION_TIME)
            state = rho * state + math.sqrt(1 - rho**2) * draw
        previous = float(times[index])
        magnitude = torch.as_tensor(smooth(state)).pow(2).sum(0).sqrt()
        fields[index, 0] = magnitude / magnitude.mean()
    return Warp(mode="bilinear", padding_mode="border")(fields, ddfs)


def _local_velocity(kind: str, shape: Sequence[int], rng: np.random.Generator, width: float) -> torch.Tensor:
    """Unit-max stationary velocity ``(D, *S)`` in normalised units of the local deformations (see the module doc),
    with a Gaussian profile of standard deviation ``width`` voxels."""
    grid = _grid(shape)
    dims = len(shape)
    view = (-1,) + (1,) * dims
    width = torch.tensor([2 * width / n for n in shape]).view(view)  # voxels, normalised per axis
    if kind == "cardiac":
        radial = grid.clone()
        if dims == 3:
            radial[2:] = 0.0
        radius = _norm(radial).clamp_min(1e-6)
        profile = torch.exp(-((radius - MYOCARDIUM_INNER_RADIUS) ** 2) / (2 * float(width[0]) ** 2))
        # pull-back: a field pointing outwards at the inner wall moves that wall inwards (thickening)
        return _unit_max(radial / radius * profile)
    field = torch.zeros_like(grid)
    for centres, sign in ((LATERAL_VENTRICLES, -1.0), (HIPPOCAMPI, 1.0)):
        for centre in centres:
            jitter = rng.uniform(-0.03, 0.03, dims)
            offset = grid - torch.tensor([c + j for c, j in zip(centre[:dims], jitter)], dtype=torch.float32).view(view)
            bump = torch.exp(-_norm(offset / width) ** 2 / 2)
            # pull-back: pointing at the centre enlarges the region there, pointing away shrinks it
            field += sign * offset / width * bump
    return _unit_max(field)


def _local_amplitudes(kind: str, times: torch.Tensor) -> torch.Tensor:
    """``(T,)`` amplitude of the local deformations: (t / 6 years)^1.5 (brain), the cardiac one squared (cardiac)."""
    if kind == "cardiac":
        return _cardiac_amplitudes(times)[:, 0] ** 2
    return (times.clamp_min(0) / BRAIN_LINEAR_SPAN) ** 1.5


def _brain_amplitudes(times: torch.Tensor) -> torch.Tensor:
    """``(T, 2)`` amplitudes: sigmoid in time (0 at t=0, saturating to 1) and linear (t / 6 years)."""
    start = torch.sigmoid(torch.tensor(-BRAIN_SIGMOID_CENTER / BRAIN_SIGMOID_WIDTH, dtype=torch.float64))
    sigmoid = (torch.sigmoid((times - BRAIN_SIGMOID_CENTER) / BRAIN_SIGMOID_WIDTH) - start) / (1 - start)
    return torch.stack([sigmoid, times / BRAIN_LINEAR_SPAN], dim=1)


def _cardiac_amplitudes(times: torch.Tensor) -> torch.Tensor:
    """``(T, 1)`` amplitude ``(1 - cos(2 pi t / period)) / 2``."""
    return ((1 - torch.cos(2 * math.pi * times / CARDIAC_PERIOD)) / 2)[:, None]


def synthetic_sequence(
    spatial_dims: int = 3,
    size: int = 32,
    times: Sequence[float] | None = None,
    kind: str = "brain",
    noise: float = 0.0,
    seed: int = 0,
    base_image: torch.Tensor | None = None,
    base_label: torch.Tensor | None = None,
    amplitude: float = 1.0,
    local: float = 0.0,
    noise_model: str = "gaussian",
    local_width: float = LOCAL_WIDTH,
    supersample: int = 1,
) -> SyntheticSequence:
    """Generate a sequence of deformed images with known true fields.

    Args:
        spatial_dims: 2 or 3.
        size: edge length of the procedural phantom's grid, ``size^spatial_dims`` voxels (>= 8); ignored when
            ``base_image`` is given.
        times: observation times; ``None`` gives ``DEFAULT_TIMES[kind]``. Any finite values, any order.
        kind: ``"brain"`` (years, sigmoid + linear dynamics) or ``"cardiac"`` (fractions of a cycle, periodic).
        noise: standard deviation of the additive Gaussian noise, relative to the base image's intensity range.
        seed: seed of the random components (texture, linear field, noise).
        base_image: ``(1, *spatial)`` image to deform instead of the procedural phantom (e.g. ``demo_volume()``), on a
            grid ``supersample`` times finer than the sequence's along every axis.
        base_label: ``(1, *spatial)`` integer labels of ``base_image`` on the sequence's grid; ``None`` with a
            ``base_image`` gives a foreground mask (1 where the block-averaged image exceeds 10% of its range).
        amplitude: scale of the deformation; at 1.0 the largest true displacement over the default times is about
            ``min(spatial) / 16`` voxels (2 at 32, 4 at 64).
        local: largest displacement, in voxels, of the local deformations a few voxels wide (0 disables them);
            at the largest local amplitude of the brain (t = 6 years) or the cardiac (t = 0.5) time course.
        noise_model: ``"gaussian"`` (additive), ``"rician"`` (magnitude of the image plus complex Gaussian noise) or
            ``"speckle"`` (additive Gaussian, then a multiplicative ultrasound-like speckle that moves with the
            tissue and decorrelates from time to time, see ``_speckle``).
        local_width: standard deviation, in voxels, of the Gaussian profile of the local deformations (> 0).
        supersample: with a ``base_image``, how many times finer its grid is than the sequence's (an integer >= 1
            dividing its size): the true fields are drawn on the sequence's grid, upsampled linearly to the fine grid
            (displacements scaled to its voxels), the fine image is warped there and block-averaged back, so the
            noise-free images carry the detail of a finer acquisition rather than the blur of one more interpolation
            on the sequence's own grid.

    Returns:
        :class:`SyntheticSequence` with ``T = len(times)``.

    Raises:
        ValueError: an argument is out of range (the message names it and the value received).
    """
    time_values = _check_arguments(spatial_dims, kind, noise, amplitude, local, noise_model, times)
    _check_resolution(local_width, supersample, base_image)
    field_rng, texture_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    fine, label = _base(spatial_dims, size, kind, base_image, base_label, texture_rng, supersample)
    base = _block_mean(fine, supersample, spatial_dims)
    shape = tuple(base.shape[1:])
    velocities = _velocities(kind, shape, time_values, amplitude, (local, local_width), field_rng)
    ddfs = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocities)
    count = time_values.numel()
    clean = _warp_clean(fine, ddfs, supersample)
    warped_labels = Warp(mode="nearest", padding_mode="border")(
        label[None].float().expand(count, *label.shape), ddfs
    )
    span = float(base.max() - base.min())
    draws = torch.from_numpy(noise_rng.standard_normal(tuple(clean.shape))).float()
    images = clean + noise * span * draws
    if noise_model == "rician":
        quadrature = torch.from_numpy(noise_rng.standard_normal(tuple(clean.shape))).float()
        images = torch.sqrt(images**2 + (noise * span * quadrature) ** 2)
    if noise_model == "speckle":
        images = images * _speckle(time_values, ddfs, noise_rng)
    return SyntheticSequence(
        images=images.contiguous(),
        clean=clean.contiguous(),
        ddfs=ddfs.contiguous(),
        label=label,
        label_sequence=warped_labels.round().long(),
        times=time_values,
    )


def _check_arguments(spatial_dims: int, kind: str, noise: float, amplitude: float, local: float, noise_model: str,
                     times: Sequence[float] | None) -> torch.Tensor:
    """The times as (T,) float64 after checking every argument of :func:`synthetic_sequence`."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise!r}.")
    if not (math.isfinite(amplitude) and amplitude >= 0.0):
        raise ValueError(f"amplitude must be a finite number >= 0, got {amplitude!r}.")
    if not (math.isfinite(local) and local >= 0.0):
        raise ValueError(f"local must be a finite number >= 0, got {local!r}.")
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}.")
    time_values = torch.as_tensor(DEFAULT_TIMES[kind] if times is None else times, dtype=torch.float64).reshape(-1)
    if time_values.numel() == 0 or not bool(torch.isfinite(time_values).all()):
        raise ValueError(f"times must be a non-empty sequence of finite numbers, got {time_values.tolist()}.")
    return time_values


def _check_resolution(local_width: float, supersample: int, base_image: torch.Tensor | None) -> None:
    if not (math.isfinite(local_width) and local_width > 0.0):
        raise ValueError(f"local_width must be a finite number > 0 (voxels), got {local_width!r}.")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be an integer >= 1, got {supersample!r}.")
    if supersample > 1 and base_image is None:
        raise ValueError("supersample > 1 needs a base_image on the finer grid.")


def _block_mean(image: torch.Tensor, factor: int, spatial_dims: int) -> torch.Tensor:
    """Average ``factor``-wide blocks of the last ``spatial_dims`` axes of ``(C, *S)`` or ``(N, C, *S)``."""
    return image if factor == 1 else (F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d)(image, factor)


def _warp_clean(fine: torch.Tensor, ddfs: torch.Tensor, factor: int) -> torch.Tensor:
    """The noise-free images (T, 1, *S): ``fine`` (1, *(factor S)) warped on its grid by the upsampled fields
    ``ddfs`` (T, D, *S) and block-averaged (``factor`` 1: warped on the sequence's grid)."""
    count, spatial_dims = ddfs.shape[0], ddfs.ndim - 2
    if factor > 1:
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        ddfs = F.interpolate(ddfs, scale_factor=factor, mode=mode, align_corners=False) * factor
    warped = Warp(mode="bilinear", padding_mode="border")(fine[None].expand(count, *fine.shape), ddfs)
    return _block_mean(warped, factor, spatial_dims)


def _base(spatial_dims: int, size: int, kind: str, base_image: torch.Tensor | None, base_label: torch.Tensor | None,
          rng: np.random.Generator, supersample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The image to deform (1, *S), on the grid ``supersample`` times finer, and its labels on the sequence's grid:
    the procedural phantom, or ``base_image`` checked."""
    if base_image is None:
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8, got {size!r}.")
        return _phantom(kind, (size,) * spatial_dims, rng)
    base = torch.as_tensor(base_image, dtype=torch.float32)
    if base.ndim != spatial_dims + 1 or base.shape[0] != 1:
        raise ValueError(
            f"base_image must be (1, *spatial) with {spatial_dims} spatial axes, got shape {tuple(base.shape)}."
        )
    if any(n % supersample for n in base.shape[1:]):
        raise ValueError(
            f"base_image's size {tuple(base.shape[1:])} must be a multiple of supersample={supersample} on every axis."
        )
    if base_label is None:
        coarse = _block_mean(base, supersample, spatial_dims)
        low, high = float(coarse.min()), float(coarse.max())
        return base, (coarse > low + 0.1 * (high - low)).long()
    label = torch.as_tensor(base_label).long()
    expected = (1, *(n // supersample for n in base.shape[1:]))
    if tuple(label.shape) != expected:
        raise ValueError(f"base_label must have base_image's shape {expected}, got {tuple(label.shape)}.")
    return base, label


def _velocities(kind: str, shape: tuple[int, ...], times: torch.Tensor, amplitude: float,
                local: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """The true stationary velocity of every time (T, D, *S), in voxels (scaled so the largest displacement over the
    default times is about ``amplitude * min(shape) / 16``), plus the local deformations (``local``: their largest
    displacement and their width, voxels)."""
    local, width = local
    to_voxels = torch.tensor([n / 2 for n in shape], dtype=torch.float32).view((-1,) + (1,) * len(shape))
    largest = amplitude * min(shape) / 16
    if kind == "brain":
        sigmoid_part, linear_part = _brain_velocities(shape, rng)
        components = torch.stack([0.75 * sigmoid_part, 0.5 * linear_part])
        amplitudes = _brain_amplitudes(times)
    else:
        components = _cardiac_velocity(shape)[None]
        amplitudes = _cardiac_amplitudes(times)
    components = components * to_voxels
    components = components / _norm(components.sum(0)).max().clamp_min(1e-12) * largest
    velocities = torch.einsum("tk,kd...->td...", amplitudes.float(), components)
    if local > 0:
        local_field = _local_velocity(kind, shape, rng, width) * to_voxels
        local_field = local_field / _norm(local_field).max().clamp_min(1e-12) * local
        velocities = velocities + _local_amplitudes(kind, times).float().view(-1, *(1,) * (len(shape) + 1)) * local_field
    return velocities
