"""The ``noder`` command: help texts of every verb, and a tiny fit / predict / evaluate / pretrain run."""

import json
import os
import subprocess
import sys

import fire
import nibabel as nib
import numpy as np
import pytest

from noder_monai import cli
from noder_monai.data import make_demo_dataset


def help_text(capsys, *argv):
    with pytest.raises(fire.core.FireExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().err  # fire writes help to stderr


def test_top_level_help_lists_every_verb(capsys):
    text = help_text(capsys)
    for verb, summary in (("fit", "Fit a NODER trajectory"), ("predict", "Predict every fitted subject"),
                          ("evaluate", "Score every fitted subject"), ("demo", "Run everything on the synthetic demo"),
                          ("pretrain", "Pretrain the deformation autoencoder")):
        assert verb in text and summary in text
    assert set(cli.COMMANDS) == {"fit", "predict", "evaluate", "demo", "pretrain", "report"}


@pytest.mark.parametrize(
    "verb, phrases",
    [
        ("fit", ["DATALIST", "JSON datalist", "--output_dir", "--threads", "torch CPU threads", "epochs, learning_rate",
                 "--times", "--bids", "--participant_label", "--time_column", "4D cine", "pybids"]),
        ("predict", ["--times", "query times", "label_volumes.csv", "--uncertainty", "image_std_t<time>.nii.gz"]),
        ("evaluate", ["--eval_dir", "NRMSE, SSIM, PSNR", "montage"]),
        ("demo", ["--directory", "--subjects", "--full", "about a minute"]),
        ("report", ["OUTPUT_DIR", "--datalist", "self-contained", "Jacobian"]),
        ("pretrain", ["OUTPUT_DIR", "--fields", "PretrainConfig fields"]),
    ],
)
def test_each_verb_explains_its_arguments(capsys, verb, phrases):
    text = help_text(capsys, verb)
    for phrase in phrases:
        assert phrase in text, (verb, phrase)


def test_console_script_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "noder_monai.cli", "fit", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "noder fit <flags> [INPUTS]..." in result.stderr


def test_tiny_fit_predict_evaluate(tmp_path, capsys):
    datalist = make_demo_dataset(tmp_path / "data", n_subjects=1, size=16)
    out = str(tmp_path / "runs")
    cli.main(["fit", datalist, "--output_dir", out, "--epochs", "2", "--levels", "[2,1]", "--level_fractions",
              "[0.5,0.5]", "--pretrained", "None", "--noprogress"])
    assert "sub-001: 2 epochs" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "sub-001", "model.pt"))
    cli.main(["predict", datalist, "--output_dir", out, "--times", "[0.5, 9.0]"])
    assert "sub-001: 5 time point(s)" in capsys.readouterr().out  # the demo datalist has its own predict_times
    written = nib.load(os.path.join(out, "sub-001", "predictions", "image_t8.0.nii.gz"))
    source = nib.load(os.path.join(tmp_path, "data", "sub-001", "label.nii.gz"))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    cli.main(["evaluate", datalist, "--output_dir", out, "--nomontage"])
    text = capsys.readouterr().out
    assert "| **overall** (n=3) |" in text
    metrics = json.load(open(os.path.join(out, "eval", "metrics.json")))
    assert 0.0 <= metrics["overall"]["nrmse"] < 1.0
    assert not os.path.exists(os.path.join(out, "eval", "sub-001_montage.png"))


def test_predict_without_inputs_or_a_written_datalist_says_what_to_pass(tmp_path):
    out = str(tmp_path / "runs")
    with pytest.raises(ValueError, match=r"no inputs given and no .*runs/datalist\.json .*pass the datalist or scans "
                                         r"you fitted"):
        cli.main(["predict", "--output_dir", out, "--times", "1.5"])
    assert not os.path.exists(out)  # nothing written before the check


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch'\]"):
        cli.main(["fit", str(tmp_path / "datalist.json"), "--epoch", "3"])


def test_tiny_pretrain_delegates_to_the_pretraining_engine(tmp_path, capsys):
    cli.main(["pretrain", str(tmp_path), "--epochs", "1", "--steps_per_epoch", "1", "--batch_size", "1",
              "--spatial_size", "8", "--validation_fields", "1", "--spatial_dims", "2", "--noprogress", "--device", "cpu"])
    assert "autoencoder:" in capsys.readouterr().out
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt")) == ["autoencoder.pt", "checkpoint.pt"]


@pytest.mark.parametrize("value, expected", [("[1.0 2.0]", [1.0, 2.0]), ("2.5", [2.5]), ("[0.5, 9.0]", [0.5, 9.0])])
def test_predict_times_go_through_parse_times(tmp_path, monkeypatch, value, expected):
    from noder_monai import workflows

    seen = {}
    monkeypatch.setattr(workflows, "infer", lambda **kwargs: seen.update(kwargs) or {})
    cli.main(["predict", str(tmp_path / "datalist.json"), "--output_dir", str(tmp_path), "--times", value])
    assert seen["predict_times"] == expected


@pytest.mark.parametrize("value, message", [
    ("[abc]", "--times[0] is the string 'abc', not a number; expected a number or a list of numbers"),
    ("[1.0, nan]", "--times[1] is the string 'nan', not a number"),
    ("inf", "--times must be finite, got inf at index 0."),
])
def test_bad_predict_times_are_named_before_any_model_is_read(tmp_path, monkeypatch, value, message):
    from noder_monai import workflows

    monkeypatch.setattr(workflows, "infer", lambda **kwargs: pytest.fail("infer ran"))
    with pytest.raises(ValueError) as error:
        cli.main(["predict", str(tmp_path / "datalist.json"), "--output_dir", str(tmp_path), "--times", value])
    assert str(error.value).startswith(message)
