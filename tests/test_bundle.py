"""The MONAI bundle as MONAI users and the model-zoo CI run it: the design card's commands on a copy of the bundle,
each config alone, one wiring with the Python and CLI fits, cohorts, tracking, checks."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from noder_monai import cli
from noder_monai.data import load_datalist, make_demo_dataset
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.model import FittedSubject
from noder_monai.utils import time_tag
from noder_monai.workflows import bundle_root, jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
CONFIGS = os.path.join(BUNDLE, "configs")
SCHEMA = os.path.join(REPO, "tests", "data", "meta_schema_offline.json")
TINY = {"epochs": 2, "levels": [2, 1], "level_fractions": [0.5, 0.5], "pretrained": None, "num_threads": 1}
#: The fit the design card's command, fit_sequence and `noder fit` are compared on (shipped autoencoder weights).
SAME_FIT = {"epochs": 3, "levels": [2, 1], "level_fractions": [0.5, 0.5]}


def config(*names, folder=CONFIGS):
    return [os.path.join(folder, name) for name in names]


def runner(*args, cwd=REPO, timeout=300):
    command = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli_overrides(overrides):
    return [item for key, value in overrides.items() for item in (f"--{key}", "None" if value is None else json.dumps(value))]


def run_workflow(config_file, workflow_type, **overrides):
    workflow = ConfigWorkflow(config_file=config_file, workflow_type=workflow_type, logging_file=False, **overrides)
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return workflow, result


def copy_bundle(folder):
    """A copy of ``bundle/`` (configs, models, docs, licence) at ``<folder>/bundle``."""
    target = folder / "bundle"
    shutil.copytree(BUNDLE, target, ignore=shutil.ignore_patterns("outputs", "eval", "demo_data", "__pycache__"))
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    datalist = make_demo_dataset(root / "data", n_subjects=2, size=16)
    document = json.load(open(datalist))
    first = root / "first.json"  # sub-001 alone, absolute paths
    subject = dict(document["subjects"][0])
    for key in ("scans", "heldout"):
        subject[key] = [{**scan, "image": str(root / "data" / scan["image"])} for scan in subject[key]]
    subject["label"] = str(root / "data" / subject["label"])
    first.write_text(json.dumps({"subjects": [subject]}))
    return {"root": root, "datalist": datalist, "document": document, "first": str(first)}


@pytest.fixture(scope="module")
def design_card(data):
    """The design card's two commands, literally, from a folder holding a fresh copy of ``bundle/``."""
    work = data["root"] / "work"
    copy = copy_bundle(work)
    fit = cli_overrides({"datalist": data["first"], **SAME_FIT, "num_threads": 1})
    training = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                               "bundle/configs/train.json", *fit], cwd=work, capture_output=True, text=True,
                              timeout=300)
    assert training.returncode == 0, training.stderr[-4000:]
    inference = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                                "bundle/configs/inference.json", "--datalist", data["first"], "--num_threads", "1"],
                               cwd=work, capture_output=True, text=True, timeout=300)
    assert inference.returncode == 0, inference.stderr[-4000:]
    return {"copy": copy, **data}


def test_design_card_training_writes_the_fitted_subject_under_the_copys_root(design_card):
    model = design_card["copy"] / "outputs" / "sub-001" / "model.pt"
    subject = FittedSubject.load(model)
    assert len(subject.history) == SAME_FIT["epochs"] and subject.fit_config["epochs"] == SAME_FIT["epochs"]
    assert [record["level"] for record in subject.history] == [2, 1, 1]
    assert not os.path.exists(os.path.join(BUNDLE, "outputs", "sub-001", "model.pt"))  # the checkout is untouched


def test_design_card_inference_writes_one_file_per_query_time(design_card):
    folder = design_card["copy"] / "outputs" / "sub-001" / "predictions"
    times = design_card["document"]["subjects"][0]["predict_times"]
    expected = {f"{kind}_{time_tag(t)}.nii.gz" for t in times for kind in ("image", "ddf", "jacobian", "label")}
    assert set(os.listdir(folder)) == expected and len(expected) == 4 * len(times)


def test_bundle_python_and_cli_fit_the_same_weights(design_card, tmp_path):
    """One wiring: the design card's training, fit_sequence and `noder fit` give identical weights and history."""
    bundle = FittedSubject.load(design_card["copy"] / "outputs" / "sub-001" / "model.pt")
    entry = load_datalist(design_card["first"])[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two commands: bit-identical weights hold for one thread count, not across them
    try:
        python = fit_sequence(entry.load(), FitConfig(**SAME_FIT), seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    cli.main(["fit", design_card["first"], "--output_dir", str(tmp_path), "--epochs", "3", "--levels", "[2,1]",
              "--level_fractions", "[0.5,0.5]", "--threads", "1", "--noprogress", "--noreport"])
    command = FittedSubject.load(tmp_path / "sub-001" / "model.pt")
    for other in (python, command):
        state, reference = other.model.state_dict(), bundle.model.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[key], reference[key]) for key in state)
        assert other.history == bundle.history
        assert other.fitted_on["scans"] == bundle.fitted_on["scans"]


def test_plain_run_from_the_repository_root_fits_one_subject(data, tmp_path):
    output_dir = tmp_path / "plain"
    result = runner("run", "--config_file", "bundle/configs/train.json",
                    *cli_overrides({"datalist": data["datalist"], "output_dir": str(output_dir),
                                    "subject_id": "sub-002", **TINY}))
    assert result.returncode == 0, result.stderr[-4000:]
    subject = FittedSubject.load(output_dir / "sub-002" / "model.pt")
    assert subject.subject == "sub-002" and [r["level"] for r in subject.history] == [2, 1]
    assert not (output_dir / "sub-001").exists()
    assert os.listdir(output_dir / "tensorboard" / "sub-002")  # TensorBoardStatsHandler wrote events


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
@pytest.mark.parametrize("workflow_type, names", [("train", ["train.json"]), ("infer", ["inference.json"]),
                                                  ("infer", ["inference.json", "evaluate.json"]),
                                                  (None, ["pretrain.json"])])
def test_check_properties_is_empty_for_each_config_alone_before_any_fit(data, tmp_path, monkeypatch, cwd,
                                                                         workflow_type, names):
    monkeypatch.chdir(REPO if cwd == "repo" else tmp_path)
    overrides = {"output_dir": str(tmp_path / "nothing_fitted")}
    if names != ["pretrain.json"]:
        overrides.update({"datalist": data["datalist"], "num_threads": 1, "pretrained": None})
    workflow = ConfigWorkflow(config_file=config(*names), workflow_type=workflow_type, logging_file=False,
                              **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    if workflow_type is not None:  # pretrain.json has only the metadata properties
        assert workflow.bundle_root == BUNDLE
    assert not os.path.exists(tmp_path / "nothing_fitted" / "sub-001" / "model.pt")


def test_a_copy_of_the_bundle_uses_its_own_root_models_and_outputs(data, tmp_path):
    copy = copy_bundle(tmp_path)
    workflow = ConfigWorkflow(config_file=str(copy / "configs" / "train.json"), workflow_type="train",
                              logging_file=False, datalist=data["datalist"])
    workflow.initialize()
    assert workflow.bundle_root == str(copy)
    assert workflow.parser.get_parsed_content("output_dir") == str(copy / "outputs")
    assert workflow.parser.get_parsed_content("pretrained") == str(copy / "models" / "model.pt")
    assert bundle_root.__module__ == "noder_monai.workflows.bundle"


def test_bundle_root_outside_a_workflow_is_the_current_bundle_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert bundle_root() == BUNDLE
    monkeypatch.chdir(BUNDLE)
    assert bundle_root() == BUNDLE
    monkeypatch.chdir(tmp_path)  # not the checkout this package is imported from
    with pytest.raises(FileNotFoundError, match="cannot find the bundle folder .* pass --bundle_root"):
        bundle_root()


def test_hyperparameters_are_top_level_keys_that_build_the_fit(data, tmp_path):
    """`--epochs 5` and the other fit settings are top-level keys; their values are FitConfig's defaults."""
    train = json.load(open(os.path.join(CONFIGS, "train.json")))
    defaults = FitConfig()
    settings = {k: v for k, v in train["fit_settings"].items() if k != "_target_"}
    assert settings == {key: f"@{key}" for key in settings} and set(settings) == set(vars(defaults))
    for key in settings:
        expected = getattr(defaults, key)
        assert train[key] == (list(expected) if isinstance(expected, tuple) else expected), key
    assert set(train["network_def"]) == {"_target_", "spatial_size"}
    workflow = ConfigWorkflow(config_file=config("train.json"), workflow_type="train", logging_file=False,
                              datalist=data["datalist"], output_dir=str(tmp_path), epochs=5, source="nearest")
    workflow.initialize()
    fit = workflow.parser.get_parsed_content("fit")
    assert (fit.epochs, fit.source) == (5, "nearest") and workflow.max_epochs == 5


def test_loss_and_optimizer_settings_change_the_fit(data):
    base = {"datalist": data["datalist"], **TINY, "epochs": 3}
    del base["pretrained"]  # from the bundle's models/: a random decoder hardly moves in 3 epochs
    histories, configs = {}, {}
    for name, extra in {"default": {}, "ncc": {"ncc_kernel_size": 5}, "lr": {"learning_rate": 0.01},
                        "sigma": {"image_smoothing_sigma": 0.0}}.items():
        output_dir = str(data["root"] / f"override_{name}")
        run_workflow(config("train.json"), "train", output_dir=output_dir, **base, **extra)
        subject = FittedSubject.load(os.path.join(output_dir, "sub-001", "model.pt"))
        histories[name] = [record["total"] for record in subject.history]
        configs[name] = subject.fit_config
    assert configs["default"]["ncc_kernel_size"] == 21 and configs["ncc"]["ncc_kernel_size"] == 5
    assert configs["default"]["learning_rate"] == 5e-3 and configs["lr"]["learning_rate"] == 0.01
    assert configs["default"]["image_smoothing_sigma"] == 0.5 and configs["sigma"]["image_smoothing_sigma"] == 0.0
    assert histories["ncc"][0] != histories["default"][0]  # another window: another loss from the first epoch
    assert histories["sigma"][0] != histories["default"][0]  # unsmoothed scans: another loss from the first epoch
    assert histories["lr"][0] == histories["default"][0] and histories["lr"][-1] != histories["default"][-1]


def test_the_bundle_runs_the_same_input_checks_as_fit_sequence(tmp_path):
    """A constant baseline and an even NCC window are refused by the bundle's training as by fit_sequence; a level
    too coarse for the image is dropped alike."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_inputs import _blob_scans, _write

    scans = _blob_scans((24, 24, 8))
    paths = _write(tmp_path, scans, np.diag([1.0, 1.0, 4.0, 1.0]))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"subjects": [{"id": "s", "scans": [{"image": p, "time": float(t)}
                                                                      for t, p in enumerate(paths)]}]}))
    overrides = {"datalist": str(datalist), "output_dir": str(tmp_path / "out"), **TINY, "levels": [4, 2, 1],
                 "level_fractions": [0.5, 0.25, 0.25]}
    run_workflow(config("train.json"), "train", **overrides)
    assert {r["level"] for r in FittedSubject.load(tmp_path / "out" / "s" / "model.pt").history} <= {2, 1}
    workflow = ConfigWorkflow(config_file=config("train.json"), workflow_type="train", logging_file=False,
                              **{**overrides, "ncc_kernel_size": 8})
    workflow.initialize()
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert "field 'ncc_kernel_size' must be an odd integer >= 3, got 8" in _chain(error.value)


def test_the_bundle_refuses_a_fit_larger_than_the_free_memory_before_building_the_network(data, tmp_path,
                                                                                         monkeypatch):
    from noder_monai.engines import memory

    monkeypatch.setattr(memory, "free_memory", lambda device="cpu": 2**20)
    workflow = ConfigWorkflow(config_file=config("train.json"), workflow_type="train", logging_file=False,
                              datalist=data["datalist"], output_dir=str(tmp_path / "out"), **TINY)
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
        workflow.run()
    message = _chain(error.value)
    assert "GB of memory (estimate, plus 20% margin), but only 0.0 GB is free on cpu" in message
    assert "fit fewer scans at once" in message and not list((tmp_path / "out").rglob("model.pt"))


def _chain(error):
    """Every message of an exception chain (MONAI wraps config and transform errors)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


@pytest.fixture(scope="module")
def cohort(data):
    """``run_workflow`` of the cohort from bundle/ with the bundle's MLflow tracking settings (a local SQLite store,
    offline): every subject fitted, one run each."""
    output_dir = str(data["root"] / "cohort")
    overrides = {"datalist": data["datalist"], "output_dir": output_dir, **TINY}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file", "configs/train.json",
                    "--tracking", "configs/mlflow.json", *cli_overrides(overrides), cwd=BUNDLE)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"output_dir": output_dir, **data}


def _mlflow_runs(output_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.join(output_dir, "mlruns.db"))
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    return client, runs


def test_cohort_tracks_every_fit_setting_loss_term_and_file_in_one_mlflow_run_per_subject(cohort):
    """configs/mlflow.json: MONAI's MLFlowHandler records per subject every FitConfig field and the network's
    arguments as params, each loss term per epoch as metrics, and the fitted file and the template as artifacts."""
    for subject_id in ("sub-001", "sub-002"):
        subject = FittedSubject.load(os.path.join(cohort["output_dir"], subject_id, "model.pt"))
        assert subject.subject == subject_id and len(subject.history) == 2
    client, runs = _mlflow_runs(cohort["output_dir"])
    assert sorted(run.info.run_name for run in runs) == ["sub-001", "sub-002"]
    for run in runs:
        subject = FittedSubject.load(os.path.join(cohort["output_dir"], run.info.run_name, "model.pt"))
        losses = [metric.value for metric in client.get_metric_history(run.info.run_id, "train_loss")]
        np.testing.assert_allclose(losses, [record["total"] for record in subject.history], rtol=1e-6)
        for term in ("total", "similarity", "smoothness", "boundary"):
            history = sorted(client.get_metric_history(run.info.run_id, f"loss_{term}"), key=lambda m: m.step)
            np.testing.assert_allclose([m.value for m in history], [r[term] for r in subject.history], rtol=1e-6)
        assert [m.value for m in client.get_metric_history(run.info.run_id, "level")] == [2.0, 1.0]
        params = run.data.params
        for key, value in subject.fit_config.items():
            assert params[key] == str(value), key  # every fit setting, with the value the fit used
        assert set(FitConfig().__dict__) <= set(params)
        assert params["network.spatial_size"] == "[16, 16, 16]" and params["subject"] == run.info.run_name
        # MONAI's CLI drops `--pretrained None` (update_kwargs ignores None): the shipped autoencoder initialised it
        assert params["pretrained"] == os.path.join(BUNDLE, "models", "model.pt") and params["seed"] == "0"
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert "model.pt" in artifacts and "template.nii.gz" in artifacts


def test_cohort_skip_existing_keeps_fitted_subjects(cohort):
    from noder_monai.workflows import CohortWorkflow

    path = os.path.join(cohort["output_dir"], "sub-001", "model.pt")
    before = os.stat(path).st_mtime_ns
    workflow = CohortWorkflow(config_file=config("train.json"), skip_existing=True, logging_file=False,
                              datalist=cohort["datalist"], output_dir=cohort["output_dir"], **TINY)
    workflow.initialize()
    records = workflow.run()
    assert {k: v["status"] for k, v in records.items()} == {"sub-001": "skipped", "sub-002": "skipped"}
    assert os.stat(path).st_mtime_ns == before


def test_inference_equals_fitted_subject_predict_and_keeps_the_affine(cohort):
    overrides = {"datalist": cohort["datalist"], "output_dir": cohort["output_dir"], "subject_id": "sub-001",
                 "num_threads": 1}
    run_workflow(config("inference.json"), "infer", **overrides)
    entry = cohort["document"]["subjects"][0]
    folder = os.path.join(cohort["output_dir"], "sub-001", "predictions")
    source = nib.load(os.path.join(os.path.dirname(cohort["datalist"]), entry["scans"][0]["image"]))
    label = nib.load(os.path.join(os.path.dirname(cohort["datalist"]), entry["label"])).get_fdata()
    subject = FittedSubject.load(os.path.join(cohort["output_dir"], "sub-001", "model.pt"))
    times = sorted(entry["predict_times"])
    expected = subject.predict(times, labels=torch.as_tensor(label))
    assert len(os.listdir(folder)) == 4 * len(times)
    for index, time in enumerate(times):
        written = {kind: nib.load(os.path.join(folder, f"{kind}_{time_tag(time)}.nii.gz"))
                   for kind in ("image", "ddf", "jacobian", "label")}
        for image in written.values():
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-6)
        np.testing.assert_allclose(written["image"].get_fdata(), expected.images[index, 0].numpy(), atol=1e-4)
        np.testing.assert_allclose(np.moveaxis(written["ddf"].get_fdata().squeeze(), -1, 0),
                                   expected.ddfs[index].numpy(), atol=1e-5)
        np.testing.assert_allclose(written["jacobian"].get_fdata(), expected.jacobians[index, 0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(written["label"].get_fdata(), expected.labels[index, 0].numpy())


def test_inference_without_a_fitted_subject_names_the_missing_file(data, tmp_path):
    workflow = ConfigWorkflow(config_file=config("inference.json"), workflow_type="infer", logging_file=False,
                              datalist=data["datalist"], output_dir=str(tmp_path), num_threads=1)
    workflow.initialize()
    assert workflow.check_properties() == []
    with pytest.raises(Exception) as error:
        workflow.run()
    model = os.path.join(str(tmp_path), "sub-001", "model.pt")
    assert f"fitted subject file '{model}' does not exist; run training first." in _chain(error.value)


@pytest.mark.parametrize("bad", ["fraction", "nan", "grid"])
def test_bundle_inference_refuses_each_label_the_cli_refuses(cohort, tmp_path, bad):
    entry = cohort["document"]["subjects"][0]
    source = nib.load(os.path.join(os.path.dirname(cohort["datalist"]), entry["label"]))
    values = source.get_fdata().astype(np.float32)
    affine = source.affine.copy()
    if bad == "fraction":
        values[0, 0, 0] = 1.5
    elif bad == "nan":
        values[0, 0, 0] = np.nan
    else:
        affine[0, 3] += 5.0
    label = str(tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(values, affine), label)
    subject = {**entry, "label": label, "scans": [{**s, "image": os.path.join(os.path.dirname(cohort["datalist"]),
                                                                            s["image"])} for s in entry["scans"]]}
    subject.pop("heldout")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"subjects": [subject]}))
    (tmp_path / "out" / "sub-001").mkdir(parents=True)
    shutil.copy(os.path.join(cohort["output_dir"], "sub-001", "model.pt"), tmp_path / "out" / "sub-001")
    record = jobs.infer(str(datalist), output_dir=tmp_path / "out", predict_times=[1.0])["sub-001"]
    assert record["status"] == "failed" and label in record["error"]
    cli_message = record["error"].split(": ", 1)[1]
    workflow = ConfigWorkflow(config_file=config("inference.json"), workflow_type="infer", logging_file=False,
                              datalist=str(datalist), output_dir=str(tmp_path / "bundle_out"), num_threads=1,
                              model_path=str(tmp_path / "out" / "sub-001" / "model.pt"))
    workflow.initialize()
    with pytest.raises(Exception) as error:
        workflow.run()
    assert cli_message in _chain(error.value)
    assert not os.path.exists(tmp_path / "bundle_out" / "sub-001" / "predictions" / "label_t1.0.nii.gz")


def test_evaluate_writes_monai_metrics_equal_to_the_package_metrics(cohort, tmp_path):
    from noder_monai.metrics import nrmse

    eval_dir = tmp_path / "eval"
    events = os.path.join(cohort["output_dir"], "tensorboard", "sub-001")
    before = set(os.listdir(events))
    workflow = ConfigWorkflow(config_file=config("inference.json", "evaluate.json"), workflow_type="infer",
                              run_id="evaluation", logging_file=False, datalist=cohort["datalist"],
                              output_dir=cohort["output_dir"], eval_dir=str(eval_dir), subject_id="sub-001",
                              num_threads=1)
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    assert len(set(os.listdir(events)) - before) == 1  # the held-out metrics went to TensorBoard too
    folder = eval_dir / "sub-001"
    assert {"metrics.csv", "nrmse_raw.csv", "ssim_raw.csv", "psnr_raw.csv", "percent_folded_raw.csv"} <= set(os.listdir(folder))
    page = open(os.path.join(cohort["output_dir"], "sub-001", "report.html"), encoding="utf-8").read()
    assert page.count('src="data:image/png;base64,') == 4 and "linear interpolation" in page  # HTMLReportHandler
    rows = [line.split(",") for line in (folder / "nrmse_raw.csv").read_text().splitlines()[1:]]
    entry = cohort["document"]["subjects"][0]
    heldout = sorted(entry["heldout"], key=lambda scan: scan["time"])
    assert len(rows) == len(heldout)
    subject = FittedSubject.load(os.path.join(cohort["output_dir"], "sub-001", "model.pt"))
    prediction = subject.predict([scan["time"] for scan in heldout])
    targets = torch.stack([torch.as_tensor(nib.load(os.path.join(os.path.dirname(cohort["datalist"]), scan["image"]))
                                           .get_fdata(), dtype=torch.float32)[None] for scan in heldout])
    np.testing.assert_allclose([float(row[1]) for row in rows], nrmse(prediction.images, targets).numpy(), rtol=1e-4)


def test_verify_net_in_out_before_any_fit_and_metadata_offline(data, tmp_path, capsys):
    for names in (["inference.json"], ["train.json"]):
        verify_net_in_out(net_id="network_def", meta_file=os.path.join(CONFIGS, "metadata.json"),
                          config_file=config(*names), any=16, extra_forward_args={"times": [0.5, 1.0], "return_ddf": False},
                          **{"network_def#spatial_size": [16, 16, 16], "datalist": data["datalist"],
                             "output_dir": str(tmp_path)})
    verify_metadata(meta_file=os.path.join(CONFIGS, "metadata.json"), filepath=SCHEMA)
    meta = json.load(open(os.path.join(CONFIGS, "metadata.json")))
    assert meta["version"] in meta["changelog"]
    assert {"noder-monai", "torchdiffeq", "tensorboard", "pytorch-ignite"} <= set(meta["required_packages_version"])
    inputs, outputs = meta["network_data_format"]["inputs"], meta["network_data_format"]["outputs"]
    assert outputs["label"]["format"] == "segmentation" and outputs["label"]["num_channels"] == 1
    spec_types = {"image", "series", "tuples", "probabilities"}  # the bundle specification's types
    assert {entry["type"] for entry in [*inputs.values(), *outputs.values()]} <= spec_types
    assert meta["eval_metrics"] and all(isinstance(value, float) for value in meta["eval_metrics"].values())
    assert "pip install -e ." in meta["description"] and "not TorchScript-exportable" in meta["description"]
    assert not os.listdir(tmp_path)  # nothing fitted, nothing written


def test_each_config_is_self_contained_and_overlays_layer_on_top():
    """No common.json: train, inference and pretrain each define what they use; the overlays only add or change
    keys; the design card's run IDs exist next to the plain ``run``."""
    assert not os.path.exists(os.path.join(CONFIGS, "common.json"))
    train, inference = (json.load(open(os.path.join(CONFIGS, f"{name}.json"))) for name in ("train", "inference"))
    pretrain = json.load(open(os.path.join(CONFIGS, "pretrain.json")))
    for document, run_id in ((train, "training"), (inference, "inference"), (pretrain, "training")):
        assert "bundle_root" in document and "initialize" in document and document[run_id]
    assert train["training"] == train["run"] and inference["inference"] == inference["run"]
    evaluate = json.load(open(os.path.join(CONFIGS, "evaluate.json")))
    assert evaluate["evaluation"] == inference["run"] and "bundle_root" not in evaluate
    for name in os.listdir(CONFIGS):
        assert "common.json" not in open(os.path.join(CONFIGS, name)).read(), name


VERIFY_BUNDLE = """
import sys
sys.path.insert(0, {folder!r})
import verify_bundle
verify_bundle.exclude_verify_torchscript_list.append({name!r})
verify_bundle.exclude_verify_shape_list.append({name!r})
verify_bundle.verify({name!r}, {models!r}, "full")
"""


def test_model_zoo_verify_bundle_passes_in_full_mode_offline(tmp_path):
    """model-zoo's ci/verify_bundle.py (kept verbatim in tests/model_zoo/), full mode, on a copy of bundle/ as the
    model zoo lays it out, offline: files, version and changelog, metadata against the schema, properties; TorchScript
    and the image-only shape check excluded as bundle_custom_data.py does for such bundles (the shape check with the
    times: test_verify_net_in_out_before_any_fit_and_metadata_offline)."""
    models = tmp_path / "models"
    name = "noder_image_sequence_regression"
    shutil.copytree(BUNDLE, models / name, ignore=shutil.ignore_patterns("outputs", "eval", "demo_data", "__pycache__"))
    (models / name / "eval").mkdir()
    shutil.copy(SCHEMA, models / name / "eval" / "schema.json")
    (models / "model_info.json").write_text("{}")
    script = VERIFY_BUNDLE.format(folder=os.path.join(REPO, "tests", "model_zoo"), name=name, models=str(models))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for line in ("directory is verified correctly.", "version and changelog are verified correctly.",
                 "metadata format is verified correctly.", "properties are verified correctly.",
                 f"bundle: {name} does not support torchscript, skip verifying."):
        assert line in result.stdout, result.stdout
    version = json.load(open(os.path.join(CONFIGS, "metadata.json")))["version"]
    (models / "model_info.json").write_text(json.dumps({f"{name}_v{version}": {}}))  # a released version
    again = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "is already used of bundle" in again.stderr  # the check can fail
    train = json.load(open(os.path.join(CONFIGS, "train.json")))
    assert "'models'" in train["pretrained"] and "'model.pt'" in train["pretrained"]


def test_evaluation_logs_the_heldout_metrics_and_the_report_to_mlflow(cohort, tmp_path):
    output_dir = str(tmp_path / "tracked")
    shutil.copytree(cohort["output_dir"], output_dir, ignore=shutil.ignore_patterns("mlruns*", "config_*"))
    overrides = {"datalist": cohort["datalist"], "output_dir": output_dir, "eval_dir": str(tmp_path / "eval"),
                 "num_threads": 1}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
                    json.dumps(config("inference.json", "evaluate.json", folder="bundle/configs")),
                    "--tracking", "bundle/configs/mlflow.json", *cli_overrides(overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    client, runs = _mlflow_runs(output_dir)
    assert sorted(run.info.run_name for run in runs) == ["sub-001", "sub-002"]
    for run in runs:
        assert set(run.data.metrics) == {"nrmse", "ssim", "psnr", "percent_folded"}
        assert 0.0 < run.data.metrics["nrmse"] < 1.0 and run.data.metrics["percent_folded"] == 0.0
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"report.html", "metrics.csv", "nrmse_raw.csv"} <= artifacts, artifacts
        assert run.data.params["model"] == os.path.join(output_dir, run.info.run_name, "model.pt")
    with open(tmp_path / "eval" / "cohort_metrics.csv") as handle:
        assert len(handle.read().splitlines()) == 1 + 2 * 3  # the same cohort table as `noder evaluate`


def test_wheel_carries_the_weights_that_live_once_in_bundle_models(tmp_path):
    import zipfile

    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "noder_monai"), source / "noder_monai",
                    ignore=shutil.ignore_patterns("__pycache__", "weights"))
    shutil.copytree(os.path.join(BUNDLE, "models"), source / "bundle" / "models")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("noder_monai-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("model.pt", "model_2d.pt"):
            packaged = archive.read(f"noder_monai/model/weights/{name}")
            assert packaged == open(os.path.join(BUNDLE, "models", name), "rb").read()
    assert not os.path.exists(os.path.join(REPO, "noder_monai", "model", "weights"))


def test_transforms_and_the_file_format_do_not_import_the_training_code():
    code = ("import sys, noder_monai.transforms, noder_monai.model; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('noder_monai.')}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = json.loads(result.stdout.strip().replace("'", '"'))
    assert "transforms" in loaded and not {"engines", "workflows", "reporting", "cli"} & set(loaded), result.stderr


def test_old_target_paths_work_for_one_release_with_a_warning():
    import noder_monai.engines
    import noder_monai.workflows

    with pytest.warns(DeprecationWarning, match=r"noder_monai.engines.CohortWorkflow has moved to "
                                                r"noder_monai.workflows.CohortWorkflow; the old path is removed"):
        assert noder_monai.engines.CohortWorkflow is noder_monai.workflows.CohortWorkflow
    with pytest.warns(DeprecationWarning, match="noder_monai.data.GeometryNiftiWriter has moved to noder_monai.io"):
        from monai.utils.module import instantiate

        assert instantiate("noder_monai.data.GeometryNiftiWriter", "callable") is not None
    with pytest.warns(DeprecationWarning, match="noder_monai.engines.report_html has moved to noder_monai.reporting.html"):
        from noder_monai.engines import report_html  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        noder_monai.engines.nothing  # noqa: B018


def test_bundle_checks_output_dir_and_cohort_ends_with_the_package_message(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    message = f"ValueError: output_dir '{afile}' exists and is not a folder."
    overrides = {"datalist": data["datalist"], "output_dir": str(afile), **TINY}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
                    "bundle/configs/train.json", "--logging_file", "None", *cli_overrides(overrides))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Failed to evaluate" in result.stderr  # MONAI's wrapper stays in the chain, above the message
    # the design card's runner too: the config's initialize installs a hook that repeats the package's message last
    plain = runner("run", "training", "--config_file", "bundle/configs/train.json", "--logging_file", "None",
                   *cli_overrides(overrides))
    assert plain.returncode != 0 and "Failed to evaluate" in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == message
    # a plain ConfigWorkflow fails in initialize, before any fit
    workflow = ConfigWorkflow(config_file=config("train.json"), workflow_type="train", logging_file=False,
                              **overrides)
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    assert f"{error.value.__cause__}" == message.split(": ", 1)[1]


def test_package_error_unwraps_nested_config_expressions():
    from monai.bundle import ConfigParser

    from noder_monai.workflows import package_error

    parser = ConfigParser({"times": "$noder_monai.io.parse_times('[abc]', name='--times')",
                           "later": "$@times + [1.0]"}, globals={"noder_monai": "noder_monai"})
    with pytest.raises(ValueError) as error, package_error():
        parser.get_parsed_content("later")
    assert str(error.value).startswith("--times: 'abc' in '[abc]' is not a number")
    assert str(error.value.__cause__).startswith("Failed to evaluate")
    with pytest.raises(RuntimeError, match="not from a config"), package_error():
        raise RuntimeError("not from a config")
    parser = ConfigParser({"fit": {"_target_": "noder_monai.engines.FitConfig", "finest_time_groups": 0}})
    with pytest.raises(ValueError, match="finest_time_groups must be an integer >= 1, got 0") as error, package_error():
        parser.get_parsed_content("fit")
    assert str(error.value.__cause__).startswith("Failed to instantiate component")


def test_bundle_outputs_keep_disagreeing_qform_sform(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_inputs import write_disagreeing_subject
    from test_io_geometry import assert_same_geometry

    paths, label = write_disagreeing_subject(tmp_path, count=3)
    document = {"subjects": [{"id": "qs", "scans": [{"image": p, "time": float(t)} for t, p in enumerate(paths)],
                              "label": label, "predict_times": [1.5]}]}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    overrides = {"datalist": str(datalist), "output_dir": str(tmp_path / "out"), "subject_id": "qs"}
    run_workflow(config("train.json"), "train", **overrides, **{**TINY, "ncc_kernel_size": 9})
    run_workflow(config("inference.json"), "infer", **overrides, num_threads=1)
    folder = tmp_path / "out" / "qs" / "predictions"
    written = sorted(os.listdir(folder))
    assert written == sorted(f"{kind}_{time_tag(1.5)}.nii.gz" for kind in ("image", "ddf", "jacobian", "label"))
    for name in written:
        header = nib.load(str(folder / name)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2), name
        assert_same_geometry(str(folder / name), paths[0])
    # the fitted file records the scans' header forms read by the one loader (LoadSequenced)
    assert FittedSubject.load(tmp_path / "out" / "qs" / "model.pt").geometry.nifti["qform_code"] == 1


def test_a_2d_image_stored_with_a_singleton_axis_goes_through_training_and_inference(tmp_path):
    """The bundle reads every scan with the package's loader: a (20, 1, 18) file is a 2D subject in training and in
    inference, and the predictions keep the file's layout."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_inputs import _blob_scans

    paths = []
    for index, scan in enumerate(_blob_scans((20, 18))):
        paths.append(str(tmp_path / f"t{index}.nii.gz"))
        nib.save(nib.Nifti1Image(scan.reshape(20, 1, 18), np.diag([1.0, 3.0, 1.2, 1.0])), paths[-1])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"subjects": [{"id": "flat", "scans": [{"image": p, "time": float(t)}
                                                                         for t, p in enumerate(paths)],
                                                  "predict_times": [1.5]}]}))
    overrides = {"datalist": str(datalist), "output_dir": str(tmp_path / "out"), "num_threads": 1}
    run_workflow(config("train.json"), "train", **{**overrides, **TINY, "ncc_kernel_size": 5})
    assert FittedSubject.load(tmp_path / "out" / "flat" / "model.pt").spatial_size == (20, 18)
    run_workflow(config("inference.json"), "infer", **overrides)
    written = nib.load(str(tmp_path / "out" / "flat" / "predictions" / f"image_{time_tag(1.5)}.nii.gz"))
    assert written.shape == (20, 1, 18)
    np.testing.assert_allclose(written.affine, nib.load(paths[0]).affine, atol=1e-6)


def test_multi_gpu_configs_shard_the_cohort_over_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m monai.bundle run_workflow CohortWorkflow` with multi_gpu_*.json on CPU: each
    subject fitted by one rank; the evaluation's cohort_metrics.csv has one row per subject and held-out time."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from cohort_data import write_cohort

    from noder_monai.workflows import markers

    datalist = write_cohort(tmp_path / "data", 3, size=16)
    output_dir, eval_dir = str(tmp_path / "out"), str(tmp_path / "eval")
    common = {"datalist": datalist, "output_dir": output_dir, "eval_dir": eval_dir, "num_threads": 1}
    fit = {**TINY, "levels": [1], "level_fractions": [1.0]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for names, overrides in ((["train.json", "multi_gpu_train.json"], cli_overrides({**common, **fit})),
                             (["inference.json", "evaluate.json", "multi_gpu_evaluate.json"], cli_overrides(common))):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "monai.bundle",
             "run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
             json.dumps(config(*names, folder="bundle/configs")), *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [markers.read_marker(os.path.join(output_dir, sid), "training")["record"]["rank"]
             for sid in ("sub-001", "sub-002", "sub-003")]
    assert sorted(set(ranks)) == [0, 1]
    with open(os.path.join(output_dir, "cohort_summary_training.json")) as handle:
        assert json.load(handle)["counts"]["done"] == 3
    with open(os.path.join(eval_dir, "cohort_metrics.csv")) as handle:
        rows = [line.split(",")[:2] for line in handle.read().splitlines()[1:]]
    assert sorted((s, float(t)) for s, t in rows) == [(s, t) for s in ("sub-001", "sub-002", "sub-003") for t in (1.5, 3.0)]


@pytest.mark.parametrize("key_in_ckpt", [None, "state_dict"])
def test_monai_bundle_load_gives_the_pretrained_encoder_and_decoder(tmp_path, monkeypatch, key_in_ckpt):
    """The docs' monai.bundle.load call, with MONAI's default key and with key_in_ckpt: encoder and decoder from
    models/model.pt, nothing left at random there."""
    import monai

    monkeypatch.chdir(tmp_path)
    network = monai.bundle.load(name=os.path.basename(BUNDLE), bundle_dir=REPO, device="cpu",
                                net_override={"spatial_size": [16, 16, 16]}, key_in_ckpt=key_in_ckpt)
    stored = torch.load(os.path.join(BUNDLE, "models", "model.pt"), weights_only=True)["state_dict"]
    state = network.state_dict()
    assert len(stored) == 14 and len(state) == 33
    assert all(torch.equal(state[key], value) for key, value in stored.items())
