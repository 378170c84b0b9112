"""Cohort scaling: wall time of `noder fit` over a small cohort with 1 and N processes under torchrun.

Makes ``--subjects`` demo subjects (the shipped Colin27 head, ``--size``^3, seven visits each) and fits them with
``torchrun --nproc_per_node=N -m noder_monai.cli fit`` for every N of ``--nproc`` into a fresh output folder, each
process with ``--threads`` torch threads (on GPUs each process uses ``cuda:LOCAL_RANK``: the same command runs on N
GPUs unchanged). Prints a markdown table: wall time, speed-up over the first N, mean fit seconds per subject and
the peak resident memory of each process (from ``cohort_summary_training.json``). Meaningful only on an otherwise idle
machine: processes x threads should equal the free cores.

    python benchmarks/cohort_scaling.py [--subjects 8] [--size 32] [--epochs 300] [--nproc 1,2] [--threads 1]
        [--workdir cohort_scaling] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def run(args: argparse.Namespace) -> list[dict]:
    from noder_monai.data import make_demo_dataset

    workdir = os.path.abspath(args.workdir)
    datalist = make_demo_dataset(os.path.join(workdir, "data"), n_subjects=args.subjects, size=args.size)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for nproc in [int(n) for n in str(args.nproc).split(",")]:
        output_dir = os.path.join(workdir, f"out_{nproc}")
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
                   "-m", "noder_monai.cli", "fit", datalist, "--output_dir", output_dir, "--threads",
                   str(args.threads), "--epochs", str(args.epochs), "--noprogress"]
        start = time.perf_counter()
        finished = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if finished.returncode != 0:
            raise RuntimeError(f"{nproc} process(es) failed:\n{finished.stderr[-3000:]}")
        with open(os.path.join(output_dir, "cohort_summary_training.json")) as handle:
            summary = json.load(handle)
        fits = [record["seconds"] for record in summary["records"].values() if record["status"] == "done"]
        rows.append({"processes": nproc, "subjects": len(fits), "wall_s": round(wall, 2),
                     "fit_s_per_subject": round(sum(fits) / len(fits), 2),
                     "peak_rss_mib": [summary["ranks"][str(r)]["peak_rss_mib"] for r in range(nproc)]})
    for row in rows:
        row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| processes | subjects | wall s | speed-up | fit s per subject | peak RSS per process (MiB) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['subjects']} | {row['wall_s']} | {row['speedup']}x | "
                     f"{row['fit_s_per_subject']} | {', '.join(str(m) for m in row['peak_rss_mib'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts, e.g. 1,2 or 1,4,8")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workdir", default="cohort_scaling")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
