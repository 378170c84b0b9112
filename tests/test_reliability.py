"""Nothing lost, nothing mixed up, on any machine: one test per kind of failure (labels, names, bounded waits, the
command line, faults while writing, checkpoints, messages, a suite that holds everywhere), each on a case of its own.
Geometry through every reader is in ``test_io_geometry.py``, folds in ``test_fold_free.py``."""

import configparser
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, SaveImaged

from noder_monai import cli
from noder_monai.data import datalist_subjects, load_datalist, read_label_map
from noder_monai.data.inputs import inputs_datalist, safe_id, scans_datalist
from noder_monai.engines import TimeNameFormatter
from noder_monai.io import GeometryNiftiWriter, label_dtype, load_label_map, load_scan
from noder_monai.model import FittedSubject, load_fitted_subject
from noder_monai.model.checkpoint import MAX_PARAMETERS
from noder_monai.model.pretrained import load_autoencoder
from noder_monai.transforms import LoadLabelMapd, LoadSequenced, ODEWarpd
from noder_monai.utils import OutputWriteError, atomic_write, time_tag
from noder_monai.workflows import jobs, markers

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cohort_data import write_cohort  # noqa: E402

TINY = {"epochs": 2, "levels": [1], "level_fractions": [1.0]}
BIG_IDS = (3_000_000_001, 3_000_000_003)  # uint32 IDs above 2^31: float32 holds neither (its spacing there is 256)
AFFINE = np.diag([1.5, 1.5, 1.0, 1.0])


def save(array, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def big_label_map(edge=16):
    labels = np.zeros((edge, edge), dtype=np.uint32)
    labels[3:8, 3:12] = BIG_IDS[0]
    labels[9:14, 4:13] = BIG_IDS[1]
    return labels


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny 2D subject whose label map holds uint32 IDs above 2^31, fitted with the jobs (2 epochs)."""
    root = tmp_path_factory.mktemp("reliability")
    datalist = write_cohort(root / "data", 1)
    document = json.load(open(datalist))
    document["subjects"][0]["label"] = "sub-001/big_label.nii.gz"
    del document["subjects"][0]["predict_times"]  # the query times come from each test
    save(big_label_map(), root / "data" / "sub-001" / "big_label.nii.gz")
    with open(datalist, "w") as handle:
        json.dump(document, handle)
    out = root / "out"
    records = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    assert records["sub-001"]["status"] == "done"
    return {"root": root, "datalist": datalist, "out": out, "model": str(out / "sub-001" / "model.pt"),
            "label": str(root / "data" / "sub-001" / "big_label.nii.gz")}


# 1. Labels ----------------------------------------------------------------------------------------------------------

def test_labels_keep_exact_ids_above_2_to_the_24_on_every_path(fitted, tmp_path):
    ids = {0, *BIG_IDS}
    labels, _ = load_label_map(fitted["label"])
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == ids
    # the Python API, with int64 IDs that even float64 cannot hold (above 2^53)
    subject = FittedSubject.load(fitted["model"])
    classes = torch.as_tensor(np.searchsorted([0, *BIG_IDS], big_label_map()), dtype=torch.int64)  # 0, 1, 2
    huge = torch.tensor([0, 2**53 + 1, 2**53 + 3])[classes]
    carried = subject.predict([0.0, 2.5], labels=huge).labels
    assert carried.dtype == torch.int64 and set(carried.unique().tolist()) <= {0, 2**53 + 1, 2**53 + 3}
    assert {2**53 + 1, 2**53 + 3} <= set(carried[0].unique().tolist())
    # ODEWarpd with mode="nearest" on every integer dtype, and the bundle's writer
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        image = MetaTensor(torch.as_tensor(big_label_map() % 200, dtype=torch.int64).to(dtype)[None])
        warped = ODEWarpd("label", subject=subject, time=1.7, mode="nearest")({"label": image})["label"]
        assert warped.dtype == dtype and set(warped.unique().tolist()) <= set(image.unique().tolist())
    pipeline = Compose([
        LoadLabelMapd("label", subject=fitted["model"]),
        ODEWarpd("label", subject=fitted["model"], time="time", mode="nearest"),
        SaveImaged("label", output_dir=str(tmp_path), output_postfix="", separate_folder=False, resample=False,
                   output_dtype=None, writer=GeometryNiftiWriter, print_log=False,
                   output_name_formatter=TimeNameFormatter("label")),
    ])
    pipeline({"label": fitted["label"], "time": 0.5})
    written = nib.load(str(tmp_path / "label_t0.5.nii.gz"))
    assert written.get_data_dtype() == np.int64 and set(np.unique(np.asarray(written.dataobj)).tolist()) <= ids
    # the command line: files and label_volumes.csv name the exact IDs
    cli.main(["predict", fitted["datalist"], "--output_dir", str(fitted["out"]), "--times", "0", "1.25"])
    folder = fitted["out"] / "sub-001" / "predictions"
    for name in ("label_t0.0.nii.gz", "label_t1.25.nii.gz"):
        values = set(np.unique(np.asarray(nib.load(str(folder / name)).dataobj)).tolist())
        assert values <= ids and BIG_IDS[0] in values
    with open(folder / "label_volumes.csv") as handle:
        assert {int(line.split(",")[1]) for line in handle.read().splitlines()[1:]} <= set(BIG_IDS)
    assert label_dtype(torch.tensor([0, 2**31 - 1])) == np.int32 and label_dtype(torch.tensor([2**31])) == np.int64


@pytest.mark.parametrize("problem", ["fraction", "nan", "shifted_grid"])
def test_labels_bad_maps_are_refused_before_the_fit_on_every_path(tmp_path, problem, capsys):
    datalist = write_cohort(tmp_path / "data", 1, size=12)
    labels = big_label_map(12).astype(np.float32) % 7
    affine = AFFINE
    if problem == "fraction":
        labels[2, 5] = 3.25
    elif problem == "nan":
        labels[6, 1] = np.nan
    else:
        affine = AFFINE.copy()
        affine[1, 3] = 4.5  # the same size, 3 voxels away in world space
    label = save(labels, tmp_path / "data" / "sub-001" / "label.nii.gz", affine)
    expected = {"fraction": "non-integer values", "nan": "non-finite values", "shifted_grid": "not on the scans' grid"}
    entry = load_datalist(datalist)[0]
    with pytest.raises(ValueError, match=expected[problem]):  # the check every stage runs before any work
        entry.check_files()
    with pytest.raises(ValueError, match=expected[problem]):  # the bundle's training transform
        LoadSequenced("image")({"image": [p for p, _ in entry.scans], "time": list(entry.times), "subject": "s",
                                "label": label})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:  # the command line: the subject fails, nothing is fitted
        cli.main(["fit", datalist, "-o", str(out), "--pretrained", "None", "--noprogress", "--noreport",
                  *[item for key, value in TINY.items() for item in (f"--{key}", json.dumps(value))]])
    assert exit_info.value.code == 1 and expected[problem] in capsys.readouterr().out
    assert not (out / "sub-001" / "model.pt").exists() and markers.read_marker(str(out / "sub-001"), "training") is None


# 2. Names -----------------------------------------------------------------------------------------------------------

def test_names_subjects_and_times_never_share_a_file(fitted, tmp_path):
    first, second = safe_id("mri é"), safe_id("mri è")
    assert first != second and first.startswith("mri__") and safe_id("sub-07") == "sub-07"
    scans = [save(np.zeros((4, 4), np.float32), tmp_path / f"s{k}.nii.gz") for k in range(2)]
    assert scans_datalist(scans, [0, 1], "mri é")["generator"]["subject"] == "mri é"  # the name given is recorded
    document = {"subjects": [{"id": sid, "scans": [{"image": s, "time": k} for k, s in enumerate(scans)]}
                             for sid in ("Knee-A", "knee-a")]}
    path = tmp_path / "case.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"subjects 'Knee-A' and 'knee-a' differ only in letter case"):
        datalist_subjects(str(path))
    times = [2.00000003, 2.00000007, 2.9999999]
    assert len({time_tag(t) for t in times}) == 3 and time_tag(np.float32(3.3)) == "t3.3"
    records = jobs.infer(fitted["datalist"], output_dir=fitted["out"], predict_times=times, num_threads=1)
    record = json.load(open(fitted["out"] / "sub-001" / "predictions" / "predictions.json"))
    assert record["times"] == times and len(set(record["images"])) == 3 == len(records["sub-001"]["images"])
    header = nib.load(record["images"][1]).header
    assert header["descrip"].tobytes().rstrip(b"\0").decode() == f"noder-monai time={times[1]!r}"


# 3. Bounded waits ---------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bounded_waits_name_the_missing_rank_and_what_to_do(tmp_path):
    script = tmp_path / "lost_rank.py"
    script.write_text(textwrap.dedent("""
        import sys
        from noder_monai.workflows import gather
        try:
            if sys.argv[1] == "finish":
                gather.wait_for_ranks("training", wait_s=0.05)
            else:
                token = gather.run_token("inference", sys.argv[2], 2)
                gather.gather_shares(sys.argv[2], "inference", token, 2, wait_s=0.05)
        except gather.RankTimeoutError as error:
            print(error)
            sys.exit(7)
    """))
    for case in ("finish", "gather"):
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "NODER_RANK_TIMEOUT_S": "1.5", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = subprocess.run([sys.executable, str(script), case, str(tmp_path)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 7, result.stderr[-2000:]
        assert "rank(s) [1] sent no sign of life for 1.5 s" in result.stdout and "never started" in result.stdout
        assert "NODER_RANK_TIMEOUT_S" in result.stdout and "rerun the same command" in result.stdout
    from noder_monai.workflows.gather import rank_timeout_s
    with pytest.raises(ValueError, match=r"timeout_s must be a positive number of seconds, got -3"):
        rank_timeout_s(-3)


# 4. The command line ------------------------------------------------------------------------------------------------

def test_cli_short_flags_of_the_help_work_and_nothing_is_written_before_the_checks(tmp_path, monkeypatch, capsys):
    for verb in ("fit", "predict", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        text = capsys.readouterr().err
        for letter, name in cli.short_flags(cli.COMMANDS[verb]).items():
            assert f"-{letter}, --{name}" in text  # the help shows exactly these
    assert cli.expand_short_flags(["fit", "a.json", "-o", "runs", "-o=x", "--epochs", "-1"]) == [
        "fit", "a.json", "--output_dir", "runs", "--output_dir=x", "--epochs", "-1"]
    scans = [save(np.full((6, 6), k, np.float32), tmp_path / f"scan{k}.nii.gz") for k in range(2)]
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.console_main(["fit", *scans, "--times", "0", "1", "-o", str(blocked / "out")])
    assert exit_info.value.code == cli.ERROR_EXIT_CODE
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("noder fit: error:") and str(blocked) in message[0]
    with pytest.raises(SystemExit):
        cli.console_main(["fit", *scans, "--times", "0", "1", "-o", str(tmp_path / "new"), "--hidden_features", "0"])
    assert "hidden_features" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.console_main(["fit", *scans, "--times", "0", "1", "-o", str(tmp_path / "new"), "--pretrained", "missing.pt"])
    assert "pretrained autoencoder file 'missing.pt' not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before  # no datalist, no folder, no noder_outputs/


# 5. Faults while writing --------------------------------------------------------------------------------------------

def test_write_faults_name_the_path_and_a_half_written_subject_is_never_done(tmp_path, monkeypatch):
    target = tmp_path / "kept.json"
    target.write_text("old")
    replace = os.replace

    def full_disk(source, destination):
        if "fitted" in os.fspath(destination) or "cohort_failures" in os.fspath(destination) or \
                os.fspath(destination) == str(target):
            raise OSError(errno.ENOSPC, "No space left on device")
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputWriteError, match=rf"cannot write '{target}': No space left on device; the disk is full"):
        atomic_write(target, b"new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["kept.json"]  # no temporary left
    datalist = write_cohort(tmp_path / "data", 2, size=12)
    out = tmp_path / "out"
    records = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    for sid, record in records.items():  # the recorder could not write its traceback either: the cohort went on
        assert record["status"] == "failed" and "disk is full" in record["error"] and "fitted" in record["error"]
        assert record["traceback"] is None and "cohort_failures" in record["traceback_error"]
        assert not (out / sid / "model.pt").exists() and markers.read_marker(str(out / sid), "training") is None
    monkeypatch.setattr(os, "replace", replace)
    again = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    assert [record["status"] for record in again.values()] == ["done", "done"]


# 6. Checkpoints -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("hidden_features", 3_000_000_000, r"field 'network.hidden_features' must be an integer in \[1, 65536\]"),
    ("num_hidden_layers", 2.5, r"field 'network.num_hidden_layers' must be an integer"),
    ("bottleneck", 4, r"unknown NODER argument\(s\) \['network.bottleneck'\]"),
    ("latent_channels", 9, r"field 'state_dict' does not fit field 'network'.*has shape"),
])
def test_checkpoints_every_field_is_checked_before_anything_is_built(fitted, tmp_path, field, value, message):
    checkpoint = torch.load(fitted["model"], weights_only=True)
    checkpoint["network"][field] = value
    path = tmp_path / "crafted.pt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}'.*{message}"):
        load_fitted_subject(str(path))


def test_checkpoints_of_autoencoders_are_bounded_too(tmp_path):
    from noder_monai.model.checkpoint import AUTOENCODER_FORMAT

    config = {"spatial_dims": 2, "latent_channels": 4, "encoder_channels": [60000, 60000, 60000],
              "decoder_channels": [8, 8], "smoothing_kernel": 3}
    path = tmp_path / "autoencoder.pt"
    torch.save({"format": AUTOENCODER_FORMAT, "config": config, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=rf"'{path}'.*'config.encoder_channels' must be 3 integers in \[1, 1024\]"):
        load_autoencoder(path)
    config["encoder_channels"] = [1024, 1024, 1024]
    config["decoder_channels"] = [1024, 1024]
    torch.save({"format": AUTOENCODER_FORMAT, "config": config, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"field 'state_dict' does not fit field 'config'.*missing"):
        load_autoencoder(path)
    assert MAX_PARAMETERS < 2**31


# 7. Messages --------------------------------------------------------------------------------------------------------

def test_messages_name_the_real_cause(tmp_path, capsys):
    huge = np.ones((5, 6, 4))
    huge[2, 3, 1] = -7.5e41
    path = save(huge, tmp_path / "huge.nii.gz")
    with pytest.raises(ValueError, match=r"huge.nii.gz' \(float64\) has values up to 7.5e\+41, which overflow float32"):
        load_scan(path)
    series = tmp_path / "series7"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    other = save(np.zeros((4, 4), np.float32), tmp_path / "t1.nii.gz")
    for call in (lambda: scans_datalist([str(series), other], [0, 1]),
                 lambda: inputs_datalist([str(series)], tmp_path / "out")):
        with pytest.raises(ValueError, match=r"series7.*is a folder.*dcm2niix"):
            call()
    with pytest.raises(SystemExit):
        cli.console_main(["fit", str(series), other, "--times", "0", "1", "-o", str(tmp_path / "out")])
    assert "dcm2niix" in capsys.readouterr().err


# 9. A suite that holds everywhere -----------------------------------------------------------------------------------

def test_suite_holds_with_pydicom_and_reads_without_reader_warnings(tmp_path):
    extra = configparser.ConfigParser()
    extra.read(os.path.join(REPO, "setup.cfg"))
    test_extra = extra["options.extras_require"]["test"]
    for package in ("pydicom", "scikit-image", "scipy"):
        assert package in test_extra  # CI installs what users commonly have
    nifti = save(np.random.default_rng(0).random((6, 5, 4)).astype(np.float32), tmp_path / "scan.nii.gz")
    label = save(np.arange(120, dtype=np.int16).reshape(6, 5, 4), tmp_path / "label.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. MONAI's NvImgCodecPydicomReader warning when pydicom is installed
        for reader in (None, "itk", "nibabel"):
            data, geometry = load_scan(nifti, reader)
            labels, _ = read_label_map(label, data.shape[1:], geometry.affine, "label", reader)
            assert labels.dtype == torch.int64 and int(labels.max()) == 119
