"""Pretrain the deformation autoencoder whose encoder and decoder NODER starts from, and find the shipped weights.

:func:`pretrain_autoencoder` trains :class:`~noder_monai.networks.DeformationAutoencoder` to reproduce displacement
fields (loss: mean squared error, plus an optional gradient-smoothness term), either on fields generated on the fly
(:mod:`noder_monai.data.deformation_fields`, no download) or on the user's own displacement-field files (for example
VoxelMorph or ANTs output), with a validation split, per-epoch metrics (mean endpoint error in voxels), a tqdm
progress bar, TensorBoard scalars when ``torch.utils.tensorboard`` is importable, and resumable atomic checkpoints.

Files written to ``output_dir``:

* ``autoencoder.pt``: the weights of the epoch with the lowest validation endpoint error, an
  ``AUTOENCODER_FORMAT`` file (``{"format", "config", "state_dict", "training", "package_version"}``) that
  ``fit_sequence(pretrained=path)`` loads;
* ``checkpoint.pt``: the last epoch's weights plus the optimizer state, the epoch counter and the history (also an
  ``AUTOENCODER_FORMAT`` file); ``resume=True`` continues from it;
* ``history.json``: one record per epoch; ``tensorboard/``: event files, if TensorBoard is installed.

:func:`~noder_monai.model.default_autoencoder_path` returns the weights shipped with the package (``bundle/models/``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss
from tqdm.auto import tqdm

from noder_monai import __version__
from noder_monai.data.deformation_fields import (
    DisplacementFieldPatches,
    GeneratedDeformationFields,
    list_displacement_fields,
)
from noder_monai.functional import check_spatial_dims
from noder_monai.model.checkpoint import AUTOENCODER_FORMAT, atomic_torch_save, read_checkpoint
from noder_monai.model.pretrained import ARCHITECTURE_KEYS
from noder_monai.networks import DeformationAutoencoder
from noder_monai.utils import PathLike, cosine_decay, summary_writer, write_json

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "evaluate_autoencoder",
    "mean_endpoint_error",
    "pretrain_autoencoder",
]

logger = logging.getLogger(__name__)


RESUMABLE_CHANGES = ("epochs",)
"""Settings that may differ between a checkpoint and the run that resumes it."""


_AUTOENCODER_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(DeformationAutoencoder).parameters.items()
}


@dataclasses.dataclass
class PretrainConfig:
    """Settings of one pretraining run (plain values, stored in every file it writes).

    Args:
        spatial_dims: 2 or 3.
        spatial_size: edge of the generated fields, or of the random crops taken from the user's fields (voxels).
        epochs: number of epochs; an epoch is ``steps_per_epoch`` Adam steps followed by a validation pass.
        steps_per_epoch: optimisation steps per epoch.
        batch_size: fields per step.
        learning_rate: initial Adam learning rate; it decays along a cosine to ``final_learning_rate`` over all steps.
        final_learning_rate: learning rate at the last step.
        smoothness_weight: weight of MONAI ``DiffusionLoss`` (squared field gradient) of the reconstruction.
        validation_fields: number of generated validation fields (generated source).
        validation_fraction: share of the user's files held out for validation when the datalist names no
            ``validation`` list (at least one file).
        latent_channels, encoder_channels, decoder_channels, smoothing_kernel: the network, see
            :class:`~noder_monai.networks.DeformationAutoencoder` (its defaults are these defaults).
        generator: keyword arguments of :class:`~noder_monai.data.deformation_fields.DeformationFieldGenerator`
            other than ``spatial_size`` (generated source).
        units, frame: how the user's files are read, see
            :func:`~noder_monai.data.deformation_fields.load_displacement_field`.
        max_plausible_displacement: its ``max_displacement`` (largest plausible displacement of a file, voxels).
        flips: random axis flips of the user's training crops.
        seed: seed of the initial weights, the generated fields, the split, the crops and the flips.
    """

    spatial_dims: int = 3
    spatial_size: int = 32
    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-3
    final_learning_rate: float = 1e-4
    smoothness_weight: float = 0.0
    validation_fields: int = 64
    validation_fraction: float = 0.1
    latent_channels: int = _AUTOENCODER_DEFAULTS["latent_channels"]
    encoder_channels: Sequence[int] = _AUTOENCODER_DEFAULTS["encoder_channels"]
    decoder_channels: Sequence[int] = _AUTOENCODER_DEFAULTS["decoder_channels"]
    smoothing_kernel: int = _AUTOENCODER_DEFAULTS["smoothing_kernel"]
    generator: dict = dataclasses.field(default_factory=dict)
    units: str = "voxel"
    frame: str = "LPS"
    max_plausible_displacement: float | None = None
    flips: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.encoder_channels = [int(c) for c in self.encoder_channels]
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        self.generator = dict(self.generator or {})
        check_spatial_dims(self.spatial_dims, (2, 3))
        for name in ("spatial_size", "epochs", "steps_per_epoch", "batch_size", "validation_fields"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.spatial_size < 8:
            raise ValueError(f"spatial_size must be >= 8, got {self.spatial_size!r}.")
        if not self.learning_rate > 0 or not 0 <= self.final_learning_rate <= self.learning_rate:
            raise ValueError(
                f"learning_rate must be > 0 and final_learning_rate in [0, learning_rate], got {self.learning_rate!r} "
                f"and {self.final_learning_rate!r}."
            )
        if not self.smoothness_weight >= 0:
            raise ValueError(f"smoothness_weight must be >= 0, got {self.smoothness_weight!r}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}.")

    def architecture(self) -> dict[str, Any]:
        """The ``config`` of the autoencoder file: :class:`DeformationAutoencoder` keyword arguments."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """Plain-value copy (lists instead of tuples), safe for ``torch.load(weights_only=True)`` and JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class PretrainResult:
    """What :func:`pretrain_autoencoder` produced.

    Attributes:
        autoencoder: path of the best-validation ``AUTOENCODER_FORMAT`` file.
        checkpoint: path of the last-epoch checkpoint (weights, optimizer, epoch counter, history).
        history: per-epoch records (``epoch``, ``learning_rate``, ``train_loss``, ``train_epe``,
            ``validation_mse``, ``validation_epe``, ``seconds``), all epochs including resumed ones.
        best_epoch: epoch (0-based) of the saved best weights.
        best_validation_epe: its mean validation endpoint error in voxels.
    """

    autoencoder: Path
    checkpoint: Path
    history: list[dict]
    best_epoch: int
    best_validation_epe: float


def mean_endpoint_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of the Euclidean distance between two displacement fields, per field.

    Args:
        prediction: (N, D, *S) voxels.
        target: (N, D, *S) voxels.

    Returns:
        (N,) voxels.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(prediction.shape)} and {tuple(target.shape)}."
        )
    return (prediction - target).pow(2).sum(1).sqrt().flatten(1).mean(1)


@torch.no_grad()
def evaluate_autoencoder(model: DeformationAutoencoder, fields: Any, batch_size: int = 8) -> dict[str, float]:
    """Reconstruction error of ``model`` on displacement fields.

    Args:
        model: the autoencoder (evaluated on its own device, in eval mode).
        fields: a (N, D, *S) tensor, or a dataset with ``len`` and either ``batch(indices)`` or items (D, *S);
            a dataset whose items differ in size needs ``batch_size=1``.
        batch_size: fields per forward pass.

    Returns:
        ``{"mse", "epe", "magnitude"}``: mean squared error per component (voxels^2), mean endpoint error (voxels)
        and the mean displacement length of the fields (voxels, for scale), all averaged over fields.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = fields.shape[0] if isinstance(fields, torch.Tensor) else len(fields)
    totals = {"mse": 0.0, "epe": 0.0, "magnitude": 0.0}
    for start in range(0, count, batch_size):
        indices = range(start, min(start + batch_size, count))
        if isinstance(fields, torch.Tensor):
            chunk = fields[start : indices[-1] + 1]
        elif hasattr(fields, "batch"):
            chunk = fields.batch(indices)
        else:
            chunk = torch.stack([fields[i] for i in indices])
        chunk = chunk.to(device)
        reconstruction = model(chunk)
        totals["mse"] += float(F.mse_loss(reconstruction, chunk, reduction="none").flatten(1).mean(1).sum())
        totals["epe"] += float(mean_endpoint_error(reconstruction, chunk).sum())
        totals["magnitude"] += float(chunk.pow(2).sum(1).sqrt().flatten(1).mean(1).sum())
    model.train(was_training)
    return {key: value / count for key, value in totals.items()}


def _datasets(config: PretrainConfig, fields: Any) -> tuple[Any, Any, Any]:
    """(training dataset indexable up to epochs * steps * batch, validation dataset, plain source description).

    User validation fields are whole files, possibly of different sizes: evaluate them one at a time.
    """
    size = (config.spatial_size,) * config.spatial_dims
    samples = config.epochs * config.steps_per_epoch * config.batch_size
    if fields is None:
        train = GeneratedDeformationFields(samples, size, config.seed, stream=0, **config.generator)
        count = config.validation_fields
        validation = GeneratedDeformationFields(count, size, config.seed, stream=1, **config.generator)
        return train, validation, "generated"
    lists = list_displacement_fields(fields)
    train_files, validation_files = lists["training"], lists["validation"]
    if not validation_files:
        if len(train_files) < 2:
            raise ValueError(
                f"fields: {len(train_files)} displacement-field file found; pretraining needs at least 2 (one held out "
                "for validation) or a datalist with a 'validation' list."
            )
        order = np.random.default_rng(config.seed).permutation(len(train_files))
        held = max(1, round(config.validation_fraction * len(train_files)))
        validation_files = [train_files[i] for i in sorted(order[:held])]
        train_files = [train_files[i] for i in sorted(order[held:])]
    read = {"units": config.units, "frame": config.frame, "max_displacement": config.max_plausible_displacement}
    train = DisplacementFieldPatches(
        train_files, config.spatial_dims, size, num_samples=samples, flips=config.flips, seed=config.seed, **read
    )
    validation = DisplacementFieldPatches(validation_files, config.spatial_dims, None, **read)
    source = {"training": [str(f) for f in train_files], "validation": [str(f) for f in validation_files]}
    return train, validation, source


def _learning_rate(config: PretrainConfig, step: int) -> float:
    """Cosine decay from ``learning_rate`` at step 0 to ``final_learning_rate`` at the last step."""
    total = config.epochs * config.steps_per_epoch - 1
    return cosine_decay(step, total, config.learning_rate, config.final_learning_rate)


def _resume_state(path: Path, config: PretrainConfig, source: Any, device: torch.device) -> dict | None:
    if not path.is_file():
        return None
    state = read_checkpoint(path, AUTOENCODER_FORMAT, device)
    previous = state["training"]["config"]
    current = config.to_dict()
    changed = {
        key: (previous.get(key), value)
        for key, value in current.items()
        if key not in RESUMABLE_CHANGES and previous.get(key) != value
    }
    if state["training"]["source"] != source:
        changed["fields"] = (state["training"]["source"], source)
    if changed:
        raise ValueError(
            f"checkpoint {str(path)!r} was written with other settings {changed} (old, new); resume with the same "
            "settings (only epochs may change), pass resume=False to start again, or use another output_dir."
        )
    return state


def _start(config: PretrainConfig, source: Any, checkpoint_path: Path | None,
           device: torch.device) -> tuple[DeformationAutoencoder, torch.optim.Optimizer, list[dict], dict]:
    """The seeded model and optimizer, with the weights, optimizer state, history and best epoch of
    ``checkpoint_path`` when it exists (a resumed run); None starts again."""
    torch.manual_seed(config.seed)
    model = DeformationAutoencoder(**config.architecture()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    state = _resume_state(checkpoint_path, config, source, device) if checkpoint_path is not None else None
    if state is None:
        return model, optimizer, [], {"epoch": -1, "validation_epe": math.inf}
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming %s at epoch %d of %d", checkpoint_path, len(state["history"]), config.epochs)
    return model, optimizer, state["history"], state["best"]


def _train_epoch(model: DeformationAutoencoder, optimizer: torch.optim.Optimizer, train: Any, config: PretrainConfig,
                 epoch: int, bar: Any) -> tuple[float, float, float]:
    """One epoch of ``steps_per_epoch`` Adam steps (the rate set per step, :func:`_learning_rate`); returns the mean
    loss, the mean endpoint error and the last rate."""
    device = next(model.parameters()).device
    smoothness = DiffusionLoss()
    model.train()
    loss_sum = epe_sum = 0.0
    steps = config.steps_per_epoch
    for step in range(steps):
        global_step = epoch * steps + step
        learning_rate = _learning_rate(config, global_step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        first = global_step * config.batch_size
        batch = train.batch(range(first, first + config.batch_size)).to(device)
        reconstruction = model(batch)
        loss = F.mse_loss(reconstruction, batch)
        if config.smoothness_weight:
            loss = loss + config.smoothness_weight * smoothness(reconstruction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        epe_sum += float(mean_endpoint_error(reconstruction.detach(), batch).mean())
        bar.update()
        bar.set_postfix(epoch=epoch, loss=f"{loss_sum / (step + 1):.4f}")
    return loss_sum / steps, epe_sum / steps, learning_rate


def _save_epoch(model: DeformationAutoencoder, optimizer: torch.optim.Optimizer, config: PretrainConfig,
                training: dict, history: list[dict], best: dict, scores: dict, output_dir: Path) -> dict:
    """Write ``autoencoder.pt`` (when this epoch is the best so far), ``checkpoint.pt`` and ``history.json``; returns
    the best epoch's record ``{"epoch", "validation_epe"}``."""
    record = history[-1]
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    header = {"format": AUTOENCODER_FORMAT, "package_version": __version__, "config": config.architecture()}
    if record["validation_epe"] < best["validation_epe"]:
        best = {"epoch": record["epoch"], "validation_epe": record["validation_epe"]}
        selected = {**training, "epoch": record["epoch"], "validation": scores}
        # the weights also at the top level (the same storage, stored once), where monai.bundle.load reads them
        atomic_torch_save({**weights, **header, "state_dict": weights, "training": selected},
                          output_dir / "autoencoder.pt")
    resumable = {"optimizer": optimizer.state_dict(), "history": history, "best": best}
    atomic_torch_save({**header, "state_dict": weights, "training": training, **resumable},
                      output_dir / "checkpoint.pt")
    write_json(history, output_dir / "history.json", indent=1)
    return best


def _log_epoch(writer: Any, record: dict, epochs: int) -> None:
    if writer is not None:
        for key in ("train_loss", "train_epe", "validation_mse", "validation_epe", "learning_rate"):
            writer.add_scalar(f"pretrain/{key}", record[key], record["epoch"])
        writer.flush()
    logger.info(
        "epoch %d/%d: train loss %.5f, train epe %.4f, validation epe %.4f vox (mean |u| %.3f), lr %.2e, %.1f s",
        record["epoch"] + 1, epochs, record["train_loss"], record["train_epe"], record["validation_epe"],
        record["validation_magnitude"], record["learning_rate"], record["seconds"],
    )


def pretrain_autoencoder(
    output_dir: PathLike,
    fields: PathLike | Sequence[PathLike] | None = None,
    config: PretrainConfig | dict | None = None,
    device: str | torch.device = "cpu",
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    **settings: Any,
) -> PretrainResult:
    """Train a :class:`DeformationAutoencoder` on displacement fields and write its weights to ``output_dir``.

    Args:
        output_dir: folder of ``autoencoder.pt``, ``checkpoint.pt``, ``history.json`` and ``tensorboard/``.
        fields: None to train on generated fields; or the user's displacement fields: a folder of NIfTI files, a
            JSON datalist (``{"training": [...], "validation": [...]}``) or a list of files (see
            :func:`~noder_monai.data.deformation_fields.list_displacement_fields`).
        config: a :class:`PretrainConfig` or a dict of its fields; defaults to ``PretrainConfig()``.
        device: torch device of the training.
        resume: continue from ``output_dir/checkpoint.pt`` if it exists (same weights, optimizer state, epoch
            counter and history; data order and learning rates continue exactly, so a resumed run ends with the
            weights an uninterrupted one would have); False starts again and overwrites.
        progress: show a tqdm progress bar with the running loss.
        callback: called after every epoch with that epoch's record.
        **settings: :class:`PretrainConfig` fields that override ``config`` (e.g. ``epochs=5``).

    Returns:
        a :class:`PretrainResult`.

    Raises:
        ValueError: a setting is out of range, the fields are unusable (the message names the file), or a checkpoint
            to resume was written with other settings.
    """
    base = config if isinstance(config, dict) else dataclasses.asdict(config or PretrainConfig())
    unknown = (set(base) | set(settings)) - {f.name for f in dataclasses.fields(PretrainConfig)}
    if unknown:
        raise ValueError(f"unknown pretraining settings {sorted(unknown)}; see PretrainConfig.")
    config = PretrainConfig(**{**base, **settings})
    device = torch.device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path = output_dir / "checkpoint.pt", output_dir / "autoencoder.pt"
    train, validation, source = _datasets(config, fields)

    model, optimizer, history, best = _start(config, source, checkpoint_path if resume else None, device)
    streams = {"training": 0, "validation": 1}
    training = {"config": config.to_dict(), "source": source, "generator_seed_streams": streams}

    writer = summary_writer(None, output_dir / "tensorboard")
    steps = config.steps_per_epoch
    bar = tqdm(total=config.epochs * steps, initial=len(history) * steps, desc="pretrain", disable=not progress)
    for epoch in range(len(history), config.epochs):
        started = time.perf_counter()
        train_loss, train_epe, learning_rate = _train_epoch(model, optimizer, train, config, epoch, bar)
        scores = evaluate_autoencoder(model, validation, config.batch_size if fields is None else 1)
        record = {
            "epoch": epoch,
            "learning_rate": learning_rate,
            "train_loss": train_loss,
            "train_epe": train_epe,
            "validation_mse": scores["mse"],
            "validation_epe": scores["epe"],
            "validation_magnitude": scores["magnitude"],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        best = _save_epoch(model, optimizer, config, training, history, best, scores, output_dir)
        _log_epoch(writer, record, config.epochs)
        if callback is not None:
            callback(record)
    bar.close()
    if writer is not None:
        writer.close()
    return PretrainResult(
        autoencoder=best_path,
        checkpoint=checkpoint_path,
        history=history,
        best_epoch=int(best["epoch"]),
        best_validation_epe=float(best["validation_epe"]),
    )
