"""One subject's fit as a MONAI training run: a ``SupervisedTrainer`` whose iteration warps the baseline to every
observed time, plus the handlers that set the coarse-to-fine level and write the fitted subject.

A subject is one training item ``{"image": (T, *S) scans as channels, "time": (T,) times, "subject": id,
"intensity": {"lower", "upper"}}`` (what ``LoadImaged`` of the scan list followed by :class:`IntensityMappingd`
gives); one epoch is one iteration: one optimizer step on all observed times as one batch.
``bundle/configs/train.json`` builds these pieces by ``_target_``; :func:`~noder_monai.engines.fit_sequence` builds
the same pieces in Python.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import IterationEvents, SupervisedTrainer
from monai.utils import CommonKeys as Keys

from noder_monai.data import IntensityMapping
from noder_monai.io.image import Geometry, load_scan
from noder_monai.engines.pretrain import default_autoencoder_path
from noder_monai.model.subject import FittedSubject, load_autoencoder_weights
from noder_monai.losses import NODERLoss
from noder_monai.networks import LEVELS, NODER, scale_window
from noder_monai.networks.autoencoder import pad_to_multiple
from noder_monai.utils import cosine_decay

__all__ = [
    "NODERTrainer",
    "CoarseToFineHandler",
    "FittedSubjectSaver",
    "EpochCallbackHandler",
    "prepare_sequence_batch",
    "init_network",
    "cosine_schedule",
    "FINAL_LR_FRACTION",
    "fitted_subject",
    "downsample_image",
    "level_window",
    "subject_template",
    "TemplateHandler",
    "MIN_LEVEL_VOXELS",
    "IMAGE_SMOOTHING_SIGMA",
    "level_image",
    "check_image_smoothing_sigma",
    "FINEST_TIME_GROUPS",
    "check_finest_time_groups",
]

logger = logging.getLogger(__name__)

HISTORY_TERMS = ("total", "similarity", "smoothness", "boundary")
"""Loss terms recorded per epoch (``NODERLoss`` output keys)."""


def downsample_image(image: torch.Tensor, level: int) -> torch.Tensor:
    """Average ``level``^d blocks: (N, C, *S) -> (N, C, *ceil(S / level)), edge-replicated at the far border.

    Level voxel ``i`` covers image voxels ``[i * level, (i + 1) * level)``, the grid of ``NODER.displacement``.
    """
    if level == 1:
        return image
    pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
    return pool(pad_to_multiple(image, level, mode="replicate"), level)


#: Default Gaussian sigma (image voxels) of :func:`level_image`: the fit's images are smoothed this much.
IMAGE_SMOOTHING_SIGMA = 0.5


def check_image_smoothing_sigma(sigma: Any) -> float:
    """``sigma`` as a float; raises ValueError naming ``image_smoothing_sigma`` unless it is a finite number >= 0."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"image_smoothing_sigma must be a finite number >= 0 (image voxels), got {sigma!r}.")
    return value


def check_finest_time_groups(groups: Any) -> int:
    """``groups`` unchanged; raises ValueError naming ``finest_time_groups`` unless it is an integer >= 1."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"finest_time_groups must be an integer >= 1, got {groups!r}.")
    return groups


def level_image(image: torch.Tensor, level: int, sigma: float = IMAGE_SMOOTHING_SIGMA) -> torch.Tensor:
    """The image the fit uses at ``level``: :func:`downsample_image`, then a Gaussian of ``sigma / level`` level
    voxels (MONAI's ``gaussian_1d`` and ``separable_filtering``, border replicated; ``sigma`` in image voxels, so
    the same physical width at every level; 0 smooths nothing), as ``antsRegistration --smoothing-sigmas`` smooths
    its images per level.

    Why: warping a noisy source with linear interpolation averages its noise by an amount that depends on the
    sub-voxel shift (most at half a voxel), so the local NCC to a noisy target rises off the true alignment whatever
    the anatomy does; the fit then carries spurious sub-voxel motion. A source whose noise is already correlated
    over a voxel (smoothed) loses that bias; the targets are smoothed alike so that both stay equally sharp.

    Shapes: (N, C, *S) -> (N, C, *ceil(S / level)).

    Raises:
        ValueError: ``sigma`` negative or not finite.
    """
    sigma = check_image_smoothing_sigma(sigma)
    image = downsample_image(image, level)
    if sigma == 0:
        return image
    from monai.networks.layers import separable_filtering
    from monai.networks.layers.convutils import gaussian_1d

    kernel = gaussian_1d(torch.tensor(sigma / level), truncated=4.0, approx="erf").to(image)
    return separable_filtering(image, [kernel] * (image.ndim - 2), mode="replicate")


#: Default ``finest_time_groups`` of :class:`NODERTrainer`: full-resolution epochs alternate between two halves of
#: the observed times.
FINEST_TIME_GROUPS = 2


#: The loss (smoothness and boundary terms, NCC windows) needs this many voxels along every axis at every level.
MIN_LEVEL_VOXELS = 3


def level_window(kernel_size: int, level: int) -> int:
    """The NCC window at ``level``: ``scale_window`` clamped to at least 3 voxels (a 1-voxel window has zero local
    variance, so its similarity is 0 whatever the alignment and the fit would not move)."""
    return max(MIN_LEVEL_VOXELS, scale_window(kernel_size, level))


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
    inverse = model.displacement(scaled_times[1:], inverse=True)
    pulled = model.warp(images[1:], inverse)
    return torch.cat([images[:1], pulled]).median(dim=0).values[None]


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
        to ``(t - t0) / (t_last - t0)``, ``(T - 1,)`` float32.
    """
    image = batchdata[Keys.IMAGE]
    if image.ndim < 4 or image.shape[0] != 1 or image.shape[1] < 2:
        raise ValueError(f"batch 'image' must be one subject's scans (1, T >= 2, *spatial), got {tuple(image.shape)}.")
    image = torch.as_tensor(image).to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    times = torch.as_tensor(batchdata["time"]).reshape(-1).to(torch.float64)
    if times.numel() != image.shape[1]:
        raise ValueError(f"batch 'time' must hold one time per scan ({image.shape[1]}), got {times.tolist()}.")
    scaled = ((times - times[0]) / (times[-1] - times[0])).to(device=device, dtype=torch.float32)
    return image[:, :1], image[0, 1:, None], scaled[1:]


class NODERTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` fitting one subject's trajectory; every epoch is one iteration over all observed times.

    The iteration runs at ``engine.state.level`` (set per epoch by :class:`CoarseToFineHandler`, default 1):
    baseline and targets are block-averaged to that level and smoothed (:func:`level_image`, once per level) and
    the loss's NCC window is scaled to cover the same physical extent (:func:`~noder_monai.networks.scale_window`).
    ``engine.state.output`` is a list of one dict (one subject is one sample, as after decollation, so
    ``from_engine(["loss"], first=True)`` works): ``image`` (baseline), ``label`` (targets), ``pred`` (warped),
    ``loss`` and ``terms`` (the loss terms as floats); ``engine.state.history`` the per-epoch records ``{"epoch",
    "level", "total", "similarity", "smoothness", "boundary"}`` stored in the fitted subject.

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
        warped, ddf = engine.network(baseline, times, level)
        # one subject is one sample: the output is the decollated form, a list of one dict
        output = {Keys.IMAGE: baseline, Keys.LABEL: targets, Keys.PRED: warped}
        engine.state.output = [output]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = loss_function(warped, targets, ddf)
        if not bool(torch.isfinite(terms["total"])):
            raise FloatingPointError(
                f"subject '{batchdata.get('subject', ['subject'])[0]}': the fit diverged: loss is "
                f"{float(terms['total'].detach())} at epoch {len(engine.state.history)} (level {level}); nothing was "
                f"saved. Lower learning_rate (now {engine.optimizer.defaults['lr']:g}) and fit again."
            )
        output[Keys.LOSS] = terms["total"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["total"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        engine.state.history.append({"epoch": len(engine.state.history), "level": level, **values})
        output.update({Keys.PRED: warped.detach(), Keys.LOSS: terms["total"].detach(), "terms": values})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class CoarseToFineHandler:
    """Set ``engine.state.level`` at the start of every epoch: ``epochs_per_level[i]`` epochs at ``levels[i]``.

    Args:
        levels: resolution levels (image voxels per level voxel, each in ``LEVELS``), coarsest first.
        epochs_per_level: epochs at each level (e.g. ``FitConfig.epochs_per_level()``); zero skips a level.
        patience: in the last level, stop after this many epochs without a relative improvement of
            ``min_improvement`` of the best loss (of the epoch's group of times, ``engine.state.time_group``, when
            full-resolution epochs alternate between groups; 0 disables early stopping).
        min_improvement: relative improvement of the best loss that resets the patience counter.
    """

    def __init__(
        self,
        levels: Sequence[int],
        epochs_per_level: Sequence[int],
        patience: int = 0,
        min_improvement: float = 1e-4,
    ) -> None:
        self.levels = tuple(int(v) for v in levels)
        self.epochs_per_level = tuple(int(v) for v in epochs_per_level)
        if not self.levels or any(v not in LEVELS for v in self.levels):
            raise ValueError(f"levels must be a non-empty sequence of values in {LEVELS}, got {levels}.")
        if len(self.epochs_per_level) != len(self.levels) or min(self.epochs_per_level) < 0:
            raise ValueError(f"epochs_per_level must be {len(self.levels)} non-negative integers, got {epochs_per_level}.")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}.")
        self.patience = int(patience)
        self.min_improvement = float(min_improvement)
        self._best: dict[int, float] = {}
        self._stale = 0

    def level_at(self, epoch: int) -> int:
        """The level of 1-based ``epoch`` (epochs after the schedule stay at the last level)."""
        end = 0
        for level, count in zip(self.levels, self.epochs_per_level):
            end += count
            if epoch <= end:
                return level
        return self.levels[-1]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def epoch_started(self, engine: Any) -> None:
        engine.state.level = self.level_at(engine.state.epoch)

    def iteration_completed(self, engine: Any) -> None:
        if not self.patience or engine.state.level != self.levels[-1]:
            return
        loss = float(engine.state.output[0][Keys.LOSS])
        group = getattr(engine.state, "time_group", 0)  # each group of times has its own loss scale
        best = self._best.get(group, math.inf)
        if best == math.inf or loss < best - abs(best) * self.min_improvement:
            self._best[group], self._stale = loss, 0
        else:
            self._stale += 1
        if self._stale >= self.patience:
            engine.terminate()


class TemplateHandler:
    """Rebuild the subject template (:func:`subject_template`) at the start of the given epochs and make the trainer
    warp it (``FitConfig(source="template")``; the template after the last epoch is built by :func:`fitted_subject`).

    Args:
        epochs: 0-based epochs at whose start the template is rebuilt (``FitConfig.template_epochs()``).
    """

    def __init__(self, epochs: Sequence[int]) -> None:
        self.epochs = {int(e) for e in epochs}

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)

    def iteration_started(self, engine: NODERTrainer) -> None:
        if len(engine.state.history) in self.epochs:
            images, scaled = _scans(engine)
            engine.set_template(subject_template(engine.network, images, scaled))


def _scans(engine: NODERTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject's normalised scans (T, 1, *S) and scaled times (T,) from the trainer's (one) batch."""
    baseline, targets, times = engine.prepare_batch(engine.state.batch, engine.state.device, engine.non_blocking)
    return torch.cat([baseline, targets]), torch.cat([times.new_zeros(1), times])


class EpochCallbackHandler:
    """Call ``callback(record)`` after every epoch with the trainer's newest history record."""

    def __init__(self, callback: Callable[[dict], None]) -> None:
        self.callback = callback

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.callback(dict(e.state.history[-1])))


def fitted_subject(
    engine: NODERTrainer, item: Mapping[str, Any], fit_config: Mapping[str, Any] | None = None, **extra: Any
) -> FittedSubject:
    """The :class:`FittedSubject` of a trained engine and its (uncollated) training item.

    With ``fit_config["source"] == "template"`` the subject template is built here from the final maps
    (:func:`subject_template`) and stored with the subject.

    Args:
        engine: the trainer after ``run()``.
        item: the dataset item: ``image`` (T, *S) normalised scans (a ``MetaTensor`` whose affine is stored),
            ``time``, ``subject`` and ``intensity`` (``IntensityMapping.to_dict()``).
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
    if "geometry" not in extra:
        extra["geometry"] = _first_scan_geometry(image)
    values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    scans = values.to(device=engine.state.device, dtype=torch.float32)[:, None]
    times = torch.as_tensor(item["time"], dtype=torch.float64).reshape(-1)
    template = None
    if config.get("source") == "template":
        scaled = ((times - times[0]) / (times[-1] - times[0])).to(device=scans.device, dtype=torch.float32)
        template = subject_template(engine.network, scans, scaled)
    return FittedSubject(
        model=engine.network.eval(),
        baseline=scans[:1],
        scans=scans,
        template=template,
        **extra,
        times=times,
        affine=torch.as_tensor(affine, dtype=torch.float64),
        intensity=IntensityMapping.from_dict({k: float(v) for k, v in item["intensity"].items()}),
        subject=str(item.get("subject", "subject")),
        fit_config=config,
        history=list(engine.state.history),
    )


def _first_scan_geometry(image: Any) -> Geometry | None:
    """The input geometry (qform, sform, codes) of the first scan a ``LoadImaged`` item was read from, if any."""
    source = getattr(image, "meta", {}).get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
        return None
    return load_scan(source)[1]


class FittedSubjectSaver:
    """``CheckpointSaver`` for a subject fit: at completion, write the fitted subject to ``save_path`` atomically.

    The file is the one :meth:`FittedSubject.save` writes (state_dict plus times, affine, intensity mapping and
    loss history), loadable with ``torch.load(weights_only=True)``, by :meth:`FittedSubject.load` and by
    ``CheckpointLoader(load_dict={"state_dict": network})``.

    Args:
        save_path: the file to write (e.g. ``<output_dir>/<id>/model.pt``).
        dataset: the training dataset (its one item gives baseline, times, affine and intensity mapping).
        fit_config: the plain optimisation settings to store (a ``FitConfig`` or a dict).
    """

    def __init__(self, save_path: str | os.PathLike, dataset: Sequence[Mapping[str, Any]], fit_config: Any = None) -> None:
        self.save_path = Path(save_path)
        self.dataset = dataset
        if dataclasses.is_dataclass(fit_config):
            fit_config = dataclasses.asdict(fit_config)
        self.fit_config = dict(fit_config or {})
        self.subject: FittedSubject | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: NODERTrainer) -> None:
        self.subject = fitted_subject(engine, self.dataset[0], self.fit_config)
        self.subject.save(self.save_path)
        self.subject.save_template(self.save_path.parent / "template.nii.gz")
        history = engine.state.history
        logger.info("%s: %d epochs, final loss %.5f -> %s", self.subject.subject, len(history),
                    history[-1]["total"] if history else math.nan, self.save_path)
