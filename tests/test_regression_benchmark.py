"""Tests for benchmarks/regression.py: the tiny suite runs every method and gives finite metrics; helpers are exact."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import regression  # noqa: E402


@pytest.fixture(scope="module")
def quick_records():
    threads = torch.get_num_threads()
    try:
        return regression.run_suite(regression.quick_settings(threads=1))
    finally:
        torch.set_num_threads(threads)


def test_quick_suite_gives_finite_metrics_for_every_method(quick_records):
    settings = regression.quick_settings()
    subjects = len(settings.cases) * len(settings.observed_counts) * len(settings.seeds)
    assert len(quick_records) == subjects * len(regression.METHODS) * len(regression.SPLITS)
    for record in quick_records:
        for key in ("nrmse", "ssim", "psnr", "fit_s", "predict_s"):
            assert math.isfinite(record[key]), record
        assert 0 <= record["nrmse"] < 1 and -1 <= record["ssim"] <= 1, record
        deforms = record["method"].startswith(("NODER", "geodesic", "true field"))
        assert (record["folded"] is not None) == deforms, record
        if deforms:
            assert 0 <= record["folded"] <= 100, record
    reference = [r["nrmse"] for r in quick_records if r["method"] == "true field on noisy first scan"]
    assert max(reference) < 0.08  # the noise of the first scan, kept by every warp of it (measured 0.040-0.067)


def test_summary_and_table_cover_every_method(quick_records):
    rows = regression.summarise(quick_records)
    assert len(rows) == 2 * len(regression.METHODS)  # 2 cases x 1 scan count
    noder = next(r for r in rows if r["method"] == "NODER (displacement)" and r["case"] == "brain 3D 16^3")
    assert noder["subjects"] == 2 and noder["scans"] == 3
    median, worst = noder["nrmse_interpolation"]
    assert 0 < median <= worst
    assert next(r for r in rows if r["method"] == "linear interpolation")["folded"] is None
    table = regression.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1
    for method in regression.METHODS:
        assert f"| {method} |" in table
    lines = regression.comparisons(rows)
    assert len(lines) == 4 and all("geodesic regression" in line for line in lines)


def test_subject_protocol_times():
    settings = regression.quick_settings()
    subject = regression.make_subject(regression.Case("brain", 2, 32), 9, 0, settings)
    assert subject.sequence.images.shape == (9, 1, 32, 32)
    assert subject.truth.times[subject.heldout["interpolation"]].tolist() == [1.0, 2.5, 4.0]
    assert subject.heldout_times.tolist() == [1.0, 2.5, 4.0, 7.0]
    assert subject.sequence.times[-1] < subject.truth.times[subject.heldout["extrapolation"]].min()
    cardiac = regression.make_subject(regression.Case("cardiac", 3, 16), 2, 1, settings)
    assert cardiac.sequence.times.tolist() == [0.0, 0.8]
    assert torch.equal(cardiac.sequence.images, cardiac.truth.images[cardiac.observed])


@pytest.mark.parametrize("default, size, expected", [(15, 96, 15), (21, 96, 21), (15, 64, 11), (21, 64, 15),
                                                     (15, 32, 5), (21, 32, 7), (15, 16, 3), (21, 16, 3)])
def test_scaled_kernel(default, size, expected):
    assert regression.scaled_kernel(default, size) == expected


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc needed")
def test_peak_memory_sees_an_allocation():
    with regression.PeakMemory() as memory:
        block = torch.ones(64 * 2**20 // 4)
        del block
    assert memory.mib is not None and 60 <= memory.mib < 200, memory.mib


def test_settings_reject_unknown_names():
    with pytest.raises(ValueError, match=r"methods must be names from .*got \['SADM'\]"):
        regression.Settings(cases=[regression.Case("brain", 3, 16)], methods=["SADM"])
    with pytest.raises(ValueError, match=r"observed_counts must be among \[2, 3, 9\], got \[4\]"):
        regression.Settings(cases=[regression.Case("brain", 3, 16)], observed_counts=(4,))
    with pytest.raises(ValueError, match=r"cases must have kind in \('brain', 'cardiac'\)"):
        regression.Settings(cases=[regression.Case("lung", 3, 16)])
