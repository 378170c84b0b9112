"""Cohorts across processes (torchrun, gloo on CPU, tiny 2D subjects): each subject once, resumable, failures kept."""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from noder_monai.data import load_datalist
from noder_monai.workflows import jobs, markers, shares

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cohort_data import write_cohort  # noqa: E402

FIT = ["--epochs", "2", "--levels", "[1]", "--level_fractions", "[1.0]"]
TINY = {"epochs": 2, "levels": [1], "level_fractions": [1.0]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tree(folder):
    """{relative path: (mtime_ns, bytes)} of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, handle.read())
    return found


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """5 subjects (sub-003 with a corrupt scan), two sizes; fit with `noder fit` and predict + evaluate with the jobs,
    each under `torchrun --nproc_per_node=2` on CPU."""
    root = tmp_path_factory.mktemp("cohort")
    datalist = write_cohort(root / "data", 5, sizes=[24, 16, 16, 24, 16], corrupt=("sub-003",))
    out, ev = str(root / "out"), str(root / "eval")
    fit = torchrun("-m", "noder_monai.cli", "fit", datalist, "--output_dir", out, "--pretrained", "None",
                   "--noprogress", "--threads", "1", *FIT)
    script = root / "predict_evaluate.py"
    script.write_text(textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.INFO)
        from noder_monai.workflows import jobs
        jobs.infer({datalist!r}, output_dir={out!r}, num_threads=1)
        jobs.evaluate({datalist!r}, output_dir={out!r}, eval_dir={ev!r}, num_threads=1, montage=False)
    """))
    rest = torchrun(str(script))
    return {"root": root, "datalist": datalist, "out": out, "eval": ev, "fit": fit, "rest": rest,
            "ids": [entry.id for entry in load_datalist(datalist)]}


def test_every_subject_fitted_exactly_once_across_two_ranks(cohort):
    shares = []
    for rank in (0, 1):
        with open(os.path.join(cohort["out"], ".cohort", f"training_rank{rank}.json")) as handle:
            shares.append(json.load(handle)["records"])
    worked = [sorted(k for k, v in share.items() if v["status"] in ("done", "failed")) for share in shares]
    assert all(worked), f"a rank did nothing: {worked}"
    assert not set(worked[0]) & set(worked[1])
    assert sorted(worked[0] + worked[1]) == cohort["ids"]
    for rank, share in enumerate(shares):  # the marker of each fitted subject names the rank that fitted it
        for subject_id, record in share.items():
            if record["status"] == "done":
                marker = markers.read_marker(os.path.join(cohort["out"], subject_id), "training")
                assert marker["record"]["rank"] == rank and marker["record"]["epochs"] == 2


def test_report_pages_are_drawn_once_each_and_the_index_by_rank_zero(cohort):
    good = [i for i in cohort["ids"] if i != "sub-003"]
    drawn = re.findall(r"(sub-\d+): report -> ", cohort["fit"].stderr)
    assert sorted(drawn) == good, drawn  # each page once, by one of the two ranks
    assert cohort["fit"].stdout.count("report:      ") == 1
    for subject_id in good:
        assert os.path.getsize(os.path.join(cohort["out"], subject_id, "report.html")) > 1000
    with open(os.path.join(cohort["out"], "report.html"), encoding="utf-8") as handle:
        index = handle.read()
    assert all(f'href="{i}/report.html"' in index for i in good) and "sub-003: not fitted" in index


def test_corrupt_scan_is_listed_as_failed_while_the_others_finish(cohort):
    assert cohort["fit"].returncode != 0, cohort["fit"].stderr[-2000:]
    assert "1 subject(s) failed: sub-003" in cohort["fit"].stderr
    with open(os.path.join(cohort["out"], "cohort_summary_training.json")) as handle:
        summary = json.load(handle)
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 1, "locked": 0}
    assert [f["id"] for f in summary["failed"]] == ["sub-003"] and "cannot be read" in summary["failed"][0]["error"]
    with open(summary["failed"][0]["traceback"]) as handle:
        assert "Traceback" in handle.read()
    assert not os.path.exists(os.path.join(cohort["out"], "sub-003", "model.pt"))
    assert sorted(summary["records"]) == cohort["ids"]


def test_merged_csvs_hold_one_row_per_subject_and_time(cohort):
    assert cohort["rest"].returncode == 0, cohort["rest"].stderr[-3000:]
    assert "inference: 4 done, 1 failed" in cohort["rest"].stderr
    good = [i for i in cohort["ids"] if i != "sub-003"]
    metrics = read_csv(os.path.join(cohort["eval"], "cohort_metrics.csv"))
    assert sorted((row["subject"], float(row["time"])) for row in metrics) == [(i, t) for i in good for t in (1.5, 3.0)]
    assert all(0 < float(row["nrmse"]) < 2 and row["split"] in ("interpolation", "extrapolation") for row in metrics)
    volumes = read_csv(os.path.join(cohort["out"], "cohort_label_volumes.csv"))
    assert sorted((row["subject"], float(row["time"])) for row in volumes) == [(i, t) for i in good for t in (1.5, 3.0)]
    assert all(float(row["volume_mm3_label1"]) > 0 for row in volumes)
    with open(os.path.join(cohort["eval"], "metrics.json")) as handle:
        assert json.load(handle)["overall"]["count"] == 8


def test_two_machines_share_the_cohort_with_torchrun_nnodes(tmp_path):
    """`torchrun --nnodes=2`, one launcher per "machine" (both on this one, static rendezvous, one process each,
    one shared output folder): every subject is fitted once, each node fits some, node 0 writes the summary."""
    import socket

    datalist = write_cohort(tmp_path / "data", 4)
    out = str(tmp_path / "out")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                          f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                          "-m", "noder_monai.cli", "fit", datalist, "--output_dir", out, "--pretrained", "None",
                          "--noprogress", "--noreport", "--threads", "1", *FIT],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        for node in (0, 1)
    ]
    finished = [launcher.communicate(timeout=300) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [err[-2000:] for _, err in finished]
    with open(os.path.join(out, "cohort_summary_training.json")) as handle:
        summary = json.load(handle)
    assert summary["world_size"] == 2 and summary["counts"]["done"] == 4
    assert sorted(record["rank"] for record in summary["records"].values()) == [0, 0, 1, 1]
    assert "outputs:" in finished[0][0]


def test_killed_run_resumes_and_leaves_finished_subjects_untouched(tmp_path):
    datalist = write_cohort(tmp_path / "data", 4)
    out = str(tmp_path / "out")
    # the first run dies (os._exit, as a kill) after writing sub-003's model and files, before its done-marker
    killer = textwrap.dedent(f"""
        import os
        from noder_monai.workflows import jobs
        original = jobs.train_subject
        def dying(entry, *args, **kwargs):
            record = original(entry, *args, **kwargs)
            if entry.id == "sub-003":
                os._exit(9)
            return record
        jobs.train_subject = dying
        jobs.train({datalist!r}, output_dir={out!r}, fit={TINY!r}, pretrained=None, progress=False, num_threads=1)
    """)
    killed = subprocess.run([sys.executable, "-c", killer], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9
    assert os.path.isfile(os.path.join(out, "sub-003", "model.pt"))
    assert markers.read_marker(os.path.join(out, "sub-003"), "training") is None
    assert not os.path.exists(os.path.join(out, "sub-004"))
    before = {sid: tree(os.path.join(out, sid)) for sid in ("sub-001", "sub-002")}
    records = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    assert {k: v["status"] for k, v in records.items()} == {
        "sub-001": "skipped", "sub-002": "skipped", "sub-003": "done", "sub-004": "done"}
    for sid in ("sub-001", "sub-002"):
        assert tree(os.path.join(out, sid)) == before[sid]
    with open(os.path.join(out, "cohort_summary_training.json")) as handle:  # the resumed run's has every subject
        assert sorted(json.load(handle)["records"]) == ["sub-001", "sub-002", "sub-003", "sub-004"]


def test_changed_scan_or_config_redoes_and_a_held_lock_is_respected(tmp_path):
    datalist = write_cohort(tmp_path / "data", 2)
    out = str(tmp_path / "out")
    first = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    assert [v["status"] for v in first.values()] == ["done", "done"]
    data = tmp_path / "data"  # sub-002's second scan replaced by another one on the same grid
    (data / "sub-002" / "t1.0.nii.gz").write_bytes((data / "sub-001" / "t1.0.nii.gz").read_bytes())
    second = jobs.train(datalist, output_dir=out, fit=TINY, pretrained=None, progress=False, num_threads=1)
    assert {k: v["status"] for k, v in second.items()} == {"sub-001": "skipped", "sub-002": "done"}
    with markers.subject_lock(os.path.join(out, "sub-001"), "training") as held:
        assert held
        third = jobs.train(datalist, output_dir=out, fit={**TINY, "epochs": 3}, pretrained=None, progress=False,
                           num_threads=1)
    assert {k: v["status"] for k, v in third.items()} == {"sub-001": "locked", "sub-002": "done"}
    assert third["sub-002"]["epochs"] == 3
    fourth = jobs.train(datalist, output_dir=out, fit={**TINY, "epochs": 3}, pretrained=None, progress=False,
                        num_threads=1)
    assert {k: v["status"] for k, v in fourth.items()} == {"sub-001": "done", "sub-002": "skipped"}


def test_shares_are_disjoint_complete_and_balanced_by_cost():
    subjects = [types_entry(f"s{k}") for k in range(7)]
    costs = [100, 90, 10, 10, 10, 10, 5]
    parts = [shares.partition_subjects(subjects, rank, 2, costs) for rank in (0, 1)]
    ids = [[s.id for s in share] for share in parts]
    assert sorted(ids[0] + ids[1]) == sorted(s.id for s in subjects) and not set(ids[0]) & set(ids[1])
    totals = [sum(costs[int(i[1:])] for i in share) for share in ids]
    assert abs(totals[0] - totals[1]) <= 20 and ids[0][0] == "s0" and ids[1][0] == "s1"
    with pytest.raises(ValueError, match="rank must be in"):
        shares.partition_subjects(subjects, 2, 2, costs)


def types_entry(name):
    from noder_monai.data import SubjectEntry

    return SubjectEntry(name, [("a", 0.0), ("b", 1.0)])


def test_rank_device_and_threads_follow_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert str(shares.rank_device("cpu")) == "cpu" and str(shares.rank_device("cuda:0")) == "cuda:0"
    assert shares.rank_threads(3) == 3 and shares.rank_threads() >= 1
    current = []
    monkeypatch.setattr(shares.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shares.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(shares.torch.cuda, "set_device", current.append)
    assert str(shares.rank_device()) == "cuda:1" and str(shares.rank_device("cuda")) == "cuda:1"
    assert str(shares.rank_device("cuda:0")) == "cuda:0" and str(shares.rank_device("cpu")) == "cpu"
    assert [str(d) for d in current] == ["cuda:1", "cuda:1", "cuda:0"]  # each rank's CUDA device made current
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        shares.dist_env()


def test_check_subject_names_mixed_grids_and_nothing_is_kept_from_finished_subjects(tmp_path):
    import gc

    import torch

    from noder_monai.model import FittedSubject

    datalist = write_cohort(tmp_path / "data", 2)
    entries = load_datalist(datalist)
    assert entries[0].check_files() == 16 * 16 * 3 == entries[0].cost()
    write_cohort(tmp_path / "other", 1, size=12)
    os.replace(tmp_path / "other" / "sub-001" / "t2.0.nii.gz", tmp_path / "data" / "sub-001" / "t2.0.nii.gz")
    with pytest.raises(ValueError, match="subject 'sub-001': files have different grids"):
        entries[0].check_files()

    def alive():
        gc.collect()
        return sum(isinstance(o, (FittedSubject, torch.nn.Module)) for o in gc.get_objects())

    before = alive()
    records = jobs.train(datalist, output_dir=tmp_path / "out", fit=TINY, pretrained=None, progress=False,
                         num_threads=1)
    assert [r["status"] for r in records.values()] == ["failed", "done"]
    assert alive() == before  # no network or fitted subject survives its subject
