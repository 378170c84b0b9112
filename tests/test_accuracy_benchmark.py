"""Tests for benchmarks/accuracy.py: the quick suite scores every method on both kinds with known truth."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402


@pytest.fixture(scope="module")
def quick_records():
    threads = torch.get_num_threads()
    try:
        return accuracy.run(accuracy.quick_settings(threads=1))
    finally:
        torch.set_num_threads(threads)


def test_quick_suite_scores_every_method_and_split(quick_records):
    settings = accuracy.quick_settings()
    sources = len(accuracy.VARIANTS["default"][2])
    methods = sources + len(accuracy.BASELINES)
    assert len(quick_records) == len(settings.cases) * settings.subjects * methods * 2
    names = {r["method"] for r in quick_records}
    assert {"NODER default, source template", "NODER default, source baseline"} <= names
    for record in quick_records:
        for key in ("nrmse", "ssim", "psnr"):
            assert math.isfinite(record[key]), record
        if record["method"] == "true field on noisy first scan":
            assert record["epe"] == 0.0 and record["folded"] == 0.0
    # both sources of one fit share its fields (and its fit time)
    for case in {r["case"] for r in quick_records}:
        template, baseline = (
            [r for r in quick_records if r["case"] == case and r["method"] == f"NODER default, source {s}"]
            for s in ("template", "baseline")
        )
        assert [r["epe"] for r in template] == [r["epe"] for r in baseline]
        assert template[0]["fit_s"] == baseline[0]["fit_s"]


def test_subjects_follow_the_protocol_with_local_detail_and_rician_noise():
    settings = accuracy.quick_settings()
    subject = accuracy.make_subject(accuracy.Case("brain", 3, 16), 0, settings)
    assert subject.sequence.times.tolist() == list(accuracy.PROTOCOLS["brain"].observed[6])
    assert subject.truth.times[subject.heldout["extrapolation"]].tolist() == [7.5]
    assert (subject.sequence.images >= 0).all()  # Rician magnitudes are never negative
    cardiac = accuracy.make_subject(accuracy.Case("cardiac", 3, 16), 0, settings)
    assert len(cardiac.observed) == 9 and len(cardiac.heldout["interpolation"]) == 2


def test_unknown_variant_is_refused():
    settings = accuracy.quick_settings()
    settings.variants = ("fastest",)
    with pytest.raises(ValueError, match="fastest"):
        accuracy.run(settings)


def test_cine_subject_is_scored_against_its_own_speckled_frames():
    settings = accuracy.quick_settings()
    subject = accuracy.make_subject(accuracy.Case("cine", 2, 32), 0, settings)
    assert len(subject.observed) == 11 and subject.sequence.spatial_size == (32, 32)
    assert torch.equal(subject.truth.clean, subject.truth.images)
    assert subject.truth.times[subject.heldout["extrapolation"]].tolist() == [14 / 15]
