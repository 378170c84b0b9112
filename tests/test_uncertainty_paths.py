"""Uncertainty everywhere users look: `noder predict --uncertainty`, the bundle's "uncertainty" key, ODEWarpd's
standard deviation keys, label_volumes.csv's Jacobian volumes and bands, and the HTML report."""

import csv
import functools
import json
import os
import re
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from noder_monai import cli
from noder_monai.data import SubjectEntry, datalist_subjects, make_demo_dataset
from noder_monai.engines import FitConfig, fit_ensemble, fit_sequence
from noder_monai.io import GEOMETRY_META_KEY, voxel_volume_mm3
from noder_monai.model import FittedSubject
from noder_monai.reporting.html import SECTIONS, subject_report
from noder_monai.reporting.tables import label_volumes
from noder_monai.transforms import ODEWarpd
from noder_monai.utils import time_tag
from noder_monai.workflows import CohortWorkflow, markers
from noder_monai.workflows import subject as per_subject

sys.path.insert(0, os.path.dirname(__file__))
from test_io_geometry import assert_same_geometry  # noqa: E402

INFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs",
                         "inference.json")
TINY_FIT = FitConfig(epochs=6, levels=(2, 1), level_fractions=(0.5, 0.5), ncc_kernel_size=5)
TINY_ENSEMBLE = {"members": 2, "epochs": 2}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One demo subject (16^3, 7 observed scans, a label map) fitted once: its file without an ensemble, and the
    subject with a 2-member ensemble."""
    root = tmp_path_factory.mktemp("uncertainty")
    datalist = make_demo_dataset(root / "data", n_subjects=1, size=16)
    entry = datalist_subjects(datalist)[0]
    torch.manual_seed(0)
    subject = fit_sequence(entry.load(), TINY_FIT, progress=False)
    plain = subject.save(root / "plain.pt")
    fit_ensemble(subject, **TINY_ENSEMBLE)
    return {"root": root, "datalist": datalist, "entry": entry, "plain": str(plain), "subject": subject}


@pytest.fixture
def small_ensembles(monkeypatch):
    """The paths that fit a missing ensemble fit a 2-member, 2-epoch one (the defaults cost a minute)."""
    monkeypatch.setattr(per_subject, "fit_ensemble", functools.partial(fit_ensemble, **TINY_ENSEMBLE))


def _copy_model(fitted, output_dir):
    model = output_dir / "sub-001" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copy(fitted["plain"], model)
    return model


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_header_forms(path, reference):
    """nibabel's affine, qform and sform (with codes) and ITK's origin, spacing and direction equal the input's."""
    assert_same_geometry(path, reference)
    written, source = nib.load(str(path)).header, nib.load(str(reference)).header
    for form in ("get_qform", "get_sform"):
        got, got_code = getattr(written, form)(coded=True)
        want, want_code = getattr(source, form)(coded=True)
        assert int(got_code) == int(want_code), (path, form)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cli_predict_uncertainty_fits_stores_and_writes_maps_in_the_input_geometry(fitted, tmp_path, small_ensembles):
    out = tmp_path / "runs"
    model = _copy_model(fitted, out)
    # a training done-marker that lists the model: adding the ensemble keeps the stage done
    digests = ("config", "inputs")
    markers.write_marker(str(model.parent), "training", "sub-001", digests, {}, [str(model)], {})
    cli.main(["predict", fitted["datalist"], "--output_dir", str(out), "--uncertainty", "--threads", "1"])
    stored = FittedSubject.load(model)
    assert stored.ensemble is not None and len(stored.ensemble.states) == 2
    assert markers.stale_reasons(markers.read_marker(str(model.parent), "training"), *digests) == []
    folder = out / "sub-001" / "predictions"
    record = json.loads((folder / "predictions.json").read_text())
    times = fitted["entry"].predict_times  # the datalist's query times
    assert record["image_std"] == [str(folder / f"image_std_{time_tag(t)}.nii.gz") for t in times]
    assert record["log_jacobian_std"] == [str(folder / f"log_jacobian_std_{time_tag(t)}.nii.gz") for t in times]
    assert record["uncertainty"].startswith("uncertainty: 2 members")
    expected = stored.predict(times, uncertainty=True)
    scan = fitted["entry"].scans[0][0]
    for index, path in enumerate(record["image_std"]):
        assert_same_header_forms(path, scan)
        assert_same_header_forms(record["log_jacobian_std"][index], scan)
        values = nib.load(path).get_fdata()
        assert values.shape == (16, 16, 16) and np.isfinite(values).all() and values.min() >= 0
        np.testing.assert_allclose(values, expected.image_std[index, 0].numpy(), rtol=1e-4, atol=1e-4)
    rows = _rows(folder / "label_volumes.csv")
    assert list(rows[0]) == ["time", "label", "voxels", "volume_mm3", "lower_mm3", "upper_mm3"]
    assert sorted((float(r["time"]), int(r["label"])) for r in rows) == [(t, k) for t in times for k in (1, 2, 3)]
    for row in rows:
        assert float(row["lower_mm3"]) <= float(row["volume_mm3"]) <= float(row["upper_mm3"])
        assert int(row["voxels"]) > 0
    cli.main(["predict", fitted["datalist"], "--output_dir", str(out), "--threads", "1"])  # without: no stale maps
    assert not list(folder.glob("image_std_*")) and not list(folder.glob("log_jacobian_std_*"))
    assert list(_rows(folder / "label_volumes.csv")[0]) == ["time", "label", "voxels", "volume_mm3"]


def test_label_volumes_integrate_the_jacobian_over_the_baseline_label(fitted):
    subject, entry = fitted["subject"], fitted["entry"]
    labels = subject.read_labels(entry.label)[0]
    carried = subject.predict([0.0, 3.0, 6.0], labels=labels).labels
    rows = label_volumes(subject, labels, [0.0, 3.0, 6.0], carried)
    assert list(rows[0]) == ["time", "label", "voxels", "volume_mm3"] and len(rows) == 3 * 3
    voxel_mm3 = voxel_volume_mm3(subject.affine)
    for row in rows:
        if row["time"] == 0.0:  # the identity at the first scan: det J = 1, the label's own voxels
            count = int((labels == row["label"]).sum())
            assert row["voxels"] == count and row["volume_mm3"] == pytest.approx(count * voxel_mm3, rel=1e-6)
        assert row["volume_mm3"] == pytest.approx(row["voxels"] * voxel_mm3, rel=0.15)  # near the carried count


def test_bundle_uncertainty_key_fits_stores_and_writes_maps_and_bands(fitted, tmp_path, small_ensembles):
    out = tmp_path / "bundle_out"
    model = _copy_model(fitted, out)
    workflow = CohortWorkflow(config_file=INFERENCE, logging_file=False, datalist=fitted["datalist"],
                              output_dir=str(out), num_threads=1, uncertainty=True)
    workflow.initialize()
    record = workflow.run()["sub-001"]
    workflow.finalize()
    assert record["status"] == "done", record
    stored = FittedSubject.load(model)
    assert stored.ensemble is not None and len(stored.ensemble.states) == 2
    times = fitted["entry"].predict_times
    folder = out / "sub-001" / "predictions"
    expected = stored.predict(times, uncertainty=True)  # the subject's default source, as inference.json's
    for index, time in enumerate(times):
        for kind, values in (("image_std", expected.image_std), ("log_jacobian_std", expected.log_jacobian_std)):
            path = folder / f"{kind}_{time_tag(time)}.nii.gz"
            np.testing.assert_allclose(nib.load(str(path)).get_fdata(), values[index, 0].numpy(), rtol=1e-4, atol=1e-4)
    assert_same_geometry(folder / f"image_std_{time_tag(times[-1])}.nii.gz", fitted["entry"].scans[0][0])
    rows = _rows(folder / "label_volumes.csv")
    assert list(rows[0]) == ["time", "label", "voxels", "volume_mm3", "lower_mm3", "upper_mm3"]
    assert len(rows) == 3 * len(times)
    assert all(float(r["lower_mm3"]) <= float(r["volume_mm3"]) <= float(r["upper_mm3"]) for r in rows)


def test_odewarpd_stores_the_standard_deviation_maps(fitted):
    subject = fitted["subject"]
    baseline = MetaTensor(subject.intensity.inverse(subject.baseline[0]), affine=subject.affine.clone())
    warp = ODEWarpd("image", subject=subject, source="default", image_std_key="image_std",
                    log_jacobian_std_key="log_jacobian_std")
    out = warp({"image": baseline, "time": 8.0})
    expected = subject.predict([8.0], uncertainty=True)
    for key, values in (("image_std", expected.image_std), ("log_jacobian_std", expected.log_jacobian_std)):
        value = out[key]
        assert isinstance(value, MetaTensor) and value.shape == (1, 16, 16, 16)
        assert bool(torch.isfinite(value).all()) and float(value.min()) >= 0
        torch.testing.assert_close(value.as_tensor(), values[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(value.affine.to(torch.float64), subject.affine)
        assert value.meta["time"] == 8.0 and GEOMETRY_META_KEY in value.meta


def test_odewarpd_std_keys_name_the_subject_without_an_ensemble_and_refuse_other_grids(fitted):
    plain = FittedSubject.load(fitted["plain"])
    item = {"image": MetaTensor(plain.baseline[0].clone(), affine=plain.affine.clone()), "time": 1.0}
    with pytest.raises(ValueError, match=r"^subject 'sub-001': model '.*plain\.pt' holds no uncertainty ensemble"):
        ODEWarpd("image", subject=plain, image_std_key="image_std")(item)
    assert "image_std" not in ODEWarpd("image", subject=plain, ddf_key="ddf")(item)  # without the keys: no maps
    shifted = fitted["subject"].affine.clone()
    shifted[0, 3] += 2.0
    other = {"image": MetaTensor(plain.baseline[0].clone(), affine=shifted), "time": 1.0}
    with pytest.raises(ValueError, match="standard deviation maps are on the fitted grid only"):
        ODEWarpd("image", subject=fitted["subject"], log_jacobian_std_key="log_jacobian_std")(other)


def test_report_draws_the_uncertainty_map_and_the_volume_bands(fitted, tmp_path):
    page_path, _ = subject_report(fitted["subject"], fitted["entry"], tmp_path / "with.html")
    page = open(page_path, encoding="utf-8").read()
    sections = dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, flags=re.S))
    assert list(sections) == list(SECTIONS)
    assert sections[SECTIONS[6]].count("<img ") == 1 and "image_std_t&lt;time&gt;.nii.gz" in sections[SECTIONS[6]]
    assert "90% band" in sections[SECTIONS[2]] and sections[SECTIONS[2]].count("<img ") == 1
    plain_path, _ = subject_report(FittedSubject.load(fitted["plain"]), fitted["entry"], tmp_path / "without.html")
    plain = dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", open(plain_path).read(), flags=re.S))
    assert "<img " not in plain[SECTIONS[6]] and "noder predict --uncertainty" in plain[SECTIONS[6]]
    assert "90% band" not in plain[SECTIONS[2]] and plain[SECTIONS[2]].count("<img ") == 1


def test_query_times_warn_when_the_subject_keeps_its_own(caplog):
    entry = SubjectEntry(id="sub-9", scans=[("a.nii.gz", 0.0), ("b.nii.gz", 1.0)], predict_times=[2.0, 3.0])
    with caplog.at_level("WARNING", logger="noder_monai.data.datalist"):
        assert entry.query_times([0.5, 8.0]) == [2.0, 3.0]
    assert "subject 'sub-9': predicted at its own predict_times [2.0, 3.0] from the datalist, not at the given times " \
           "[0.5, 8.0]" in caplog.text
    caplog.clear()
    assert entry.query_times([3.0, 2.0]) == [2.0, 3.0] and not caplog.text
