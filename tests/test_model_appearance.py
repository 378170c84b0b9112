"""The appearance of predictions: noise estimates, the magnitude noise floor, weights, and the per-subject choice by
leave-one-visit-out validation (on identity fields, then on real fits where averaging must lose or must win)."""

from __future__ import annotations

import math

import pytest
import torch

from noder_monai.data import SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.model import FittedSubject
from noder_monai.model.appearance import (
    SourceChoice,
    candidate_names,
    candidate_weights,
    combine,
    informative,
    magnitude_noise_floor,
    noise_std,
    select_source,
    time_weights,
)
from noder_monai.metrics import nrmse



def _smooth_image(size: int = 24, dims: int = 3) -> torch.Tensor:
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(*[axis] * dims, indexing="ij"))
    return (1.0 + torch.cos(2 * grid[0]) * torch.sin(1.5 * grid[1]))[None]


@pytest.mark.parametrize("dims", [2, 3])
def test_noise_std_recovers_white_noise_on_anatomy(dims):
    generator = torch.Generator().manual_seed(0)
    image = _smooth_image(48 if dims == 2 else 24, dims)
    image[(slice(None),) + (slice(8, 16),) * dims] += 2.0  # a sharp-edged block: the robust scale ignores its edges
    noisy = image + 0.05 * torch.randn(image.shape, generator=generator)
    assert noise_std(noisy) == pytest.approx(0.05, rel=0.15)
    assert noise_std(image) < 0.01


def test_noise_floor_of_rician_magnitudes_and_none_for_signed_or_full_images():
    generator = torch.Generator().manual_seed(1)
    signal = torch.zeros(3, 1, 24, 24, 24)
    signal[:, :, 6:18, 6:18, 6:18] = 1.0
    sigma = 0.05
    real = signal + sigma * torch.randn(signal.shape, generator=generator)
    magnitude = torch.sqrt(real**2 + (sigma * torch.randn(signal.shape, generator=generator)) ** 2)
    noise = [noise_std(scan) for scan in magnitude]
    assert magnitude_noise_floor(magnitude, noise) == pytest.approx(2 * sigma**2, rel=0.15)
    assert magnitude_noise_floor(real, [noise_std(scan) for scan in real]) == 0.0  # signed: not magnitudes
    full = magnitude + 1.0  # no voxel without signal: nothing to measure a floor on
    assert magnitude_noise_floor(full, [noise_std(scan) for scan in full]) == 0.0


def test_time_weights_kernel_noise_and_limits():
    observed = [0.0, 1.0, 2.0, 4.0]
    equal = time_weights(1.0, observed, math.inf, [1.0] * 4)
    assert torch.allclose(equal, torch.full((4,), 0.25, dtype=torch.float64))
    narrow = time_weights(1.0, observed, 0.05, [1.0] * 4)
    assert narrow[1] > 0.99
    noisy = time_weights(1.0, observed, math.inf, [1.0, math.sqrt(2), 1.0, 1.0])
    assert noisy[1] == pytest.approx(noisy[0] / 2)
    far = time_weights(100.0, observed, 0.01, [1.0] * 4)  # every kernel value underflows: the closest scan
    assert far.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_candidate_weights_bracket_baseline_and_leave_out():
    observed, noise = [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]
    assert candidate_weights("nearest", 2.5, observed, noise).tolist() == [0.0, 0.25, 0.75]
    assert candidate_weights("nearest", 5.0, observed, noise).tolist() == [0.0, 0.0, 1.0]
    assert candidate_weights("baseline", 2.0, observed, noise).tolist() == [1.0, 0.0, 0.0]
    left_out = candidate_weights("nearest", 1.0, observed, noise, available=[True, False, True])
    assert left_out.tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert candidate_weights("weighted:inf", 1.0, observed, noise, available=[True, False, True])[1] == 0
    with pytest.raises(ValueError, match="unknown candidate 'median'"):
        candidate_weights("median", 1.0, observed, noise)
    assert candidate_names(with_template=False)[:2] == ("baseline", "nearest") and "template" not in \
        candidate_names(with_template=False)


def test_power_average_removes_the_noise_floor():
    generator = torch.Generator().manual_seed(2)
    sigma, count = 0.1, 8
    noise = sigma * torch.randn(2, count, 1, 16, 16, 16, generator=generator)
    magnitudes = list(torch.sqrt(noise[0] ** 2 + noise[1] ** 2))  # no signal: Rayleigh noise, mean 1.25 sigma
    weights = torch.full((count,), 1 / count, dtype=torch.float64)
    plain = combine(magnitudes, weights)
    corrected = combine(magnitudes, weights, 2 * sigma**2, lambda x: x, lambda x: x)
    assert float(plain.mean()) == pytest.approx(1.25 * sigma, rel=0.05)
    assert float(corrected.mean()) < 0.5 * float(plain.mean())


def _identity_choice(scans: torch.Tensor, times: list[float]) -> SourceChoice:
    zero = torch.zeros(scans.shape[0], scans.ndim - 2, *scans.shape[2:])
    return select_source(scans, times, zero, zero, lambda x: x, lambda x: x)


def test_choice_averages_noise_of_a_still_subject_and_follows_a_changing_one():
    """Identity fields: when nothing moves, averaging every scan wins; when the intensity changes quickly and the
    noise is low, only the nearest scans predict a left-out one."""
    generator = torch.Generator().manual_seed(3)
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    base = _smooth_image(16) - 2.5  # signed: no magnitude floor
    still = torch.stack([base + 0.2 * torch.randn(base.shape, generator=generator) for _ in times])
    choice = _identity_choice(still, times)
    assert choice.source in ("weighted:0.6", "weighted:inf") and choice.noise_floor == 0
    assert choice.beats_references
    changing = torch.stack([base * (1 + 0.4 * t) + 0.01 * torch.randn(base.shape, generator=generator) for t in times])
    choice = _identity_choice(changing, times)
    assert choice.source in ("nearest", "weighted:0.1")
    assert choice.errors[choice.source] == min(choice.errors.values())
    assert set(choice.references) == {"linear interpolation", "nearest scan"}


def test_choice_round_trips_through_a_plain_dictionary():
    choice = SourceChoice("weighted:0.35", 0.002, [0.1, 0.2], {"baseline": 0.2, "weighted:0.35": 0.1},
                          {"linear interpolation": 0.15, "nearest scan": 0.18})
    assert SourceChoice.from_dict(choice.to_dict()) == choice
    assert "weighted:0.35" in choice.summary() and "WARNING" not in choice.summary()
    losing = SourceChoice("baseline", 0.0, [0.1], {"baseline": 0.3}, {"linear interpolation": 0.2, "nearest scan": 0.4})
    assert not losing.beats_references and "WARNING" in losing.summary()


CONFIG = dict(epochs=40, levels=(2, 1), level_fractions=(0.5, 0.5), ncc_kernel_size=7)


def _fit_and_score(truth, observed: list[int], heldout: list[int]) -> tuple[FittedSubject, dict[str, float]]:
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject="s")
    fitted = fit_sequence(sequence, FitConfig(**CONFIG), seed=0, progress=False)
    times = truth.times[heldout]
    scores = {}
    for source in ("auto", "baseline", "template", "nearest"):
        scores[source] = float(nrmse(fitted.predict(times, source=source).images, truth.clean[heldout]).mean())
    return fitted, scores


def test_sharp_anatomy_with_fine_change_the_template_loses_and_the_choice_says_so():
    """Sharp edges, fast local change, almost no noise: averaging scans carried from far away blurs; the choice is
    a narrow one and scores best on the held-out truth."""
    generator = torch.Generator().manual_seed(4)
    base = (torch.rand(1, 6, 6, 6, generator=generator) > 0.5).float()
    base = base.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)  # 24^3 blocks, sharp edges
    times = [0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]
    truth = synthetic_sequence(3, times=times, base_image=base, amplitude=0.5, local=2.5, local_width=2.0,
                               noise=0.002, seed=0)
    fitted, scores = _fit_and_score(truth, [0, 1, 3, 4, 5, 6, 7], [2])
    assert fitted.source_choice.source in ("nearest", "weighted:0.1", "weighted:0.2"), fitted.source_choice
    assert scores["template"] > scores["auto"]
    assert scores["auto"] <= 1.02 * min(scores[s] for s in ("baseline", "template", "nearest")), scores


def test_smooth_phantom_with_noise_averaging_wins_and_the_choice_says_so():
    times = [0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0]
    truth = synthetic_sequence(3, size=24, times=times, amplitude=0.5, noise=0.08, noise_model="gaussian", seed=1)
    fitted, scores = _fit_and_score(truth, [0, 1, 3, 4, 5, 6, 7], [2])
    assert fitted.source_choice.source in ("weighted:0.35", "weighted:0.6", "weighted:inf", "template")
    assert scores["auto"] < scores["nearest"] and scores["auto"] < scores["baseline"]
    assert scores["auto"] <= 1.02 * min(scores[s] for s in ("baseline", "template", "nearest")), scores


def test_chosen_source_and_validation_errors_round_trip_through_the_file(tmp_path):
    truth = synthetic_sequence(3, size=16, times=[0.0, 1.0, 2.0, 3.0], noise=0.03, noise_model="rician", seed=2)
    sequence = SubjectSequence.from_tensors(truth.images, truth.times, subject="s")
    fitted = fit_sequence(sequence, FitConfig(epochs=6, levels=(2, 1), level_fractions=(0.5, 0.5),
                                              ncc_kernel_size=5), seed=0, progress=False)
    path = fitted.save(tmp_path / "model.pt")
    loaded = FittedSubject.load(path)
    assert loaded.source_choice == fitted.source_choice
    assert set(loaded.source_choice.errors) == set(candidate_names(loaded.source_choice.noise_floor == 0))
    assert torch.equal(loaded.predict([0.5, 4.0]).images, fitted.predict([0.5, 4.0]).images)
    raw = torch.load(path, weights_only=True)
    raw["source_choice"] = {"source": "weighted:0.35"}
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="field 'source_choice' is malformed"):
        FittedSubject.load(tmp_path / "bad.pt")


def test_a_constant_scan_is_left_out_of_the_choice_and_the_file_loads(tmp_path):
    truth = synthetic_sequence(2, size=32, times=[0.0, 1.0, 2.0, 3.0, 4.0], noise=0.02, seed=1)
    images = truth.images.clone()
    images[2] = 0.0  # a blank scan: it cannot guide the fit, and must not count in the appearance either
    sequence = SubjectSequence.from_tensors(images, truth.times, subject="blank")
    fitted = fit_sequence(sequence, FitConfig(epochs=6, levels=(2, 1), level_fractions=(0.5, 0.5), ncc_kernel_size=5),
                          seed=0, progress=False)
    choice = fitted.source_choice
    assert choice.errors and max(choice.errors.values()) < 1.0  # validated on the 3 other scans, not the blank one
    assert informative(fitted.scans) == [True, True, False, True, True]
    loaded = FittedSubject.load(fitted.save(tmp_path / "model.pt"))
    assert loaded.source_choice == choice
    prediction = loaded.predict([2.0]).images[0]  # at the blank scan's own time: made from the others
    assert float(prediction.std()) > 0.1 * float(truth.clean[2].std())
    assert float(nrmse(prediction[None], truth.clean[2:3])) < 0.5
