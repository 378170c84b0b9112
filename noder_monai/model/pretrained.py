"""The pretrained deformation autoencoder a fit starts from: where the shipped weights are, and loading them.

The weights live once in the repository, in ``bundle/models/`` (what the bundle's configs load); a wheel carries a
copy in ``noder_monai/model/weights/`` (setup.py copies it at build time), so a non-editable install finds them too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from noder_monai.functional import check_spatial_dims
from noder_monai.model.checkpoint import AUTOENCODER_FORMAT, check_state_dict, read_checkpoint
from noder_monai.networks import NODER, DeformationAutoencoder, check_noder_arguments
from noder_monai.utils import PathLike

__all__ = [
    "ARCHITECTURE_KEYS",
    "BUNDLE_MODELS_DIR",
    "WEIGHTS_DIR",
    "WEIGHT_FILES",
    "default_autoencoder_path",
    "load_autoencoder",
    "load_autoencoder_weights",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where a wheel holds the pretrained autoencoders (copied there from ``bundle/models/`` at build time, see setup.py)."""
BUNDLE_MODELS_DIR = Path(__file__).resolve().parents[2] / "bundle" / "models"
"""The one copy in a checkout (an editable install): the bundle's ``models/`` folder, which the configs load."""
WEIGHT_FILES = {3: "model.pt", 2: "model_2d.pt"}
"""File name of the pretrained autoencoder per spatial dims."""

ARCHITECTURE_KEYS = ("spatial_dims", "latent_channels", "encoder_channels", "decoder_channels", "smoothing_kernel")
"""The ``PretrainConfig`` fields that define the network (the ``config`` of an autoencoder file)."""


def default_autoencoder_path(spatial_dims: int) -> Path:
    """The pretrained autoencoder shipped with the package for ``spatial_dims`` (2 or 3).

    The file fits NODER's default network (``latent_channels=4``, ``encoder_channels=(16, 32, 32)``,
    ``decoder_channels=(32, 16)``, ``smoothing_kernel=15``); how it was trained is in ``bundle/docs/pretraining.md``.
    It is ``bundle/models/model.pt`` (3D) or ``model_2d.pt`` (2D): from the wheel's package data, else from the
    checkout this package is imported from.

    Raises:
        ValueError: if ``spatial_dims`` is not 2 or 3.
        FileNotFoundError: if the installed package lacks the file (a build without its package data).
    """
    check_spatial_dims(spatial_dims, (2, 3))
    candidates = [folder / WEIGHT_FILES[spatial_dims] for folder in (WEIGHTS_DIR, BUNDLE_MODELS_DIR)]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"the shipped {spatial_dims}D autoencoder is missing from this installation (looked for "
            f"{[str(c) for c in candidates]})."
        )
    return path


def _autoencoder_config(checkpoint: dict, path: str | Path) -> dict:
    """The checked architecture of an autoencoder file: every :data:`ARCHITECTURE_KEYS` entry present, known, within
    bounds, and fitting the file's weights (checked without allocating, :func:`~noder_monai.model.checkpoint.
    check_state_dict`).

    Raises:
        ValueError: naming the file and the field.
    """
    where = f"autoencoder {str(path)!r}"
    config = checkpoint.get("config")
    if not isinstance(config, dict) or any(key not in config for key in ARCHITECTURE_KEYS):
        raise ValueError(f"{where}: field 'config' must hold {list(ARCHITECTURE_KEYS)}, got "
                         f"{sorted(config) if isinstance(config, dict) else type(config).__name__}.")
    architecture = {key: config[key] for key in ARCHITECTURE_KEYS}
    if architecture["spatial_dims"] not in (2, 3) or isinstance(architecture["spatial_dims"], bool):
        raise ValueError(f"{where}: field 'config.spatial_dims' must be 2 or 3, got {architecture['spatial_dims']!r}.")
    check_noder_arguments({k: v for k, v in architecture.items() if k != "spatial_dims"}, where, "config.")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: field 'state_dict' must be a dictionary of tensors.")
    check_state_dict(lambda: DeformationAutoencoder(**architecture), state, where, "config")
    return architecture


def load_autoencoder_weights(model: NODER, path: str | Path) -> None:
    """Copy a pretrained deformation autoencoder's encoder and decoder weights into ``model``.

    The file holds ``{"format": AUTOENCODER_FORMAT, "config": {...}, "state_dict": DeformationAutoencoder state}``
    and the same weights at the top level too (``encoder.*``, ``decoder.*``: what ``monai.bundle.load`` copies into a
    ``NODER`` by name); ``state_dict`` is the one read here, and every field is checked before use.

    Raises:
        ValueError: naming the file, if it is another kind of file, a field is missing or out of bounds, or its
            networks differ from ``model``'s.
    """
    checkpoint = read_checkpoint(path, AUTOENCODER_FORMAT, map_location=model.initial_state.device)
    config = _autoencoder_config(checkpoint, path)
    if config["spatial_dims"] != model.spatial_dims:
        raise ValueError(
            f"autoencoder {str(path)!r} is for spatial_dims={config['spatial_dims']}, the model has {model.spatial_dims}."
        )
    for part in ("encoder", "decoder"):
        prefix = f"{part}."
        weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        try:
            getattr(model, part).load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"autoencoder {str(path)!r}: its {part} does not match the model's: {error}") from error


def load_autoencoder(path: PathLike, map_location: str | torch.device = "cpu") -> DeformationAutoencoder:
    """Build a :class:`DeformationAutoencoder` from an ``AUTOENCODER_FORMAT`` file and load its weights strictly;
    every field is checked before anything is built.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file and field, if it is another kind of file, a field is missing or out of bounds,
            or its weights do not fit its config.
    """
    checkpoint = read_checkpoint(path, AUTOENCODER_FORMAT, map_location)
    model = DeformationAutoencoder(**_autoencoder_config(checkpoint, path))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval()
