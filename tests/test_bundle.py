"""The MONAI bundle: the real runner (training, inference, evaluating) on tiny data, overrides, metadata schema."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import noder_monai
from noder_monai.data import make_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
CONFIGS = os.path.join(BUNDLE, "configs")
TINY = ["--fit#epochs", "2", "--fit#levels", "[2,1]", "--fit#level_fractions", "[0.5,0.5]", "--pretrained", "None"]


def monai_run(run_id, config_file, cwd, *overrides):
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, "--num_threads", "1",
               *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """training from the repository root, inference from bundle/, evaluating from elsewhere (absolute config)."""
    root = tmp_path_factory.mktemp("bundle")
    datalist = make_demo_dataset(root / "data", n_subjects=1, size=16)
    output_dir, eval_dir = str(root / "outputs"), str(root / "eval")
    data = ["--datalist", datalist, "--output_dir", output_dir]
    results = {
        "training": monai_run("training", "bundle/configs/train.json", REPO, *data, *TINY),
        "inference": monai_run("inference", "configs/inference.json", BUNDLE, *data),
        "evaluating": monai_run("evaluating", os.path.join(CONFIGS, "evaluate.json"), str(root), *data,
                                "--eval_dir", eval_dir),
    }
    return {"root": root, "datalist": datalist, "output_dir": output_dir, "eval_dir": eval_dir, **results}


@pytest.mark.parametrize("run_id", ["training", "inference", "evaluating"])
def test_runner_succeeds(runs, run_id):
    assert runs[run_id].returncode == 0, runs[run_id].stdout[-2000:] + runs[run_id].stderr[-4000:]


def test_training_files_and_overrides(runs):
    folder = os.path.join(runs["output_dir"], "sub-001")
    assert sorted(os.listdir(folder)) == ["fitted", "loss.csv", "loss.json", "model.pt", "predictions"]
    history = json.load(open(os.path.join(folder, "loss.json")))
    assert [record["level"] for record in history] == [2, 1]  # the --fit#... overrides reached the fit
    assert "sub-001: 2 epochs" in runs["training"].stdout


def test_inference_outputs_keep_the_input_affine(runs):
    document = json.load(open(runs["datalist"]))["subjects"][0]
    source = nib.load(os.path.join(os.path.dirname(runs["datalist"]), document["scans"][0]["image"]))
    folder = os.path.join(runs["output_dir"], "sub-001", "predictions")
    for time in document["predict_times"]:
        for kind in ("image", "ddf", "jacobian", "label"):
            written = nib.load(os.path.join(folder, f"{kind}_t{float(time)!r}.nii.gz"))
            np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
            assert written.shape[:3] == source.shape
    image = nib.load(os.path.join(folder, "image_t1.0.nii.gz")).get_fdata()
    assert np.isfinite(image).all() and 0.1 * source.get_fdata().max() < image.max() < 2 * source.get_fdata().max()


def test_evaluation_metrics_finite_and_in_range(runs):
    metrics = json.load(open(os.path.join(runs["eval_dir"], "metrics.json")))
    assert metrics["overall"]["count"] == 3
    for row in metrics["subjects"]["sub-001"]["scans"]:
        assert 0.0 <= row["nrmse"] < 1.0 and -1.0 <= row["ssim"] <= 1.0 and 0.0 < row["psnr"] < 100.0
        assert 0.0 <= row["percent_folded"] <= 100.0
    assert os.path.getsize(os.path.join(runs["eval_dir"], "sub-001_montage.png")) > 1000
    assert "| **overall** (n=3) |" in open(os.path.join(runs["eval_dir"], "metrics.md")).read()


def test_bad_datalist_fails_through_the_runner(tmp_path):
    make_demo_dataset(tmp_path, n_subjects=1, size=8)
    document = json.load(open(tmp_path / "datalist.json"))
    document["subjects"][0]["scans"] = document["subjects"][0]["scans"][:1]
    (tmp_path / "bad.json").write_text(json.dumps(document))
    result = monai_run("training", "bundle/configs/train.json", REPO, "--datalist", str(tmp_path / "bad.json"),
                       "--output_dir", str(tmp_path / "out"), *TINY)
    assert result.returncode != 0
    assert "subject 'sub-001': field 'scans' needs at least 2 scans, got 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_configs_parse_with_one_definition_of_each_setting(monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(REPO)
    common = json.load(open(os.path.join(CONFIGS, "common.json")))
    for name, run_id in (("train.json", "training"), ("inference.json", "inference"), ("evaluate.json", "evaluating")):
        config = json.load(open(os.path.join(CONFIGS, name)))
        assert run_id in config
        for key, value in config.items():  # every shared value is a reference to common.json, never a copy
            if key in common and key != "imports":
                assert value == f"$@common['{key}']" or value.get("base") == f"$@common['{key}']", (name, key)
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    parser.update({"fit#epochs": 7, "network#latent_channels": 8})
    assert parser.get_parsed_content("fit") == {**common["fit"], "epochs": 7}
    assert parser.get_parsed_content("network")["latent_channels"] == 8
    assert parser.get_parsed_content("output_dir") == os.path.join(BUNDLE, "outputs")
    assert not os.path.exists(os.path.join(CONFIGS, "multi_gpu_train.json"))


# Offline copy of what MONAI's bundle metadata schema (meta_schema_20240725.json, the one model-zoo bundles name in
# "schema") requires; `python -m monai.bundle verify_metadata` downloads that schema and needs jsonschema.
REQUIRED_STRINGS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                    "authors", "copyright")
OPTIONAL_STRINGS = ("data_source", "data_type", "image_classes", "label_classes", "pred_classes", "intended_use")
TENSOR_FIELDS = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str,
                 "value_range": list}


def schema_errors(meta):
    errors = [f"'{key}' must be a string" for key in REQUIRED_STRINGS if not isinstance(meta.get(key), str)]
    errors += [f"'{key}' must be a string" for key in OPTIONAL_STRINGS if key in meta and not isinstance(meta[key], str)]
    for key in ("required_packages_version", "changelog", "eval_metrics", "supported_apps"):
        if (key in meta or key == "required_packages_version") and not isinstance(meta.get(key), dict):
            errors.append(f"'{key}' must be an object")
    if "references" in meta and not all(isinstance(r, str) for r in meta["references"]):
        errors.append("'references' must be a list of strings")
    formats = {key: value for key, value in meta.items() if re.fullmatch(r"[_a-zA-Z0-9]+_data_format", key)}
    if "network_data_format" not in formats:
        errors.append("'network_data_format' is required")
    for name, io_format in formats.items():
        for part in ("inputs", "outputs"):
            for entry, tensor in io_format.get(part, {None: None}).items():
                if isinstance(tensor, (int, float, str, bool)):
                    continue
                for field, kind in TENSOR_FIELDS.items():
                    if not isinstance(tensor, dict) or not isinstance(tensor.get(field), kind):
                        errors.append(f"{name}.{part}.{entry}.{field} must be a {kind.__name__}")
                if isinstance(tensor, dict):
                    if not all(isinstance(s, (str, int)) for s in tensor.get("spatial_shape", [])):
                        errors.append(f"{name}.{part}.{entry}.spatial_shape must hold strings or integers")
                    if not all(isinstance(v, (int, float)) for v in tensor.get("value_range", [])):
                        errors.append(f"{name}.{part}.{entry}.value_range must hold numbers")
    return errors


def test_metadata_passes_the_schema_offline():
    meta = json.load(open(os.path.join(CONFIGS, "metadata.json")))
    assert schema_errors(meta) == []
    assert schema_errors({"version": 1, "network_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {}}})[:2] == [
        "'schema' must be a string", "'version' must be a string"]
    assert meta["schema"].endswith("meta_schema_20240725.json")
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]["noder-monai"] == noder_monai.__version__
    assert {"torchdiffeq", "nibabel", "itk", "fire"} <= set(meta["required_packages_version"])
    for key in ("monai_version", "pytorch_version", "numpy_version"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", meta[key]), key
    assert "NODER: Image Sequence Regression Based on Neural Ordinary Differential Equations" in meta["references"][0]
    assert set(meta["network_data_format"]["outputs"]) == {"image", "ddf", "jacobian", "label"}
