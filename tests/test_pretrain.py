"""Pretraining: the shipped weights fit the default networks and reconstruct held-out fields as documented; a short
run lowers the loss, resumes exactly and writes a file that fit_sequence starts from; the bundle config runs."""

import subprocess
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from noder_monai.data import DeformationFieldGenerator, GeneratedDeformationFields, SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence, pretrain_autoencoder
from noder_monai.engines.pretrain import evaluate_autoencoder, mean_endpoint_error
from noder_monai.io import save_image
from noder_monai.model import default_autoencoder_path, load_autoencoder, load_autoencoder_weights
from noder_monai.networks import NODER, DeformationAutoencoder

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "bundle" / "docs" / "pretraining.md"
#: Upper bounds on the mean endpoint error (voxels) of the shipped weights on the first 8 held-out fields
#: (seed 0, stream 2), as stated in bundle/docs/pretraining.md.
DOCUMENTED_EPE_BOUND = {3: "0.30", 2: "0.15"}
TINY = {"spatial_size": 16, "steps_per_epoch": 4, "batch_size": 2, "validation_fields": 2, "progress": False}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shipped_weights_are_small_and_found_in_the_one_bundle_copy(spatial_dims):
    path = default_autoencoder_path(spatial_dims)
    assert path == REPO / "bundle" / "models" / ("model.pt" if spatial_dims == 3 else "model_2d.pt")
    assert path.stat().st_size < 1_000_000
    tracked = subprocess.run(["git", "ls-files", "*.pt"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if tracked:  # in a git checkout: the one copy of the weights is the bundle's
        assert [REPO / name for name in tracked if (REPO / name).read_bytes() == path.read_bytes()] == [path]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shipped_weights_load_strictly_into_the_default_networks(spatial_dims):
    path = default_autoencoder_path(spatial_dims)
    model = NODER((24,) * spatial_dims)
    load_autoencoder_weights(model, path)
    autoencoder = load_autoencoder(path)
    default = DeformationAutoencoder(spatial_dims)
    default.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    for name, value in autoencoder.state_dict().items():
        assert torch.equal(default.state_dict()[name], value)
        part, key = name.split(".", 1)
        assert torch.equal(getattr(model, part).state_dict()[key], value)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shipped_weights_reconstruct_held_out_fields_below_the_documented_error(spatial_dims):
    path = default_autoencoder_path(spatial_dims)
    training = torch.load(path, weights_only=True)["training"]["config"]
    size = (training["spatial_size"],) * spatial_dims
    fields = GeneratedDeformationFields(8, size, seed=training["seed"], stream=2, **training["generator"])
    scores = evaluate_autoencoder(load_autoencoder(path), fields)
    bound = DOCUMENTED_EPE_BOUND[spatial_dims]
    assert f"below {bound} voxels" in DOCS.read_text()
    assert scores["epe"] < float(bound)
    assert scores["epe"] < 0.5 * scores["magnitude"]


def test_mean_endpoint_error_is_the_mean_vector_distance():
    target = torch.zeros(2, 3, 4, 4, 4)
    prediction = target.clone()
    prediction[0, 0], prediction[0, 1] = 3.0, 4.0
    assert mean_endpoint_error(prediction, target).tolist() == [5.0, 0.0]


def test_a_short_run_lowers_the_loss_and_its_file_initialises_a_fit(tmp_path):
    # a 5-voxel smoothing kernel: the default 15-voxel one leaves almost nothing to learn on 16^3 fields
    settings = {**TINY, "steps_per_epoch": 8, "batch_size": 4, "smoothing_kernel": 5, "learning_rate": 5e-3}
    result = pretrain_autoencoder(tmp_path, epochs=2, **settings)
    validation = GeneratedDeformationFields(2, (16, 16, 16), seed=0, stream=1)
    torch.manual_seed(0)
    before = evaluate_autoencoder(DeformationAutoencoder(3, smoothing_kernel=5), validation)
    after = evaluate_autoencoder(load_autoencoder(result.autoencoder), validation)
    assert after["mse"] < 0.8 * before["mse"]
    assert after["mse"] == pytest.approx(result.history[-1]["validation_mse"], rel=1e-5)
    assert result.autoencoder.is_file() and result.checkpoint.is_file() and (tmp_path / "history.json").is_file()
    truth = synthetic_sequence(3, 16, times=(0.0, 2.0, 4.0), seed=1)
    sequence = SubjectSequence.from_tensors(truth.images, truth.times)
    config = FitConfig(epochs=2, levels=(1,), level_fractions=(1.0,))
    network = {"smoothing_kernel": 5}
    fitted = fit_sequence(sequence, config, network=network, pretrained=result.autoencoder, progress=False)
    saved = torch.load(result.autoencoder, weights_only=True)["state_dict"]
    for key, value in fitted.model.encoder.state_dict().items():
        assert torch.equal(value, saved[f"encoder.{key}"])
    assert len(fitted.history) == 2


def test_resuming_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    settings = {**TINY, "spatial_dims": 2, "epochs": 2}
    whole = pretrain_autoencoder(tmp_path / "whole", **settings)

    def interrupt(record):
        raise KeyboardInterrupt(f"stopped after epoch {record['epoch']}")

    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 0"):
        pretrain_autoencoder(tmp_path / "split", callback=interrupt, **settings)
    resumed = pretrain_autoencoder(tmp_path / "split", **settings)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    final = torch.load(resumed.checkpoint, weights_only=True)
    expected = torch.load(whole.checkpoint, weights_only=True)
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value)
    assert final["optimizer"]["state"][0]["step"] == expected["optimizer"]["state"][0]["step"] == 8
    with pytest.raises(ValueError, match=r"other settings \{'batch_size': \(2, 3\)\}"):
        pretrain_autoencoder(tmp_path / "split", **{**settings, "epochs": 3, "batch_size": 3})


def test_pretraining_on_user_files_holds_one_out(tmp_path):
    fields = DeformationFieldGenerator((20, 20)).generate(3)
    for index, field in enumerate(fields):
        save_image(field, torch.eye(4), tmp_path / "fields" / f"f{index}.nii.gz")
    result = pretrain_autoencoder(tmp_path / "out", fields=tmp_path / "fields", spatial_dims=2, epochs=1, **TINY)
    source = torch.load(result.checkpoint, weights_only=True)["training"]["source"]
    assert len(source["training"]) == 2 and len(source["validation"]) == 1
    assert 0 < result.best_validation_epe < 2.0
    with pytest.raises(ValueError, match="1 displacement-field file found; pretraining needs at least 2"):
        pretrain_autoencoder(tmp_path / "one", fields=[tmp_path / "fields" / "f0.nii.gz"], spatial_dims=2, **TINY)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        default_autoencoder_path(4)
    with pytest.raises(ValueError, match=r"unknown pretraining settings \['steps'\]"):
        pretrain_autoencoder("unused", steps=3)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        pretrain_autoencoder("unused", batch_size=0)


@pytest.mark.parametrize("folder", [".", "bundle"])
def test_bundle_config_finds_its_root_and_trains(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(REPO / folder)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "pretrain.json"))
    assert parser.get_parsed_content("bundle_root") == str(REPO / "bundle")
    parser.update({"output_dir": str(tmp_path), "spatial_dims": 2, "epochs": 1, "device": "cpu", **TINY})
    parser.get_parsed_content("training")
    written = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    assert written["config"]["spatial_dims"] == 2
    weights = written["state_dict"]  # also at the top level, where monai.bundle.load copies them by name
    assert weights and all(torch.equal(written[key], value) for key, value in weights.items())
