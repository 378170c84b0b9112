"""The handlers of a fit: the coarse-to-fine level per epoch (with early stopping), the subject template rebuilds,
an epoch callback, and the writer of the fitted subject."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.utils import CommonKeys as Keys

from noder_monai.engines.trainer import NODERTrainer, fitted_subject, subject_template
from noder_monai.model import FittedSubject
from noder_monai.networks import LEVELS

__all__ = ["CoarseToFineHandler", "EpochCallbackHandler", "FittedSubjectSaver", "TemplateHandler"]

logger = logging.getLogger(__name__)


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
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.callback(dict(e.state.history[-1])))


class FittedSubjectSaver:
    """``CheckpointSaver`` for a subject fit: at completion, write the fitted subject to ``save_path`` atomically.

    The file is the one :meth:`FittedSubject.save` writes (state_dict plus times, affine, intensity mapping and
    loss history), loadable with ``torch.load(weights_only=True)``, by :meth:`FittedSubject.load` and by
    ``CheckpointLoader(load_dict={"state_dict": network})``.

    Why not MONAI's ``CheckpointSaver(save_final=True)``: it also writes its final file when the run raises (a fit
    stopped part-way would leave a ``model.pt`` like a finished one), it writes in place (its ``DiskSaver`` has
    ``atomic=False``: a killed process leaves a truncated file), and it saves ``state_dict`` objects, while the
    fitted subject (scans, times, intensity mapping, the template built from the final maps) exists only after the
    last epoch. Tested in ``tests/test_engines_fit.py``.

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
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def completed(self, engine: NODERTrainer) -> None:
        self.subject = fitted_subject(engine, self.dataset[0], self.fit_config)
        self.subject.save_template(self.save_path.parent / "template.nii.gz")
        self.subject.save(self.save_path)  # last: a model file means the template was written too
        history = engine.state.history
        logger.info("%s: %d epochs, final loss %.5f -> %s", self.subject.subject, len(history),
                    history[-1]["total"] if history else math.nan, self.save_path)
