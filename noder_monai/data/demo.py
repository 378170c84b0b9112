"""The shipped demo volume (Colin27 T1, downsampled) and a synthetic longitudinal demo dataset built on it.

The assets in ``noder_monai/data/assets`` are derived from ``templates/ch2.nii.gz`` and ``templates/ch2bet.nii.gz`` of
Debian's ``mricron-data`` package (BSD-3-Clause, see ``bundle/docs/data_license.txt``) by :func:`build_demo_assets`:

- ``colin27_64.nii.gz``: the head's bounding box (voxels above 20), padded symmetrically to a cube, area-averaged to
  64^3 isotropic voxels (about 3.4 mm), rounded to uint8 (the source's intensity units, 0-255).
- ``colin27_64_labels.nii.gz``: a coarse tissue map made by intensity thresholds: 0 background and non-brain (outside
  the ``ch2bet`` brain mask), 1 CSF-like, 2 grey-like, 3 white-like (three-class k-means thresholds of the T1
  intensities inside the brain mask), resampled with the image (area-averaged one-hot, arg-max).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import CropForeground, Resize, SpatialPad

from noder_monai.data.datalist import load_datalist
from noder_monai.data.synthetic import synthetic_sequence
from noder_monai.io import load_image, save_image
from noder_monai.utils import PathLike, write_json

__all__ = [
    "ASSET_DIR",
    "DEMO_HELDOUT_TIMES",
    "DEMO_PREDICT_TIMES",
    "DEMO_TIMES",
    "build_demo_assets",
    "demo_labels",
    "demo_volume",
    "make_demo_dataset",
]

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ASSET_SIZE = 64
IMAGE_ASSET = "colin27_64.nii.gz"
LABEL_ASSET = "colin27_64_labels.nii.gz"
LABEL_CLASSES = 4  # background / CSF-like / grey-like / white-like
HEAD_THRESHOLD = 20.0

#: Visit times (years) of a demo subject; DEMO_HELDOUT_TIMES are kept out of the fit (two between visits, one after).
DEMO_TIMES = (0.0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0)
DEMO_HELDOUT_TIMES = (2.1, 4.4, 7.0)
DEMO_PREDICT_TIMES = (1.0, 2.1, 4.4, 7.0, 8.0)


def _kmeans_thresholds(values: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Two thresholds separating three intensity classes (1D k-means started at the 10/50/90th percentiles)."""
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assignment = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[assignment == k].mean() for k in range(3)])
    return float(centres[0] + centres[1]) / 2, float(centres[1] + centres[2]) / 2


def _one_hot(label: torch.Tensor) -> torch.Tensor:
    """``(1, *S)`` integer labels -> ``(LABEL_CLASSES, *S)`` float32."""
    return torch.nn.functional.one_hot(label[0].long(), LABEL_CLASSES).movedim(-1, 0).float()


def build_demo_assets(
    source_dir: PathLike = "/usr/share/mricron/templates", directory: PathLike = ASSET_DIR
) -> tuple[str, str]:
    """Rebuild the demo assets from Debian ``mricron-data`` (``apt-get install mricron-data``).

    Args:
        source_dir: folder holding ``ch2.nii.gz`` (Colin27 T1 with scalp) and ``ch2bet.nii.gz`` (brain only).
        directory: where ``colin27_64.nii.gz`` and ``colin27_64_labels.nii.gz`` are written.

    Returns:
        ``(image_path, label_path)``.

    Raises:
        FileNotFoundError: a source file is missing.
    """
    head, affine = load_image(os.path.join(source_dir, "ch2.nii.gz"), reader="nibabel")
    brain, _ = load_image(os.path.join(source_dir, "ch2bet.nii.gz"), reader="nibabel")
    inside = brain[0] > 0
    low, high = _kmeans_thresholds(head[0][inside].numpy().astype(np.float64))
    tissue = 1 + (head[0] > low).long() + (head[0] > high).long()
    label = torch.where(inside, tissue, torch.zeros_like(tissue))[None]
    stacked = MetaTensor(torch.cat([head, _one_hot(label)]), affine=affine)
    cropped = CropForeground(select_fn=lambda x: x > HEAD_THRESHOLD, channel_indices=0, allow_smaller=True)(stacked)
    cube = SpatialPad(spatial_size=(max(cropped.shape[1:]),) * 3, method="symmetric")(cropped)
    small = Resize((ASSET_SIZE,) * 3, mode="area")(cube)
    os.makedirs(directory, exist_ok=True)
    image_path = save_image(
        small[:1].clamp(0, 255).as_tensor(), small.affine, os.path.join(directory, IMAGE_ASSET), dtype=np.uint8
    )
    label_path = save_image(
        small[1:].argmax(0, keepdim=True).as_tensor(),
        small.affine,
        os.path.join(directory, LABEL_ASSET),
        dtype=np.uint8,
    )
    return image_path, label_path


def _resized(name: str, size: int, labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}.")
    data, affine = load_image(os.path.join(ASSET_DIR, name), reader="nibabel")
    volume = MetaTensor(_one_hot(data) if labels else data, affine=affine)
    if size != ASSET_SIZE:
        volume = Resize((size,) * 3, mode="area" if size < ASSET_SIZE else "trilinear")(volume)
    result = volume.argmax(0, keepdim=True) if labels else volume
    return result.as_tensor().contiguous(), torch.as_tensor(np.asarray(volume.affine), dtype=torch.float64)


def demo_volume(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped Colin27 T1 head, resampled to ``size^3`` voxels covering the same field of view.

    Args:
        size: edge length in voxels (>= 8); 64 is the stored resolution, smaller sizes are area-averaged, larger
            ones trilinearly interpolated.

    Returns:
        ``(image, affine)``: image ``(1, size, size, size)`` float32 in the source's intensity units (0-255),
        affine ``(4, 4)`` float64 voxel-to-world (RAS, mm).
    """
    return _resized(IMAGE_ASSET, size, labels=False)


def demo_labels(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse tissue labels of :func:`demo_volume` on the same grid.

    Args:
        size: edge length in voxels (>= 8).

    Returns:
        ``(labels, affine)``: labels ``(1, size, size, size)`` int64 (0 background and non-brain, 1 CSF-like,
        2 grey-like, 3 white-like), affine ``(4, 4)`` float64 equal to :func:`demo_volume`'s.
    """
    return _resized(LABEL_ASSET, size, labels=True)


def _existing_generator(path: str) -> dict | None:
    """The ``generator`` record of a complete datalist at ``path`` (all files present), else ``None``."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle).get("generator")
        load_datalist(path)
    except (OSError, ValueError, AttributeError):
        return None
    return record


def _scan_entries(subject: str, folder: str, times: Sequence[float]) -> list[dict]:
    return [{"image": f"{subject}/{folder}/t{time:05.2f}.nii.gz", "time": float(time)} for time in times]


def make_demo_dataset(
    directory: PathLike, n_subjects: int = 2, size: int = 64, noise: float = 0.02, seed: int = 0
) -> str:
    """Write a synthetic longitudinal demo dataset on the Colin27 head, with its datalist.

    Subject ``k`` (``sub-001``, ``sub-002``, ...) is :func:`~noder_monai.data.synthetic.synthetic_sequence` of kind
    ``"brain"`` applied to :func:`demo_volume` with seed ``seed + k`` and deformation amplitude 1.0 (odd subjects)
    or 0.8 (even subjects), observed at :data:`DEMO_TIMES` except :data:`DEMO_HELDOUT_TIMES`, which are written as
    held-out scans. Per subject: ``scans/tTT.TT.nii.gz`` (float32), ``heldout/tTT.TT.nii.gz`` and ``label.nii.gz``
    (uint8, the baseline's tissue labels); ``predict_times`` is :data:`DEMO_PREDICT_TIMES`. All files are written
    atomically and the datalist last; when ``directory`` already holds a complete dataset made with the same
    arguments and times, nothing is rewritten.

    Args:
        directory: output folder (created if missing).
        n_subjects: number of subjects, >= 1.
        size: edge length of the grid in voxels (>= 8); the demo volume is resampled to it.
        noise: Gaussian noise standard deviation relative to the volume's intensity range.
        seed: base seed.

    Returns:
        Path of ``datalist.json`` in ``directory`` (format: :mod:`noder_monai.data.datalist`).
    """
    if not isinstance(n_subjects, int) or n_subjects < 1:
        raise ValueError(f"n_subjects must be an integer >= 1, got {n_subjects!r}.")
    directory = os.path.abspath(os.fspath(directory))
    datalist_path = os.path.join(directory, "datalist.json")
    generator = {
        "function": "noder_monai.data.make_demo_dataset",
        "arguments": {"n_subjects": n_subjects, "size": size, "noise": noise, "seed": seed},
        "times": {"visits": list(DEMO_TIMES), "heldout": list(DEMO_HELDOUT_TIMES), "predict": list(DEMO_PREDICT_TIMES)},
    }
    if _existing_generator(datalist_path) == generator:
        return datalist_path
    volume, affine = demo_volume(size)
    labels, _ = demo_labels(size)
    all_times = sorted(set(DEMO_TIMES) | set(DEMO_HELDOUT_TIMES))
    observed = [time for time in all_times if time not in DEMO_HELDOUT_TIMES]
    subjects = []
    for index in range(n_subjects):
        subject = f"sub-{index + 1:03d}"
        sequence = synthetic_sequence(
            spatial_dims=3,
            times=all_times,
            kind="brain",
            noise=noise,
            seed=seed + index,
            base_image=volume,
            base_label=labels,
            amplitude=1.0 if index % 2 == 0 else 0.8,
        )
        entry = {
            "id": subject,
            "scans": _scan_entries(subject, "scans", observed),
            "label": f"{subject}/label.nii.gz",
            "heldout": _scan_entries(subject, "heldout", DEMO_HELDOUT_TIMES),
            "predict_times": list(DEMO_PREDICT_TIMES),
        }
        for scan in entry["scans"] + entry["heldout"]:
            image = sequence.images[all_times.index(scan["time"])]
            save_image(image, affine, os.path.join(directory, scan["image"]))
        save_image(sequence.label, affine, os.path.join(directory, entry["label"]), dtype=np.uint8)
        subjects.append(entry)
    write_json({"generator": generator, "subjects": subjects}, datalist_path)
    return datalist_path
