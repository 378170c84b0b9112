"""A user's own data in one command (scan files with times, a BIDS tree, a 4D cine file), the HTML report, the
argument grouping of list flags, and the thread rule."""

import base64
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from noder_monai import cli
from noder_monai.data import make_demo_dataset
from noder_monai.data.bids import bids_datalist
from noder_monai.data.inputs import cine_frame_times
from noder_monai.reporting.html import SECTIONS
from noder_monai.utils import free_cores

TINY = ["--epochs", "2", "--levels", "[2,1]", "--level_fractions", "[0.5,0.5]", "--pretrained", "None",
        "--noprogress", "--noreport"]


def _scans(folder, count, size=16, seed=0):
    """``count`` 16^3 blobs drifting along the first axis, as NIfTI files with a 2 mm affine."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = []
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        centre = np.array([7.0 + 0.5 * k, 8.0, 8.0])
        volume = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / 18.0) + 0.01 * rng.standard_normal(grid.shape[1:])
        path = os.path.join(folder, f"scan{k}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
        paths.append(path)
    return paths


def test_fit_scan_files_with_times_writes_model_and_datalist(tmp_path, capsys):
    paths = _scans(tmp_path / "in", 3)
    out = str(tmp_path / "runs")
    cli.main(["fit", *paths, "--times", "0", "1.5", "3", "--output_dir", out, *TINY])
    assert "sub-01: 2 epochs" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "sub-01", "model.pt"))
    datalist = json.load(open(os.path.join(out, "datalist.json")))
    assert [s["time"] for s in datalist["subjects"][0]["scans"]] == [0.0, 1.5, 3.0]
    assert [s["image"] for s in datalist["subjects"][0]["scans"]] == [os.path.abspath(p) for p in paths]
    # predict reads <output_dir>/datalist.json when no input is given; --times are the query times
    cli.main(["predict", "--output_dir", out, "--times", "0.5", "4"])
    assert "sub-01: 2 time point(s) [0.5, 4.0]" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "sub-01", "predictions", "image_t4.0.nii.gz"))
    # or from the scan files again, their times as --scan_times
    cli.main(["predict", *paths, "--scan_times", "0", "1.5", "3", "--output_dir", out, "--times", "2"])
    assert "sub-01: 1 time point(s) [2.0]" in capsys.readouterr().out


def test_fit_scan_files_needs_one_time_per_scan(tmp_path):
    paths = _scans(tmp_path / "in", 3)
    with pytest.raises(ValueError, match=r"3 scans but 2 times \[0.0, 1.0\]"):
        cli.main(["fit", *paths, "--times", "0", "1", "--output_dir", str(tmp_path / "o"), *TINY])


def _bids(root, ages):
    for subject, sessions in ages.items():
        rows = ["session_id\tage"]
        for index, (session, age) in enumerate(sessions.items()):
            anat = root / subject / session / "anat"
            path = _scans(anat, 1, seed=index)[0]
            os.replace(path, anat / f"{subject}_{session}_T1w.nii.gz")
            rows.append(f"{session}\t{age}")
        (root / subject / f"{subject}_sessions.tsv").write_text("\n".join(rows) + "\n")


def test_fit_bids_uses_ages_as_times(tmp_path, capsys):
    root = tmp_path / "bids"
    _bids(root, {"sub-01": {"ses-1": 70.2, "ses-2": 71.5, "ses-3": 73.0}, "sub-02": {"ses-a": 65.0, "ses-b": 66.0}})
    out = str(tmp_path / "runs")
    cli.main(["fit", "--bids", str(root), "--participant-label", "01", "--output_dir", out, *TINY])
    assert "sub-01: 2 epochs" in capsys.readouterr().out
    datalist = json.load(open(os.path.join(out, "datalist.json")))
    assert [s["id"] for s in datalist["subjects"]] == ["sub-01"]
    assert [s["time"] for s in datalist["subjects"][0]["scans"]] == [70.2, 71.5, 73.0]
    assert datalist["subjects"][0]["scans"][1]["image"].endswith("sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
    assert os.path.isfile(os.path.join(out, "sub-01", "model.pt"))
    assert not os.path.exists(os.path.join(out, "sub-02"))


def test_bids_missing_age_names_the_session(tmp_path):
    root = tmp_path / "bids"
    _bids(root, {"sub-01": {"ses-1": 70.2, "ses-2": "n/a"}})
    with pytest.raises(ValueError, match=r"sub-01 ses-2: missing 'age' in '.*sub-01_sessions.tsv'"):
        bids_datalist(root)
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t70.2\n")
    with pytest.raises(ValueError, match=r"sub-01 ses-2: no row in"):
        bids_datalist(root)
    with pytest.raises(ValueError, match=r"has no subject folder \['sub-07'\]"):
        bids_datalist(root, participant_label=["07"])


def _cine(path, frames=4, step_ms=40.0):
    volumes = [nib.load(p).get_fdata() for p in _scans(os.path.dirname(path) + "/frames", frames)]
    image = nib.Nifti1Image(np.stack(volumes, -1).astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0]))
    image.header.set_xyzt_units("mm", "msec")
    image.header["pixdim"][4] = step_ms
    nib.save(image, path)
    return str(path)


def test_fit_cine_file_uses_its_frame_times(tmp_path, capsys):
    cine = _cine(tmp_path / "patient7_4d.nii.gz")
    assert cine_frame_times(cine) == [0.0, 0.04, 0.08, 0.12]
    out = str(tmp_path / "runs")
    cli.main(["fit", cine, "--output_dir", out, *TINY])
    assert "patient7_4d: 2 epochs" in capsys.readouterr().out
    datalist = json.load(open(os.path.join(out, "datalist.json")))
    scans = datalist["subjects"][0]["scans"]
    assert [s["time"] for s in scans] == [0.0, 0.04, 0.08, 0.12]
    frame = nib.load(scans[2]["image"])
    assert frame.shape == (16, 16, 16)
    np.testing.assert_allclose(frame.affine, nib.load(cine).affine[:4, :4], atol=1e-6)
    np.testing.assert_allclose(frame.get_fdata(), nib.load(cine).get_fdata()[..., 2], atol=1e-5)
    assert os.path.isfile(os.path.join(out, "patient7_4d", "model.pt"))


def test_cine_frame_times_are_the_header_values_in_seconds(tmp_path):
    assert cine_frame_times(_cine(tmp_path / "a.nii.gz", frames=4, step_ms=33.3)) == [0.0, 0.0333, 0.0666, 0.0999]


def test_cine_without_frame_time_asks_for_times(tmp_path):
    cine = _cine(tmp_path / "c.nii.gz", step_ms=0.0)
    with pytest.raises(ValueError, match=r"gives no frame time .* --times T1 T2 \.\.\. \(4 values\)"):
        cine_frame_times(cine)


def test_report_html_is_self_contained_with_one_figure_per_section(tmp_path, capsys):
    datalist = make_demo_dataset(tmp_path / "data", n_subjects=1, size=16)
    out = str(tmp_path / "runs")
    cli.main(["fit", datalist, "--output_dir", out, *TINY])
    cli.main(["evaluate", datalist, "--output_dir", out, "--nomontage"])
    capsys.readouterr()
    cli.main(["report", "--output_dir", out, "--datalist", datalist])
    assert "report:" in capsys.readouterr().out
    page = open(os.path.join(out, "sub-001", "report.html"), encoding="utf-8").read()
    payloads = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(payloads) == 4
    text = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', "", page)
    assert "http" not in text.lower() and "src=" not in text and "<link" not in text and "<script" not in text
    assert all(b"http" not in base64.b64decode(p).lower() for p in payloads)  # no URL in the PNG metadata either
    sections = re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, flags=re.S)
    assert [title for title, _ in sections] == list(SECTIONS)
    for title, body in sections[:4]:
        assert body.count("<img ") == 1, title
    assert sections[4][1].count("<img ") == 0 and "linear interpolation" in sections[4][1]
    assert "nearest observed scan" in sections[4][1] and "<td class=\"l\">extrapolation</td>" in sections[4][1]
    index = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert 'href="sub-001/report.html"' in index and "http" not in index.lower()


def test_list_flags_are_grouped_for_fire():
    assert cli.group_list_flags(["fit", "a", "b", "--times", "0", "-1.5", "3", "--epochs", "2"]) == [
        "fit", "a", "b", "--times", "[0, -1.5, 3]", "--epochs", "2"]
    assert cli.group_list_flags(["predict", "--times", "[1, 2]"]) == ["predict", "--times", "[1, 2]"]
    assert cli.group_list_flags(["fit", "--participant_label", "01", "sub-02", "--bids", "r"]) == [
        "fit", "--participant_label", "['01', '02']", "--bids", "r"]


def test_free_cores_counts_busy_cores(monkeypatch):
    import noder_monai.utils as utils

    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    for busy, expected in ((0.0, 2), (0.2, 2), (0.5, 1), (1.0, 1), (2.0, 1), (3.5, 1)):
        monkeypatch.setattr(utils, "_busy_cpus", lambda interval, b=busy: b)
        assert free_cores() == expected, busy
