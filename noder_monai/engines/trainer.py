"""One subject's fit as a MONAI training run: a ``SupervisedTrainer`` whose iteration warps the baseline (or the
subject template) to every observed time at the current resolution level.

A subject is one training item ``{"image": (T, *S) scans as channels, "time": (T,) times, "subject": id,
"intensity": {"lower", "upper"}, "geometry", "fitted_on"}`` (:class:`~noder_monai.transforms.LoadSequenced` then
:class:`~noder_monai.transforms.IntensityMappingd`); one epoch is one iteration: one optimizer step on all observed
times as one batch. The handlers that drive it are in :mod:`noder_monai.engines.handlers`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import IterationEvents, SupervisedTrainer
from monai.utils import CommonKeys as Keys

from noder_monai.data import IntensityMapping
from noder_monai.engines.levels import (
    FINEST_TIME_GROUPS,
    IMAGE_SMOOTHING_SIGMA,
    SIMILARITY_VOXELS,
    check_finest_time_groups,
    check_image_smoothing_sigma,
    check_similarity_voxels,
    level_image,
    level_window,
    similarity_box,
)
from noder_monai.io import Geometry
from noder_monai.losses import NODERLoss
from noder_monai.model import FittedSubject, default_autoencoder_path, load_autoencoder_weights
from noder_monai.model.appearance import SourceChoice, informative, noise_std, select_source
from noder_monai.networks import LEVELS, NODER
from noder_monai.utils import cosine_decay

__all__ = [
    "FINAL_LR_FRACTION",
    "HISTORY_TERMS",
    "NODERTrainer",
    "cosine_schedule",
    "fitted_subject",
    "init_network",
    "prepare_sequence_batch",
    "subject_collate",
    "subject_template",
]

logger = logging.getLogger(__name__)

HISTORY_TERMS = ("total", "similarity", "smoothness", "boundary")
"""Loss terms recorded per epoch (``NODERLoss`` output keys)."""


@torch.no_grad()
def subject_template(model: NODER, images: torch.Tensor, scaled_times: torch.Tensor) -> torch.Tensor:
    """Every scan pulled back to the first time through the inverse of its fitted map, and their per-voxel median.

    The median (for an even count the lower of the two middle values, as ``torch.median``) is not pulled by a scan
    that is misaligned at an edge, and on magnitude MRI, whose Rician noise is skewed upwards in dark regions, it
    stays closer to the noise-free intensity than a mean.

    Args:
        model: the (partly) fitted trajectory.
        images: (T, 1, *S) the observed scans, normalised, the first at scaled time 0.
        scaled_times: (T,) their scaled times.

    Returns:
        (1, 1, *S) the template, in the first scan's space and the scans' (normalised) intensities.
    """
    inverses = model.inverse_displacements(scaled_times[1:])  # one map at a time
    pulled = [model.warp(image[None], inverse) for image, inverse in zip(images[1:], inverses)]
    return torch.cat([images[:1], *pulled]).median(dim=0).values[None]


FINAL_LR_FRACTION = 0.05
"""The fit's learning rate decays along a cosine to this fraction of the initial rate (measured more stable across
the level changes than a constant rate)."""


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, final_fraction: float = FINAL_LR_FRACTION
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every parameter group's rate to ``final_fraction`` of its initial value over ``total_steps``
    scheduler steps (the curve of ``CosineAnnealingLR``, computed in closed form by :func:`noder_monai.utils.cosine_decay`).

    Args:
        optimizer: the optimizer; its current rates are the initial ones.
        total_steps: steps (epochs of a fit) of the whole decay, >= 1.
        final_fraction: the final rate as a fraction of the initial one. Defaults to :data:`FINAL_LR_FRACTION`.
    """
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    total = int(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_decay(step, total, 1.0, final_fraction))


def init_network(network: NODER, pretrained: str | os.PathLike | None = "auto", finetune_decoder: bool = True) -> NODER:
    """Make a fresh :class:`NODER` ready to fit: pretrained encoder/decoder, z(0), frozen encoder.

    Args:
        network: the network (any device).
        pretrained: ``"auto"`` uses the autoencoder shipped for the network's spatial dims (a warning and random
            weights if the installation lacks it); a path uses that deformation-autoencoder file; None keeps the
            random weights.
        finetune_decoder: optimise the decoder together with the dynamics (the encoder is always frozen).

    Returns:
        ``network`` itself; only parameters with ``requires_grad`` are meant to be optimised.
    """
    if pretrained == "auto":
        try:
            pretrained = default_autoencoder_path(network.spatial_dims)
        except FileNotFoundError as error:
            logger.warning("%s Fitting from randomly initialised encoder/decoder weights.", error)
            pretrained = None
    if pretrained is not None:
        load_autoencoder_weights(network, pretrained)
    network.set_initial_state()
    network.encoder.requires_grad_(False)
    network.decoder.requires_grad_(bool(finetune_decoder))
    return network


def prepare_sequence_batch(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prepare_batch`` of :class:`NODERTrainer`: one subject item (batch of 1) -> baseline, targets, scaled times.

    Returns:
        baseline ``(1, 1, *S)``, targets ``(T - 1, 1, *S)`` float32 and the observed times after the first, scaled
        to ``(t - t0) / (t_last - t0)`` (or ``(t - origin) / span`` when the item holds ``"time_span": (origin,
        span)``, as an ensemble member fitted without the last scan does), ``(T - 1,)`` float32.
    """
    image = batchdata[Keys.IMAGE]
    if image.ndim < 4 or image.shape[0] != 1 or image.shape[1] < 2:
        raise ValueError(f"batch 'image' must be one subject's scans (1, T >= 2, *spatial), got {tuple(image.shape)}.")
    image = torch.as_tensor(image).to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    times = torch.as_tensor(batchdata["time"]).reshape(-1).to(torch.float64)
    if times.numel() != image.shape[1]:
        raise ValueError(f"batch 'time' must hold one time per scan ({image.shape[1]}), got {times.tolist()}.")
    origin, span = batchdata.get("time_span", [(times[0], times[-1] - times[0])])[0]
    scaled = ((times - origin) / span).to(device=device, dtype=torch.float32)
    return image[:, :1], image[0, 1:, None], scaled[1:]


def subject_collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` of a subject's ``DataLoader`` (batch size 1): the batch's tensors are the item's with a batch
    axis added as a view, without the copy of every scan that stacking makes each epoch; other values in a list.

    Raises:
        ValueError: for a batch of more than one item.
    """
    if len(items) != 1:
        raise ValueError(f"subject_collate collates one subject item, got {len(items)}.")
    return {key: value.unsqueeze(0) if isinstance(value, torch.Tensor) else [value] for key, value in items[0].items()}


class NODERTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` fitting one subject's trajectory; every epoch is one iteration over all observed times.

    The iteration runs at ``engine.state.level`` (set per epoch by :class:`CoarseToFineHandler`, default 1):
    baseline and targets are block-averaged to that level and smoothed (:func:`level_image`, once per level) and
    the loss's NCC window is scaled to cover the same physical extent (:func:`~noder_monai.networks.scale_window`).
    ``engine.state.output`` is a list of one dict (one subject is one sample, as after decollation, so
    ``from_engine(["loss"], first=True)`` works): ``image`` (baseline), ``label`` (targets), ``pred`` (warped),
    ``loss`` and ``terms`` (the loss terms as floats); ``engine.state.history`` the per-epoch records ``{"epoch",
    "level", "total", "similarity", "smoothness", "boundary"}`` stored in the fitted subject; ``engine.state.metrics``
    the epoch's ``loss_total``, ``loss_similarity``, ``loss_smoothness``, ``loss_boundary`` and ``level``, which
    MONAI's ``MLFlowHandler`` and ``TensorBoardStatsHandler`` log every epoch.

    Args:
        device: torch device of the fit.
        max_epochs: number of epochs (= optimizer steps).
        train_data_loader: yields the subject item (see the module docstring); one item.
        network: a :class:`NODER` prepared with :func:`init_network`.
        optimizer: over the network's trainable parameters.
        loss_function: a :class:`NODERLoss` (its window is the level-1 window).
        prepare_batch: item -> (baseline, targets, scaled times). Defaults to :func:`prepare_sequence_batch`.
        image_smoothing_sigma: Gaussian sigma (image voxels) of the images at every level (:func:`level_image`).
        finest_time_groups: at level 1 (full resolution), each epoch fits one of this many interleaved groups of
            the observed times, in turn (so one full-resolution epoch costs about 1 / groups of an epoch over all
            times; the recorded loss is that group's); 1 fits every time in every epoch.
        similarity_voxels: at most about this many voxels are scored by the similarity per epoch, in a random box
            of the level grid (:func:`similarity_box`; the recorded similarity is that box's); the regularisers
            always cover the whole field. None scores every voxel.
        kwargs: other ``SupervisedTrainer`` arguments (``train_handlers``, ``inferer``, ``amp``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: NODER,
        optimizer: torch.optim.Optimizer,
        loss_function: NODERLoss,
        prepare_batch: Callable = prepare_sequence_batch,
        image_smoothing_sigma: float = IMAGE_SMOOTHING_SIGMA,
        finest_time_groups: int = FINEST_TIME_GROUPS,
        similarity_voxels: int | None = SIMILARITY_VOXELS,
        **kwargs: Any,
    ) -> None:
        if not isinstance(loss_function, NODERLoss):
            raise ValueError(f"loss_function must be a NODERLoss, got {type(loss_function).__name__}.")
        sigma = check_image_smoothing_sigma(image_smoothing_sigma)
        groups = check_finest_time_groups(finest_time_groups)
        kwargs.setdefault("optim_set_to_none", True)
        kwargs.setdefault("decollate", False)  # one subject per batch; the output holds (T - 1)-batches
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch,
            **kwargs,
        )
        self.image_smoothing_sigma = sigma
        self.finest_time_groups = groups
        self.similarity_voxels = check_similarity_voxels(similarity_voxels)
        self.state.level = 1
        self.state.history = []
        self.state.template = None
        self._levels: dict[tuple[int, int], tuple[NODERLoss, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._templates: dict[int, torch.Tensor] = {}

    def set_template(self, template: torch.Tensor | None) -> None:
        """Warp ``template`` (1, 1, *S), normalised, instead of the baseline from now on (None: the baseline)."""
        self.state.template = template
        self._templates = {}

    def _template_at(self, level: int) -> torch.Tensor:
        if level not in self._templates:
            self._templates[level] = level_image(self.state.template, level, self.image_smoothing_sigma)
        return self._templates[level]

    def _at_level(self, level: int, batchdata: Mapping[str, Any],
                  group: int = 0) -> tuple[NODERLoss, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The level's loss and data for one group of times. The scans are block-averaged and smoothed once per
        level; each group gets its own loss (which caches its fixed targets' statistics). At level 1 with
        ``finest_time_groups`` G > 1, group ``g`` holds the targets ``g, g + G, g + 2G, ...`` (interleaved, so
        every group spans the observed times)."""
        if level not in LEVELS:
            raise ValueError(f"engine.state.level must be one of {LEVELS}, got {level!r}.")
        if (level, group) not in self._levels:
            baseline, targets, times = self.prepare_batch(batchdata, self.state.device, self.non_blocking)
            baseline = level_image(baseline, level, self.image_smoothing_sigma)
            targets = level_image(targets, level, self.image_smoothing_sigma)
            groups = self._groups(level, times.numel())
            for each in range(groups):
                loss = self.loss_function
                if level_window(loss.ncc_kernel_size, level) != loss.ncc_kernel_size or each > 0:
                    loss = NODERLoss(
                        spatial_dims=loss.spatial_dims,
                        ncc_kernel_size=level_window(loss.ncc_kernel_size, level),
                        similarity_weight=loss.similarity_weight,
                        smoothness_weight=loss.smoothness_weight,
                        boundary_weight=loss.boundary_weight,
                    )
                chosen = slice(each, None, groups)
                self._levels[(level, each)] = (loss, baseline, targets[chosen].contiguous(), times[chosen])
        return self._levels[(level, group)]

    def _groups(self, level: int, targets: int) -> int:
        """Time groups at ``level``: ``finest_time_groups`` at level 1 (at most one per target), else 1."""
        return min(self.finest_time_groups, targets) if level == 1 else 1

    def _iteration(self, engine: NODERTrainer, batchdata: dict[str, Any]) -> list[dict]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        level = int(getattr(engine.state, "level", 1))
        group = len(engine.state.history) % engine._groups(level, torch.as_tensor(batchdata["time"]).numel() - 1)
        engine.state.time_group = group
        loss_function, baseline, targets, times = engine._at_level(level, batchdata, group)
        if engine.state.template is not None:
            baseline = engine._template_at(level)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        field = engine.network.displacement_field(times, level)
        box = similarity_box(baseline.shape[2:], engine.similarity_voxels, loss_function.ncc_kernel_size // 2)
        region, scored = box if box is not None else (None, None)
        if region is not None:
            targets = targets[(slice(None), slice(None), *region)]
        ddf = field.dense(region)
        origin = None if region is None else [r.start for r in region]
        warped = engine.network.warp(baseline.expand(len(times), *baseline.shape[1:]), ddf, origin)
        # one subject is one sample: the output is the decollated form, a list of one dict
        output = {Keys.IMAGE: baseline, Keys.LABEL: targets, Keys.PRED: warped}
        engine.state.output = [output]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = loss_function(warped, targets, field, scored)
        # the epoch's one copy from the device: the loss terms, read together
        values = dict(zip(terms, torch.stack([v.detach() for v in terms.values()]).tolist()))
        if not math.isfinite(values["total"]):
            raise FloatingPointError(
                f"subject '{batchdata.get('subject', ['subject'])[0]}': the fit diverged: loss is "
                f"{values['total']} at epoch {len(engine.state.history)} (level {level}); nothing was "
                f"saved. Lower learning_rate (now {engine.optimizer.defaults['lr']:g}) and fit again."
            )
        output[Keys.LOSS] = terms["total"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["total"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.state.history.append({"epoch": len(engine.state.history), "level": level, **values})
        engine.state.metrics.update({f"loss_{name}": value for name, value in values.items()}, level=level)
        output.update({Keys.PRED: warped.detach(), Keys.LOSS: terms["total"].detach(), "terms": values})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def fitted_subject(
    engine: NODERTrainer, item: Mapping[str, Any], fit_config: Mapping[str, Any] | None = None, **extra: Any
) -> FittedSubject:
    """The :class:`FittedSubject` of a trained engine and its (uncollated) training item.

    With ``fit_config["source"]`` ``"template"`` or ``"auto"`` the subject template is built here from the final
    maps (:func:`subject_template`) and stored with the subject; with ``"auto"`` the appearance is chosen by
    validation on the subject's own scans (:func:`choose_source`).

    Args:
        engine: the trainer after ``run()``.
        item: the dataset item (:func:`~noder_monai.transforms.sequence_item` then ``IntensityMappingd``): ``image``
            (T, *S) normalised scans (a ``MetaTensor`` whose affine is stored), ``time``, ``subject``, ``intensity``
            (``IntensityMapping.to_dict()``) and, when read from files, ``geometry`` and ``fitted_on`` (JSON text).
        fit_config: the plain optimisation settings to store (``FitConfig`` as a dict).
        extra: other :class:`FittedSubject` arguments (``geometry``, ``fitted_on``).

    Raises:
        FloatingPointError: if the network's weights are not finite (the fit diverged).
    """
    if not all(bool(torch.isfinite(p).all()) for p in engine.network.parameters()):
        raise FloatingPointError(
            f"subject '{item.get('subject', 'subject')}': the fit diverged (non-finite weights after "
            f"{len(engine.state.history)} epochs); nothing was saved. Lower the learning rate and fit again."
        )
    image = item[Keys.IMAGE]
    affine = getattr(image, "affine", None)
    if affine is None:
        affine = torch.eye(image.ndim)
    config = dict(fit_config or {})
    config["learning_rate"] = float(engine.optimizer.defaults.get("lr", config.get("learning_rate", math.nan)))
    config["ncc_kernel_size"] = int(engine.loss_function.ncc_kernel_size)
    config["smoothness_weight"] = float(engine.loss_function.smoothness_weight)
    config["boundary_weight"] = float(engine.loss_function.boundary_weight)
    for key, value in _item_records(item).items():
        extra.setdefault(key, value)
    values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    scans = values.to(device=engine.state.device, dtype=torch.float32)[:, None]
    times = torch.as_tensor(item["time"], dtype=torch.float64).reshape(-1)
    intensity = IntensityMapping.from_dict({k: float(v) for k, v in item["intensity"].items()})
    template, choice = None, None
    if config.get("source") in ("template", "auto"):
        scaled = ((times - times[0]) / (times[-1] - times[0])).to(device=scans.device, dtype=torch.float32)
        template = subject_template(engine.network, scans, scaled)
        if config["source"] == "auto":
            choice = choose_source(engine.network, scans, scaled, times, intensity)
            log = logger.info if choice.beats_references else logger.warning
            log("%s: %s", item.get("subject", "subject"), choice.summary())
    return FittedSubject(
        model=engine.network.eval(),
        baseline=scans[:1],
        scans=scans,
        template=template,
        **extra,
        times=times,
        affine=torch.as_tensor(affine, dtype=torch.float64),
        intensity=intensity,
        subject=str(item.get("subject", "subject")),
        fit_config=config,
        history=list(engine.state.history),
        source_choice=choice,
    )


@torch.no_grad()
def choose_source(model: NODER, scans: torch.Tensor, scaled_times: torch.Tensor, times: torch.Tensor,
                  intensity: IntensityMapping) -> SourceChoice:
    """The appearance of a subject's predictions, chosen by validation on its own scans
    (:func:`~noder_monai.model.appearance.select_source`); with fewer than 3 non-constant scans, where none can be
    left out, the bracketing scans carried and blended in time (``nearest``).

    Args:
        model: the fitted trajectory.
        scans: (T, 1, *S) normalised scans; scaled_times: (T,) their scaled times; times: (T,) in the user's unit.
        intensity: the subject's intensity mapping.
    """
    usable = informative(scans)
    if sum(usable) < 3 or not usable[0]:
        return SourceChoice(source="nearest", noise_floor=0.0, noise_std=[noise_std(scan) for scan in scans],
                            errors={}, references={})
    return select_source(scans, times.tolist(), model.displacement(scaled_times),
                         model.displacement(scaled_times, inverse=True), intensity.inverse, intensity.forward)


def _item_records(item: Mapping[str, Any]) -> dict[str, Any]:
    """The item's ``geometry`` (a :class:`Geometry`) and ``fitted_on`` (a dict), stored as JSON text so that they
    survive collation; absent keys are left out."""
    records = {key: json.loads(item[key]) for key in ("geometry", "fitted_on") if isinstance(item.get(key), str)}
    if records.get("geometry") is not None:
        records["geometry"] = Geometry.from_dict(records["geometry"])
    return records
