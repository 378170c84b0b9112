"""The settings of one subject's fit (:class:`FitConfig`, named :data:`PRESETS`) and the checks every fit passes
before any work (:func:`check_fit_inputs`)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.utils import CommonKeys as Keys

from noder_monai.data import IntensityMapping
from noder_monai.engines.levels import (
    FINEST_TIME_GROUPS,
    IMAGE_SMOOTHING_SIGMA,
    MIN_LEVEL_VOXELS,
    check_finest_time_groups,
    check_image_smoothing_sigma,
)
from noder_monai.losses import NODERLoss
from noder_monai.model import PREDICT_SOURCES
from noder_monai.networks import LEVELS

__all__ = ["PRESETS", "FitConfig", "check_fit_inputs"]

logger = logging.getLogger(__name__)

_LOSS_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(NODERLoss).parameters.items()}


@dataclasses.dataclass
class FitConfig:
    """Optimisation settings of one subject's fit (plain values, stored in the fitted subject's file).

    Args:
        epochs: maximum number of epochs over all levels (one epoch = one Adam step on all observed times).
        learning_rate: initial Adam learning rate; it decays along a cosine to 5% of this value over all epochs
            (measured more stable across the level changes than a constant rate).
        ncc_kernel_size: local NCC window in image voxels (odd); scaled with the level. Default: :class:`NODERLoss`'s.
        smoothness_weight: weight of the gradient smoothness of the field. Default: :class:`NODERLoss`'s.
        boundary_weight: weight of the L2 norm of the field on the boundary planes. Default: :class:`NODERLoss`'s.
        levels: coarse-to-fine resolution levels (image voxels per level voxel, each in 1, 2, 4), coarsest first;
            ``(1,)`` fits at full resolution only.
        level_fractions: share of ``epochs`` spent at each level (same length as ``levels``, summing to 1).
        patience: stop the last level after this many epochs without a relative loss improvement of
            ``min_improvement`` (0 disables early stopping).
        min_improvement: relative improvement of the best loss that resets the patience counter.
        finetune_decoder: optimise the decoder together with the dynamics (the encoder stays frozen).
        source: the appearance of the predictions (one of ``PREDICT_SOURCES``; the default of
            :meth:`FittedSubject.predict`). ``"auto"`` (default): chosen per subject after the fit, by predicting
            each observed scan from the others with every candidate (the first scan, the bracketing scans, the
            subject template, and the observed scans carried to the time through one composed map and weighted by
            their distance in time and their noise) and keeping the best (:mod:`noder_monai.model.appearance`); the
            choice and every candidate's validation error are stored with the subject. ``"template"``: after the
            fit, every observed scan is pulled back to the first time through the inverse of its fitted map and the
            per-voxel median of them is the subject template
            (:func:`~noder_monai.engines.trainer.subject_template`), warped to each query time. ``"baseline"``: the
            first scan is warped (the paper). ``"nearest"``: predictions carry the two observed scans that bracket a
            time to it and blend them.
        template_rounds: template builds with ``source="template"``: the last one after the fit; each earlier one
            (as ANTs builds single-subject templates) is followed by epochs that fit the trajectory to warp the
            template instead of the first scan. Defaults to 1 (the fields are then those of the first-scan fit).
        template_start: fraction of the epochs after which the first of several builds happens; the others are
            spread evenly over the remaining epochs.
        image_smoothing_sigma: Gaussian sigma in image voxels by which the scans the fit compares are smoothed
            (scaled with the level, like ``antsRegistration --smoothing-sigmas``;
            :func:`~noder_monai.engines.levels.level_image`). It removes the spurious sub-voxel motion that
            linear interpolation of a noisy scan favours. Predictions use the unsmoothed scans. 0 smooths nothing.
        finest_time_groups: at full resolution (level 1), each epoch fits one of this many interleaved groups of
            the observed times in turn, so a full-resolution epoch costs about 1 / groups of one over all times
            (the recorded loss of such an epoch is its group's). 1 fits every time in every epoch.
    """

    epochs: int = 300
    learning_rate: float = 5e-3
    ncc_kernel_size: int = _LOSS_DEFAULTS["ncc_kernel_size"]
    smoothness_weight: float = _LOSS_DEFAULTS["smoothness_weight"]
    boundary_weight: float = _LOSS_DEFAULTS["boundary_weight"]
    levels: Sequence[int] = (4, 2, 1)
    level_fractions: Sequence[float] = (0.6, 0.2, 0.2)
    patience: int = 0
    min_improvement: float = 1e-4
    finetune_decoder: bool = True
    source: str = "auto"
    template_rounds: int = 1
    template_start: float = 0.5
    image_smoothing_sigma: float = IMAGE_SMOOTHING_SIGMA
    finest_time_groups: int = FINEST_TIME_GROUPS

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
        if self.source not in PREDICT_SOURCES:
            raise ValueError(f"source must be one of {PREDICT_SOURCES}, got {self.source!r}.")
        if self.template_rounds < 1:
            raise ValueError(f"template_rounds must be >= 1, got {self.template_rounds}.")
        if not 0 <= self.template_start < 1:
            raise ValueError(f"template_start must be in [0, 1), got {self.template_start}.")
        self.image_smoothing_sigma = check_image_smoothing_sigma(self.image_smoothing_sigma)
        check_finest_time_groups(self.finest_time_groups)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FitConfig":
        """The settings of a named preset (:data:`PRESETS`), with ``overrides`` on top.

        Raises:
            ValueError: naming the preset if it is unknown, or an override if it is invalid.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}.")
        return cls(**{**PRESETS[name], **overrides})

    def template_epochs(self) -> set[int]:
        """Epochs (0-based, over all levels) at whose start the template is rebuilt during the fit (it is built
        once more after the last epoch): ``template_rounds - 1`` of them, spread evenly from ``template_start``."""
        if self.source != "template":
            return set()
        total = sum(self.epochs_per_level())
        first = self.template_start * total
        rebuilds = self.template_rounds - 1
        return {int(first + (total - first) * k / rebuilds) for k in range(rebuilds)}

    def epochs_per_level(self) -> list[int]:
        """Epochs at each level, ``epochs`` in all; rounding goes to the finest level, which always gets at least one
        epoch (taken from the level with the most when the fractions leave it none)."""
        counts = [int(self.epochs * f) for f in self.level_fractions[:-1]]
        if counts and self.epochs - sum(counts) < 1:
            counts[counts.index(max(counts))] -= 1
        return counts + [self.epochs - sum(counts)]


PRESETS: dict[str, dict] = {
    "longitudinal-mri": {"source": "auto"},
    "cine": {"source": "nearest"},
}
"""Named settings per kind of data (``FitConfig.preset(name)``): ``"longitudinal-mri"`` (the defaults: the
appearance chosen per subject) and ``"cine"`` (always carry the bracketing frames, whose texture a cine keeps)."""


def _where(item: Mapping[str, Any], index: int = 0) -> str:
    subject = item.get("subject", "subject")
    paths = _paths(item)
    return f"subject '{subject}': scan '{paths[index]}'" if paths else f"subject '{subject}': scan {index}"


def _paths(item: Mapping[str, Any]) -> list[str]:
    """The scan files an item was read from (``image.meta["filename_or_obj"]``), if any."""
    image = item[Keys.IMAGE]
    names = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


def _raw(item: Mapping[str, Any], value: float) -> float:
    """An intensity of the item in the scans' own units (the item's ``intensity`` mapping undone)."""
    if "intensity" not in item:
        return value
    return float(IntensityMapping.from_dict(item["intensity"]).inverse(torch.tensor(value, dtype=torch.float64)))


def check_fit_inputs(item: Mapping[str, Any], config: FitConfig) -> FitConfig:
    """Refuse what a fit cannot handle before any work, and adapt the levels to the image size.

    Every fit passes here: :func:`~noder_monai.engines.fit_sequence` (Python and the ``noder`` command) and the
    bundle's ``train.json`` (its ``fit`` key) call it on the training item before the network is built.

    Checks: ``ncc_kernel_size`` is an odd integer >= 3; every spatial axis has at least :data:`MIN_LEVEL_VOXELS`
    voxels (a 2D image must be stored with one singleton axis, which is dropped on reading); the baseline (the only
    image ever warped) is not constant. Levels too coarse for some axis (fewer than 3 level voxels along it) are
    dropped, their epochs given to the next finer level, and this is logged.

    Args:
        item: the training item: ``image`` (T, *S) scans as channels (a ``MetaTensor`` whose ``filename_or_obj``
            lists the files, for messages), ``subject``, and ``intensity`` when the scans are normalised.
        config: the settings asked for.

    Returns:
        the configuration actually used (``config`` itself when nothing was dropped).

    Raises:
        ValueError: naming the subject, the file, the size and the axis or field at fault.
    """
    _check_window(item, config.ncc_kernel_size)
    images = torch.as_tensor(item[Keys.IMAGE])
    size = tuple(int(s) for s in images.shape[1:])
    for axis, length in enumerate(size):
        if length < MIN_LEVEL_VOXELS:
            raise ValueError(
                f"{_where(item)} has size {size}: axis {axis} has {length} voxel(s), the fit needs at least "
                f"{MIN_LEVEL_VOXELS} along every axis (a 2D image must be stored with exactly one axis of length 1)."
            )
    _check_content(item, images)
    return _drop_coarse_levels(item, config, size)


def _check_window(item: Mapping[str, Any], kernel: Any) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < MIN_LEVEL_VOXELS or kernel % 2 == 0:
        raise ValueError(
            f"subject '{item.get('subject', 'subject')}': field 'ncc_kernel_size' must be an odd integer >= "
            f"{MIN_LEVEL_VOXELS}, got {kernel!r}."
        )


def _check_content(item: Mapping[str, Any], images: torch.Tensor) -> None:
    """A constant baseline is refused (every prediction would be that constant); a constant later scan is logged."""
    low, high = float(images[0].min()), float(images[0].max())
    if not high > low:
        raise ValueError(
            f"{_where(item)} (the baseline, the only image warped) is constant (every voxel {_raw(item, low):g}): "
            f"every prediction would be that constant; check the file or put a scan with content first."
        )
    for index in range(1, images.shape[0]):
        scan = images[index]
        if not float(scan.max()) > float(scan.min()):
            logger.warning("%s is constant (every voxel %g): it cannot guide the fit.", _where(item, index),
                           _raw(item, float(scan.min())))


def _drop_coarse_levels(item: Mapping[str, Any], config: FitConfig, size: tuple[int, ...]) -> FitConfig:
    kept = [level for level in config.levels if all(math.ceil(s / level) >= MIN_LEVEL_VOXELS for s in size)]
    if not kept:
        raise ValueError(f"{_where(item)} has size {size}: no level of {config.levels} leaves at least "
                         f"{MIN_LEVEL_VOXELS} voxels along every axis; add level 1.")
    if len(kept) == len(config.levels):
        return config
    fractions, carry = [], 0.0
    for level, fraction in zip(config.levels, config.level_fractions):
        if level in kept:
            fractions.append(fraction + carry)
            carry = 0.0
        else:
            carry += fraction
    fractions[-1] += carry
    for level in (level for level in config.levels if level not in kept):
        coarse = tuple(math.ceil(s / level) for s in size)
        axis = min(range(len(size)), key=lambda a: coarse[a])
        logger.warning(
            "%s has size %s: level %d dropped (axis %d would have %d voxel(s), fewer than %d); levels %s, "
            "fractions %s.", _where(item), size, level, axis, coarse[axis], MIN_LEVEL_VOXELS, tuple(kept),
            tuple(round(f, 6) for f in fractions))
    total = sum(fractions)
    return dataclasses.replace(config, levels=tuple(kept), level_fractions=tuple(f / total for f in fractions))
