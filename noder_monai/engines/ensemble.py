"""Fit a subject's uncertainty ensemble: members fine-tuned from its fitted trajectory, each without one observed
scan, then the scale of their spread calibrated on the scans they left out (:mod:`noder_monai.model.uncertainty`).

A member starts from the subject's fitted weights (not from scratch), so it costs a fraction of a fit: ``epochs``
Adam steps at one resolution ``level`` with the fit's loss, learning rate and time scale, on every observed scan but
one. Members leave out different scans (spread evenly over the visits after the first, the last always among them,
so that extrapolation past the last scan is calibrated too) and are seeded differently.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from monai.data import DataLoader
from monai.handlers import LrScheduleHandler
from monai.utils import CommonKeys as Keys

from noder_monai.engines.config import FitConfig
from noder_monai.engines.handlers import CoarseToFineHandler
from noder_monai.engines.trainer import NODERTrainer, cosine_schedule, subject_collate
from noder_monai.losses import NODERLoss
from noder_monai.model import FittedSubject
from noder_monai.model.appearance import informative
from noder_monai.model.uncertainty import Ensemble, calibrate, member_state
from noder_monai.networks import LEVELS

__all__ = ["ENSEMBLE_EPOCHS", "ENSEMBLE_LEVEL", "ENSEMBLE_MEMBERS", "fit_ensemble", "left_out_scans"]

ENSEMBLE_MEMBERS = 5
"""Default number of members (at most one per observed scan after the first)."""

ENSEMBLE_EPOCHS = 40
"""Default fine-tuning epochs of each member."""

ENSEMBLE_LEVEL = 2
"""Default resolution level of the members' fine-tuning (image voxels per level voxel)."""


def left_out_scans(usable: Sequence[bool], members: int) -> list[int]:
    """Which observed scan each member leaves out: up to ``members`` of the usable scans after the first, evenly
    spread, the last usable one always included.

    Raises:
        ValueError: fewer than 2 usable scans after the first (no ensemble can be calibrated), or ``members`` < 2.
    """
    candidates = [k for k, use in enumerate(usable) if use and k > 0]
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ValueError(f"members must be an integer >= 2, got {members!r}.")
    if len(candidates) < 2:
        raise ValueError(f"an uncertainty ensemble needs at least 3 non-constant observed scans (each member leaves "
                         f"one out after the first), got {len(candidates) + int(bool(usable[0]))}.")
    if members >= len(candidates):
        return candidates
    picks = torch.linspace(len(candidates) - 1, 0, members).round().long().tolist()
    return sorted({candidates[p] for p in picks})


def fit_ensemble(
    subject: FittedSubject,
    members: int = ENSEMBLE_MEMBERS,
    epochs: int = ENSEMBLE_EPOCHS,
    level: int = ENSEMBLE_LEVEL,
    seed: int = 0,
) -> Ensemble:
    """Fit and calibrate ``subject``'s uncertainty ensemble and attach it (``subject.ensemble``); save the subject
    to keep it.

    Args:
        subject: a fitted subject whose file holds its observed scans (every fit since the appearance choice).
        members: number of members (>= 2; at most one per observed scan after the first).
        epochs: fine-tuning epochs per member (>= 1).
        level: resolution level of the fine-tuning, one of ``LEVELS``.
        seed: members are seeded ``seed``, ``seed + 1``, ...

    Returns:
        the :class:`~noder_monai.model.uncertainty.Ensemble` (also ``subject.ensemble``).

    Raises:
        ValueError: the subject holds no scans, has fewer than 3 non-constant ones, or an argument is out of range.
    """
    if subject.scans is None:
        raise ValueError(f"subject {subject.subject!r}: its file holds no observed scans (fitted by an older version); "
                         f"fit it again to add an uncertainty ensemble.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}.")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    left_out = left_out_scans(informative(subject.scans), members)
    config = FitConfig(**{key: value for key, value in subject.fit_config.items()
                          if key in FitConfig.__dataclass_fields__})
    states = []
    for index, left in enumerate(left_out):
        torch.manual_seed(seed + index)
        states.append(member_state(_fine_tune(subject, left, config, epochs, level).state_dict()))
    ensemble = Ensemble(left_out=left_out, states=states, scale=1.0, edge_scale=0.0, noise_scale=1.0, coverage=0.0,
                        epochs=epochs, level=level)
    ensemble.scale, ensemble.edge_scale, ensemble.noise_scale, ensemble.coverage = calibrate(subject, ensemble)
    subject.ensemble = ensemble
    return ensemble


def _fine_tune(subject: FittedSubject, left: int, config: FitConfig, epochs: int, level: int) -> torch.nn.Module:
    """A copy of the subject's network fine-tuned on every observed scan but ``left``, at ``level``."""
    network = copy.deepcopy(subject.model).train()
    network.encoder.requires_grad_(False)
    network.decoder.requires_grad_(bool(config.finetune_decoder))
    keep = [k for k in range(len(subject.times)) if k != left]
    origin, span = float(subject.times[0]), float(subject.times[-1] - subject.times[0])
    item = {Keys.IMAGE: subject.scans[keep, 0], "time": subject.times[keep], "time_span": (origin, span),
            "subject": f"{subject.subject} (member without scan {left})"}
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=config.learning_rate)
    loss = NODERLoss(spatial_dims=network.spatial_dims, ncc_kernel_size=config.ncc_kernel_size,
                     smoothness_weight=config.smoothness_weight, boundary_weight=config.boundary_weight)
    trainer = NODERTrainer(
        device=subject.device, network=network, optimizer=optimizer, loss_function=loss, max_epochs=epochs,
        train_data_loader=DataLoader([item], batch_size=1, collate_fn=subject_collate),
        train_handlers=[CoarseToFineHandler((level,), (epochs,)),
                        LrScheduleHandler(cosine_schedule(optimizer, epochs), print_lr=False)],
        image_smoothing_sigma=config.image_smoothing_sigma, finest_time_groups=config.finest_time_groups,
        similarity_voxels=config.similarity_voxels,
    )
    trainer.run()
    return network.eval()
