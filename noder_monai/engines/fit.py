"""Fit NODER to one subject's sequence: coarse-to-fine Adam on NCC + smoothness + boundary terms."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from noder_monai.data import IntensityMapping, SubjectSequence
from noder_monai.functional import robust_mean
from noder_monai.engines.pretrain import default_autoencoder_path
from noder_monai.engines.subject import PREDICT_SOURCES, FittedSubject, load_autoencoder_weights
from noder_monai.losses import NODERLoss
from noder_monai.networks import LEVELS, NODER, scale_window
from noder_monai.networks.autoencoder import pad_to_multiple

__all__ = ["PRESETS", "FitConfig", "fit_sequence", "downsample_image", "subject_template"]


@dataclasses.dataclass
class FitConfig:
    """Optimisation settings of one subject's fit (plain values, stored in the fitted subject's file).

    Args:
        epochs: maximum number of epochs over all levels (one epoch = one Adam step on all observed times).
        learning_rate: initial Adam learning rate; it decays along a cosine to 5% of this value over all epochs
            (measured more stable across the level changes than a constant rate).
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
        source: the appearance of the predictions (one of ``PREDICT_SOURCES``, the default of
            :meth:`FittedSubject.predict`): ``"baseline"`` warps the first scan (the paper); ``"template"`` warps a
            denoised subject template (every observed scan pulled back to the first time through the inverse of its
            current fitted map and averaged with :func:`~noder_monai.functional.robust_mean`, rebuilt
            ``template_rounds`` times during the fit, as ANTs builds single-subject templates; the fit then warps
            the template to every observed time); ``"nearest"`` fits as ``"baseline"`` and predicts by carrying
            the observed scans that bracket a time to it (for sequences whose texture changes, e.g. ultrasound).
        template_rounds: number of template builds with ``source="template"``: the last one after the fit, from
            the final maps; each earlier one is followed by epochs that fit the trajectory to warp the template.
        template_start: fraction of the epochs after which the first of several builds happens; the others are
            spread evenly over the remaining epochs.
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
    source: str = "baseline"
    template_rounds: int = 3
    template_start: float = 0.5

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
        """Epochs at each level; rounding goes to the finest level, which always gets at least one epoch."""
        counts = [int(self.epochs * f) for f in self.level_fractions[:-1]]
        return counts + [max(1, self.epochs - sum(counts))]


PRESETS: dict[str, dict] = {
    "longitudinal-mri": {"source": "template"},
    "cine": {"source": "nearest"},
}
"""Named settings per kind of data (``FitConfig.preset(name)``): ``"longitudinal-mri"`` (scans months or years
apart whose appearance is stable: warp a denoised subject template) and ``"cine"`` (frames of a cycle whose texture
changes from frame to frame, e.g. ultrasound speckle: carry the bracketing frames)."""


def downsample_image(image: torch.Tensor, level: int) -> torch.Tensor:
    """Average ``level``^d blocks: (N, C, *S) -> (N, C, *ceil(S / level)), edge-replicated at the far border.

    Level voxel ``i`` covers image voxels ``[i * level, (i + 1) * level)``, the grid of ``NODER.displacement``.
    """
    if level == 1:
        return image
    pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
    return pool(pad_to_multiple(image, level, mode="replicate"), level)


@torch.no_grad()
def subject_template(model: NODER, images: torch.Tensor, scaled_times: torch.Tensor) -> torch.Tensor:
    """Every scan pulled back to the first time through the inverse of its fitted map, robustly averaged.

    Args:
        model: the (partly) fitted trajectory.
        images: (T, 1, *S) the observed scans, normalised, the first at scaled time 0.
        scaled_times: (T,) their scaled times.

    Returns:
        (1, 1, *S) the template, in the first scan's space and the scans' (normalised) intensities.
    """
    inverse = model.displacement(scaled_times[1:], inverse=True)
    pulled = model.warp(images[1:], inverse)
    return robust_mean(torch.cat([images[:1], pulled]), dim=0)[None]


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
    intensity = IntensityMapping.fit(sequence.images)
    images = intensity(sequence.images).to(device=device, dtype=torch.float32)
    times = sequence.times.to(torch.float64)
    scaled = ((times - times[0]) / (times[-1] - times[0])).to(device=device, dtype=torch.float32)
    model = NODER(sequence.spatial_size, **(network or {})).to(device)
    if pretrained == "auto":
        pretrained = default_autoencoder_path(sequence.spatial_dims)
    if pretrained is not None:
        load_autoencoder_weights(model, pretrained)
    model.set_initial_state()
    model.encoder.requires_grad_(False)
    model.decoder.requires_grad_(config.finetune_decoder)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    epochs = config.epochs_per_level()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, sum(epochs), eta_min=config.learning_rate * 0.05)
    history: list[dict] = []
    source = images[:1]
    template_epochs = config.template_epochs()
    bar = tqdm(total=sum(epochs), desc=f"fit {sequence.subject}", disable=not progress, leave=False)
    for level, level_epochs in zip(config.levels, epochs):
        if level_epochs == 0:
            continue
        targets = downsample_image(images[1:], level)
        baseline = downsample_image(source, level)
        criterion = NODERLoss(
            spatial_dims=sequence.spatial_dims,
            ncc_kernel_size=scale_window(config.ncc_kernel_size, level),
            smoothness_weight=config.smoothness_weight,
            boundary_weight=config.boundary_weight,
        )
        is_last = level == config.levels[-1]
        best, stale = math.inf, 0
        for _ in range(level_epochs):
            if len(history) in template_epochs:
                source = subject_template(model, images, scaled)
                baseline = downsample_image(source, level)
            optimizer.zero_grad(set_to_none=True)
            warped, ddf = model(baseline, scaled[1:], level)
            terms = criterion(warped, targets, ddf)
            terms["total"].backward()
            optimizer.step()
            scheduler.step()
            record = {"epoch": len(history), "level": level, **{k: v.item() for k, v in terms.items()}}
            history.append(record)
            if callback is not None:
                callback(record)
            bar.update()
            bar.set_postfix(level=level, loss=f"{record['total']:.4f}")
            if is_last and config.patience:
                if best == math.inf or record["total"] < best - abs(best) * config.min_improvement:
                    best, stale = record["total"], 0
                else:
                    stale += 1
                if stale >= config.patience:
                    break
    bar.close()
    if config.source == "template":
        source = subject_template(model, images, scaled)
    return FittedSubject(
        model=model.eval(),
        baseline=images[:1],
        times=times,
        affine=sequence.affine,
        intensity=intensity,
        subject=sequence.subject,
        fit_config=dataclasses.asdict(config),
        history=history,
        scans=images,
        template=source if config.source == "template" else None,
    )
