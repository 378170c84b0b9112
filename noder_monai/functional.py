"""Pure tensor maths shared by the networks, losses and metrics of noder-monai.

Everything here is a plain differentiable function of tensors, works on CPU and CUDA and keeps the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SeparableField",
    "box_filter",
    "check_ddf",
    "check_odd_kernel_size",
    "check_spatial_dims",
    "compose_displacements",
    "integrate_velocity",
    "invert_displacement",
    "jacobian_determinant",
    "odd_window",
    "separable_filter",
    "unfold_displacement",
    "warp",
    "warp_border",
    "warp_nearest",
]

_PADDING_MODES = ("zeros", "replicate")


def odd_window(width: float) -> int:
    """The odd integer >= 1 nearest to ``width`` (a window width in voxels, e.g. a width scaled to another grid)."""
    return max(1, 2 * int(round((float(width) - 1) / 2)) + 1)


def check_odd_kernel_size(kernel_size: int, name: str = "kernel_size") -> int:
    """Return ``kernel_size`` as an ``int`` after checking that it is a positive odd integer.

    Raises:
        ValueError: naming ``name`` and the value received otherwise.
    """
    is_int = isinstance(kernel_size, Integral) and not isinstance(kernel_size, bool)
    if not is_int or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {kernel_size!r}.")
    return int(kernel_size)


def check_spatial_dims(spatial_dims: int, allowed: tuple[int, ...] = (1, 2, 3)) -> int:
    """Return ``spatial_dims`` as an ``int`` after checking that it is one of ``allowed`` (default 1, 2 or 3).

    Raises:
        ValueError: naming ``spatial_dims`` and the value received otherwise.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in allowed:
        choices = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}" if len(allowed) > 1 else str(allowed[0])
        raise ValueError(f"spatial_dims must be {choices}, got {spatial_dims!r}.")
    return int(spatial_dims)


def check_ddf(ddf: torch.Tensor, name: str = "ddf", min_size: int = 1) -> None:
    """Check that ``ddf`` is a displacement field of shape ``(N, D, *spatial)`` with ``D`` = 1, 2 or 3 spatial axes.

    Args:
        ddf: the tensor to check.
        name: the argument name used in the error message.
        min_size: the smallest size allowed along every spatial axis.

    Raises:
        ValueError: naming ``name`` and the shape received if ``ddf`` is not such a tensor, its channel count is
            not its number of spatial axes, or a spatial axis is shorter than ``min_size``.
    """
    if not isinstance(ddf, torch.Tensor) or ddf.ndim not in (3, 4, 5):
        shape = tuple(ddf.shape) if isinstance(ddf, torch.Tensor) else type(ddf).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, D, *spatial) with D = 1, 2 or 3, got {shape}.")
    if ddf.shape[1] != ddf.ndim - 2:
        raise ValueError(
            f"{name} must have one channel per spatial axis, (N, {ddf.ndim - 2}, *spatial), got {tuple(ddf.shape)}."
        )
    if min(ddf.shape[2:]) < min_size:
        raise ValueError(
            f"{name} must have at least {min_size} voxels along every spatial axis, got {tuple(ddf.shape)}."
        )


def _box_mean_along(x: torch.Tensor, kernel_size: int, dim: int, padding_mode: str) -> torch.Tensor:
    """Mean over a centred ``kernel_size`` window along one axis of ``x``, by a running sum.

    The padded rows are centred on their own mean before the cumulative sum and the mean is added back after
    the difference, so the rounding error of the running sum does not grow with the intensity offset or the
    row length (float32 stays within about 1e-7 relative of a float64 reference at 128^3).
    """
    radius = kernel_size // 2
    size = x.shape[dim]
    pad = [0, 0] * (x.ndim - 2)
    pad[2 * (x.ndim - 1 - dim)] = radius
    pad[2 * (x.ndim - 1 - dim) + 1] = radius
    padded = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else "replicate")
    offset = padded.mean(dim=dim, keepdim=True)
    running = torch.cumsum(padded - offset, dim=dim)
    running = F.pad(running, [0, 0] * (x.ndim - 1 - dim) + [1, 0])
    window_sum = running.narrow(dim, kernel_size, size) - running.narrow(dim, 0, size)
    return window_sum / kernel_size + offset


def _box_mean_along_adjoint(grad: torch.Tensor, kernel_size: int, dim: int, padding_mode: str) -> torch.Tensor:
    """Adjoint (transpose) of :func:`_box_mean_along`, applied to ``grad``.

    The zero-padded window mean is symmetric, so it is its own adjoint. With replicate padding, the voxels
    copied beyond each end fold back onto the end voxel: voxel 0 also gets ``max(0, r - i) / kernel_size`` of
    ``grad[i]`` and voxel ``n - 1`` gets ``max(0, i + r - (n - 1)) / kernel_size`` of it (``r`` the radius).
    """
    out = _box_mean_along(grad, kernel_size, dim, "zeros")
    if padding_mode == "zeros":
        return out
    radius, size = kernel_size // 2, grad.shape[dim]
    count = min(radius, size)
    shape = [-1] + [1] * (grad.ndim - 1 - dim)
    weights = (radius - torch.arange(count, device=grad.device, dtype=grad.dtype)).reshape(shape) / kernel_size
    front = (grad.narrow(dim, 0, count) * weights).sum(dim=dim, keepdim=True)
    back = (grad.narrow(dim, size - count, count) * weights.flip(0)).sum(dim=dim, keepdim=True)
    out.narrow(dim, 0, 1).add_(front)
    out.narrow(dim, size - 1, 1).add_(back)
    return out


class _BoxMean(torch.autograd.Function):
    """The separable box mean with its adjoint as the backward pass.

    Autograd through the running sums would cost about four forward passes (flips, paddings and the zero
    tensors of every slice's gradient); the adjoint is one more box mean plus, for replicate padding, two
    weighted sums per axis. The backward is built of differentiable operations, so double backward works.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int, padding_mode: str) -> torch.Tensor:
        ctx.kernel_size, ctx.padding_mode = kernel_size, padding_mode
        for dim in range(2, x.ndim):
            x = _box_mean_along(x, kernel_size, dim, padding_mode)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        for dim in range(2, grad.ndim):
            grad = _box_mean_along_adjoint(grad, ctx.kernel_size, dim, ctx.padding_mode)
        return grad, None, None


def box_filter(x: torch.Tensor, kernel_size: int, padding_mode: str = "zeros") -> torch.Tensor:
    """Mean over a ``kernel_size``-wide cube around every voxel (stride 1, output of the input size).

    Voxels of the window that fall outside the image take the padding value, and the divisor is always
    ``kernel_size ** d``: with ``"zeros"`` the mean near the border is pulled towards 0 (as a zero-padded
    ``avg_pool`` with ``count_include_pad=True`` or MONAI's rectangular ``separable_filtering``), with
    ``"replicate"`` the border voxel is repeated. The window mean is computed axis by axis with running sums
    (``torch.cumsum``), so its cost per voxel does not depend on ``kernel_size``; the backward pass applies the
    filter's adjoint (one more box mean) rather than autograd through the running sums, about 2x cheaper.

    Timings against ``avg_pool``: ``benchmarks/README.md`` (running sums win from ``kernel_size`` 7 on).

    Args:
        x: tensor of shape ``(N, C, *spatial)`` with 1, 2 or 3 spatial dimensions, any floating dtype.
        kernel_size: window width in voxels along every spatial axis, a positive odd integer; 1 returns ``x``.
        padding_mode: value of the voxels outside the image, ``"zeros"`` (default) or ``"replicate"``.

    Returns:
        Tensor of the same shape, dtype and device as ``x``: the window mean at every voxel.

    Raises:
        ValueError: if ``kernel_size`` is not a positive odd integer, ``padding_mode`` is not one of
            ``"zeros"``, ``"replicate"``, or ``x`` does not have 1 to 3 spatial dimensions.
    """
    kernel_size = check_odd_kernel_size(kernel_size)
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (N, C, *spatial) with 1 to 3 spatial dimensions, got {shape}.")
    if kernel_size == 1:
        return x
    return _BoxMean.apply(x, kernel_size, padding_mode)


def invert_displacement(
    ddf: torch.Tensor, iterations: int = 20, initial: torch.Tensor | None = None, damping: float = 0.7
) -> torch.Tensor:
    """Displacement ``w`` of the inverse map, by damped fixed-point iteration (MONAI ``Warp`` convention, voxels).

    Solves ``w(x) + ddf(x + w(x)) = 0``, so that ``Warp(Warp(image, ddf), w) ~ image``, with the update
    ``w <- w - damping * (w + ddf(x + w))`` (the fixed-point inversion of Chen et al., Med. Phys. 35(1), 2008,
    damped: the undamped iteration diverges where the displacement's gradient exceeds 1, in strongly compressed
    regions of smooth fields).

    Args:
        ddf: (N, D, *S) displacement in voxels, D = 2 or 3.
        iterations: update steps (>= 1).
        initial: (N, D, *S) starting guess (e.g. the integral of the negated velocity); defaults to ``-ddf``.
        damping: step of each update, in (0, 1].

    Returns:
        (N, D, *S) the inverse map's displacement, same dtype and device.

    Raises:
        ValueError: if ``ddf`` is not an (N, D, *S) field, ``initial`` has another shape, ``iterations`` < 1 or
            ``damping`` is outside (0, 1].
    """
    check_ddf(ddf)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}.")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}.")
    if initial is not None and initial.shape != ddf.shape:
        raise ValueError(f"initial must have the shape of ddf {tuple(ddf.shape)}, got {tuple(initial.shape)}.")
    inverse = -ddf if initial is None else initial
    for _ in range(iterations):
        inverse = inverse - damping * (inverse + warp_border(ddf, inverse))
    return inverse


def compose_displacements(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of warping with ``first`` and then with ``second`` (MONAI ``Warp`` convention, voxel units).

    ``Warp(Warp(image, first), second) == Warp(image, compose_displacements(first, second))`` up to interpolation:
    the result is ``second(x) + first(x + second(x))``, ``first`` sampled bilinearly with border padding.

    Args:
        first: (N, D, *S) displacement applied first.
        second: (N, D, *S) displacement applied second.

    Returns:
        (N, D, *S).
    """
    if first.shape != second.shape:
        raise ValueError(
            f"first and second must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}."
        )
    return second + warp_border(first, second)


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "border",
    origin: Sequence[int] | None = None,
) -> torch.Tensor:
    """``image`` sampled at ``x + ddf(x)``: MONAI ``Warp`` (native ``grid_sample``, ``align_corners=True``), same
    values to the last bit, on a field that may cover only a box of the image's grid.

    Why not MONAI's class: it keeps a reference grid of the batch's full size (``(N, D, *S)``, rebuilt whenever the
    batch or size changes) and normalises the grid with in-place slice assignments and an index copy, whose
    backward passes allocate full-size tensors; here each axis's coordinate is one broadcast expression and the
    channels are stacked once (timings in ``benchmarks/README.md``).

    Args:
        image: (N, C, *S) with 2 or 3 spatial axes (N may be an ``expand`` of one image).
        ddf: (N, D, *B) displacement in voxels of ``image``'s grid (pull-back: channel ``i`` moves along axis ``i``),
            on the box of size ``B`` whose first voxel is ``origin`` of ``image``'s grid.
        mode: ``grid_sample`` mode, ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``grid_sample`` padding, ``"border"``, ``"zeros"`` or ``"reflection"``.
        origin: (D,) index in ``image``'s grid of the field's first voxel; None: the field covers the whole image
            (``B == S``).

    Returns:
        (N, C, *B), dtype and device of ``image``.

    Raises:
        ValueError: if ``ddf`` is not (N, D, *B) for ``image``'s N and D, or the box leaves the image.
    """
    dims = image.ndim - 2
    if dims not in (2, 3) or ddf.ndim != image.ndim or ddf.shape[:2] != (image.shape[0], dims):
        raise ValueError(
            f"warp: ddf must have shape ({image.shape[0]}, {dims}, *box) for an image of shape {tuple(image.shape)}, "
            f"got {tuple(ddf.shape)}."
        )
    origin = tuple(int(o) for o in origin) if origin is not None else (0,) * dims
    box, size = ddf.shape[2:], image.shape[2:]
    if len(origin) != dims or any(o < 0 or o + b > n for o, b, n in zip(origin, box, size)):
        raise ValueError(f"warp: a field of size {tuple(box)} at {origin} leaves the image of size {tuple(size)}.")
    coordinates = []
    for axis in reversed(range(dims)):  # grid_sample's last grid entry indexes the first spatial axis
        shape = [1] * (dims + 1)
        shape[1 + axis] = box[axis]
        grid = torch.arange(origin[axis], origin[axis] + box[axis], device=ddf.device, dtype=ddf.dtype).view(shape)
        coordinates.append((grid + ddf[:, axis]) * 2 / max(size[axis] - 1, 1) - 1)
    grid = torch.stack(coordinates, dim=-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_border(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """MONAI ``Warp(mode="bilinear", padding_mode="border")``'s values of ``image`` (N, C, *S) by ``ddf`` (N, D, *S)
    (voxels): :func:`warp` with its defaults, so warping inside a prediction constructs nothing (MONAI warns when a
    ``Warp`` is made)."""
    return warp(image, ddf)


def integrate_velocity(velocity: torch.Tensor, num_steps: int = 7) -> torch.Tensor:
    """Displacement of the exponential of a stationary velocity field by scaling and squaring: MONAI ``DVF2DDF``
    (bilinear, border padding), same values, with :func:`warp`.

    Args:
        velocity: (N, D, *S) in voxels.
        num_steps: squarings (>= 1); the velocity is first divided by ``2 ** num_steps``.

    Returns:
        (N, D, *S) displacement in voxels.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}.")
    ddf = velocity / (2**num_steps)
    for _ in range(num_steps):
        ddf = ddf + warp(ddf, ddf)
    return ddf


def _along(x: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` (N, C, *c) with the (n_k, c_k) ``matrices[k]`` applied along spatial axis ``k``: (N, C, *n).

    The last axis first (``x @ A.T``), then each earlier axis as one batched product ``A @ x`` on a (P, c_k, Q) view,
    so that no operand is transposed in memory (about 1.8x faster than transposing every axis to the end)."""
    for axis in reversed(range(len(matrices))):
        matrix = matrices[axis]
        if axis == len(matrices) - 1:
            x = x @ matrix.T
            continue
        shape = x.shape
        before, after = math.prod(shape[:axis + 2]), math.prod(shape[axis + 3:])
        x = (matrix @ x.reshape(before, shape[axis + 2], after)).reshape(*shape[:axis + 2], matrix.shape[0],
                                                                             *shape[axis + 3:])
    return x


def _quadratic_form(x: torch.Tensor, grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum over (N, C) of x^T (G_1 kron G_2 kron ...) x`` for (c_k, c_k) ``grams``: ``||(M_1 kron ...) x||^2`` when
    ``G_k = M_k^T M_k``."""
    return (x * _along(x, grams)).sum()


@dataclasses.dataclass
class SeparableField:
    """A displacement field that is a linear map of a coarse one, axis by axis: ``dense = coarse x_1 A_1 x_2 A_2 ...``
    (each (n_k, c_k) ``matrices[k]`` applied along spatial axis ``k``), as NODER's upsampled and smoothed fields are.

    The gradient-smoothness and boundary terms of the dense field are quadratic forms of the coarse one whose
    matrices are per-axis Gram matrices (``c_k x c_k``), so :meth:`smoothness` and :meth:`boundary` give the value
    of ``GradientSmoothnessLoss`` / ``BoundaryLoss`` on :meth:`dense` (equal up to float rounding) at the cost of a
    few products on the coarse grid, without the dense field; :meth:`dense` with a ``region`` gives the field on a
    box only (the rows of the matrices in the box).

    Attributes:
        coarse: (N, D, *c) the coarse field, in the dense field's units (voxels of the dense grid).
        matrices: one (n_k, c_k) matrix per spatial axis, on ``coarse``'s device and of its dtype.
    """

    coarse: torch.Tensor
    matrices: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        self.matrices = tuple(self.matrices)
        if self.coarse.ndim != len(self.matrices) + 2 or any(
                m.ndim != 2 or m.shape[1] != c or m.device != self.coarse.device or m.dtype != self.coarse.dtype
                for m, c in zip(self.matrices, self.coarse.shape[2:])):
            raise ValueError(
                f"SeparableField: matrices {[(tuple(m.shape), m.dtype, str(m.device)) for m in self.matrices]} do not "
                f"map a coarse field of shape {tuple(self.coarse.shape)} ({self.coarse.dtype}, {self.coarse.device}) "
                f"axis by axis."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, D, *n): the shape of :meth:`dense`."""
        return (*self.coarse.shape[:2], *(m.shape[0] for m in self.matrices))

    def dense(self, region: Sequence[slice] | None = None) -> torch.Tensor:
        """The field on the dense grid, (N, D, *n), or on the box ``region`` (one ``slice`` with step 1 per axis)."""
        matrices = self.matrices if region is None else tuple(m[r] for m, r in zip(self.matrices, region))
        return _along(self.coarse, matrices).contiguous()

    def smoothness(self) -> torch.Tensor:
        """``GradientSmoothnessLoss()(self.dense())``: the mean over (N, D, interior voxels) of the summed squared
        central differences (every axis cropped by one voxel at each end; each axis needs >= 3 voxels)."""
        sizes = [m.shape[0] for m in self.matrices]
        if min(sizes) < 3:
            raise ValueError(f"SeparableField.smoothness: every axis needs >= 3 voxels, got {sizes}.")
        inner = [m[1:-1] for m in self.matrices]
        total = self.coarse.new_zeros(())
        for axis, matrix in enumerate(self.matrices):
            rows = list(inner)
            rows[axis] = (matrix[2:] - matrix[:-2]) / 2
            total = total + _quadratic_form(self.coarse, [r.T @ r for r in rows])
        count = self.coarse.shape[0] * self.coarse.shape[1]
        for size in sizes:
            count *= size - 2
        return total / count

    def boundary(self) -> torch.Tensor:
        """``BoundaryLoss()(self.dense())``: the mean squared displacement over the two end planes of every axis
        (a plane counted once per axis it ends); each plane is the coarse field contracted with one row of its
        axis's matrix, so only plane-sized products are made."""
        sizes = [m.shape[0] for m in self.matrices]
        full = [m.T @ m for m in self.matrices]
        total = self.coarse.new_zeros(())
        count = 0
        for axis, matrix in enumerate(self.matrices):
            others = [gram for other, gram in enumerate(full) if other != axis]
            for row in (matrix[0], matrix[-1]):
                plane = torch.tensordot(self.coarse, row, dims=([axis + 2], [0]))  # (N, D, *other coarse sizes)
                total = total + _quadratic_form(plane, others)
            planes = 2 * self.coarse.shape[0] * self.coarse.shape[1]
            for other, size in enumerate(sizes):
                planes *= 1 if other == axis else size
            count += planes
        return total / count


def separable_filter(x: torch.Tensor, kernel: torch.Tensor, padding_mode: str = "replicate") -> torch.Tensor:
    """``x`` (N, C, *S) filtered along every spatial axis by the odd 1D ``kernel``, the values of MONAI's
    ``separable_filtering(x, [kernel] * D, mode=...)`` up to float rounding.

    Why not MONAI's: its convolutions over a one-channel volume make oneDNN reorder the input into a 16-channel
    blocked layout, a transient of about 16 times the input (1.2 GB for five 144^3 scans); here each axis is a
    weighted sum of ``len(kernel)`` shifted views of the padded input (for the few-tap Gaussians of the fit).

    Args:
        x: (N, C, *S) with 1 to 3 spatial axes.
        kernel: (K,) with K odd (its values are read once, as numbers).
        padding_mode: ``"replicate"`` or ``"zeros"``.

    Returns:
        (N, C, *S), dtype and device of ``x``.
    """
    if kernel.ndim != 1 or kernel.numel() % 2 == 0:
        raise ValueError(f"kernel must be 1D with an odd length, got shape {tuple(kernel.shape)}.")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
    weights = kernel.detach().to(device="cpu", dtype=x.dtype).tolist()
    radius = len(weights) // 2
    for dim in range(2, x.ndim):
        size = x.shape[dim]
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - dim)] = pad[2 * (x.ndim - 1 - dim) + 1] = radius
        padded = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else "replicate")
        out = padded.narrow(dim, 0, size) * weights[0]
        for tap in range(1, len(weights)):
            out.add_(padded.narrow(dim, tap, size), alpha=weights[tap])
        x = out
    return x


NEAREST_PADDING_MODES = ("border", "zeros", "reflection")
"""Out-of-grid rules of :func:`warp_nearest`, those of ``torch.nn.functional.grid_sample``."""


def _nearest_index(position: torch.Tensor, size: int, padding_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel index nearest to ``position`` (voxels) along an axis of ``size`` voxels, as ``grid_sample(mode="nearest",
    align_corners=True)`` picks it, and whether it lies inside the grid (always, except with ``"zeros"``)."""
    if padding_mode == "border":
        position = position.clamp(0, size - 1)
    elif padding_mode == "reflection":
        period = 2 * (size - 1)
        position = (position.abs() % period if period else position * 0)
        position = torch.where(position > size - 1, period - position, position)
    index = torch.round(position)  # half to even, like grid_sample's nearbyint
    inside = (index >= 0) & (index <= size - 1)
    return index.clamp(0, size - 1).to(torch.int64), inside


def warp_nearest(image: torch.Tensor, ddf: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Warp ``image`` with ``ddf`` by nearest-neighbour gathering: every output voxel is a copy of one input voxel, so
    any dtype keeps its values exactly (integer label IDs up to int64, which a float32 interpolation would round
    above 2^24). The voxel chosen is the one MONAI ``Warp(mode="nearest")`` samples (pull-back convention
    ``out(x) = image(round(x + ddf(x)))``, voxel units, ``align_corners=True``).

    Args:
        image: (N, C, *S) any dtype, 2 or 3 spatial axes.
        ddf: (N, D, *S) displacement in voxels, D spatial axes; N equal to ``image``'s or 1.
        padding_mode: one of :data:`NEAREST_PADDING_MODES`: the nearest border voxel, zero, or the reflected voxel.

    Returns:
        (N, C, *S) in ``image``'s dtype and device.

    Raises:
        ValueError: if the shapes do not match or ``padding_mode`` is unknown.
    """
    check_ddf(ddf)
    spatial = tuple(ddf.shape[2:])
    if image.ndim != ddf.ndim or tuple(image.shape[2:]) != spatial or image.shape[0] not in (ddf.shape[0], 1):
        raise ValueError(f"image must have shape (N, C, {', '.join(map(str, spatial))}) with N = {ddf.shape[0]} or 1, "
                         f"got {tuple(image.shape)}.")
    if padding_mode not in NEAREST_PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {NEAREST_PADDING_MODES}, got {padding_mode!r}.")
    grid = torch.meshgrid(*(torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in spatial), indexing="ij")
    flat = torch.zeros((), dtype=torch.int64, device=ddf.device)
    inside = torch.ones((), dtype=torch.bool, device=ddf.device)
    for axis, size in enumerate(spatial):
        index, valid = _nearest_index(grid[axis] + ddf[:, axis], size, padding_mode)
        flat = flat * size + index
        inside = inside & valid
    batch = ddf.shape[0]
    source = image.expand(batch, *image.shape[1:]).reshape(batch, image.shape[1], -1)
    gathered = torch.gather(source, 2, flat.reshape(batch, 1, -1).expand(-1, image.shape[1], -1))
    gathered = gathered.reshape(batch, image.shape[1], *spatial)
    return torch.where(inside[:, None], gathered, torch.zeros((), dtype=image.dtype, device=image.device))


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of the deformation ``x -> x + ddf(x)`` at every voxel.

    ``J_ij = delta_ij + d ddf_i / d x_j`` with central differences inside and one-sided differences on the
    border voxels (``torch.gradient``), voxel units; the determinant is written out (``a d - b c`` in 2D, the
    rule of Sarrus in 3D). 1 means no local volume change, > 1 expansion, < 1 shrinkage, <= 0 a fold.
    Differentiable.

    Args:
        ddf: displacement field of shape ``(B, D, *spatial)``, ``D`` = 1, 2 or 3 spatial axes of at least
            2 voxels, channel ``i`` along spatial axis ``i``, in voxels.

    Returns:
        Tensor of shape ``(B, 1, *spatial)``, dimensionless.

    Raises:
        ValueError: if ``ddf`` is not of that shape.
    """
    check_ddf(ddf, "ddf", min_size=2)
    dims = ddf.ndim - 2
    gradients = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = [[gradients[j][:, i] + (1.0 if i == j else 0.0) for j in range(dims)] for i in range(dims)]
    if dims == 1:
        det = jac[0][0]
    elif dims == 2:
        det = jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    else:
        det = (
            jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
        )
    return det.unsqueeze(1)


MAX_UNFOLD_ROUNDS = 10000
"""Safety bound of :func:`unfold_displacement` (the neighbourhood covers any grid of up to 1250 voxels per axis)."""


def unfold_displacement(ddf: torch.Tensor, min_jacobian: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct a displacement field where it folds: where :func:`jacobian_determinant` is ``<= min_jacobian``, the
    field is replaced by its 3-voxel box mean (edges replicated) in a neighbourhood of those voxels, and again until
    no voxel is left; the neighbourhood grows by one voxel every 8 rounds, so the loop ends (a field smoothed over
    the whole grid tends to a constant, whose determinant is 1). Elsewhere the field is returned unchanged; a field
    without folds is returned as is.

    Args:
        ddf: (N, D, *S) displacement in voxels, D = 2 or 3, at least 2 voxels per axis.
        min_jacobian: every voxel of the result has a determinant above this (> 0: no folds).

    Returns:
        ``(ddf, corrected)``: the field, same dtype and device, and ``corrected`` (N,) the percentage of voxels of
        each field that changed.

    Raises:
        ValueError: if ``ddf`` is not an (N, D, *S) field with D = 2 or 3, or ``min_jacobian`` is not in [0, 1).
        RuntimeError: folds remain after :data:`MAX_UNFOLD_ROUNDS` rounds (not seen in practice).
    """
    check_ddf(ddf, "ddf", min_size=2)
    if ddf.shape[1] not in (2, 3):
        raise ValueError(f"ddf must have 2 or 3 spatial axes, got shape {tuple(ddf.shape)}.")
    if not 0 <= min_jacobian < 1:
        raise ValueError(f"min_jacobian must be in [0, 1), got {min_jacobian!r}.")
    pool = F.max_pool2d if ddf.shape[1] == 2 else F.max_pool3d
    original, rounds = ddf, 0
    folded = jacobian_determinant(ddf) <= min_jacobian
    while bool(folded.any()):
        if rounds > MAX_UNFOLD_ROUNDS:
            raise RuntimeError(f"unfold_displacement: folds left after {rounds} rounds of smoothing.")
        reach = 1 + rounds // 8
        region = pool(folded.to(ddf.dtype), 2 * reach + 1, stride=1, padding=reach) > 0
        ddf = torch.where(region, box_filter(ddf, 3, "replicate"), ddf)
        folded = jacobian_determinant(ddf) <= min_jacobian
        rounds += 1
    corrected = (ddf != original).any(dim=1).flatten(1).to(ddf.dtype).mean(dim=1) * 100.0
    return ddf, corrected
