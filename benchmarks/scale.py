"""Fit cost against image size: time per level and per epoch, peak memory, prediction time and held-out accuracy.

One brain subject per size: the Colin27 T1 head (full resolution, ``/usr/share/mricron/templates/ch2.nii.gz`` of
Debian's ``mricron-data``, BSD-3-Clause; without it the shipped 64^3 volume upsampled, which has less detail and is
flagged in the table's header) padded to the size's aspect ratio and resampled to the size, deformed by
``synthetic_sequence(kind="brain", local=2)`` with Rician noise 3 % (``benchmarks/accuracy.py``'s brain protocol):
six visits observed over 6.5 years (0, 1, 2.2, 3.5, 5, 6.5), held out 1.6 and 4.2 (between visits) and 7.5 (after).
Accuracy is NRMSE against the noise-free truth, next to linear intensity interpolation of the noisy scans.

Every fit runs in a fresh process (its peak memory is its own; the data it fits are loaded first and counted), the
subjects are made once per size in another process and cached under ``--cache``. Per run: fit seconds (wall clock
and CPU time of the process, all threads; on a machine shared with other jobs CPU time is the steadier measure), CPU
seconds of the first epoch (set-up included) and per later epoch at each level (1/4, 1/2, full resolution), peak
resident memory of the process during the fit (``VmHWM``, reset before the fit through ``/proc/self/clear_refs``) and
the fit's own part of it (the peak minus the memory in use when the fit starts, next to the package's estimate,
``noder_monai.engines.memory``; with ``--device cuda`` also ``torch.cuda.max_memory_allocated``), prediction
seconds per time point (image, field and Jacobian map) and the prediction's own peak, NRMSE between visits and after
the last. The table ends with the fitted exponent ``a`` of ``cost ~ voxels^a`` over the sizes.

``--compare-tree DIR`` also fits with the package of another source tree (``git archive <commit> | tar -x -C DIR``)
at its own defaults, alternating the two in fresh processes, and prints the ratios of fit time and peak memory: the
way to compare versions on a shared machine. ``--variants`` adds fits of this tree with other ``FitConfig`` settings
(JSON objects, e.g. ``'{"similarity_voxels": null}'``), in the same alternation.

    python benchmarks/scale.py [--sizes 64 96 128 144x176x144 182x218x182] [--epochs 30] [--threads 2]
        [--device cpu] [--repeats 1] [--compare-tree DIR] [--variants JSON ...] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_SIZES = ("64", "96", "128", "144x176x144", "182x218x182")
COLIN27 = "/usr/share/mricron/templates/ch2.nii.gz"
OBSERVED_TIMES = (0.0, 1.0, 2.2, 3.5, 5.0, 6.5)
HELDOUT_TIMES = {"interpolation": (1.6, 4.2), "extrapolation": (7.5,)}
NOISE, LOCAL = 0.03, 2.0
LEVEL_COLUMNS = (4, 2, 1)
COLUMNS = (
    "size", "voxels", "tree", "epochs", "fit_s", "fit_cpu_s", "first_epoch_s", "s_per_epoch_level_4",
    "s_per_epoch_level_2", "s_per_epoch_level_1", "peak_rss_gb", "fit_peak_gb", "estimate_gb", "cuda_peak_gb",
    "predict_s", "predict_peak_gb", "nrmse_interpolation", "nrmse_extrapolation", "linear_nrmse_interpolation",
    "linear_nrmse_extrapolation",
)
"""Keys of every result record (``cuda_peak_gb`` is NaN on the CPU)."""


def parse_size(text: str) -> tuple[int, int, int]:
    """``"144"`` -> (144, 144, 144); ``"144x176x144"`` -> (144, 176, 144). Raises ValueError naming the text."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) < 8:
        raise ValueError(f"--sizes: {text!r} is not N or NxNxN with every N >= 8.")
    return tuple(values)


def anatomy(shape: Sequence[int], source: str | None = COLIN27) -> tuple[Any, str]:
    """The Colin27 head (``source``, or the shipped 64^3 volume when it is missing) padded to the aspect ratio of
    ``shape`` and resampled to it: ``((1, *shape) float32, description)``."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Resize, SpatialPad

    if source is not None and os.path.isfile(source):
        from noder_monai.io import load_image

        volume, _ = load_image(source, reader="nibabel")
        described = f"Colin27 at full resolution ({source})"
    else:
        from noder_monai.data import demo_volume

        volume, _ = demo_volume(64)
        described = f"the shipped 64^3 Colin27 volume upsampled ({source} not found: apt-get install mricron-data)"
    volume = (volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)).float()
    scale = min(t / s for t, s in zip(shape, volume.shape[1:]))
    padded = [max(s, round(t / scale)) for t, s in zip(shape, volume.shape[1:])]
    volume = SpatialPad(padded, method="symmetric")(volume)
    mode = "area" if all(t <= s for t, s in zip(shape, volume.shape[1:])) else "trilinear"
    resized = Resize(tuple(shape), mode=mode)(volume)
    return (resized.as_tensor() if isinstance(resized, MetaTensor) else resized).contiguous(), described


def make_subject(shape: Sequence[int], path: str, source: str | None = COLIN27) -> None:
    """Write the subject of ``shape`` to ``path`` (torch file): observed scans and times, held-out truth and times,
    linear interpolation's NRMSE per split, and what the anatomy is."""
    import torch

    from noder_monai.baselines import linear_interpolation
    from noder_monai.data import synthetic_sequence
    from noder_monai.metrics import nrmse

    base, described = anatomy(shape, source)
    heldout = [t for split in HELDOUT_TIMES.values() for t in split]
    times = sorted(set(OBSERVED_TIMES) | set(heldout))
    truth = synthetic_sequence(spatial_dims=3, times=times, kind="brain", noise=NOISE, noise_model="rician", seed=0,
                               base_image=base, amplitude=1.0, local=LOCAL)
    observed = [times.index(t) for t in OBSERVED_TIMES]
    subject = {"images": truth.images[observed].clone(), "times": list(OBSERVED_TIMES), "anatomy": described}
    for split, split_times in HELDOUT_TIMES.items():
        index = [times.index(t) for t in split_times]
        subject[f"truth_{split}"] = truth.clean[index].clone()
        linear = linear_interpolation(subject["images"], torch.tensor(OBSERVED_TIMES), torch.tensor(split_times))
        subject[f"linear_nrmse_{split}"] = float(nrmse(linear, subject[f"truth_{split}"]).mean())
    torch.save(subject, path + ".part")
    os.replace(path + ".part", path)


def _peak_rss_gb() -> float:
    """This process's peak resident memory (``VmHWM``) since start or the last :func:`_reset_peak_rss`, in GB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return math.nan


def _reset_peak_rss() -> None:
    """Start a new ``VmHWM`` peak at the current resident size (Linux ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass  # the peak then counts from the process start


def fit_once(job: dict) -> dict:
    """One fit and prediction of a cached subject (``job``: path, tree, epochs, threads, device, settings: other
    ``FitConfig`` fields); a result record.

    With ``job["tree"]`` the package is imported from that source tree (run it in a fresh process)."""
    if job.get("tree"):
        sys.path.insert(0, job["tree"])
    import torch

    from noder_monai.data import SubjectSequence
    from noder_monai.engines import FitConfig, fit_sequence
    from noder_monai.metrics import nrmse

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    cuda = device.type == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    subject = torch.load(job["path"], weights_only=True)
    sequence = SubjectSequence.from_tensors(subject["images"], subject["times"], subject="scale")
    shape = tuple(sequence.spatial_size)
    stamps: list[tuple[int, float, float]] = []
    _reset_peak_rss()
    start_rss = _peak_rss_gb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = now(), time.process_time()
    config = FitConfig(epochs=job["epochs"], **job.get("settings", {}))
    fitted = fit_sequence(sequence, config, device=device, seed=0, progress=False,
                          callback=lambda record: stamps.append((int(record["level"]), now(), time.process_time())))
    fit_s, fit_cpu_s = now() - start, time.process_time() - cpu_start
    record: dict[str, Any] = {
        "size": "x".join(map(str, shape)), "voxels": math.prod(shape), "tree": _label(job),
        "epochs": len(stamps), "fit_s": fit_s, "fit_cpu_s": fit_cpu_s, "peak_rss_gb": _peak_rss_gb(),
        "fit_peak_gb": _peak_rss_gb() - start_rss, "estimate_gb": _estimate_gb(shape, len(sequence.images), config),
        "cuda_peak_gb": torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else math.nan,
    }
    record["first_epoch_s"] = stamps[0][2] - cpu_start if stamps else math.nan
    previous = stamps[0][2] if stamps else cpu_start
    durations: dict[int, list[float]] = {}
    for level, _, stamp in stamps[1:]:
        durations.setdefault(level, []).append(stamp - previous)
        previous = stamp
    for level in LEVEL_COLUMNS:
        spent = durations.get(level)
        record[f"s_per_epoch_level_{level}"] = sum(spent) / len(spent) if spent else math.nan
    _reset_peak_rss()
    queries = [t for split in HELDOUT_TIMES.values() for t in split]
    start = now()
    prediction = fitted.predict(queries)
    record["predict_s"] = (now() - start) / len(queries)
    record["predict_peak_gb"] = _peak_rss_gb()
    first = 0
    for split, split_times in HELDOUT_TIMES.items():
        images = prediction.images[first:first + len(split_times)]
        first += len(split_times)
        record[f"nrmse_{split}"] = float(nrmse(images, subject[f"truth_{split}"]).mean())
        record[f"linear_nrmse_{split}"] = subject[f"linear_nrmse_{split}"]
    return record


def _estimate_gb(shape: Sequence[int], scans: int, config: Any) -> float:
    """The package's estimate of the fit's own peak (``noder_monai.engines.memory``), NaN for a tree without one."""
    try:
        from noder_monai.engines.levels import similarity_region_voxels
        from noder_monai.engines.memory import fit_memory_estimate
    except ImportError:
        return math.nan
    region = similarity_region_voxels(shape, config.similarity_voxels, config.ncc_kernel_size // 2)
    return fit_memory_estimate(shape, scans, region, config.source) / 2**30


def _label(job: dict) -> str:
    """The table's name of a job: its tree (or "this tree") and its settings, if any."""
    label = job.get("tree") or "this tree"
    return label + (f" {json.dumps(job['settings'])}" if job.get("settings") else "")


def _in_fresh_process(function: Callable, argument: Any) -> Any:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, (argument,))


def run(
    sizes: Sequence[str],
    epochs: int = 30,
    threads: int = 2,
    device: str = "cpu",
    trees: Sequence[str | None | dict] = (None,),
    repeats: int = 1,
    cache: str | None = None,
    fresh_processes: bool = True,
    source: str | None = COLIN27,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict[str, str]]:
    """Fit every size with every tree (None: this one; a dict: this one with those ``FitConfig`` settings),
    alternating trees within each repeat.

    Returns:
        (records, anatomy per size): one record per fit with the keys :data:`COLUMNS`.
    """
    call = _in_fresh_process if fresh_processes else (lambda function, argument: function(argument))
    folder = Path(cache or os.path.join(tempfile.gettempdir(), "noder-scale-cache"))
    folder.mkdir(parents=True, exist_ok=True)
    records, anatomies = [], {}
    for text in sizes:
        shape = parse_size(text)
        origin = "colin27" if source is not None and os.path.isfile(source) else "demo64"
        path = str(folder / f"brain_{'x'.join(map(str, shape))}_{origin}.pt")
        if not os.path.isfile(path):
            call(_make_subject_job, (shape, path, source))
        anatomies["x".join(map(str, shape))] = _anatomy_of(path)
        for _ in range(repeats):
            for tree in trees:
                job = {"path": path, "epochs": epochs, "threads": threads, "device": device}
                job.update({"settings": tree} if isinstance(tree, dict) else {"tree": tree})
                record = call(fit_once, job)
                records.append(record)
                if log is not None:
                    log(f"{record['size']} {record['tree']}: fit {record['fit_s']:.1f} s, peak "
                        f"{record['peak_rss_gb']:.2f} GB, NRMSE {record['nrmse_interpolation']:.4f} / "
                        f"{record['nrmse_extrapolation']:.4f}")
    return records, anatomies


def _make_subject_job(arguments: tuple) -> None:
    make_subject(*arguments)


def _anatomy_of(path: str) -> str:
    import torch

    return torch.load(path, weights_only=True)["anatomy"]


def exponent(voxels: Sequence[float], costs: Sequence[float]) -> float:
    """Least-squares slope of log(cost) against log(voxels): ``a`` in ``cost ~ voxels^a`` (NaN under 2 sizes)."""
    points = [(math.log(v), math.log(c)) for v, c in zip(voxels, costs) if c > 0 and math.isfinite(c)]
    if len({x for x, _ in points}) < 2:
        return math.nan
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def summarise(records: Sequence[dict]) -> list[dict]:
    """Median over repeats per (size, tree), in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["size"], record["tree"]), []).append(record)
    rows = []
    for runs in groups.values():
        row = dict(runs[0])
        for key in COLUMNS:
            if isinstance(row[key], float):
                values = [run[key] for run in runs]
                row[key] = statistics.median(values) if all(math.isfinite(v) for v in values) else math.nan
        row["runs"] = len(runs)
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict], header: str) -> str:
    """The table, the ratios against the first other tree per size, and the exponents per tree."""
    def cell(value: Any, digits: int) -> str:
        return "-" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}f}"

    lines = [header, "", "| size | voxels | tree | epochs | fit s | fit CPU s | first epoch CPU s | "
             "CPU s/epoch at 1/4 | at 1/2 | at full | peak RSS GB | fit's own peak GB | its estimate GB | "
             "CUDA peak GB | predict s per time | predict peak GB | NRMSE interp | NRMSE extrap | linear interp. "
             "NRMSE interp | extrap |", "|" + "---|" * 20]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['voxels']} | {row['tree']} | {row['epochs']} | {cell(row['fit_s'], 1)} | "
            f"{cell(row['fit_cpu_s'], 1)} | {cell(row['first_epoch_s'], 1)} | "
            + " | ".join(cell(row[f"s_per_epoch_level_{level}"], 3) for level in LEVEL_COLUMNS)
            + f" | {cell(row['peak_rss_gb'], 2)} | {cell(row['fit_peak_gb'], 2)} | {cell(row['estimate_gb'], 2)} | "
            f"{cell(row['cuda_peak_gb'], 2)} | {cell(row['predict_s'], 2)} | "
            f"{cell(row['predict_peak_gb'], 2)} | {cell(row['nrmse_interpolation'], 4)} | "
            f"{cell(row['nrmse_extrapolation'], 4)} | {cell(row['linear_nrmse_interpolation'], 4)} | "
            f"{cell(row['linear_nrmse_extrapolation'], 4)} |"
        )
    trees = list(dict.fromkeys(row["tree"] for row in rows))
    if len(trees) > 1:
        reference = trees[-1]
        lines += ["", f"Ratios to {reference} (same run):", "", "| size | tree | fit time | fit CPU time | peak RSS "
                  "| NRMSE interp | NRMSE extrap |", "|---|---|---|---|---|---|---|"]
        for size in dict.fromkeys(row["size"] for row in rows):
            theirs = next((r for r in rows if r["size"] == size and r["tree"] == reference), None)
            for ours in (r for r in rows if r["size"] == size and r["tree"] != reference and theirs is not None):
                lines.append(f"| {size} | {ours['tree']} | " + " | ".join(
                    cell(ours[key] / theirs[key], 2)
                    for key in ("fit_s", "fit_cpu_s", "peak_rss_gb", "nrmse_interpolation", "nrmse_extrapolation"))
                    + " |")
    lines += ["", "Fitted exponent a of cost ~ voxels^a over the sizes:", "",
              "| tree | fit time | fit CPU time | CPU s/epoch at full resolution | peak RSS | predict s |",
              "|---|---|---|---|---|---|"]
    for tree in trees:
        mine = [row for row in rows if row["tree"] == tree]
        voxels = [row["voxels"] for row in mine]
        lines.append(f"| {tree} | " + " | ".join(
            cell(exponent(voxels, [row[key] for row in mine]), 2)
            for key in ("fit_s", "fit_cpu_s", "s_per_epoch_level_1", "peak_rss_gb", "predict_s")) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="N or NxNxN per size")
    parser.add_argument("--epochs", type=int, default=30,
                        help="epochs of each fit (FitConfig.epochs; the level fractions are kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set to the number of idle cores)")
    parser.add_argument("--device", default="cpu", help="torch device of the fits (e.g. cuda)")
    parser.add_argument("--repeats", type=int, default=1, help="fits per size and tree; medians are reported")
    parser.add_argument("--compare-tree", default=None, help="also fit with the package of this source tree")
    parser.add_argument("--variants", nargs="*", default=[], type=json.loads,
                        help="more fits of this tree with these FitConfig settings (JSON objects)")
    parser.add_argument("--cache", default=None, help="folder of the generated subjects (default: a temp folder)")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="also write every record here")
    args = parser.parse_args(argv)
    for size in args.sizes:
        parse_size(size)
    trees = [None] + list(args.variants) + ([os.path.abspath(args.compare_tree)] if args.compare_tree else [])
    load_before, started = os.getloadavg(), time.perf_counter()
    records, anatomies = run(args.sizes, args.epochs, args.threads, args.device, trees, args.repeats, args.cache,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    header = (
        f"## scale: {len(OBSERVED_TIMES)} scans, {args.epochs} epochs (FitConfig's level fractions), "
        f"{args.threads} thread(s), {args.device}, median of {args.repeats} run(s)\n\nAnatomy: "
        + "; ".join(f"{size}: {described}" for size, described in anatomies.items())
        + f".\nLoad average {' '.join(f'{v:.2f}' for v in load_before)} at the start, "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; {time.perf_counter() - started:.0f} s in all."
    )
    text = markdown(summarise(records), header)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n", encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
