"""Tests for benchmarks/accuracy.py: the quick matrix scores every method with the default's choice recorded, and the
rule checks flag what they must."""

from __future__ import annotations

import dataclasses
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


def test_quick_matrix_scores_every_method_split_and_records_the_choice(quick_records):
    settings = accuracy.quick_settings()
    methods = 1 + len(accuracy.SOURCES) + len(accuracy.BASELINES)
    assert len(quick_records) == len(settings.cells) * settings.subjects * methods * 2
    for record in quick_records:
        for key in ("nrmse", "ssim", "psnr", "sharpness"):
            assert math.isfinite(record[key]), record
        assert record["cell"] in {cell.name for cell in settings.cells}
    defaults = [r for r in quick_records if r["method"] == accuracy.DEFAULT]
    assert defaults and all(r["choice"] for r in defaults)
    # every source of one fit shares its fields, hence its field error and fit time
    for cell in settings.cells:
        fits = [r for r in quick_records if r["cell"] == cell.name and r["method"].startswith("NODER")]
        assert len({(r["split"], r["epe"]) for r in fits}) == 2 and len({r["fit_s"] for r in fits}) == 1
    text = accuracy.report(quick_records)
    assert "Worst case per method" in text and "Rules for NODER default" in text


def test_rule_checks_flag_a_loss_and_pass_a_win():
    def record(method, nrmse, folded=0.0):
        return {"cell": "c", "seed": 0, "split": "interpolation", "method": method, "nrmse": nrmse, "folded": folded}

    records = [record(accuracy.DEFAULT, 0.10), record("NODER source baseline", 0.12),
               record("NODER source template", 0.095), record("NODER source nearest", 0.2),
               record("linear interpolation", 0.11), record("nearest scan", 0.15), record("geodesic regression", 0.3)]
    outcome, = accuracy.check_rules(records)
    assert outcome["rules"]["below linear interpolation"] and outcome["rules"]["no worse than the first-scan source"]
    assert not outcome["rules"]["within 2% of the best single source"]  # 0.10 > 1.02 * 0.095
    assert "FAILS 'within 2% of the best single source': c / seed 0 / interpolation" in accuracy.rules_text(records)
    worst = accuracy.worst_cases(records)
    assert "| NODER source nearest | c / seed 0 / interpolation | 0.2000 | 0.0950 | 2.105 |" in worst


def test_subjects_follow_their_protocol_with_rician_noise_and_a_sharper_truth():
    small = dataclasses.replace(accuracy.CASES["colin-3.4mm"], size=16)
    subject = accuracy.make_subject(accuracy.Cell(small, "fine", "high"), 0)
    assert subject.sequence.times.tolist() == list(accuracy.BRAIN_A[0])
    assert subject.truth.times[subject.heldout["extrapolation"]].tolist() == [7.5]
    assert (subject.sequence.images >= 0).all()  # Rician magnitudes are never negative
    cine = accuracy.make_subject(accuracy.Cell(dataclasses.replace(accuracy.CASES["cine"], size=32), "smooth", "low"), 0)
    assert len(cine.observed) == 11 and torch.equal(cine.truth.clean, cine.truth.images)
    with pytest.raises(ValueError, match="scales from"):
        accuracy._cells(["cardiac"], ["huge"], ["low"])


@pytest.mark.skipif(not (accuracy.TEMPLATES / "ch2.nii.gz").is_file(), reason="needs Debian's mricron-data")
def test_full_resolution_anatomy_is_sampled_on_the_finer_grid():
    anatomy = dataclasses.replace(accuracy.CASES["colin-1.5mm"], size=16)
    base = accuracy.base_image(anatomy)
    assert base.shape == (1, 32, 32, 32) and float(base.min()) == 0.0 and float(base.max()) == 1.0


def test_edge_sharpness_is_one_for_the_truth_and_lower_for_a_blur():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 4:12, 4:12] = 1.0
    blurred = torch.nn.functional.avg_pool2d(image, 3, 1, 1)
    mask = torch.ones_like(image, dtype=torch.bool)
    assert accuracy.edge_sharpness(image, image, mask) == pytest.approx(1.0)
    assert accuracy.edge_sharpness(blurred, image, mask) < 0.9
