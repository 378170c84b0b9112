"""The latent vector field f(z, t) whose flow is NODER's deformation trajectory."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["LatentDynamics"]


class LatentDynamics(nn.Module):
    """dz/dt = f(z, t): strided convolutions over z, flatten, add a time embedding, fully connected layers, reshape.

    The flattened size follows from ``latent_shape``, so any image size works; the module is built per subject.
    The last layer starts at zero, so the initial trajectory is constant (the identity deformation).

    Args:
        latent_shape: (C, *L), the shape of one latent state.
        channels: output channels of the stride-2 convolutions. Defaults to (16, 16).
        hidden_features: width of the fully connected layers. Defaults to 64.
        num_hidden_layers: fully connected hidden layers after the time is added. Defaults to 2.

    Shapes:
        ``forward(t, z)``: t a scalar tensor (scaled time), z (B, C, *L); returns dz/dt of shape (B, C, *L).
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        channels: Sequence[int] = (16, 16),
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
    ):
        super().__init__()
        latent_shape = tuple(int(s) for s in latent_shape)
        if len(latent_shape) not in (3, 4) or min(latent_shape) < 1:
            raise ValueError(f"latent_shape must be (C, *L) with 2 or 3 spatial sizes >= 1, got {latent_shape}.")
        if hidden_features < 1 or num_hidden_layers < 1:
            raise ValueError(
                f"hidden_features and num_hidden_layers must be >= 1, got {hidden_features} and {num_hidden_layers}."
            )
        spatial_dims = len(latent_shape) - 1
        self.latent_shape = latent_shape
        convs: list[nn.Module] = []
        in_channels = latent_shape[0]
        for out_channels in channels:
            convs.append(Convolution(spatial_dims, in_channels, out_channels, strides=2, kernel_size=3, act="tanh", norm=None))
            in_channels = out_channels
        self.features = nn.Sequential(*convs, nn.Flatten())
        with torch.no_grad():
            num_features = self.features(torch.zeros(1, *latent_shape)).shape[1]
        self.project = nn.Linear(num_features, hidden_features)
        self.time_embedding = nn.Sequential(nn.Linear(1, hidden_features), nn.Tanh(), nn.Linear(hidden_features, hidden_features))
        layers: list[nn.Module] = []
        for _ in range(num_hidden_layers):
            layers += [nn.Tanh(), nn.Linear(hidden_features, hidden_features)]
        self.head = nn.Linear(hidden_features, math.prod(latent_shape))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.mlp = nn.Sequential(*layers, nn.Tanh(), self.head)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}.")
        time = t.reshape(1, 1).to(z.dtype)
        hidden = self.project(self.features(z)) + self.time_embedding(time)
        return self.mlp(hidden).reshape(z.shape)
