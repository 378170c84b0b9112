"""Deformation encoder and decoder: the latent space in which NODER integrates its ODE.

Both are fully convolutional, so one set of (pretrained) weights serves every image size. The encoder maps a
displacement field on the image grid to a latent map on a grid 8 times coarser; the decoder maps a latent map to a
displacement field on a grid 4 times coarser than the image. A 15-voxel box filter after the decoder removes
everything above about 1/8 of the voxel frequency, so decoding at stride 4 and upsampling loses nothing that
matters and costs a fraction of a full-resolution decoder (``benchmarks/README.md``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from noder_monai.functional import SeparableField, box_filter, check_spatial_dims

__all__ = [
    "ENCODER_STRIDE",
    "DECODER_STRIDE",
    "DeformationEncoder",
    "DeformationDecoder",
    "DeformationAutoencoder",
    "smooth_upsample",
    "smooth_upsample_field",
    "pad_to_multiple",
]

ENCODER_STRIDE = 8
"""Image voxels per latent voxel along each axis."""
DECODER_STRIDE = 4
"""Image voxels per decoder-output voxel along each axis."""


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "constant") -> torch.Tensor:
    """Pad the spatial axes of ``x`` (N, C, *spatial) at their far end up to a multiple of ``multiple``.

    Args:
        x: tensor of shape (N, C, *spatial).
        multiple: every spatial size of the result is a multiple of this.
        mode: ``torch.nn.functional.pad`` mode ("constant" pads zeros, "replicate" repeats the edge).

    Returns:
        tensor of shape (N, C, *ceil(spatial / multiple) * multiple).
    """
    pads: list[int] = []
    for size in reversed(x.shape[2:]):
        pads += [0, (-size) % multiple]
    if not any(pads):
        return x
    return F.pad(x, pads, mode=mode)


@functools.lru_cache(maxsize=64)
def _smooth_upsample_matrix(
    in_size: int, factor: int, out_size: int, kernel_size: int, device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(out_size, in_size) matrix of 1D linear upsampling by ``factor`` then a zero-padded box mean, computed in
    float64 on the CPU and kept per ``device`` and ``dtype`` (no copy to the device per call)."""
    with torch.inference_mode(False), torch.no_grad():  # cached: an ordinary tensor even if first made for a prediction
        if device is not None or dtype != torch.float64:
            return _smooth_upsample_matrix(in_size, factor, out_size, kernel_size).to(device=device, dtype=dtype)
        basis = torch.eye(in_size, dtype=torch.float64)[None]
        if factor > 1:
            basis = F.interpolate(basis, scale_factor=factor, mode="linear", align_corners=False)
        return box_filter(basis[:, :, :out_size], kernel_size)[0].T.contiguous()


def smooth_upsample_field(
    field: torch.Tensor, factor: int, spatial_size: Sequence[int], kernel_size: int = 1
) -> SeparableField:
    """:func:`smooth_upsample` as a :class:`~noder_monai.functional.SeparableField` (not yet evaluated), whose
    :meth:`~noder_monai.functional.SeparableField.dense` is the result; its regularisers and boxes cost only
    products on the coarse grid."""
    spatial_dims = field.ndim - 2
    if len(spatial_size) != spatial_dims:
        raise ValueError(f"spatial_size must have {spatial_dims} entries, got {tuple(spatial_size)}.")
    matrices = []
    for axis, (size_in, size_out) in enumerate(zip(field.shape[2:], spatial_size)):
        if not 1 <= int(size_out) <= size_in * factor:
            raise ValueError(f"spatial_size[{axis}] must be in [1, {size_in * factor}], got {size_out}.")
        matrices.append(_smooth_upsample_matrix(int(size_in), int(factor), int(size_out), int(kernel_size),
                                                field.device, field.dtype))
    return SeparableField(field, tuple(matrices))


def smooth_upsample(field: torch.Tensor, factor: int, spatial_size: Sequence[int], kernel_size: int = 1) -> torch.Tensor:
    """Linear upsampling by an integer factor, crop to ``spatial_size``, then a box filter (zero padding).

    Equal to ``box_filter(interpolate(field, scale_factor=factor, mode="(tri|bi)linear")[crop], kernel_size)`` up to
    float rounding, but computed as one small matrix product per axis, because both operators are separable and
    linear (many times cheaper than ``interpolate`` then ``box_filter``, see ``benchmarks/README.md``). Voxel centres follow ``align_corners=False``: output voxel
    ``i`` lies in input voxel ``i // factor``. Values are interpolated, not rescaled (the caller converts units).

    Args:
        field: (N, C, *coarse).
        factor: integer upsampling factor >= 1.
        spatial_size: output size, at most ``coarse * factor`` along each axis.
        kernel_size: odd box width in output voxels; 1 means no smoothing.

    Returns:
        (N, C, *spatial_size).
    """
    return smooth_upsample_field(field, factor, spatial_size, kernel_size).dense()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order (3D: ``channels_last_3d``), in which oneDNN's convolutions run about
    twice as fast on the CPU as in the default order (``benchmarks/README.md``); values and shape are unchanged."""
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)


class DeformationEncoder(nn.Module):
    """Encode a displacement field into a latent map on a grid ``ENCODER_STRIDE`` times coarser.

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of the latent map. Defaults to 4.
        channels: output channels of the stride-2 convolutions; exactly three, so the latent grid has stride 8.
            Defaults to (16, 32, 32).

    Shapes:
        input (N, spatial_dims, *S), voxel units; output (N, latent_channels, *ceil(S / 8)).
    """

    def __init__(self, spatial_dims: int = 3, latent_channels: int = 4, channels: Sequence[int] = (16, 32, 32)):
        super().__init__()
        check_spatial_dims(spatial_dims, (2, 3))
        if len(channels) != 3:
            raise ValueError(f"channels must have exactly 3 entries (stride {ENCODER_STRIDE}), got {tuple(channels)}.")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}.")
        self.spatial_dims = spatial_dims
        layers: list[nn.Module] = []
        in_channels = spatial_dims
        for out_channels in channels:
            layers.append(
                Convolution(spatial_dims, in_channels, out_channels, strides=2, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.2}), norm=None)
            )
            in_channels = out_channels
        layers.append(Convolution(spatial_dims, in_channels, latent_channels, kernel_size=3, conv_only=True))
        self.net = nn.Sequential(*layers)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        if ddf.ndim != self.spatial_dims + 2 or ddf.shape[1] != self.spatial_dims:
            raise ValueError(
                f"ddf must have shape (N, {self.spatial_dims}, *spatial) for spatial_dims={self.spatial_dims}, "
                f"got {tuple(ddf.shape)}."
            )
        return self.net(_channels_last(pad_to_multiple(ddf, ENCODER_STRIDE)))


class DeformationDecoder(nn.Module):
    """Decode a latent map into a displacement field on a grid ``DECODER_STRIDE`` times coarser than the image.

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of the latent map. Defaults to 4.
        channels: feature channels before and after the single x2 upsampling. Defaults to (32, 16).

    Shapes:
        input (N, latent_channels, *L); output (N, spatial_dims, *(2 L)), in image-grid voxel units.
    """

    def __init__(self, spatial_dims: int = 3, latent_channels: int = 4, channels: Sequence[int] = (32, 16)):
        super().__init__()
        check_spatial_dims(spatial_dims, (2, 3))
        if len(channels) != 2:
            raise ValueError(f"channels must have exactly 2 entries, got {tuple(channels)}.")
        act = ("leakyrelu", {"negative_slope": 0.2})
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.net = nn.Sequential(
            Convolution(spatial_dims, latent_channels, channels[0], kernel_size=3, act=act, norm=None),
            nn.Upsample(scale_factor=2, mode="trilinear" if spatial_dims == 3 else "bilinear", align_corners=False),
            Convolution(spatial_dims, channels[0], channels[1], kernel_size=3, act=act, norm=None),
            Convolution(spatial_dims, channels[1], spatial_dims, kernel_size=3, conv_only=True),
        )
        head = self.net[-1].conv
        nn.init.normal_(head.weight, std=1e-5)
        nn.init.zeros_(head.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != self.spatial_dims + 2 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z must have shape (N, {self.latent_channels}, *latent) for spatial_dims={self.spatial_dims}, "
                f"got {tuple(z.shape)}."
            )
        return self.net(_channels_last(z))


class DeformationAutoencoder(nn.Module):
    """Encoder, decoder and the smoothing that NODER applies after decoding, for pretraining on deformation fields.

    ``forward(ddf)`` returns ``box_filter(crop(upsample_x4(decoder(encoder(ddf)))))`` (:func:`smooth_upsample`): exactly the path a latent
    state takes to a field inside NODER, so pretrained weights fit NODER without adaptation.

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of the latent map. Defaults to 4.
        encoder_channels: see :class:`DeformationEncoder`.
        decoder_channels: see :class:`DeformationDecoder`.
        smoothing_kernel: box-filter width in image voxels (odd). Defaults to 15.

    Shapes:
        input and output (N, spatial_dims, *S) in voxel units.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        latent_channels: int = 4,
        encoder_channels: Sequence[int] = (16, 32, 32),
        decoder_channels: Sequence[int] = (32, 16),
        smoothing_kernel: int = 15,
    ):
        super().__init__()
        self.encoder = DeformationEncoder(spatial_dims, latent_channels, encoder_channels)
        self.decoder = DeformationDecoder(spatial_dims, latent_channels, decoder_channels)
        self.smoothing_kernel = smoothing_kernel

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        return smooth_upsample(self.decoder(self.encoder(ddf)), DECODER_STRIDE, ddf.shape[2:], self.smoothing_kernel)
