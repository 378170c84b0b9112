"""Smoke test of benchmarks/scale.py at 16^3: every column of the table is there and finite."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale  # noqa: E402


def test_scale_table_at_16_has_every_column_finite(tmp_path):
    records, anatomies = scale.run(["16"], epochs=5, threads=1, cache=str(tmp_path), fresh_processes=False,
                                   source=None)
    assert len(records) == 1 and set(anatomies) == {"16x16x16"}
    assert "upsampled" in anatomies["16x16x16"]  # source=None: the shipped volume, and the header says so
    record = records[0]
    assert set(scale.COLUMNS) <= set(record)
    assert record["size"] == "16x16x16" and record["voxels"] == 16**3 and record["epochs"] == 5
    for key in scale.COLUMNS:
        if key in ("size", "tree", "cuda_peak_gb"):
            continue  # cuda_peak_gb is NaN on the CPU
        assert math.isfinite(record[key]) and record[key] >= 0, key
    assert 0 < record["nrmse_interpolation"] < 1 and 0 < record["linear_nrmse_extrapolation"] < 1
    text = scale.markdown(scale.summarise(records + [dict(records[0], tree="other")]), "## header")
    assert "| 16x16x16 | 4096 | this tree | 5 |" in text
    assert "Ratios to other" in text and "| 16x16x16 | this tree | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 |" in text


def test_exponent_and_sizes():
    assert scale.exponent([1e3, 1e4, 1e5], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert math.isnan(scale.exponent([1e3], [1.0]))
    assert scale.parse_size("144x176x144") == (144, 176, 144) and scale.parse_size("64") == (64, 64, 64)
    with pytest.raises(ValueError, match="--sizes: '12x3'"):
        scale.parse_size("12x3")
