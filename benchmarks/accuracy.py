"""Held-out accuracy over a matrix no single case can tune: anatomies x deformation scales x noise levels, 3D and 2D,
plus a speckle cine; NODER's default against every baseline, with the rules the default must meet checked per subject.

Cells (``--cases``, ``--scales``, ``--noises``; ``--subjects`` seeds per cell, default 3):

- anatomies (the case):
  - ``colin-3.4mm``: the shipped Colin27 head at 64^3 (about 3.4 mm voxels, smooth edges); visits 0, 1, 2.2, 3.5,
    5, 6.5 years observed, 1.6 and 4.2 held out between visits, 7.5 after the last;
  - ``colin-1.5mm``: Colin27 at its full 1 mm resolution (Debian ``mricron-data``, BSD-3-Clause), a 96 mm cube
    around the ventricles at 1.5 mm (64^3) whose truth is warped on a 0.75 mm grid and block-averaged
    (``synthetic_sequence(supersample=2)``), the detail of a 1-1.5 mm T1; visits 0, 2, 3, 4, 5, 6.5 years
    observed, 0.5 and 1 held out (early, where the first scan alone is nearly right) and 8 after;
  - ``cardiac``: the procedural chest phantom at 64^3, 9 of 12 frames of a cycle observed, frames 3 and 6 held out
    between and 11 after;
  - 2D: ``macaque-1mm`` (an axial slice of the INIA19 macaque T1 template of the same package, 96^2 at 1 mm, truth on
    its native 0.5 mm grid; the 1.5 mm Colin27 protocol) and ``cardiac-2d`` (the phantom at 128^2);
  - ``cine``: the 2D phantom at 128^2 with ultrasound-like speckle that moves with the tissue and decorrelates from
    frame to frame (11 of 15 frames observed, frames 3, 7, 11 between and 14 after), scored against the held-out
    frames themselves (the speckle is the signal);
- deformation scales: ``smooth`` (global atrophy-like or contraction-and-twist dynamics, about 4 voxels at most at
  64 voxels across, no local change) and ``fine`` (half that global motion plus local changes of 2.5 voxels with a
  Gaussian profile of 2 voxels, 3-6 voxels wide: ventricles that grow and hippocampus-like regions that shrink, or a
  thickening myocardium);
- noise: ``low`` and ``high``, Rician noise of 1% and 3% of the image range (cine: additive noise of 0.5% and 1.5%
  under the speckle).

Methods: ``NODER default`` (no preset: the appearance chosen per subject by leave-one-visit-out validation), the
three single appearance sources of the same fit (``NODER source baseline``, the first scan warped as in the paper;
``template``; ``nearest``), geodesic regression (linear dynamics), linear intensity interpolation and the nearest
scan. Per subject and split: NRMSE, SSIM, PSNR against the noise-free truth (``benchmarks/regression.py``'s
scoring), field error (mean distance in voxels to the true displacement over the foreground), % folded voxels,
edge sharpness (root-mean-square gradient magnitude of the prediction over the truth's foreground, as a
fraction of the truth's: below 1 is blur), fit and predict seconds. Rules checked per subject and split for ``NODER default``:
NRMSE below linear interpolation, the nearest scan and geodesic regression, no worse than the first-scan source,
and within 2% of the best single source (baseline, template, nearest); 0 % folded.

    python benchmarks/accuracy.py --threads 2 --json matrix.json --output matrix.md     # the whole matrix
    python benchmarks/accuracy.py --cases cardiac --scales fine --noises high --subjects 1
    python benchmarks/accuracy.py --merge part1.json part2.json --output matrix.md       # tables of saved runs
    python benchmarks/accuracy.py --quick                                               # tiny: what the tests run

The Colin27 1 mm and macaque anatomies need ``apt-get install mricron-data`` (``/usr/share/mricron/templates``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regression  # noqa: E402
from regression import SPLITS, MethodOutput, Subject  # noqa: E402

from noder_monai.data import SubjectSequence, demo_volume, synthetic_sequence  # noqa: E402
from noder_monai.engines import FitConfig, fit_sequence  # noqa: E402

__all__ = ["CASES", "Cell", "Settings", "check_rules", "full_settings", "main", "make_subject", "quick_settings", "run"]

TEMPLATES = Path(os.environ.get("MRICRON_TEMPLATES", "/usr/share/mricron/templates"))
SOURCES = ("baseline", "template", "nearest")
"""The single appearance sources scored from the default fit beside its own choice."""
BASELINES = ("geodesic regression", "linear interpolation", "nearest scan")
DEFAULT = "NODER default"


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One case of the matrix: where its base image comes from and its time protocol."""

    name: str
    spatial_dims: int
    size: int
    protocol: tuple  # (observed times, between-visit held-out times, after-the-last held-out times)
    kind: str = "brain"
    supersample: int = 1
    speckle: bool = False


BRAIN_A = ((0.0, 1.0, 2.2, 3.5, 5.0, 6.5), (1.6, 4.2), (7.5,))
BRAIN_B = ((0.0, 2.0, 3.0, 4.0, 5.0, 6.5), (0.5, 1.0), (8.0,))
CARDIAC = (tuple(k / 12 for k in (0, 1, 2, 4, 5, 7, 8, 9, 10)), (3 / 12, 6 / 12), (11 / 12,))
CINE = (tuple(k / 15 for k in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13)), (3 / 15, 7 / 15, 11 / 15), (14 / 15,))

CASES = {
    "colin-3.4mm": Anatomy("colin-3.4mm", 3, 64, BRAIN_A),
    "colin-1.5mm": Anatomy("colin-1.5mm", 3, 64, BRAIN_B, supersample=2),
    "cardiac": Anatomy("cardiac", 3, 64, CARDIAC, kind="cardiac"),
    "macaque-1mm": Anatomy("macaque-1mm", 2, 96, BRAIN_B, supersample=2),
    "cardiac-2d": Anatomy("cardiac-2d", 2, 128, CARDIAC, kind="cardiac"),
    "cine": Anatomy("cine", 2, 128, CINE, kind="cardiac", speckle=True),
}
SCALES = {"smooth": {"amplitude": 1.0, "local": 0.0}, "fine": {"amplitude": 0.5, "local": 2.5, "local_width": 2.0}}
NOISES = {"low": 0.01, "high": 0.03}
CINE_NOISE = {"low": 0.005, "high": 0.015}


@dataclasses.dataclass(frozen=True)
class Cell:
    """An anatomy at one deformation scale and noise level (``regression.score`` reads ``name``)."""

    anatomy: Anatomy
    scale: str
    noise: str

    @property
    def name(self) -> str:
        return f"{self.anatomy.name} {self.anatomy.spatial_dims}D, {self.scale}, {self.noise} noise"


@dataclasses.dataclass
class Settings:
    """What one run measures (``cells`` x ``subjects`` seeds) and how NODER is fitted (``fit``: FitConfig
    overrides; the default fit takes none)."""

    cells: Sequence[Cell]
    subjects: int = 3
    baselines: Sequence[str] = BASELINES
    fit: dict = dataclasses.field(default_factory=dict)
    geodesic: regression.Settings = dataclasses.field(
        default_factory=lambda: regression.Settings(cases=[], kernel_reference=64)
    )
    threads: int = 1


def _cells(cases: Sequence[str], scales: Sequence[str], noises: Sequence[str]) -> list[Cell]:
    unknown = [c for c in cases if c not in CASES] + [s for s in scales if s not in SCALES] + \
        [n for n in noises if n not in NOISES]
    if unknown:
        raise ValueError(f"cases must be from {tuple(CASES)}, scales from {tuple(SCALES)} and noises from "
                         f"{tuple(NOISES)}, got {unknown}.")
    return [Cell(CASES[c], s, n) for c in cases for s in scales for n in noises]


def full_settings(threads: int = 1) -> Settings:
    """Every case, scale and noise level, 3 subjects each."""
    return Settings(cells=_cells(list(CASES), list(SCALES), list(NOISES)), threads=threads)


def quick_settings(threads: int = 1) -> Settings:
    """Tiny subjects for the tests: the shipped head at 16^3 and the 2D phantom at 32^2, one subject, a few epochs."""
    small = {"colin-3.4mm": dataclasses.replace(CASES["colin-3.4mm"], size=16),
             "cardiac-2d": dataclasses.replace(CASES["cardiac-2d"], size=32)}
    geodesic = regression.Settings(cases=[], geodesic_iterations=4, kernel_reference=64)
    return Settings(
        cells=[Cell(small["colin-3.4mm"], "fine", "high"), Cell(small["cardiac-2d"], "smooth", "low")],
        subjects=1,
        fit={"epochs": 6, "levels": (2, 1), "level_fractions": (0.5, 0.5), "ncc_kernel_size": 5},
        geodesic=geodesic,
        threads=threads,
    )


def _template(name: str) -> tuple[torch.Tensor, tuple[float, ...]]:
    path = TEMPLATES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install it with 'apt-get install mricron-data' (or set "
                                "MRICRON_TEMPLATES to the folder holding it).")
    image = nib.load(str(path))
    return torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32)), tuple(float(z) for z in image.header.get_zooms()[:3])


def _resample(volume: torch.Tensor, zooms: Sequence[float], spacing: float) -> torch.Tensor:
    size = [round(n * z / spacing) for n, z in zip(volume.shape, zooms)]
    mode = "area" if spacing >= min(zooms) else "trilinear"
    return F.interpolate(volume[None, None], size=size, mode=mode)[0, 0]


def _crop(volume: torch.Tensor, size: Sequence[int], centre: Sequence[float]) -> torch.Tensor:
    """The ``size`` box of ``volume`` centred at the fractions ``centre`` of its axes (kept inside; axes shorter than
    the box are zero-padded evenly first)."""
    pads = []
    for n, s in zip(reversed(volume.shape), reversed(size)):
        extra = max(0, s - n)
        pads += [extra // 2, extra - extra // 2]
    volume = F.pad(volume, pads)
    slices = []
    for n, s, c in zip(volume.shape, size, centre):
        start = min(max(0, round(c * n - s / 2)), n - s)
        slices.append(slice(start, start + s))
    return volume[tuple(slices)]


@functools.lru_cache(maxsize=8)
def base_image(anatomy: Anatomy) -> torch.Tensor | None:
    """The base image ``(1, *S)`` in [0, 1] on the truth's grid (``supersample`` x the sequence's), None for the
    procedural phantom."""
    fine = anatomy.size * anatomy.supersample
    if anatomy.kind == "cardiac":
        return None
    if anatomy.name == "colin-3.4mm":
        volume = demo_volume(anatomy.size)[0][0]
        volume = volume if anatomy.spatial_dims == 3 else volume[..., anatomy.size // 2]
    elif anatomy.name == "colin-1.5mm":
        volume, zooms = _template("ch2.nii.gz")
        volume = _crop(_resample(volume, zooms, 1.5 / anatomy.supersample), (fine,) * 3, (0.5, 0.52, 0.55))
    elif anatomy.name == "macaque-1mm":
        volume, zooms = _template("inia19-t1-brain.nii.gz")  # 0.5 mm
        volume = _resample(volume, zooms, 1.0 / anatomy.supersample)
        volume = _crop(volume, (fine, fine, 1), (0.5, 0.5, 0.6))[..., 0]
    else:
        raise ValueError(f"no base image for case {anatomy.name!r}.")
    volume = volume - volume.min()
    return (volume / volume.max())[None].contiguous()


def make_subject(cell: Cell, seed: int) -> Subject:
    """The subject of ``cell`` and ``seed``: observed (noisy) scans and the truth at every observed and held-out time."""
    anatomy = cell.anatomy
    observed_times, between, after = anatomy.protocol
    times = sorted(set(observed_times) | set(between) | set(after))
    truth = synthetic_sequence(
        spatial_dims=anatomy.spatial_dims,
        size=anatomy.size,
        times=times,
        kind=anatomy.kind,
        noise=(CINE_NOISE if anatomy.speckle else NOISES)[cell.noise],
        noise_model="speckle" if anatomy.speckle else "rician",
        seed=seed,
        base_image=base_image(anatomy),
        supersample=anatomy.supersample,
        **{**SCALES[cell.scale], **({"amplitude": 2 * SCALES[cell.scale]["amplitude"]} if anatomy.speckle else {})},
    )
    if anatomy.speckle:  # the speckle is the signal: score against the held-out frames themselves
        truth = dataclasses.replace(truth, clean=truth.images)
    observed = [times.index(t) for t in observed_times]
    name = f"{cell.name} / seed {seed}"
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject=name)
    heldout = {"interpolation": [times.index(t) for t in between], "extrapolation": [times.index(t) for t in after]}
    return Subject(case=cell, seed=seed, name=name, sequence=sequence, truth=truth, heldout=heldout, observed=observed)


def edge_sharpness(images: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Root-mean-square gradient magnitude of ``images`` over ``mask`` as a fraction of ``truth``'s (all
    ``(Q, 1, *S)``; central differences). Blur lowers it (a ramp has less gradient energy than the step it smooths;
    a mean gradient magnitude would not see it, blur keeps a monotone edge's total variation)."""
    def energy(x: torch.Tensor) -> torch.Tensor:
        squared = torch.stack(torch.gradient(x.float(), dim=tuple(range(2, x.ndim)))).pow(2).sum(0)
        return (squared * mask).sum()

    return float((energy(images) / energy(truth).clamp_min(1e-12)).sqrt())


def _noder(settings: Settings, fits: dict) -> dict[str, Callable[[Subject], MethodOutput]]:
    """The default fit, scored with its own choice and with each single source (one fit per subject)."""

    def method(source: str | None) -> Callable[[Subject], MethodOutput]:
        def run(subject: Subject) -> MethodOutput:
            if subject.name not in fits:
                started = time.perf_counter()
                fitted = fit_sequence(subject.sequence, FitConfig(**settings.fit), seed=0, progress=False)
                fits.clear()
                fits[subject.name] = (fitted, time.perf_counter() - started)
            fitted, fit_seconds = fits[subject.name]
            started = time.perf_counter()
            prediction = fitted.predict(subject.heldout_times, source=source)
            return MethodOutput(prediction.images, prediction.ddfs, fit_seconds, time.perf_counter() - started)

        return run

    return {DEFAULT: method(None), **{f"NODER source {s}": method(s) for s in SOURCES}}


def _methods(settings: Settings, fits: dict) -> dict[str, Callable[[Subject], MethodOutput]]:
    unknown = [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines must be from {BASELINES}, got {unknown}.")
    methods = _noder(settings, fits)
    for name in settings.baselines:
        runner = regression._RUNNERS[name]
        methods[name] = functools.partial(lambda r, subject: r(subject, settings.geodesic), runner)
    return methods


def run(settings: Settings, log: Callable[[str], None] | None = None) -> list[dict]:
    """Every method on every subject; one record per (subject, method, split) as ``regression.score``'s, plus
    ``cell``, ``sharpness`` and, for the default, ``choice`` (the appearance it chose)."""
    torch.set_num_threads(settings.threads)
    fits: dict = {}
    methods = _methods(settings, fits)
    records = []
    for cell in settings.cells:
        for seed in range(settings.subjects):
            subject = make_subject(cell, seed)
            for name, method in methods.items():
                with regression.PeakMemory() as memory:
                    output = method(subject)
                output.peak_mib = memory.mib
                results = regression.score(name, subject, output)
                for record, split in zip(results, SPLITS):
                    rows = [i for s in SPLITS for i in subject.heldout[s]]
                    chosen = [rows.index(i) for i in subject.heldout[split]]
                    truth = subject.truth.clean[subject.heldout[split]]
                    mask = subject.truth.label_sequence[subject.heldout[split]] > 0
                    record["sharpness"] = edge_sharpness(output.images[chosen].cpu(), truth, mask)
                    record["cell"] = cell.name
                    if name == DEFAULT:
                        record["choice"] = fits[subject.name][0].source_choice.source
                records += results
                if log is not None:
                    scores = ", ".join(f"{r['split'][:6]} NRMSE {r['nrmse']:.4f}" for r in results)
                    extra = f" [{results[0]['choice']}]" if name == DEFAULT else ""
                    log(f"{subject.name} | {name}{extra}: {scores}, fit {results[0]['fit_s']:.1f} s")
    return records


def check_rules(records: list[dict]) -> list[dict]:
    """The default's rules per (subject, split): one dict with the cell, seed, split and each rule's outcome."""
    by_key: dict = {}
    for record in records:
        by_key[(record["cell"], record["seed"], record["split"], record["method"])] = record
    outcomes = []
    for (cell, seed, split, method), ours in by_key.items():
        if method != DEFAULT:
            continue

        def other(name: str) -> float | None:
            found = by_key.get((cell, seed, split, name))
            return None if found is None else found["nrmse"]

        single = [v for v in (other(f"NODER source {s}") for s in SOURCES) if v is not None]
        rules = {f"below {b}": ours["nrmse"] < other(b) for b in BASELINES if other(b) is not None}
        if other("NODER source baseline") is not None:
            rules["no worse than the first-scan source"] = ours["nrmse"] <= other("NODER source baseline")
        if single:
            rules["within 2% of the best single source"] = ours["nrmse"] <= 1.02 * min(single)
        rules["0 % folded"] = ours["folded"] == 0
        outcomes.append({"cell": cell, "seed": seed, "split": split, "nrmse": ours["nrmse"], "rules": rules})
    return outcomes


def summary_table(records: list[dict]) -> str:
    """One row per cell: the median NRMSE (interp / extrap) of every method, the default's choices, sharpness."""
    cells = list(dict.fromkeys(r["cell"] for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    lines = ["| cell | " + " | ".join(methods) + " | default's choices | sharpness default / truth |",
             "|---" * (len(methods) + 3) + "|"]
    for cell in cells:
        cells_out = []
        for method in methods:
            values = [statistics.median(r["nrmse"] for r in records
                                        if r["cell"] == cell and r["method"] == method and r["split"] == split)
                      for split in SPLITS]
            cells_out.append(" / ".join(f"{v:.4f}" for v in values))
        ours = [r for r in records if r["cell"] == cell and r["method"] == DEFAULT]
        choices = ", ".join(sorted({r["choice"] for r in ours}))
        sharp = statistics.median(r["sharpness"] for r in ours)
        lines.append(f"| {cell} | " + " | ".join(cells_out) + f" | {choices} | {sharp:.3f} |")
    return "\n".join(lines)


def worst_cases(records: list[dict]) -> str:
    """Per method: the subject and split where its NRMSE is largest relative to the best method there."""
    best: dict = {}
    for r in records:
        key = (r["cell"], r["seed"], r["split"])
        best[key] = min(best.get(key, float("inf")), r["nrmse"])
    lines = ["| method | worst case | its NRMSE | best there | ratio |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in records):
        own = [r for r in records if r["method"] == method]
        worst = max(own, key=lambda r: r["nrmse"] / best[(r["cell"], r["seed"], r["split"])])
        reference = best[(worst["cell"], worst["seed"], worst["split"])]
        lines.append(f"| {method} | {worst['cell']} / seed {worst['seed']} / {worst['split']} | {worst['nrmse']:.4f} "
                     f"| {reference:.4f} | {worst['nrmse'] / reference:.3f} |")
    return "\n".join(lines)


def rules_text(records: list[dict]) -> str:
    outcomes = check_rules(records)
    failed = [(o, rule) for o in outcomes for rule, ok in o["rules"].items() if not ok]
    total = sum(len(o["rules"]) for o in outcomes)
    lines = [f"Rules for {DEFAULT}: {total - len(failed)} of {total} checks pass over {len(outcomes)} (subject, split)."]
    lines += [f"- FAILS '{rule}': {o['cell']} / seed {o['seed']} / {o['split']} (NRMSE {o['nrmse']:.4f})"
              for o, rule in failed]
    return "\n".join(lines)


def report(records: list[dict], header: str = "") -> str:
    rows = regression.summarise(records)
    return "\n\n".join(part for part in [
        header,
        "Median NRMSE over subjects, between visits / after the last scan:",
        summary_table(records),
        rules_text(records),
        "Worst case per method (NRMSE over the best method's on that subject and split):",
        worst_cases(records),
        "Every metric, median (worst subject):",
        regression.markdown_table(rows),
    ] if part)


def matrix_arguments(description: str) -> argparse.ArgumentParser:
    """The options of every benchmark over this matrix: threads, cells and subjects, and where results go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (use the idle cores)")
    parser.add_argument("--subjects", type=int, default=None, help="subjects (seeds) per cell")
    parser.add_argument("--cases", nargs="+", default=None, help=f"from {tuple(CASES)} (default all)")
    parser.add_argument("--scales", nargs="+", default=None, help=f"from {tuple(SCALES)} (default all)")
    parser.add_argument("--noises", nargs="+", default=None, help=f"from {tuple(NOISES)} (default all)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="only print the tables of saved --json runs")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    return parser


def chosen_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells of ``--cases``, ``--scales`` and ``--noises`` (each defaulting to all)."""
    return _cells(args.cases or list(CASES), args.scales or list(SCALES), args.noises or list(NOISES))


def emit_merged(args: argparse.Namespace, tables: Callable[[list[dict]], str]) -> bool:
    """With ``--merge``, print (and write) ``tables`` of the saved records and return True."""
    if not args.merge:
        return False
    records = [r for path in args.merge for r in json.loads(path.read_text())]
    regression.emit(tables(records), records, args.output, args.json)
    return True


def load_header(started: float, load_before: Sequence[float]) -> str:
    """The machine's load average at the start and now, and the run's total time."""
    return (f"load average {' '.join(f'{v:.2f}' for v in load_before)} at the start, "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; total {time.perf_counter() - started:.0f} s.")


def main(argv: Sequence[str] | None = None) -> None:
    parser = matrix_arguments(__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes (what the tests run)")
    parser.add_argument("--baselines", nargs="*", default=None, help=f"from {BASELINES} (default all)")
    args = parser.parse_args(argv)
    if emit_merged(args, report):
        return
    settings = quick_settings(args.threads) if args.quick else full_settings(args.threads)
    if not args.quick:
        settings.cells = chosen_cells(args)
    if args.subjects is not None:
        settings.subjects = args.subjects
    if args.baselines is not None:
        settings.baselines = tuple(args.baselines)
    started, load_before = time.perf_counter(), os.getloadavg()
    records = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    header = (f"{len(settings.cells)} cell(s) x {settings.subjects} subject(s), torch threads {settings.threads}; "
              + load_header(started, load_before))
    regression.emit(report(records, header), records, args.output, args.json)


if __name__ == "__main__":
    main()
