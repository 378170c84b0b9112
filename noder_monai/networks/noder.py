"""NODER: a neural ODE in the latent space of a deformation autoencoder, producing a deformation trajectory.

z(0) = Encoder(zero field); dz/dt = f(z, t) (:class:`LatentDynamics`), integrated with a fixed-step RK4 (torchdiffeq);
the decoded field minus the decoded initial state (so that time 0 is exactly the identity) is upsampled from the
decoder's stride-4 grid and smoothed by a box filter; the baseline image is warped (``grid_sample``, the values of MONAI's
``Warp``).
All query times go through the decoder, the filter and the warp as one batch.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Iterator, Sequence

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from noder_monai.functional import SeparableField, integrate_velocity, invert_displacement, odd_window, warp
from noder_monai.networks.autoencoder import (
    DECODER_STRIDE,
    ENCODER_STRIDE,
    DeformationDecoder,
    DeformationEncoder,
    smooth_upsample,
    smooth_upsample_field,
)
from noder_monai.networks.dynamics import LatentDynamics

__all__ = ["NODER", "ARGUMENT_BOUNDS", "FIELD_TYPES", "LEVELS", "check_noder_arguments", "scale_window"]

FIELD_TYPES = ("displacement", "velocity")
"""``displacement``: the decoder outputs the displacement (the paper). ``velocity`` (default): it outputs a stationary
velocity integrated by scaling and squaring on the decoder grid, a diffeomorphism there up to discretisation; its
linear upsampling to the image grid can fold where the motion is large for that grid, which
:meth:`~noder_monai.model.FittedSubject.fields` checks and corrects in every prediction."""
LEVELS = (1, 2, 4)
"""Resolution levels (image voxels per level voxel) at which a trajectory can be produced."""


ARGUMENT_BOUNDS = {
    "spatial_size": (1, 16384),
    "latent_channels": (1, 512),
    "encoder_channels": (1, 1024),
    "decoder_channels": (1, 1024),
    "dynamics_channels": (1, 1024),
    "hidden_features": (1, 65536),
    "num_hidden_layers": (1, 64),
    "smoothing_kernel": (1, 255),
    "step_size": (1e-4, 10.0),
    "integration_steps": (1, 32),
}
"""Inclusive ``(low, high)`` of each size argument of :class:`NODER` (per entry for sequences): far beyond any useful
network, low enough that a crafted file cannot make the constructor allocate without bound."""
_SEQUENCE_LENGTHS = {"spatial_size": (2, 3), "encoder_channels": (3, 3), "decoder_channels": (2, 2),
                     "dynamics_channels": (0, 8)}


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_noder_arguments(arguments: dict, where: str = "NODER", prefix: str = "") -> dict:
    """Check :class:`NODER` keyword arguments before anything is built: known names, types, and the sizes within
    :data:`ARGUMENT_BOUNDS` (so a file cannot ask for an unbounded allocation).

    Args:
        arguments: keyword arguments (a subset of :class:`NODER`'s; a checkpoint's ``network`` entry).
        where: what the messages start with, e.g. ``"checkpoint 'model.pt'"``.
        prefix: put before each argument's name in the messages, e.g. ``"network."``.

    Returns:
        ``arguments`` as a new dictionary.

    Raises:
        ValueError: naming ``where`` and the argument: an unknown name, a wrong type, a size out of bounds, an even
            ``smoothing_kernel`` or an unknown ``field``.
    """
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: field '{prefix.rstrip('.')}' must be a dictionary of NODER arguments, got "
                         f"{type(arguments).__name__}.")
    known = set(inspect.signature(NODER).parameters)
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ValueError(f"{where}: unknown NODER argument(s) {[prefix + name for name in unknown]}; NODER takes "
                         f"{sorted(known)}.")
    for name, value in arguments.items():
        field = f"{where}: field '{prefix}{name}'"
        if name in _SEQUENCE_LENGTHS:
            shortest, longest = _SEQUENCE_LENGTHS[name]
            low, high = ARGUMENT_BOUNDS[name]
            if not isinstance(value, (list, tuple)) or not shortest <= len(value) <= longest or not all(
                    _is_int(v) and low <= v <= high for v in value):
                raise ValueError(f"{field} must be {shortest}{'' if shortest == longest else f'-{longest}'} integers "
                                 f"in [{low}, {high}], got {value!r}.")
        elif name in ("adjoint",):
            if not isinstance(value, bool):
                raise ValueError(f"{field} must be true or false, got {value!r}.")
        elif name == "field":
            if value not in FIELD_TYPES:
                raise ValueError(f"{field} must be one of {FIELD_TYPES}, got {value!r}.")
        elif name == "step_size":
            low, high = ARGUMENT_BOUNDS[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
                raise ValueError(f"{field} must be a number in [{low:g}, {high:g}], got {value!r}.")
        else:
            low, high = ARGUMENT_BOUNDS[name]
            if not _is_int(value) or not low <= value <= high or (name == "smoothing_kernel" and value % 2 == 0):
                kind = "an odd integer" if name == "smoothing_kernel" else "an integer"
                raise ValueError(f"{field} must be {kind} in [{low}, {high}], got {value!r}.")
    return dict(arguments)


def scale_window(kernel_size: int, level: int) -> int:
    """The odd window width at ``level`` that covers about the same physical extent as ``kernel_size`` at level 1."""
    return odd_window(kernel_size / level)


class NODER(nn.Module):
    """Deformation trajectory of one subject, as a function of (scaled) time.

    Args:
        spatial_size: image size (2 or 3 entries); any size (padded to the encoder stride internally).
        latent_channels: channels of the latent state. Defaults to 4.
        encoder_channels: see :class:`DeformationEncoder`. Defaults to (16, 32, 32).
        decoder_channels: see :class:`DeformationDecoder`. Defaults to (32, 16).
        dynamics_channels: stride-2 convolution channels of :class:`LatentDynamics`. Defaults to (16, 16).
        hidden_features: fully connected width of :class:`LatentDynamics`. Defaults to 64.
        num_hidden_layers: fully connected hidden layers of :class:`LatentDynamics`. Defaults to 2.
        smoothing_kernel: odd box-filter width in image voxels applied to the field. Defaults to 15.
        step_size: RK4 step in scaled time (the observed span is [0, 1]). Defaults to 0.1.
        adjoint: integrate the backward pass with the adjoint method (constant memory, slower). Defaults to False.
        field: one of :data:`FIELD_TYPES`. Defaults to "velocity" (the more accurate variant in the regression
            benchmark, ``benchmarks/README.md``; its predictions are corrected where they fold).
        integration_steps: scaling-and-squaring steps for ``field="velocity"``. Defaults to 7.

    Raises:
        ValueError: naming the argument, for one outside :data:`ARGUMENT_BOUNDS` or of the wrong type
            (:func:`check_noder_arguments`).

    Shapes:
        ``displacement(times, level)``: times (T,) -> (T, D, *ceil(S / level)) in level-grid voxels.
        ``forward(image, times, level, return_ddf)``: image (1, 1, *ceil(S / level)) -> warped (T, 1, *ceil(S / level))
        and, with ``return_ddf`` (default), the field.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        latent_channels: int = 4,
        encoder_channels: Sequence[int] = (16, 32, 32),
        decoder_channels: Sequence[int] = (32, 16),
        dynamics_channels: Sequence[int] = (16, 16),
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
        smoothing_kernel: int = 15,
        step_size: float = 0.1,
        adjoint: bool = False,
        field: str = "velocity",
        integration_steps: int = 7,
    ):
        super().__init__()
        spatial_size = tuple(int(s) for s in spatial_size)
        check_noder_arguments({
            "spatial_size": spatial_size, "latent_channels": latent_channels, "encoder_channels": tuple(encoder_channels),
            "decoder_channels": tuple(decoder_channels), "dynamics_channels": tuple(dynamics_channels),
            "hidden_features": hidden_features, "num_hidden_layers": num_hidden_layers,
            "smoothing_kernel": smoothing_kernel, "step_size": step_size, "adjoint": adjoint, "field": field,
            "integration_steps": integration_steps}, "NODER")
        self.config = {
            "spatial_size": list(spatial_size),
            "latent_channels": latent_channels,
            "encoder_channels": list(encoder_channels),
            "decoder_channels": list(decoder_channels),
            "dynamics_channels": list(dynamics_channels),
            "hidden_features": hidden_features,
            "num_hidden_layers": num_hidden_layers,
            "smoothing_kernel": smoothing_kernel,
            "step_size": float(step_size),
            "adjoint": bool(adjoint),
            "field": field,
            "integration_steps": integration_steps,
        }
        self.spatial_size = spatial_size
        self.spatial_dims = len(spatial_size)
        self.smoothing_kernel = smoothing_kernel
        self.step_size = float(step_size)
        self.adjoint = adjoint
        self.field = field
        latent_size = tuple(math.ceil(s / ENCODER_STRIDE) for s in spatial_size)
        self.encoder = DeformationEncoder(self.spatial_dims, latent_channels, encoder_channels)
        self.decoder = DeformationDecoder(self.spatial_dims, latent_channels, decoder_channels)
        self.dynamics = LatentDynamics((latent_channels, *latent_size), dynamics_channels, hidden_features, num_hidden_layers)
        self.register_buffer("initial_state", torch.zeros(1, latent_channels, *latent_size))
        self.integration_steps = integration_steps

    @torch.no_grad()
    def set_initial_state(self) -> None:
        """z(0) = Encoder(zero field); call after (re)loading encoder weights. Stored as a buffer in the state_dict."""
        zero_field = self.initial_state.new_zeros(1, self.spatial_dims, *self.spatial_size)
        self.initial_state.copy_(self.encoder(zero_field))

    def latent_trajectory(self, times: torch.Tensor) -> torch.Tensor:
        """Latent states at ``times`` (T,) in scaled time (any order, repeats and negative values allowed).

        Returns:
            (T, C, *L). Times after 0 are integrated forwards from z(0), times before 0 backwards.
        """
        times = torch.as_tensor(times, dtype=self.initial_state.dtype, device=self.initial_state.device).reshape(-1)
        if not torch.isfinite(times).all():
            raise ValueError(f"times must be finite, got {times.tolist()}.")
        solve = odeint_adjoint if self.adjoint else odeint
        options = {"step_size": self.step_size, "interp": "cubic"}
        pieces, positions = [], []
        zero = times == 0
        if zero.any():
            pieces.append(self.initial_state.expand(int(zero.sum()), *self.initial_state.shape[1:]))
            positions.append(zero.nonzero().flatten())
        for direction in (1.0, -1.0):
            selected = times * direction > 0
            if not selected.any():
                continue
            grid, inverse = torch.unique(times[selected] * direction, return_inverse=True)
            grid = torch.cat([grid.new_zeros(1), grid]) * direction
            states = solve(self.dynamics, self.initial_state, grid, method="rk4", options=options)
            pieces.append(states[1:, 0][inverse])
            positions.append(selected.nonzero().flatten())
        order = torch.cat(positions).argsort()
        return torch.cat(pieces)[order]

    def displacement(self, times: torch.Tensor, level: int = 1, inverse: bool = False) -> torch.Tensor:
        """Displacement fields at ``times`` (T,) scaled, on the grid of ``level`` (image voxels per level voxel).

        Args:
            times: (T,) scaled times.
            level: one of :data:`LEVELS`.
            inverse: return the inverse maps' displacements instead: ``warp(warp(x, ddf), inverse_ddf) ~ x``,
                by :func:`~noder_monai.functional.invert_displacement` on the level grid (one time after another),
                started (for ``field="velocity"``) from the integral of the negated velocity.

        Returns:
            (T, D, *ceil(S / level)) in level-grid voxels; exactly zero at time 0.
        """
        if not inverse:
            return self.displacement_field(times, level).dense()
        return torch.cat(list(self.inverse_displacements(times, level)))

    def inverse_displacements(self, times: torch.Tensor, level: int = 1) -> Iterator[torch.Tensor]:
        """``displacement(times, level, inverse=True)`` one time after another: yields (1, D, *ceil(S / level)) per
        time of ``times`` (T,), in order, so that only one full-size inverse map is held at a time (the latent
        trajectory is integrated once for all times)."""
        size = self._level_size(level)
        for one in self._decoded(times).split(1):
            if self.field == "displacement":
                yield invert_displacement(self._displacement_field(one, level, size).dense())
                continue
            velocity = self._velocity(one)
            ddf = self._exponential_field(velocity, level, size).dense()
            yield invert_displacement(ddf, 10, initial=self._exponential_field(-velocity, level, size).dense())

    def displacement_field(self, times: torch.Tensor, level: int = 1) -> SeparableField:
        """:meth:`displacement` at ``times`` (T,) as a :class:`~noder_monai.functional.SeparableField` on the grid of
        ``level``: its ``dense()`` is the field, ``dense(region)`` the field on a box only, and its ``smoothness()``
        and ``boundary()`` the loss terms of the dense field, computed on the decoder grid."""
        size = self._level_size(level)
        coarse = self._decoded(times)
        if self.field == "displacement":
            return self._displacement_field(coarse, level, size)
        return self._exponential_field(self._velocity(coarse), level, size)

    def _level_size(self, level: int) -> list[int]:
        """The grid of ``level``; raises ValueError naming ``level`` unless it is one of :data:`LEVELS`."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
        return [math.ceil(s / level) for s in self.spatial_size]

    def _decoded(self, times: torch.Tensor) -> torch.Tensor:
        """The decoded fields at ``times`` minus the decoded initial state (T, D, *decoder grid), image voxels."""
        decoded = self.decoder(torch.cat([self.initial_state, self.latent_trajectory(times)]))
        return decoded[1:] - decoded[:1]

    def _displacement_field(self, coarse: torch.Tensor, level: int, size: list[int]) -> SeparableField:
        """The decoded displacement (``field="displacement"``) upsampled and box-filtered to ``level`` (level voxels)."""
        window = scale_window(self.smoothing_kernel, level)
        field = smooth_upsample_field(coarse, DECODER_STRIDE // level, size, window)
        return SeparableField(field.coarse / level, field.matrices)

    def _velocity(self, coarse: torch.Tensor) -> torch.Tensor:
        """The smoothed stationary velocity on the decoder grid, in decoder voxels."""
        window = scale_window(self.smoothing_kernel, DECODER_STRIDE)
        return smooth_upsample(coarse, 1, coarse.shape[2:], window) / DECODER_STRIDE

    def _exponential_field(self, velocity: torch.Tensor, level: int, size: list[int]) -> SeparableField:
        """Scaling and squaring of a decoder-grid velocity (decoder voxels), upsampled to ``level`` (level voxels)."""
        coarse_ddf = integrate_velocity(velocity, self.integration_steps) * (DECODER_STRIDE / level)
        return smooth_upsample_field(coarse_ddf, DECODER_STRIDE // level, size)

    def warp(self, image: torch.Tensor, ddf: torch.Tensor, origin: Sequence[int] | None = None) -> torch.Tensor:
        """``image`` (N, C, *S) warped by ``ddf`` (N, D, *B) with bilinear interpolation and border padding
        (:func:`~noder_monai.functional.warp`; ``origin``: where a field on a box of the grid starts)."""
        return warp(image, ddf, "bilinear", "border", origin)

    def forward(
        self, image: torch.Tensor, times: torch.Tensor, level: int = 1, return_ddf: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Warp ``image`` (1, C, *ceil(S / level)) to every time of ``times`` (T,); returns the warped images
        (T, C, ...) and, with ``return_ddf`` (default), the fields (T, D, ...)."""
        ddf = self.displacement(times, level)
        expected = tuple(ddf.shape[2:])
        if image.ndim != self.spatial_dims + 2 or image.shape[0] != 1 or tuple(image.shape[2:]) != expected:
            raise ValueError(f"image must have shape (1, C, {', '.join(map(str, expected))}), got {tuple(image.shape)}.")
        warped = self.warp(image.expand(ddf.shape[0], *image.shape[1:]), ddf)
        return (warped, ddf) if return_ddf else warped
