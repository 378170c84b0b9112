"""The MONAI bundle as MONAI users and the model-zoo CI run it: runner, cohort, tracking, properties, checks."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from noder_monai.data import make_demo_dataset
from noder_monai.engines import time_tag
from noder_monai.model import FittedSubject

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundle")
CONFIGS = os.path.join(BUNDLE, "configs")
SCHEMA = os.path.join(REPO, "tests", "data", "meta_schema_offline.json")
TINY = {"fit#epochs": 2, "fit#levels": [2, 1], "fit#level_fractions": [0.5, 0.5], "pretrained": None,
        "num_threads": 1}


def layered(*names, absolute=False):
    folder = CONFIGS if absolute else "bundle/configs"
    return [os.path.join(folder, name) for name in ("common.json", *names)]


def runner(*args, cwd=REPO, timeout=180):
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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    datalist = make_demo_dataset(root / "data", n_subjects=2, size=16)
    return {"root": root, "datalist": datalist, "document": json.load(open(datalist))}


@pytest.fixture(scope="module")
def cohort(data):
    """``run_workflow`` of the cohort from bundle/ with MLflow tracking: every subject fitted, one run each."""
    output_dir = str(data["root"] / "cohort")
    overrides = {"datalist": data["datalist"], "output_dir": output_dir, **TINY}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
                    json.dumps(["configs/common.json", "configs/train.json"]), "--tracking", "mlflow",
                    *cli_overrides(overrides), cwd=BUNDLE)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"output_dir": output_dir, **data}


def test_plain_runner_fits_one_subject_from_the_repository_root(data):
    output_dir = data["root"] / "plain"
    result = runner("run", "--config_file", json.dumps(layered("train.json")),
                    *cli_overrides({"datalist": data["datalist"], "output_dir": str(output_dir),
                                    "subject_id": "sub-002", **TINY}))
    assert result.returncode == 0, result.stderr[-4000:]
    subject = FittedSubject.load(output_dir / "sub-002" / "model.pt")
    assert subject.subject == "sub-002" and [r["level"] for r in subject.history] == [2, 1]
    assert not (output_dir / "sub-001").exists()
    assert os.listdir(output_dir / "tensorboard" / "sub-002")  # TensorBoardStatsHandler wrote events


def test_cohort_fits_every_subject_with_one_mlflow_run_each(cohort):
    import mlflow

    for subject_id in ("sub-001", "sub-002"):
        subject = FittedSubject.load(os.path.join(cohort["output_dir"], subject_id, "model.pt"))
        assert subject.subject == subject_id and len(subject.history) == 2
    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.join(cohort["output_dir"], "mlruns.db"))
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert sorted(run.info.run_name for run in runs) == ["sub-001", "sub-002"]
    for run in runs:
        losses = [metric.value for metric in client.get_metric_history(run.info.run_id, "train_loss")]
        subject = FittedSubject.load(os.path.join(cohort["output_dir"], run.info.run_name, "model.pt"))
        np.testing.assert_allclose(losses, [record["total"] for record in subject.history], rtol=1e-6)


def test_cohort_skip_existing_keeps_fitted_subjects(cohort):
    from noder_monai.workflows import CohortWorkflow

    path = os.path.join(cohort["output_dir"], "sub-001", "model.pt")
    before = os.stat(path).st_mtime_ns
    workflow = CohortWorkflow(config_file=layered("train.json", absolute=True), skip_existing=True, logging_file=False,
                              datalist=cohort["datalist"], output_dir=cohort["output_dir"], **TINY)
    workflow.initialize()
    records = workflow.run()
    assert {k: v["status"] for k, v in records.items()} == {"sub-001": "skipped", "sub-002": "skipped"}
    assert os.stat(path).st_mtime_ns == before


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
@pytest.mark.parametrize("workflow_type, names", [("train", ["train.json"]), ("infer", ["inference.json"])])
def test_check_properties_is_empty_from_any_folder(cohort, tmp_path, monkeypatch, cwd, workflow_type, names):
    monkeypatch.chdir(REPO if cwd == "repo" else tmp_path)
    overrides = {"datalist": cohort["datalist"], "output_dir": cohort["output_dir"], "num_threads": 1}
    if workflow_type == "train":
        overrides.update(TINY)
    if cwd == "elsewhere":
        overrides["bundle_root"] = BUNDLE
    workflow = ConfigWorkflow(config_file=layered(*names, absolute=cwd == "elsewhere"), workflow_type=workflow_type,
                              logging_file=False, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.bundle_root == BUNDLE


def test_bundle_root_is_overridable(data, tmp_path):
    root = tmp_path / "my_bundle"
    shutil.copytree(CONFIGS, root / "configs")
    workflow = ConfigWorkflow(config_file=[str(root / "configs" / "common.json"), str(root / "configs" / "train.json")],
                              workflow_type="train", logging_file=False, bundle_root=str(root), datalist=data["datalist"])
    workflow.initialize()
    assert workflow.parser.get_parsed_content("output_dir") == str(root / "outputs")
    assert workflow.parser.get_parsed_content("pretrained").startswith(str(root / "models"))


def test_loss_and_optimizer_overrides_change_the_fit(data):
    base = {"datalist": data["datalist"], **TINY, "fit#epochs": 3}
    del base["pretrained"]  # from the bundle's models/: a random decoder hardly moves in 3 epochs
    histories, configs = {}, {}
    for name, extra in {"default": {}, "ncc": {"loss#ncc_kernel_size": 5}, "lr": {"optimizer#lr": 0.01},
                        "sigma": {"fit#image_smoothing_sigma": 0.0}}.items():
        output_dir = str(data["root"] / f"override_{name}")
        run_workflow(layered("train.json"), "train", output_dir=output_dir, **base, **extra)
        subject = FittedSubject.load(os.path.join(output_dir, "sub-001", "model.pt"))
        histories[name] = [record["total"] for record in subject.history]
        configs[name] = subject.fit_config
    assert configs["default"]["ncc_kernel_size"] == 21 and configs["ncc"]["ncc_kernel_size"] == 5
    assert configs["default"]["learning_rate"] == 5e-3 and configs["lr"]["learning_rate"] == 0.01
    assert configs["default"]["image_smoothing_sigma"] == 0.5 and configs["sigma"]["image_smoothing_sigma"] == 0.0
    assert histories["ncc"][0] != histories["default"][0]  # another window: another loss from the first epoch
    assert histories["sigma"][0] != histories["default"][0]  # unsmoothed scans: another loss from the first epoch
    assert histories["lr"][0] == histories["default"][0] and histories["lr"][-1] != histories["default"][-1]


def test_inference_equals_fitted_subject_predict_and_keeps_the_affine(cohort):
    overrides = {"datalist": cohort["datalist"], "output_dir": cohort["output_dir"], "subject_id": "sub-001",
                 "num_threads": 1}
    run_workflow(layered("inference.json"), "infer", **overrides)
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


def test_evaluate_writes_monai_metrics_equal_to_the_package_metrics(cohort, tmp_path):
    from noder_monai.metrics import nrmse

    eval_dir = tmp_path / "eval"
    events = os.path.join(cohort["output_dir"], "tensorboard", "sub-001")
    before = set(os.listdir(events))
    run_workflow(layered("inference.json", "evaluate.json"), "infer", datalist=cohort["datalist"],
                 output_dir=cohort["output_dir"], eval_dir=str(eval_dir), subject_id="sub-001", num_threads=1)
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


def test_verify_net_in_out_and_metadata_offline():
    result = runner("verify_net_in_out", "network_def", "--meta_file", "bundle/configs/metadata.json",
                    "--config_file", json.dumps(layered("train.json")), "--any", "16",
                    "--network_def#spatial_size", "[16,16,16]",
                    "--extra_forward_args", "{'times': [0.5, 1.0], 'return_ddf': False}")
    assert result.returncode == 0 and "data shape of network is verified with no error" in result.stderr + result.stdout, \
        result.stderr[-3000:]
    result = runner("verify_metadata", "--meta_file", "bundle/configs/metadata.json", "--filepath", SCHEMA)
    assert result.returncode == 0 and "metadata is verified with no error" in result.stderr + result.stdout
    meta = json.load(open(os.path.join(CONFIGS, "metadata.json")))
    assert meta["version"] in meta["changelog"] and "noder-monai" not in meta["required_packages_version"]
    assert "pip install -e ." in meta["description"] and "not TorchScript-exportable" in meta["description"]


def test_model_zoo_min_checks_offline():
    """What model-zoo's ci/verify_bundle.py checks in min mode, offline: LICENSE, metadata, inference config, weights
    that the configs load (one copy in the repository)."""
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert os.path.isfile(os.path.join(BUNDLE, name)), name
    assert "Apache License" in open(os.path.join(BUNDLE, "LICENSE")).read()
    train = json.load(open(os.path.join(CONFIGS, "train.json")))
    assert "'models'" in train["pretrained"] and "'model.pt'" in train["pretrained"]
    for name in os.listdir(CONFIGS):  # common.json is merged by --config_file lists, never read from Python
        assert "load_common" not in open(os.path.join(CONFIGS, name)).read()


def test_network_and_loss_defaults_come_from_the_constructors():
    train = json.load(open(os.path.join(CONFIGS, "train.json")))
    assert set(train["network_def"]) == {"_target_", "spatial_size"}
    assert train["fit"] == {"_target_": "noder_monai.engines.FitConfig"}
    assert all(str(value).startswith(("$@fit.", "$len(")) for key, value in train["loss"].items() if key != "_target_")


def test_evaluation_logs_the_heldout_metrics_to_mlflow(cohort, tmp_path):
    import mlflow

    output_dir = str(tmp_path / "tracked")
    shutil.copytree(cohort["output_dir"], output_dir, ignore=shutil.ignore_patterns("mlruns*", "config_*"))
    overrides = {"datalist": cohort["datalist"], "output_dir": output_dir, "eval_dir": str(tmp_path / "eval"),
                 "num_threads": 1}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
                    json.dumps(layered("inference.json", "evaluate.json")), "--tracking", "mlflow",
                    *cli_overrides(overrides))
    assert result.returncode == 0, result.stderr[-4000:]
    client = mlflow.MlflowClient(tracking_uri="sqlite:///" + os.path.join(output_dir, "mlruns.db"))
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert sorted(run.info.run_name for run in runs) == ["sub-001", "sub-002"]
    for run in runs:
        assert set(run.data.metrics) == {"nrmse", "ssim", "psnr", "percent_folded"}
        assert 0.0 < run.data.metrics["nrmse"] < 1.0 and run.data.metrics["percent_folded"] == 0.0


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
            packaged = archive.read(f"noder_monai/engines/weights/{name}")
            assert packaged == open(os.path.join(BUNDLE, "models", name), "rb").read()
    assert not os.path.exists(os.path.join(REPO, "noder_monai", "engines", "weights"))


def test_transforms_and_the_file_format_do_not_import_the_training_code():
    code = ("import sys, noder_monai.transforms, noder_monai.model; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('noder_monai.')}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = result.stdout.strip()
    assert loaded and not {"engines", "workflows", "reporting", "cli"} & set(eval(loaded)), result.stderr[-2000:]


def test_bundle_checks_output_dir_and_cohort_ends_with_the_package_message(data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    message = f"ValueError: output_dir '{afile}' exists and is not a folder."
    overrides = {"datalist": data["datalist"], "output_dir": str(afile), **TINY}
    result = runner("run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file",
                    json.dumps(layered("train.json")), "--logging_file", "None", *cli_overrides(overrides))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Failed to evaluate" in result.stderr  # MONAI's wrapper stays in the chain, above the message
    # the plain runner too: common.json's initialize installs a hook that repeats the package's message last
    plain = runner("run", "--config_file", json.dumps(layered("train.json")), "--logging_file", "None",
                   *cli_overrides(overrides))
    assert plain.returncode != 0 and "Failed to evaluate" in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == message
    # a plain ConfigWorkflow fails in initialize, before any fit
    workflow = ConfigWorkflow(config_file=layered("train.json"), workflow_type="train", logging_file=False,
                              **overrides)
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    assert f"{error.value.__cause__}" == message.split(": ", 1)[1]


def test_package_error_unwraps_nested_config_expressions():
    from monai.bundle import ConfigParser

    from noder_monai.workflows import package_error

    parser = ConfigParser({"times": "$noder_monai.io.image.parse_times('[abc]', name='--times')",
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
    from test_io_geometry import assert_same_geometry
    from test_inputs import write_disagreeing_subject

    paths, label = write_disagreeing_subject(tmp_path, count=3)
    document = {"subjects": [{"id": "qs", "scans": [{"image": p, "time": float(t)} for t, p in enumerate(paths)],
                              "label": label, "predict_times": [1.5]}]}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    overrides = {"datalist": str(datalist), "output_dir": str(tmp_path / "out"), "subject_id": "qs"}
    run_workflow(layered("train.json"), "train", **overrides, **{**TINY, "fit#ncc_kernel_size": 9})
    run_workflow(layered("inference.json"), "infer", **overrides, num_threads=1)
    folder = tmp_path / "out" / "qs" / "predictions"
    written = sorted(os.listdir(folder))
    assert written == sorted(f"{kind}_{time_tag(1.5)}.nii.gz" for kind in ("image", "ddf", "jacobian", "label"))
    for name in written:
        header = nib.load(str(folder / name)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2), name
        assert_same_geometry(str(folder / name), paths[0])


def test_multi_gpu_configs_shard_the_cohort_over_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m monai.bundle run_workflow CohortWorkflow` with multi_gpu_*.json on CPU: each
    subject fitted by one rank; the evaluation's cohort_metrics.csv has one row per subject and held-out time."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from cohort_data import write_cohort

    from noder_monai.workflows import cohort as cohort_runner

    datalist = write_cohort(tmp_path / "data", 3, size=16)
    output_dir, eval_dir = str(tmp_path / "out"), str(tmp_path / "eval")
    common = {"datalist": datalist, "output_dir": output_dir, "eval_dir": eval_dir, "num_threads": 1}
    fit = {**TINY, "fit#levels": [1], "fit#level_fractions": [1.0]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for names, overrides in ((["train.json", "multi_gpu_train.json"], cli_overrides({**common, **fit})),
                             (["inference.json", "evaluate.json", "multi_gpu_evaluate.json"], cli_overrides(common))):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "monai.bundle",
             "run_workflow", "noder_monai.workflows.CohortWorkflow", "--config_file", json.dumps(layered(*names)),
             *overrides], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [cohort_runner.read_marker(os.path.join(output_dir, sid), "train")["record"]["rank"]
             for sid in ("sub-001", "sub-002", "sub-003")]
    assert sorted(set(ranks)) == [0, 1]
    with open(os.path.join(output_dir, "cohort_summary_train.json")) as handle:
        assert json.load(handle)["counts"]["done"] == 3
    with open(os.path.join(eval_dir, "cohort_metrics.csv")) as handle:
        rows = [line.split(",")[:2] for line in handle.read().splitlines()[1:]]
    assert sorted((s, float(t)) for s, t in rows) == [(s, t) for s in ("sub-001", "sub-002", "sub-003") for t in (1.5, 3.0)]
