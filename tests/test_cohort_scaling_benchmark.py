"""benchmarks/cohort_scaling.py on 2 tiny subjects: both process counts fit every subject once; the table is filled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cohort_scaling  # noqa: E402


@pytest.mark.slow  # two torchrun launches: the sharding itself is tested in test_workflows_cohort.py
def test_smoke_run_fits_every_subject_with_one_and_two_processes(tmp_path, capsys):
    rows = cohort_scaling.main(["--subjects", "2", "--size", "12", "--epochs", "2", "--nproc", "1,2",
                                "--workdir", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    assert [row["processes"] for row in rows] == [1, 2] and [row["subjects"] for row in rows] == [2, 2]
    assert [len(row["peak_rss_mib"]) for row in rows] == [1, 2]
    assert all(100 < mib < 4000 for row in rows for mib in row["peak_rss_mib"])
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and rows[1]["wall_s"] > 0
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "| 2 | 2 |" in capsys.readouterr().out
