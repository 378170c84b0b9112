"""The one-file formats of the package: a fitted subject and a deformation autoencoder, read and checked.

Both are plain dictionaries (tensors, numbers, strings, lists) written with ``torch.save`` to a temporary name and
renamed, and read with ``torch.load(weights_only=True)``; a ``format`` entry says which kind a file is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noder_monai.networks import NODER, check_noder_arguments
from noder_monai.utils import atomic_write

__all__ = ["AUTOENCODER_FORMAT", "MAX_PARAMETERS", "SUBJECT_FORMAT", "atomic_torch_save", "check_state_dict",
           "read_checkpoint", "validate_subject_checkpoint"]

SUBJECT_FORMAT = "noder-monai/fitted-subject"
"""``format`` of a fitted-subject file (:meth:`~noder_monai.model.FittedSubject.save`)."""
AUTOENCODER_FORMAT = "noder-monai/deformation-autoencoder"
"""``format`` of a pretrained deformation-autoencoder file (``noder pretrain``, ``bundle/models/``)."""
MAX_PARAMETERS = 2**28
"""Most parameters a file may describe (1 GiB of float32): the package's networks have well under a million."""


def atomic_torch_save(obj: dict, path: str | Path) -> Path:
    """``torch.save`` in memory, then :func:`~noder_monai.utils.atomic_write` (temporary file, rename): no
    half-written file is ever visible, and a failed write (disk full, ...) is an ``OutputWriteError`` naming the file.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return Path(atomic_write(path, buffer.getvalue()))


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


def check_state_dict(build: Callable[[], nn.Module], state_dict: dict, where: str, field: str, summary: str = "") -> None:
    """Check a file's network description against its weights without allocating: ``build()`` runs on PyTorch's
    ``meta`` device (shapes only), its parameter count must not exceed :data:`MAX_PARAMETERS`, and ``state_dict``
    must have exactly its keys and shapes.

    Args:
        build: makes the network from the file's description (e.g. ``lambda: NODER(**network)``).
        state_dict: the file's weights.
        where: what the messages start with, e.g. ``"checkpoint 'model.pt'"``.
        field: the file's field holding the description, named in the messages.
        summary: what the description says, for the messages (e.g. ``"spatial_size [48, 48]"``).

    Raises:
        ValueError: naming ``where`` and the field: the description fails to build, asks for too many parameters,
            or does not match the weights' keys or shapes.
    """
    try:
        with torch.device("meta"):
            network = build()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{where}: field '{field}' does not describe a network: {error}") from error
    count = sum(parameter.numel() for parameter in network.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"{where}: field '{field}' describes a network of {count} parameters, more than "
                         f"{MAX_PARAMETERS}; the file is damaged or crafted.")
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in state_dict.items()}
    problems = [f"missing {sorted(set(expected) - set(given))}"] if set(expected) - set(given) else []
    problems += [f"unexpected {sorted(set(given) - set(expected))}"] if set(given) - set(expected) else []
    problems += [f"'{key}' has shape {given[key]}, the network needs {shape}" for key, shape in expected.items()
                 if key in given and given[key] != shape][:3]
    if problems:
        described = f" ({summary})" if summary else ""
        raise ValueError(f"{where}: field 'state_dict' does not fit field '{field}'{described}: {'; '.join(problems)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_subject_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Check every field of a fitted-subject file before it is used; a ValueError names the file and the field.

    Nothing is built before every field passed. Required: ``network`` (:class:`NODER` arguments: known names only,
    each within :data:`~noder_monai.networks.ARGUMENT_BOUNDS`, ``spatial_size`` among them), ``state_dict`` (dict of
    tensors whose keys and shapes are those of that network, :func:`check_state_dict`),
    ``baseline`` (finite tensor ``(1, 1, *spatial)``, its size checked against the weights when loading), ``times`` (>= 2 finite, strictly increasing numbers),
    ``affine`` (finite 4x4), ``intensity`` (finite ``lower`` < ``upper``), ``subject`` (string), ``fit_config``
    (dict), ``history`` (list). Optional: ``geometry``, ``fitted_on``, ``source_choice`` and ``ensemble`` (dicts, or
    None; the last two checked entry by entry when loaded), ``scans``
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

    network = check_noder_arguments(checkpoint["network"], where, "network.")
    size = network.get("spatial_size")
    if size is None:
        raise bad("network.spatial_size", "2 or 3 positive integers", size)
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("state_dict", "a non-empty dictionary of tensors", type(state).__name__)
    check_state_dict(lambda: NODER(**network), state, where, "network", f"spatial_size {list(size)}")
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
    for key in ("geometry", "fitted_on", "source_choice", "ensemble"):
        if checkpoint.get(key) is not None and not isinstance(checkpoint[key], dict):
            raise bad(key, "a dictionary or None", checkpoint[key])
    for key, count in (("scans", len(times)), ("template", 1)):
        image = checkpoint.get(key)
        expected = (count, 1, *size)
        if image is not None and (not isinstance(image, torch.Tensor) or tuple(image.shape) != expected):
            raise bad(key, f"None or a tensor of shape {expected}", image)
        if image is not None and not bool(torch.isfinite(image).all()):
            raise ValueError(f"{where}: field {key!r} contains NaN or Inf.")
