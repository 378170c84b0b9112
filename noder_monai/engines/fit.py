"""Fit NODER to one subject's sequence: coarse-to-fine Adam on NCC + smoothness + boundary terms.

:func:`fit_sequence` is the Python face of the bundle's training run: it builds the same
:class:`~noder_monai.engines.trainer.NODERTrainer`, loss, optimizer, schedule and handlers as
``bundle/configs/train.json`` for an in-memory sequence.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from monai.data import DataLoader, MetaTensor
from ignite.handlers import ProgressBar
from monai.handlers import LrScheduleHandler
from monai.utils import CommonKeys as Keys

from noder_monai.data import SubjectSequence
from noder_monai.engines.subject import FittedSubject
from noder_monai.engines.trainer import (
    CoarseToFineHandler,
    EpochCallbackHandler,
    NODERTrainer,
    cosine_schedule,
    downsample_image,
    fitted_subject,
    init_network,
)
from noder_monai.losses import NODERLoss
from noder_monai.networks import LEVELS, NODER
from noder_monai.transforms.intensity import IntensityMappingd

__all__ = ["FitConfig", "fit_sequence", "downsample_image"]


@dataclasses.dataclass
class FitConfig:
    """Optimisation settings of one subject's fit (plain values, stored in the fitted subject's file).

    Args:
        epochs: maximum number of epochs over all levels (one epoch = one Adam step on all observed times).
        learning_rate: initial Adam learning rate; it decays along a cosine to ``FINAL_LR_FRACTION`` (5%) of this
            value over all epochs (``engines.trainer.cosine_schedule``).
        ncc_kernel_size: local NCC window in image voxels (odd); scaled with the level.
        smoothness_weight: weight of the gradient smoothness of the field.
        boundary_weight: weight of the L2 norm of the field on the boundary planes.
        levels: coarse-to-fine resolution levels (image voxels per level voxel, each in 1, 2, 4), coarsest first;
            ``(1,)`` fits at full resolution only.
        level_fractions: share of ``epochs`` spent at each level (same length as ``levels``, summing to 1).
        patience: stop the last level after this many epochs without a relative loss improvement of
            ``min_improvement`` (0 disables early stopping).
        min_improvement: relative improvement of the best loss that resets the patience counter.
        finetune_decoder: optimise the decoder together with the dynamics (the encoder stays frozen).
    """

    epochs: int = 300
    learning_rate: float = 5e-3
    ncc_kernel_size: int = 21
    smoothness_weight: float = 0.05
    boundary_weight: float = 1e-4
    levels: Sequence[int] = (4, 2, 1)
    level_fractions: Sequence[float] = (0.45, 0.45, 0.1)
    patience: int = 0
    min_improvement: float = 1e-4
    finetune_decoder: bool = True

    def __post_init__(self) -> None:
        self.levels = tuple(int(v) for v in self.levels)
        self.level_fractions = tuple(float(v) for v in self.level_fractions)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not self.levels or any(v not in LEVELS for v in self.levels):
            raise ValueError(f"levels must be a non-empty sequence of values in {LEVELS}, got {self.levels}.")
        if len(self.level_fractions) != len(self.levels) or any(f < 0 for f in self.level_fractions):
            raise ValueError(
                f"level_fractions must be {len(self.levels)} non-negative numbers (one per level), got {self.level_fractions}."
            )
        if not math.isclose(sum(self.level_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"level_fractions must sum to 1, got {self.level_fractions}.")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}.")

    def epochs_per_level(self) -> list[int]:
        """Epochs at each level; rounding goes to the finest level, which always gets at least one epoch."""
        counts = [int(self.epochs * f) for f in self.level_fractions[:-1]]
        return counts + [max(1, self.epochs - sum(counts))]


def fit_sequence(
    sequence: SubjectSequence,
    config: FitConfig | None = None,
    network: dict | None = None,
    pretrained: str | Path | None = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> FittedSubject:
    """Fit a NODER trajectory to ``sequence`` and return the fitted subject.

    Args:
        sequence: the subject's scans (T >= 2, times strictly increasing); the first scan is the baseline.
        config: optimisation settings; defaults to ``FitConfig()``.
        network: keyword arguments of :class:`NODER` other than ``spatial_size``.
        pretrained: ``"auto"`` (default) initialises the encoder/decoder with the weights shipped for the sequence's
            dimensionality (``default_autoencoder_path``; they fit the default network channels); a path uses that
            deformation-autoencoder file (see ``load_autoencoder_weights``); None starts from random weights.
        device: torch device of the fit.
        seed: seeds torch's global generator so that the same call returns the same model.
        progress: show a tqdm progress bar with the current loss.
        callback: called after every epoch with that epoch's record (epoch, level and loss terms as floats).

    Returns:
        the :class:`FittedSubject`, with the loss history of every epoch.
    """
    config = config or FitConfig()
    device = torch.device(device)
    torch.manual_seed(seed)
    images = sequence.images.as_tensor() if isinstance(sequence.images, MetaTensor) else sequence.images
    item = IntensityMappingd(keys=Keys.IMAGE)(
        {
            Keys.IMAGE: MetaTensor(images[:, 0], affine=sequence.affine),
            "time": sequence.times.to(torch.float64),
            "subject": sequence.subject,
        }
    )
    dataset = [item]
    network_def = NODER(sequence.spatial_size, **(network or {}))
    model = init_network(network_def, pretrained, config.finetune_decoder).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    epochs = config.epochs_per_level()
    scheduler = cosine_schedule(optimizer, sum(epochs))
    loss = NODERLoss(
        spatial_dims=sequence.spatial_dims,
        ncc_kernel_size=config.ncc_kernel_size,
        smoothness_weight=config.smoothness_weight,
        boundary_weight=config.boundary_weight,
    )
    handlers = [
        CoarseToFineHandler(config.levels, epochs, config.patience, config.min_improvement),
        LrScheduleHandler(scheduler, print_lr=False),
    ]
    if callback is not None:
        handlers.append(EpochCallbackHandler(callback))
    trainer = NODERTrainer(
        device=device,
        max_epochs=sum(epochs),
        train_data_loader=DataLoader(dataset, batch_size=1),
        network=model,
        optimizer=optimizer,
        loss_function=loss,
        train_handlers=handlers,
    )
    if progress:
        ProgressBar(desc=f"fit {sequence.subject}", persist=False).attach(
            trainer, output_transform=lambda output: {"loss": float(output[0][Keys.LOSS])}
        )
    trainer.run()
    return fitted_subject(trainer, item, dataclasses.asdict(config))
