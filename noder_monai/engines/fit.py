"""Fit NODER to one subject's sequence from Python: the bundle's training run on an in-memory sequence.

:func:`fit_sequence` makes the training item ``train.json`` reads from files (:func:`~noder_monai.transforms.
sequence_item`, then :class:`~noder_monai.transforms.IntensityMappingd`), passes :func:`~noder_monai.engines.
check_fit_inputs`, and builds the pieces ``train.json`` builds by ``_target_``, in the same order (so the same seed
gives the same weights): :class:`~noder_monai.networks.NODER` initialised by :func:`init_network`, Adam,
:func:`cosine_schedule`, :class:`~noder_monai.losses.NODERLoss`, the coarse-to-fine and template handlers and
:class:`~noder_monai.engines.NODERTrainer`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import LrScheduleHandler
from monai.utils import CommonKeys as Keys
from tqdm.auto import tqdm

from noder_monai.data import SubjectSequence
from noder_monai.engines.config import FitConfig, check_fit_inputs
from noder_monai.engines.handlers import CoarseToFineHandler, EpochCallbackHandler, TemplateHandler
from noder_monai.engines.trainer import NODERTrainer, cosine_schedule, fitted_subject, init_network, subject_collate
from noder_monai.losses import NODERLoss
from noder_monai.model import FittedSubject
from noder_monai.networks import NODER
from noder_monai.transforms import IntensityMappingd, sequence_item

__all__ = ["fit_sequence"]


def fit_sequence(
    sequence: SubjectSequence,
    config: FitConfig | None = None,
    network: dict | None = None,
    pretrained: str | Path | None = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool | str = True,
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
        progress: show a tqdm bar over the epochs with the level and loss, when stdout is a terminal; a
            string is the bar's description.
        callback: called after every epoch with that epoch's record (epoch, level and loss terms as floats).

    Returns:
        the :class:`FittedSubject`, with the loss history of every epoch, the scans' geometry and a record of what it
        was fitted on (``fitted_on``).

    Raises:
        ValueError: before any work, from :func:`check_fit_inputs` (sizes, NCC window, constant baseline, memory),
            naming the subject and file.
        FloatingPointError: the loss or the weights became NaN/Inf (the fit diverged); nothing is returned.
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    item = sequence_item(sequence)
    config = check_fit_inputs(item, config or FitConfig(), device)  # before the normalised copy of the scans
    item = IntensityMappingd(keys=Keys.IMAGE)(item)
    network_def = NODER(tuple(item[Keys.IMAGE].shape[1:]), **(network or {}))
    model = init_network(network_def, pretrained, config.finetune_decoder).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    handlers = _handlers(config, cosine_schedule(optimizer, config.epochs), callback)
    trainer = NODERTrainer(
        device=device,
        network=model,
        optimizer=optimizer,
        loss_function=_loss(config, model.spatial_dims),
        max_epochs=config.epochs,
        train_data_loader=DataLoader([item], batch_size=1, collate_fn=subject_collate),
        train_handlers=handlers,
        image_smoothing_sigma=config.image_smoothing_sigma,
        finest_time_groups=config.finest_time_groups,
        similarity_voxels=config.similarity_voxels,
    )
    _show_progress(trainer, progress, f"fit {sequence.subject}")
    trainer.run()
    return fitted_subject(trainer, item, dataclasses.asdict(config))


def _loss(config: FitConfig, spatial_dims: int) -> NODERLoss:
    return NODERLoss(spatial_dims=spatial_dims, ncc_kernel_size=config.ncc_kernel_size,
                     smoothness_weight=config.smoothness_weight, boundary_weight=config.boundary_weight)


def _handlers(config: FitConfig, scheduler: Any, callback: Callable[[dict], None] | None) -> list:
    """``train.json``'s ``train#handlers`` that change the fit, in its order (logging handlers aside)."""
    handlers = [
        CoarseToFineHandler(config.levels, config.epochs_per_level(), config.patience, config.min_improvement),
        TemplateHandler(config.template_epochs()),
        LrScheduleHandler(scheduler, print_lr=False),
    ]
    return handlers + ([EpochCallbackHandler(callback)] if callback is not None else [])


def _show_progress(trainer: NODERTrainer, progress: bool | str, default: str) -> None:
    """A tqdm bar over the fit's epochs (level and loss), unless ``progress`` is off or stdout/stderr is not a
    terminal (no bar in log files). A string ``progress`` is the bar's description (e.g. ``"subject sub-002"``)."""
    if not progress or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return
    bar = tqdm(total=trainer.state.max_epochs, desc=progress if isinstance(progress, str) else default, unit="epoch",
               leave=False, dynamic_ncols=True)

    def advance(engine: NODERTrainer) -> None:
        loss = float(engine.state.output[0][Keys.LOSS])
        bar.set_postfix(level=getattr(engine.state, "level", "?"), loss=f"{loss:.4f}", refresh=False)
        bar.update(1)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, advance)
    trainer.add_event_handler(Events.COMPLETED, lambda _: bar.close())
