"""The CLI jobs: files written, affines kept, metrics in range, bad datalists named, helpers exact."""

import json
import os
import re
import shutil
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import torch

from noder_monai.data import datalist_subjects, make_demo_dataset
from noder_monai.model import FittedSubject
from noder_monai.io import voxel_volume_mm3
from noder_monai.model.uncertainty import jacobian_volumes
from noder_monai.utils import resolve_device, time_tag
from noder_monai.workflows import jobs
from noder_monai.workflows import subject as per_subject

TINY_FIT = {"epochs": 2, "levels": [2, 1], "level_fractions": [0.5, 0.5]}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflows")
    datalist = make_demo_dataset(root / "data", n_subjects=1, size=16)
    output_dir, eval_dir = root / "outputs", root / "eval"
    common = {"datalist": datalist, "output_dir": output_dir}
    training = jobs.train(fit=TINY_FIT, pretrained=None, progress=False, **common)
    inference = jobs.infer(predict_times=[9.0], **common)
    metrics = jobs.evaluate(eval_dir=eval_dir, **common)
    with open(datalist) as handle:
        document = json.load(handle)
    return {"root": root, "datalist": datalist, "document": document, "output_dir": output_dir, "eval_dir": eval_dir,
            "training": training, "inference": inference, "metrics": metrics}


def test_training_writes_model_loss_and_fitted_images(run):
    folder = run["output_dir"] / "sub-001"
    record = run["training"]["sub-001"]
    assert record["epochs"] == 2 and record["model"] == str(folder / "model.pt")
    subject = FittedSubject.load(folder / "model.pt")
    assert subject.subject == "sub-001" and len(subject.history) == 2
    lines = (folder / "loss.csv").read_text().splitlines()
    assert lines[0] == "epoch,level,total,similarity,smoothness,boundary" and len(lines) == 3
    assert json.loads((folder / "loss.json").read_text())[1]["level"] == 1
    scans = run["document"]["subjects"][0]["scans"]
    assert len(record["fitted"]) == len(scans) == 7
    source = nib.load(str(run["root"] / "data" / scans[0]["image"]))
    fitted = nib.load(str(folder / "fitted" / f"image_{time_tag(scans[0]['time'])}.nii.gz"))
    np.testing.assert_allclose(fitted.affine, source.affine, atol=1e-6)
    # the default source is the subject template: the fit at the first time is the template, in the scans' units
    assert subject.default_source == "auto" and subject.template is not None and subject.source_choice is not None
    expected = subject.predict([scans[0]["time"]]).images[0, 0].numpy()
    np.testing.assert_allclose(fitted.get_fdata(), expected, atol=1e-3 * np.ptp(source.get_fdata()))
    first = subject.predict([scans[0]["time"]], source="baseline").images[0, 0].numpy()
    np.testing.assert_allclose(first, source.get_fdata(), atol=1e-3 * np.ptp(source.get_fdata()))
    summary = json.loads((run["output_dir"] / "cohort_summary_training.json").read_text())
    assert summary["records"]["sub-001"]["epochs"] == 2 and summary["counts"]["done"] == 1


def test_inference_writes_every_output_in_input_space(run):
    folder = run["output_dir"] / "sub-001" / "predictions"
    record = run["inference"]["sub-001"]
    assert record["times"] == run["document"]["subjects"][0]["predict_times"] == [1.0, 2.1, 4.4, 7.0, 8.0]
    source_affine = nib.load(str(run["root"] / "data" / run["document"]["subjects"][0]["label"])).affine
    for kind, shape in (("image", (16, 16, 16)), ("ddf", (16, 16, 16, 1, 3)), ("jacobian", (16, 16, 16)),
                        ("label", (16, 16, 16))):
        written = nib.load(str(folder / f"{kind}_t7.0.nii.gz"))
        assert written.shape == shape
        np.testing.assert_allclose(written.affine, source_affine, atol=1e-6)
    assert nib.load(str(folder / "label_t7.0.nii.gz")).get_data_dtype() == np.int32
    assert json.loads((folder / "predictions.json").read_text())["ddfs"][0].endswith("ddf_t1.0.nii.gz")
    volumes = (folder / "label_volumes.csv").read_text().splitlines()
    assert volumes[0] == "time,label,voxels,volume_mm3" and len(volumes) == 1 + 5 * 3


def test_global_predict_times_apply_to_subjects_without_their_own(run, tmp_path):
    document = json.loads(json.dumps(run["document"]))
    del document["subjects"][0]["predict_times"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    (tmp_path / "out" / "sub-001").mkdir(parents=True)
    shutil.copy(run["output_dir"] / "sub-001" / "model.pt", tmp_path / "out" / "sub-001" / "model.pt")
    data = run["root"] / "data"
    assert jobs.infer(datalist, data, tmp_path / "out", predict_times=[9.0, -1.0])["sub-001"]["times"] == [-1.0, 9.0]
    observed_and_heldout = [0.0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0, 7.0]
    assert jobs.infer(datalist, data, tmp_path / "out")["sub-001"]["times"] == observed_and_heldout


def test_evaluation_metrics_in_range_and_report_files(run):
    metrics = run["metrics"]
    rows = metrics["subjects"]["sub-001"]["scans"]
    assert [row["time"] for row in rows] == [2.1, 4.4, 7.0]
    assert [row["split"] for row in rows] == ["interpolation", "interpolation", "extrapolation"]
    for row in rows:
        assert 0.0 <= row["nrmse"] < 1.0 and -1.0 <= row["ssim"] <= 1.0 and 0.0 < row["psnr"] < 100.0
        assert 0.0 <= row["percent_folded"] <= 100.0
    assert metrics["overall"]["count"] == 3 and metrics["splits"]["interpolation"]["count"] == 2
    assert metrics["overall"]["nrmse"] == pytest.approx(np.mean([row["nrmse"] for row in rows]))
    assert json.loads((run["eval_dir"] / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    table = (run["eval_dir"] / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| subject | time | split | NRMSE") and table[2 + 3 + 2 + 1] == ""
    choice = metrics["subjects"]["sub-001"]["appearance"]
    assert table[-3:-1] == ["| subject | chosen | validation NRMSE | linear interpolation | nearest scan | |",
                            "|---|---|---|---|---|---|"]
    assert table[-1].startswith(f"| sub-001 | {choice['source']} | {choice['errors'][choice['source']]:.4f} | ")
    png = (run["eval_dir"] / "sub-001_montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_time_tag_is_exact_and_file_safe():
    assert [time_tag(t) for t in (2.1, 7, -0.5, 1e-05)] == ["t2.1", "t7.0", "t-0.5", "t1e-05"]
    assert time_tag(torch.tensor(2.1, dtype=torch.float32)) == "t2.1"  # a time that went through float32 metadata


def test_skip_existing_keeps_fitted_subjects(run):
    model = run["output_dir"] / "sub-001" / "model.pt"
    before = model.stat().st_mtime_ns
    summary = jobs.train(run["datalist"], output_dir=run["output_dir"], fit=TINY_FIT, pretrained=None,
                              skip_existing=True, progress=False)
    assert summary["sub-001"]["status"] == "skipped" and summary["sub-001"]["epochs"] == 2
    assert model.stat().st_mtime_ns == before


def write_datalist(tmp_path, subject):
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), np.eye(4)),
                 str(tmp_path / name))
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"subjects": [subject]}))
    return path


@pytest.mark.parametrize(
    "subject, error, message",
    [
        ({"id": "bad"}, ValueError, "subject 'bad': field 'scans' is missing"),
        ({"id": "bad", "scans": [{"image": "a.nii.gz", "time": 0}, {"image": "nope.nii.gz", "time": 1}]},
         FileNotFoundError, r"subject 'bad': field 'scans'\[1\].image: file not found"),
        ({"id": "bad", "scans": [{"image": "a.nii.gz", "time": 0}]}, ValueError,
         "subject 'bad': field 'scans' needs at least 2 scans, got 1"),
        ({"id": "bad", "scans": [{"image": "a.nii.gz", "time": 0}, {"image": "b.nii.gz", "time": "soon"}]},
         ValueError, r"subject 'bad': field 'scans'\[1\].time must be a finite number, got 'soon'"),
        ({"id": "../bad", "scans": [{"image": "a.nii.gz", "time": 0}, {"image": "b.nii.gz", "time": 1}]},
         ValueError, r"subject '../bad': field 'id' is used as a folder name"),
    ],
)
def test_bad_datalist_fails_before_fitting_naming_subject_and_field(tmp_path, subject, error, message):
    datalist = write_datalist(tmp_path, subject)
    with pytest.raises(error, match=message):
        jobs.train(datalist, output_dir=tmp_path / "out", fit=TINY_FIT, pretrained=None, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_model_heldout_and_settings_errors(run, tmp_path):
    # a subject without a model is a failed subject of the cohort, recorded with its error
    record = jobs.infer(run["datalist"], output_dir=tmp_path / "empty")["sub-001"]
    assert record["status"] == "failed" and os.path.isfile(record["traceback"])
    assert re.search("FileNotFoundError: subject 'sub-001': fitted model .* not found; run training", record["error"])
    document = json.loads(json.dumps(run["document"]))
    del document["subjects"][0]["heldout"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="no subject of the datalist has a 'heldout' field"):
        jobs.evaluate(datalist, run["root"] / "data", run["output_dir"], tmp_path / "eval")
    with pytest.raises(ValueError, match=r"fit has unknown setting\(s\) \['epoch'\]"):
        jobs.train(run["datalist"], output_dir=tmp_path / "out", fit={"epoch": 3})
    with pytest.raises(FileNotFoundError, match="pretrained autoencoder file 'none.pt' not found"):
        jobs.train(run["datalist"], output_dir=tmp_path / "out", pretrained="none.pt")
    with pytest.raises(ValueError, match="give datalist .* or dataset_dir"):
        datalist_subjects()


def test_datalist_rules_and_demo_default(tmp_path):
    subjects = datalist_subjects(demo_dir=tmp_path / "demo", demo={"n_subjects": 1, "size": 8})
    assert [entry.id for entry in subjects] == ["sub-001"] and len(subjects[0].scans) >= 2
    assert [entry.id for entry in datalist_subjects(None, tmp_path / "demo")] == ["sub-001"]
    assert datalist_subjects(tmp_path / "demo" / "datalist.json")[0].scans == subjects[0].scans


def test_settings_helpers():
    assert jobs.split_settings(epochs=5, latent_channels=8) == ({"epochs": 5}, {"latent_channels": 8})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch'\]"):
        jobs.split_settings(epoch=5)
    assert resolve_device("cpu") == torch.device("cpu")


def test_tensorboard_scalars_per_subject(run, tmp_path, monkeypatch):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    jobs.train(run["datalist"], output_dir=tmp_path, fit=TINY_FIT, pretrained=None, tensorboard=True,
                    progress=False)
    assert written[0] == ("dir", str(tmp_path / "tensorboard" / "sub-001"))
    assert ("loss/total", 1) in written and ("loss/boundary", 0) in written and written[-1] == ("closed",)


def test_tensorboard_required_but_missing_names_the_package(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        jobs.train(run["datalist"], output_dir=tmp_path, fit=TINY_FIT, pretrained=None, tensorboard=True)


# ---- input checks wired into the jobs ---------------------------------------------------------------------------

sys.path.insert(0, os.path.dirname(__file__))
from test_io_geometry import assert_same_geometry  # noqa: E402
from test_inputs import write_disagreeing_subject  # noqa: E402

QS_FIT = {"epochs": 2, "ncc_kernel_size": 9}


@pytest.fixture(scope="module")
def qs_run(tmp_path_factory):
    """A subject whose scans' qform (code 1) and sform (code 2) disagree, with a label map and a held-out scan,
    through jobs.train and jobs.infer (umask 022)."""
    root = tmp_path_factory.mktemp("qs")
    paths, label = write_disagreeing_subject(root, count=4)
    document = {"subjects": [{"id": "qs", "scans": [{"image": paths[i], "time": t} for i, t in ((0, 0.0), (1, 1.0), (3, 3.0))],
                              "label": label, "heldout": [{"image": paths[2], "time": 2.0}]}]}
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps(document))
    old = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match="disagree"):
            training = jobs.train(datalist, output_dir=root / "out", fit=QS_FIT, pretrained=None, progress=False)
            inference = jobs.infer(datalist, output_dir=root / "out", predict_times=[1.5])
    finally:
        os.umask(old)
    return {"root": root, "paths": paths, "label": label, "document": document, "datalist": datalist,
            "out": root / "out", "training": training, "inference": inference}


def test_outputs_keep_disagreeing_qform_sform_through_train_and_infer(qs_run):
    record = qs_run["inference"]["qs"]
    template = str(qs_run["out"] / "qs" / "template.nii.gz")
    outputs = [*qs_run["training"]["qs"]["fitted"], *record["images"], *record["ddfs"], *record["ddfs_itk"],
               *record["jacobians"], *record["labels"], template]
    assert len(outputs) == 3 + 5 + 1
    for path in outputs:
        header = nib.load(path).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2), path
        np.testing.assert_allclose(nib.load(path).header.get_qform(), nib.load(qs_run["paths"][0]).header.get_qform())
        assert_same_geometry(path, qs_run["paths"][0])  # nibabel (sform) and ITK (qform) read the input's grid
        assert oct(os.stat(path).st_mode & 0o777) == "0o644", path


def test_infer_writes_the_itk_field_beside_the_voxel_field(qs_run):
    folder = qs_run["out"] / "qs" / "predictions"
    record = qs_run["inference"]["qs"]
    assert record["ddfs_itk"] == [str(folder / "ddf_itk_t1.5.nii.gz")]
    assert json.loads((folder / "predictions.json").read_text())["ddfs_itk"] == record["ddfs_itk"]
    itk_field, voxel = nib.load(record["ddfs_itk"][0]), nib.load(record["ddfs"][0])
    assert itk_field.shape == voxel.shape == (16, 16, 16, 1, 3)
    assert itk_field.header.get_intent()[0] == "vector"
    # 2 mm voxels, RAS -> LPS: x and y flip sign and double, z doubles
    np.testing.assert_allclose(itk_field.get_fdata(), voxel.get_fdata() * np.array([-2.0, -2.0, 2.0]), atol=1e-5)


def test_label_volumes_use_the_voxel_volume(qs_run):
    rows = (qs_run["out"] / "qs" / "predictions" / "label_volumes.csv").read_text().splitlines()
    assert rows[0] == "time,label,voxels,volume_mm3" and len(rows) == 2
    time, label, voxels, volume = rows[1].split(",")
    # the Jacobian-integrated volume of a barely deformed label is near its carried voxel count times 2^3 mm^3
    assert (float(time), int(label)) == (1.5, 3) and float(volume) == pytest.approx(8.0 * int(voxels), rel=0.1)


def test_label_volumes_count_the_slice_thickness_of_a_stored_2d_image():
    affine = np.diag([0.9, 1.1, 3.0, 1.0])  # a (20, 18) slice stored (20, 18, 1), 3 mm thick
    labels = torch.zeros(20, 18, dtype=torch.int64)
    labels[:5, :4] = 2
    volumes = jacobian_volumes(torch.zeros(1, 2, 20, 18), labels, [2], voxel_volume_mm3(torch.as_tensor(affine)))
    assert volumes.tolist() == [pytest.approx(20 * 0.9 * 1.1 * 3.0)]


def test_file_or_unwritable_output_dir_fails_before_any_fit(qs_run, tmp_path, monkeypatch):
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before checking output_dir")

    monkeypatch.setattr(per_subject, "fit_sequence", no_fit)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"^output_dir '{afile}' exists and is not a folder.$"):
        jobs.train(qs_run["datalist"], output_dir=afile, fit=QS_FIT, pretrained=None, progress=False)
    with pytest.raises(ValueError, match=f"^output_dir '{afile}' exists and is not a folder.$"):
        jobs.infer(qs_run["datalist"], output_dir=afile)
    with pytest.raises(ValueError, match=f"^output_dir '{afile}' exists and is not a folder.$"):
        jobs.evaluate(qs_run["datalist"], output_dir=qs_run["out"], eval_dir=afile)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(ValueError, match=f"^output_dir '{locked}' is not writable"):
                jobs.train(qs_run["datalist"], output_dir=locked, fit=QS_FIT, pretrained=None, progress=False)
        finally:
            locked.chmod(0o755)


def test_jobs_remove_temporaries_a_killed_run_left(qs_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(qs_run["out"] / "qs", out / "qs", ignore=shutil.ignore_patterns("tensorboard"))
    left = out / "qs" / "predictions" / ".tmp-0123456789abcdef0123456789abcdef-image_t1.5.nii.gz"
    mine = out / "qs" / "notes.tmp"
    for path in (left, mine):
        path.write_bytes(b"")
    os.utime(left, (0, 0))
    jobs.infer(qs_run["datalist"], output_dir=out, predict_times=[1.5])
    assert not left.exists() and mine.exists()


def _copy_model(qs_run, tmp_path, **changes):
    document = json.loads(json.dumps(qs_run["document"]))
    document["subjects"][0].update(changes)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    (tmp_path / "out" / "qs").mkdir(parents=True)
    model = tmp_path / "out" / "qs" / "model.pt"
    shutil.copy(qs_run["out"] / "qs" / "model.pt", model)
    return datalist, model


def _failed(summary_dir, stage, message):
    """The subject 'qs' is recorded as failed by the cohort run of ``stage``, its error matching ``message``."""
    summary = json.loads((summary_dir / f"cohort_summary_{stage}.json").read_text())
    (failure,) = summary["failed"]
    assert failure["id"] == "qs" and os.path.isfile(failure["traceback"])
    assert re.search(message, failure["error"].split(": ", 1)[1]), failure["error"]


def test_stale_model_is_refused_by_infer_and_evaluate_and_refitted_by_skip_existing(qs_run, tmp_path):
    scans = [dict(scan) for scan in qs_run["document"]["subjects"][0]["scans"]]
    scans[2]["time"] = 4.0
    datalist, model = _copy_model(qs_run, tmp_path, scans=scans)
    message = (f"subject 'qs': model '{model}' is stale: times changed from [0.0, 1.0, 3.0] to [0.0, 1.0, 4.0]. "
               "Fit the subject again")
    assert jobs.infer(datalist, output_dir=tmp_path / "out")["qs"]["status"] == "failed"
    _failed(tmp_path / "out", "inference", "^" + re.escape(message))
    assert jobs.evaluate(datalist, output_dir=tmp_path / "out", eval_dir=tmp_path / "eval", montage=False)["failed"]
    _failed(tmp_path / "eval", "evaluation", r"model '.*model\.pt' is stale: times changed")
    before = model.stat().st_mtime_ns
    summary = jobs.train(datalist, output_dir=tmp_path / "out", fit=QS_FIT, pretrained=None, skip_existing=True,
                         progress=False)
    assert list(summary) == ["qs"] and model.stat().st_mtime_ns != before
    assert FittedSubject.load(model).times.tolist() == [0.0, 1.0, 4.0]
    # now current: kept
    refitted = model.stat().st_mtime_ns
    kept = jobs.train(datalist, output_dir=tmp_path / "out", fit=QS_FIT, pretrained=None, skip_existing=True,
                      progress=False)
    assert kept["qs"]["status"] == "skipped" and model.stat().st_mtime_ns == refitted


def test_changed_scan_file_makes_the_model_stale(qs_run, tmp_path):
    copies = [str(shutil.copy(path, tmp_path / os.path.basename(path))) for path in qs_run["paths"]]
    scans = [{"image": copies[i], "time": t} for i, t in ((0, 0.0), (1, 1.0), (3, 3.0))]
    datalist, model = _copy_model(qs_run, tmp_path, scans=scans)
    assert jobs.infer(datalist, output_dir=tmp_path / "out")["qs"]["status"] == "failed"
    _failed(tmp_path / "out", "inference", r"is stale: scan files changed from \[")


@pytest.mark.parametrize("kind, message", [
    ("channels", r"label map '{}' has 2 channels \(shape \(16, 16, 16\) per channel\)"),  # the up-front check
    ("fraction", r"label map '{}' has non-integer values \(.*0\.5.* at voxel \(0, 0, 0\), 4096 voxel\(s\) in all\)"),
])
def test_bad_label_map_is_named_by_infer(qs_run, tmp_path, kind, message):
    data = np.zeros((16, 16, 16, 2), np.float32) if kind == "channels" else np.full((16, 16, 16), 0.5, np.float32)
    label = str(tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(data, nib.load(qs_run["label"]).affine), label)
    datalist, _ = _copy_model(qs_run, tmp_path, label=label)
    assert jobs.infer(datalist, output_dir=tmp_path / "out", predict_times=[1.5])["qs"]["status"] == "failed"
    _failed(tmp_path / "out", "inference", message.format(re.escape(label)))


def test_constant_heldout_scan_is_named_by_evaluate(qs_run, tmp_path):
    constant = str(tmp_path / "constant.nii.gz")
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 5.0, np.float32), nib.load(qs_run["paths"][0]).affine), constant)
    datalist, _ = _copy_model(qs_run, tmp_path, heldout=[{"image": constant, "time": 2.0}])
    assert jobs.evaluate(datalist, output_dir=tmp_path / "out", eval_dir=tmp_path / "eval", montage=False)["failed"]
    _failed(tmp_path / "eval", "evaluation", f"^target '{re.escape(constant)}' is constant \\(every voxel 5\\)")
