"""A fitted subject: the trajectory model plus everything needed to predict in the user's space, as one file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from monai.networks.blocks import Warp

from noder_monai import __version__
from noder_monai.data import IntensityMapping
from noder_monai.metrics import jacobian_determinant
from noder_monai.networks import NODER
from noder_monai.utils import atomic_write

__all__ = [
    "AUTOENCODER_FORMAT",
    "SUBJECT_FORMAT",
    "FittedSubject",
    "Prediction",
    "atomic_torch_save",
    "load_autoencoder_weights",
    "read_checkpoint",
]

SUBJECT_FORMAT = "noder-monai/fitted-subject"
AUTOENCODER_FORMAT = "noder-monai/deformation-autoencoder"


def atomic_torch_save(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename: no half-written file is ever visible."""
    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


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
    """

    times: torch.Tensor
    images: torch.Tensor
    ddfs: torch.Tensor
    jacobians: torch.Tensor
    labels: torch.Tensor | None
    affine: torch.Tensor


class FittedSubject:
    """One subject's fitted trajectory; ``save``/``load`` it as a single file, ``predict`` at any times.

    Args:
        model: the fitted :class:`NODER`.
        baseline: (1, 1, *S) first scan, normalised intensities (the only image ever warped).
        times: (T,) observed times in the user's unit; time is scaled as (t - times[0]) / (times[-1] - times[0]).
        affine: (4, 4) voxel-to-world matrix of the scans.
        intensity: the intensity mapping used for every scan of the subject; predictions are mapped back with it.
        subject: subject identifier.
        fit_config: the plain optimisation settings used.
        history: per-epoch loss records.
    """

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
    ):
        self.model = model
        self.baseline = baseline
        self.times = torch.as_tensor(times, dtype=torch.float64).cpu()
        self.affine = torch.as_tensor(affine, dtype=torch.float64).cpu()
        self.intensity = intensity
        self.subject = subject
        self.fit_config = fit_config or {}
        self.history = history or []
        self._label_warp = Warp(mode="nearest", padding_mode="border")

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return self.model.spatial_size

    @property
    def device(self) -> torch.device:
        return self.baseline.device

    def scaled_time(self, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """User times (Q,) -> scaled times (Q,) float32, 0 at the first scan and 1 at the last."""
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1).cpu()
        if not torch.isfinite(times).all():
            raise ValueError(f"times must be finite numbers, got {times.tolist()}.")
        scaled = (times - self.times[0]) / (self.times[-1] - self.times[0])
        return scaled.to(device=self.device, dtype=torch.float32)

    def check_spatial_size(self, shape: Sequence[int], name: str) -> None:
        """Raise a ValueError naming ``name`` if ``shape`` (spatial only) is not the fitted image size."""
        if tuple(int(s) for s in shape) != tuple(self.spatial_size):
            raise ValueError(
                f"{name} has spatial size {tuple(int(s) for s in shape)}, but subject {self.subject!r} was fitted to "
                f"{len(self.spatial_size)}D images of size {tuple(self.spatial_size)}."
            )

    @torch.inference_mode()
    def displacement(self, times: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Displacement fields (Q, D, *S) in voxels at user ``times`` (Q,)."""
        return self.model.displacement(self.scaled_time(times))

    @torch.inference_mode()
    def predict(
        self,
        times: Sequence[float] | torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 8,
    ) -> Prediction:
        """Images, fields, Jacobian maps and (optionally) carried labels at any user ``times``.

        Args:
            times: (Q,) query times in the user's unit, inside or outside the observed span, any order.
            labels: optional baseline label map (*S), (1, *S) or (1, 1, *S), warped with nearest-neighbour sampling.
            batch_size: time points decoded and warped at once (bounds memory on large images).

        Returns:
            a :class:`Prediction` on the CPU.
        """
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        if times.numel() == 0:
            raise ValueError("times must contain at least one time point.")
        if labels is not None:
            labels = torch.as_tensor(labels)
            while labels.ndim > self.model.spatial_dims and labels.shape[0] == 1:
                labels = labels[0]
            self.check_spatial_size(labels.shape, "labels")
            labels = labels.to(device=self.device, dtype=torch.float32)[None, None]
        images, ddfs, jacobians, warped_labels = [], [], [], []
        for chunk in times.split(batch_size):
            ddf = self.model.displacement(self.scaled_time(chunk))
            moved = self.model.warp(self.baseline.expand(len(chunk), *self.baseline.shape[1:]), ddf)
            images.append(self.intensity.inverse(moved).cpu())
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
            "times": self.times.tolist(),
            "time_origin": float(self.times[0]),
            "time_scale": float(self.times[-1] - self.times[0]),
            "spatial_size": list(self.spatial_size),
            "affine": self.affine.tolist(),
            "intensity": self.intensity.to_dict(),
            "fit_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.fit_config.items()},
            "history": self.history,
        }

    def save(self, path: str | Path) -> Path:
        """Write the subject to ``path`` atomically (temporary name, then rename). Returns the path."""
        return atomic_torch_save(self.state(), path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "FittedSubject":
        """Load a file written by :meth:`save` with ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming the file, if it is not a fitted subject or its weights do not fit its recorded size.
        """
        checkpoint = read_checkpoint(path, SUBJECT_FORMAT, map_location)
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
        return cls(
            model=model.to(map_location).eval(),
            baseline=baseline.to(map_location),
            times=torch.tensor(checkpoint["times"], dtype=torch.float64),
            affine=torch.tensor(checkpoint["affine"], dtype=torch.float64),
            intensity=IntensityMapping.from_dict(checkpoint["intensity"]),
            subject=checkpoint["subject"],
            fit_config=checkpoint["fit_config"],
            history=checkpoint["history"],
        )
