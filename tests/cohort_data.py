"""Tiny 2D cohorts for the cohort tests: a bright disc that grows over time, a label map, held-out scans."""

import json
import os

import nibabel as nib
import numpy as np


def write_cohort(directory, n_subjects=4, size=16, corrupt=(), sizes=None):
    """Write ``n_subjects`` 2D subjects (3 scans at t=0,1,2, held-out t=1.5 and 3, a label) and their datalist.

    ``corrupt``: ids whose second scan is garbage bytes; ``sizes``: per-subject grid edge (default ``size``).
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    subjects = []
    for k in range(n_subjects):
        sid = f"sub-{k + 1:03d}"
        edge = (sizes or [size] * n_subjects)[k]
        yy, xx = np.mgrid[:edge, :edge]
        rng = np.random.default_rng(k)

        def scan(t):
            radius = edge * (0.2 + 0.04 * t) + k * 0.1
            disc = ((yy - edge / 2) ** 2 + (xx - edge / 2) ** 2 <= radius ** 2).astype(np.float32)
            return 100 * disc + rng.normal(0, 1, (edge, edge)).astype(np.float32)

        def save(array, name, dtype=np.float32):
            path = os.path.join(directory, sid, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            nib.save(nib.Nifti1Image(array.astype(dtype), np.diag([1.5, 1.5, 1.0, 1.0])), path)
            return f"{sid}/{name}"

        scans = [{"image": save(scan(t), f"t{t}.nii.gz"), "time": t} for t in (0.0, 1.0, 2.0)]
        heldout = [{"image": save(scan(t), f"held_t{t}.nii.gz"), "time": t} for t in (1.5, 3.0)]
        label = save((scan(0.0) > 50).astype(np.uint8), "label.nii.gz", np.uint8)
        if sid in corrupt:
            with open(os.path.join(directory, scans[1]["image"]), "wb") as handle:
                handle.write(b"\x1f\x8b this is not a gzip stream" * 10)
        subjects.append({"id": sid, "scans": scans, "heldout": heldout, "label": label, "predict_times": [1.5, 3.0]})
    path = os.path.join(directory, "datalist.json")
    with open(path, "w") as handle:
        json.dump({"subjects": subjects}, handle)
    return path
