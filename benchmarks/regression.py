"""Image-sequence regression benchmark: NODER against geodesic regression and intensity baselines, known truth.

Every subject is a synthetic sequence (``noder_monai.data.synthetic_sequence``) with non-linear dynamics: "brain"
deforms the real Colin27 anatomy (``demo_volume``; its middle axial slice in 2D) with an atrophy that accelerates
then saturates plus a steadily growing random component (years); "cardiac" contracts and twists a procedural
chest phantom over a cycle (fractions of a cycle). Each (case, number of observed scans, seed) is one subject; the
seed draws the random field component, the texture and the noise. The observed scans carry Gaussian noise; the
held-out times are scored against the noise-free truth:

- interpolation: times between observed scans (brain 1.0, 2.5, 4.0 years; cardiac 0.25, 0.45, 0.65 of a cycle);
- extrapolation: one time after the last observed scan (brain 7.0; cardiac 0.9).

Observed scans: 9 (brain: 0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0; cardiac: 0, 0.1, ..., 0.8), 3 (first, middle,
last of those) or 2 (first and last). The same held-out times serve every count, so rows with fewer scans show
what the missing visits cost.

Methods: NODER with ``field="displacement"`` (the paper) and ``field="velocity"`` (the package default)
(fold-free by construction on the decoder grid), both from the shipped pretrained autoencoder; geodesic
regression (``noder_monai.baselines.GeodesicRegression``, linear dynamics); linear intensity interpolation (the end
scans held outside the span); the nearest scan; and, as a reference, the true field applied to the noisy first
scan (what NODER would score with a perfect deformation: the noise of that one scan stays in every prediction; not
a bound, since any warp that interpolates between voxels also averages some of that noise away).

Per subject and split, NRMSE, SSIM and PSNR (``noder_monai.metrics``, data range of the noise-free sequence) and
the field error (mean distance in voxels between the predicted and the true displacement over the foreground of
the true image, label > 0) are averaged over the split's held-out times; % folded voxels (det of the Jacobian
<= 0) is the worst over them. The table gives the median over subjects and, in brackets, the worst subject (largest
NRMSE, field error and % folded, smallest SSIM and PSNR, longest times, largest memory). Fit and predict seconds
are wall-clock times (predict: every held-out time at once, with the fields and, for NODER, the Jacobian maps).
Peak memory is the largest rise of the process's resident set size (RSS) during a method's fit and predict,
measured in the benchmark's one process after an unmeasured warm-up run of every method: the kernel's RSS
high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` and free heap memory returned to the system
(``malloc_trim``) before each method (Linux only; "-" elsewhere).

Deformations are a few voxels (``amplitude`` 2: at most ``size / 8`` voxels, 4 at 32^3 and 8 at 64^2; the
demo's 4 voxels at 64^3 in voxel terms). Windows scale with the image size: the package defaults (box-filter width
15, NCC window 21) are meant for images of about ``Settings.kernel_reference`` (96) voxels across; a case of
``size`` voxels uses the nearest odd integers to ``15 * size / 96`` and ``21 * size / 96`` (at least 3), for NODER
and geodesic regression alike. NODER fits 300 epochs (the default) at levels (2, 1) with fractions (0.6, 0.4) (the
small-image schedule of the engine tests), not the default (4, 2, 1) / (0.45, 0.45, 0.1): at 32^3 and 64^2 level 4
leaves 8-16 voxels across with an NCC window of 1-3 voxels; on the 9-scan 3D subjects (seed 0, displacement) the
default schedule fitted 40% faster but scored a higher held-out NRMSE in three of four splits (brain interpolation
0.081 vs 0.070, extrapolation 0.113 vs 0.087; cardiac interpolation 0.065 vs 0.053; cardiac extrapolation 0.057 vs
0.069).

Run from the repository root (CI never runs the full suite; ``--quick`` is what the tests run)::

    python benchmarks/regression.py --threads 1 --output results.md --json results.json
    python benchmarks/regression.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from monai.networks.blocks import Warp

from noder_monai.baselines import GeodesicRegression, linear_interpolation, nearest_scan
from noder_monai.data import IntensityMapping, SubjectSequence, SyntheticSequence, demo_volume, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "SPLITS",
    "Case",
    "MethodOutput",
    "PeakMemory",
    "Protocol",
    "Settings",
    "Subject",
    "comparisons",
    "emit",
    "full_settings",
    "main",
    "make_subject",
    "markdown_table",
    "quick_settings",
    "run_method",
    "score",
    "run_suite",
    "scaled_kernel",
    "summarise",
]

SPLITS = ("interpolation", "extrapolation")
METHODS = (
    "NODER (displacement)",
    "NODER (velocity)",
    "geodesic regression",
    "linear interpolation",
    "nearest scan",
    "true field on noisy first scan",
)
DEFAULT_SMOOTHING_KERNEL = 15
DEFAULT_NCC_KERNEL = 21


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of sequence at one image size: ``kind`` in ("brain", "cardiac"), 2 or 3 spatial dims, ``size``
    voxels along every axis."""

    kind: str
    spatial_dims: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.kind} {self.spatial_dims}D {self.size}^{self.spatial_dims}"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Observed times for each number of observed scans, and the held-out times of each split (one kind)."""

    observed: dict
    interpolation: tuple
    extrapolation: tuple

    def heldout(self, split: str) -> tuple:
        return getattr(self, split)


PROTOCOLS = {
    "brain": Protocol(
        observed={9: (0.0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0), 3: (0.0, 3.0, 6.0), 2: (0.0, 6.0)},
        interpolation=(1.0, 2.5, 4.0),
        extrapolation=(7.0,),
    ),
    "cardiac": Protocol(
        observed={9: tuple(frame / 10 for frame in range(9)), 3: (0.0, 0.4, 0.8), 2: (0.0, 0.8)},
        interpolation=(0.25, 0.45, 0.65),
        extrapolation=(0.9,),
    ),
}


@dataclasses.dataclass
class Settings:
    """Everything that defines a benchmark run.

    Args:
        cases: the (kind, dims, size) cases.
        observed_counts: numbers of observed scans (keys of ``Protocol.observed``).
        seeds: one subject per seed and (case, count).
        methods: names from :data:`METHODS`.
        epochs: NODER ``FitConfig.epochs``.
        levels: NODER ``FitConfig.levels``; (2, 1): at these sizes level 4 leaves 8-16 voxels across and an NCC
            window of 1-3 voxels, and measured worse than starting at level 2 (see the module docstring).
        level_fractions: NODER ``FitConfig.level_fractions``.
        geodesic_iterations: Adam steps per pyramid level of geodesic regression.
        geodesic_pyramid_levels: its pyramid levels.
        geodesic_integration_stride: its scaling-and-squaring grid stride.
        noise: Gaussian noise of the observed scans, relative to the base image's intensity range.
        amplitude: deformation amplitude of each kind (``synthetic_sequence(amplitude=...)``).
        kernel_reference: image size (voxels across) at which the default windows 15 / 21 apply.
        pretrained: NODER's ``fit_sequence(pretrained=...)`` ("auto": the shipped autoencoder).
        threads: ``torch.set_num_threads`` for the run.
    """

    cases: Sequence[Case]
    observed_counts: Sequence[int] = (2, 3, 9)
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = METHODS
    epochs: int = 300
    levels: Sequence[int] = (2, 1)
    level_fractions: Sequence[float] = (0.6, 0.4)
    geodesic_iterations: int = 100
    geodesic_pyramid_levels: int = 2
    geodesic_integration_stride: int = 2
    noise: float = 0.02
    amplitude: dict = dataclasses.field(default_factory=lambda: {"brain": 2.0, "cardiac": 2.0})
    kernel_reference: int = 96
    pretrained: str | None = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods must be names from {METHODS}, got {unknown}.")
        for case in self.cases:
            if case.kind not in PROTOCOLS or case.spatial_dims not in (2, 3):
                raise ValueError(f"cases must have kind in {tuple(PROTOCOLS)} and spatial_dims 2 or 3, got {case}.")
        missing = [n for n in self.observed_counts if any(n not in p.observed for p in PROTOCOLS.values())]
        if missing:
            raise ValueError(f"observed_counts must be among {sorted(PROTOCOLS['brain'].observed)}, got {missing}.")


def full_settings(threads: int = 1) -> Settings:
    """The full suite: brain and cardiac, 3D 32^3 and 2D 64^2, 2, 3 and 9 observed scans, seeds 0-2."""
    cases = [Case("brain", 3, 32), Case("cardiac", 3, 32), Case("brain", 2, 64), Case("cardiac", 2, 64)]
    return Settings(cases=cases, threads=threads)


def quick_settings(threads: int = 1) -> Settings:
    """A tiny suite for tests (well under a minute on one core): 16^3 brain and 32^2 cardiac, 3 scans, 2 seeds."""
    return Settings(
        cases=[Case("brain", 3, 16), Case("cardiac", 2, 32)],
        observed_counts=(3,),
        seeds=(0, 1),
        epochs=12,
        geodesic_iterations=6,
        threads=threads,
    )


def scaled_kernel(default: int, size: int, reference: int = 96) -> int:
    """The odd window (>= 3) nearest to ``default * size / reference``: the default windows' extent relative to the
    image, for images of ``size`` voxels across."""
    return max(3, 2 * math.floor((default * size / reference - 1) / 2 + 0.5) + 1)


@functools.lru_cache(maxsize=8)
def _brain_base(spatial_dims: int, size: int) -> torch.Tensor:
    """Colin27 at ``size``^3, or its middle axial slice (through the lateral ventricles) in 2D: (1, *S)."""
    volume, _ = demo_volume(size)
    return volume if spatial_dims == 3 else volume[..., size // 2]


@dataclasses.dataclass
class Subject:
    """One benchmark subject: the observed sequence and the truth at the held-out times.

    Attributes:
        case: its case.
        seed: its seed.
        name: "case / scans / seed" label.
        sequence: the observed (noisy) scans.
        truth: the synthetic sequence at every observed and held-out time (``truth.times`` sorted).
        heldout: split -> indices into ``truth.times``.
        observed: indices into ``truth.times`` of the observed scans.
    """

    case: Case
    seed: int
    name: str
    sequence: SubjectSequence
    truth: SyntheticSequence
    heldout: dict
    observed: list

    @property
    def heldout_times(self) -> torch.Tensor:
        """(Q,) float64: interpolation times then extrapolation times."""
        return self.truth.times[[i for split in SPLITS for i in self.heldout[split]]]

    @property
    def data_range(self) -> float:
        return float(self.truth.clean.max() - self.truth.clean.min())


def make_subject(case: Case, observed_count: int, seed: int, settings: Settings) -> Subject:
    """Generate the subject of ``case`` with ``observed_count`` observed scans and ``seed``."""
    protocol = PROTOCOLS[case.kind]
    observed_times = protocol.observed[observed_count]
    times = sorted(set(observed_times) | set(protocol.interpolation) | set(protocol.extrapolation))
    truth = synthetic_sequence(
        spatial_dims=case.spatial_dims,
        size=case.size,
        times=times,
        kind=case.kind,
        noise=settings.noise,
        seed=seed,
        base_image=_brain_base(case.spatial_dims, case.size) if case.kind == "brain" else None,
        amplitude=settings.amplitude[case.kind],
    )
    observed = [times.index(t) for t in observed_times]
    name = f"{case.name} / {observed_count} scans / seed {seed}"
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject=name)
    heldout = {split: [times.index(t) for t in protocol.heldout(split)] for split in SPLITS}
    return Subject(case=case, seed=seed, name=name, sequence=sequence, truth=truth, heldout=heldout, observed=observed)


def _libc_malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager: the largest rise of this process's resident memory inside the block, in MiB.

    Linux only: ``gc.collect`` and ``malloc_trim`` first (freed memory kept by the allocator would hide a rise),
    then the RSS high-water mark is reset by writing 5 to ``/proc/self/clear_refs``; on exit the rise is
    ``VmHWM - VmRSS(start)``. ``mib`` is None where that is not possible.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        _libc_malloc_trim()
        self.mib: float | None = None
        self._start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM")
        if self._start is not None and peak is not None:
            self.mib = max(0, peak - self._start) / 1024


@dataclasses.dataclass
class MethodOutput:
    """Predictions of one method at ``Subject.heldout_times``: images (Q, 1, *S) in the scans' units, fields
    (Q, D, *S) or None, and the costs."""

    images: torch.Tensor
    ddfs: torch.Tensor | None
    fit_seconds: float
    predict_seconds: float
    peak_mib: float | None = None


def _windows(subject: Subject, settings: Settings) -> tuple[int, int]:
    size = max(subject.sequence.spatial_size)
    return (
        scaled_kernel(DEFAULT_SMOOTHING_KERNEL, size, settings.kernel_reference),
        scaled_kernel(DEFAULT_NCC_KERNEL, size, settings.kernel_reference),
    )


def _noder(field: str) -> Callable[[Subject, Settings], MethodOutput]:
    def run(subject: Subject, settings: Settings) -> MethodOutput:
        smoothing, ncc = _windows(subject, settings)
        started = time.perf_counter()
        fitted = fit_sequence(
            subject.sequence,
            FitConfig(
                epochs=settings.epochs,
                ncc_kernel_size=ncc,
                levels=settings.levels,
                level_fractions=settings.level_fractions,
            ),
            network={"smoothing_kernel": smoothing, "field": field},
            pretrained=settings.pretrained,
            seed=0,
            progress=False,
        )
        fitted_at = time.perf_counter()
        prediction = fitted.predict(subject.heldout_times)
        done = time.perf_counter()
        return MethodOutput(prediction.images, prediction.ddfs, fitted_at - started, done - fitted_at)

    return run


def _geodesic(subject: Subject, settings: Settings) -> MethodOutput:
    smoothing, ncc = _windows(subject, settings)
    sequence = subject.sequence
    started = time.perf_counter()
    intensity = IntensityMapping.fit(sequence.images)
    model = GeodesicRegression(
        spatial_dims=sequence.spatial_dims,
        iterations=settings.geodesic_iterations,
        ncc_kernel_size=ncc,
        smoothing_kernel=smoothing,
        pyramid_levels=settings.geodesic_pyramid_levels,
        integration_stride=settings.geodesic_integration_stride,
    ).fit(intensity(sequence.images), sequence.times)
    fitted_at = time.perf_counter()
    ddfs = model.predict_ddf(subject.heldout_times)
    with torch.inference_mode():
        images = intensity.inverse(Warp(mode="bilinear", padding_mode="border")(
            model.baseline.expand(ddfs.shape[0], *model.baseline.shape[1:]), ddfs
        ))
    done = time.perf_counter()
    return MethodOutput(images, ddfs, fitted_at - started, done - fitted_at)


def _intensity_baseline(function: Callable) -> Callable[[Subject, Settings], MethodOutput]:
    def run(subject: Subject, settings: Settings) -> MethodOutput:
        started = time.perf_counter()
        images = function(subject.sequence.images, subject.sequence.times, subject.heldout_times)
        return MethodOutput(images, None, 0.0, time.perf_counter() - started)

    return run


def _true_field(subject: Subject, settings: Settings) -> MethodOutput:
    indices = [i for split in SPLITS for i in subject.heldout[split]]
    ddfs = subject.truth.ddfs[indices]
    started = time.perf_counter()
    baseline = subject.sequence.images[:1]
    images = Warp(mode="bilinear", padding_mode="border")(baseline.expand(len(indices), *baseline.shape[1:]), ddfs)
    return MethodOutput(images, ddfs, 0.0, time.perf_counter() - started)


_RUNNERS = {
    "NODER (displacement)": _noder("displacement"),
    "NODER (velocity)": _noder("velocity"),
    "geodesic regression": _geodesic,
    "linear interpolation": _intensity_baseline(linear_interpolation),
    "nearest scan": _intensity_baseline(nearest_scan),
    "true field on noisy first scan": _true_field,
}


def _endpoint_error(ddfs: torch.Tensor, subject: Subject, split: str) -> float:
    """Mean over the split's times of the mean distance (voxels) between predicted and true fields (Q, D, *S) over
    the foreground (label > 0) of the true image at that time."""
    indices = subject.heldout[split]
    mask = (subject.truth.label_sequence[indices] > 0).float()
    distance = (ddfs.detach().float().cpu() - subject.truth.ddfs[indices]).norm(dim=1, keepdim=True)
    return ((distance * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)).mean().item()


def run_method(method: str, subject: Subject, settings: Settings) -> list[dict]:
    """Fit and predict ``subject`` with ``method``; one record per split with its metrics and costs.

    Returns:
        ``[{"case", "scans", "seed", "method", "split", "nrmse", "ssim", "psnr", "epe", "folded", "fit_s",
        "predict_s", "peak_mib"}, ...]``; ``epe`` (mean endpoint error of the field against the true one, voxels,
        over the foreground) and ``folded`` are None for methods without a deformation.
    """
    if method not in _RUNNERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    with PeakMemory() as memory:
        output = _RUNNERS[method](subject, settings)
    output.peak_mib = memory.mib
    return score(method, subject, output)


def score(method: str, subject: Subject, output: MethodOutput) -> list[dict]:
    """The records of :func:`run_method` for ``output``, the predictions of ``method`` at ``subject.heldout_times``."""
    records, start = [], 0
    for split in SPLITS:
        count = len(subject.heldout[split])
        rows = slice(start, start + count)
        start += count
        truth = subject.truth.clean[subject.heldout[split]]
        predicted = output.images[rows].detach().float().cpu()
        record = {
            "case": subject.case.name,
            "scans": len(subject.observed),
            "seed": subject.seed,
            "method": method,
            "split": split,
            "nrmse": nrmse(predicted, truth).mean().item(),
            "ssim": ssim(predicted, truth, subject.data_range).mean().item(),
            "psnr": psnr(predicted, truth, subject.data_range).mean().item(),
            "epe": None if output.ddfs is None else _endpoint_error(output.ddfs[rows], subject, split),
            "folded": None if output.ddfs is None else percent_folded(output.ddfs[rows].float().cpu()).max().item(),
            "fit_s": output.fit_seconds,
            "predict_s": output.predict_seconds,
            "peak_mib": output.peak_mib,
        }
        records.append(record)
    return records


def _warm_up(settings: Settings) -> None:
    """Run every method once, unmeasured, on a tiny subject of each dimensionality: lazy initialisations (kernel
    libraries, caches) would otherwise land in the first measured method's time and memory."""
    tiny = dataclasses.replace(settings, epochs=2, geodesic_iterations=2)
    for spatial_dims in sorted({case.spatial_dims for case in settings.cases}):
        subject = make_subject(Case("cardiac", spatial_dims, 16), min(settings.observed_counts), 0, tiny)
        for method in settings.methods:
            _RUNNERS[method](subject, tiny)


def run_suite(settings: Settings, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every method on every subject of ``settings``; returns the per-(subject, method, split) records."""
    torch.set_num_threads(settings.threads)
    _warm_up(settings)
    records = []
    for case in settings.cases:
        for count in settings.observed_counts:
            for seed in settings.seeds:
                subject = make_subject(case, count, seed, settings)
                for method in settings.methods:
                    results = run_method(method, subject, settings)
                    records += results
                    if log is not None:
                        scores = ", ".join(f"{r['split'][:6]} NRMSE {r['nrmse']:.4f}" for r in results)
                        log(f"{subject.name} | {method}: {scores}, fit {results[0]['fit_s']:.1f} s")
    return records


def _worst(values: list, larger_is_worse: bool):
    return max(values) if larger_is_worse else min(values)


def summarise(records: list[dict]) -> list[dict]:
    """One row per (case, scans, method): for each metric and split, the median over seeds and the worst seed.

    Returns:
        rows with keys "case", "scans", "method", "subjects" and ``{metric}_{split}`` (metrics nrmse, ssim,
        psnr, epe), "folded", "fit_s", "predict_s", "peak_mib", each a ``(median, worst)`` pair (None where not
        applicable).
    """
    groups: dict = {}
    for record in records:
        groups.setdefault((record["case"], record["scans"], record["method"]), []).append(record)
    rows = []
    for (case, scans, method), group in groups.items():
        row = {"case": case, "scans": scans, "method": method, "subjects": len({r["seed"] for r in group})}
        for split in SPLITS:
            in_split = [r for r in group if r["split"] == split]
            for metric, larger_is_worse in (("nrmse", True), ("ssim", False), ("psnr", False), ("epe", True)):
                values = [r[metric] for r in in_split]
                row[f"{metric}_{split}"] = (
                    None if None in values else (statistics.median(values), _worst(values, larger_is_worse))
                )
        per_seed: dict = {}
        for record in group:
            per_seed.setdefault(record["seed"], []).append(record)
        for key in ("folded", "fit_s", "predict_s", "peak_mib"):
            if any(r[key] is None for r in group):
                row[key] = None
                continue
            values = [max(r[key] for r in seed_records) for seed_records in per_seed.values()]
            row[key] = (statistics.median(values), max(values))
        rows.append(row)
    return rows


def _cell(pair: tuple | None, digits: int, scientific: bool = False) -> str:
    if pair is None:
        return "-"
    if scientific:
        return " (".join("0" if v == 0 else f"{v:.1e}" for v in pair) + ")"
    return f"{pair[0]:.{digits}f} ({pair[1]:.{digits}f})"


def markdown_table(rows: list[dict]) -> str:
    """The rows of :func:`summarise` as one markdown table, "median (worst)" in every cell."""
    lines = [
        "| case | scans | method | NRMSE interp | NRMSE extrap | SSIM interp | SSIM extrap | PSNR interp | "
        "PSNR extrap | field error interp | field error extrap | % folded | fit s | predict s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["case"],
            str(row["scans"]),
            row["method"],
            _cell(row["nrmse_interpolation"], 4),
            _cell(row["nrmse_extrapolation"], 4),
            _cell(row["ssim_interpolation"], 3),
            _cell(row["ssim_extrapolation"], 3),
            _cell(row["psnr_interpolation"], 2),
            _cell(row["psnr_extrapolation"], 2),
            _cell(row["epe_interpolation"], 3),
            _cell(row["epe_extrapolation"], 3),
            _cell(row["folded"], 0, scientific=True),
            _cell(row["fit_s"], 1),
            _cell(row["predict_s"], 2),
            _cell(row["peak_mib"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(rows: list[dict], reference: str = "NODER (displacement)") -> list[str]:
    """Plain-text lines: per (case, scans, split), does ``reference`` beat geodesic regression and linear
    interpolation on median NRMSE, and by how much."""
    by_key = {(r["case"], r["scans"], r["method"]): r for r in rows}
    lines = []
    for (case, scans, method), row in by_key.items():
        if method != reference:
            continue
        for split in SPLITS:
            ours = row[f"nrmse_{split}"][0]
            parts = []
            for other in ("geodesic regression", "linear interpolation"):
                if (case, scans, other) in by_key:
                    theirs = by_key[(case, scans, other)][f"nrmse_{split}"][0]
                    parts.append(f"{'beats' if ours < theirs else 'LOSES to'} {other} ({ours:.4f} vs {theirs:.4f})")
            if parts:
                lines.append(f"- {case}, {scans} scans, {split}: {reference} " + "; ".join(parts))
    return lines


def _header(settings: Settings, started: float, load_before: tuple, load_after: tuple) -> str:
    windows = ", ".join(
        f"{c.name}: box {scaled_kernel(DEFAULT_SMOOTHING_KERNEL, c.size, settings.kernel_reference)}, "
        f"NCC {scaled_kernel(DEFAULT_NCC_KERNEL, c.size, settings.kernel_reference)}"
        for c in settings.cases
    )
    return "\n".join([
        f"Settings: NODER `FitConfig(epochs={settings.epochs}, levels={tuple(settings.levels)}, "
        f"level_fractions={tuple(settings.level_fractions)})`, "
        f"pretrained={settings.pretrained!r}; "
        f"geodesic regression {settings.geodesic_iterations} iterations x {settings.geodesic_pyramid_levels} levels, "
        f"integration stride {settings.geodesic_integration_stride}; windows {windows}; noise {settings.noise}; "
        f"amplitude {settings.amplitude}; seeds {list(settings.seeds)}; torch threads {settings.threads}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average (1, 5, 15 min) "
        f"{' '.join(f'{v:.2f}' for v in load_before)} at the start, {' '.join(f'{v:.2f}' for v in load_after)} at "
        f"the end; total {time.perf_counter() - started:.0f} s.",
        "Cells: median over subjects (worst subject). Field error: mean distance (voxels) between the predicted and "
        "the true displacement over the foreground. Peak MiB: rise of the process RSS during fit + predict.",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny suite of the tests (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (use the free cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="subjects per (case, scans)")
    parser.add_argument("--scans", type=int, nargs="+", default=None, help="observed-scan counts, from 2, 3, 9")
    parser.add_argument("--cases", nargs="+", default=None, help="e.g. brain3d cardiac2d (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="NODER epochs (default 300)")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    args = parser.parse_args(argv)
    settings = quick_settings(args.threads) if args.quick else full_settings(args.threads)
    if args.seeds is not None:
        settings.seeds = tuple(args.seeds)
    if args.scans is not None:
        settings.observed_counts = tuple(args.scans)
    if args.cases is not None:
        settings.cases = [c for c in settings.cases if f"{c.kind}{c.spatial_dims}d" in args.cases]
    if args.epochs is not None:
        settings.epochs = args.epochs
    settings.__post_init__()
    started, load_before = time.perf_counter(), os.getloadavg()
    records = run_suite(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = summarise(records)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    text = "\n\n".join([
        _header(settings, started, load_before, os.getloadavg()),
        markdown_table(rows),
        *(
            f"{method} against the baselines, median held-out NRMSE:\n" + "\n".join(comparisons(rows, method))
            for method in ("NODER (displacement)", "NODER (velocity)")
            if method in settings.methods
        ),
        f"Process CPU time {usage.ru_utime + usage.ru_stime:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB.",
    ])
    emit(text, records, args.output, args.json)


def emit(text: str, records: list[dict], output: Path | None, json_path: Path | None) -> None:
    """Print the markdown ``text``; also write it to ``output`` and the records to ``json_path`` when given."""
    print(text)
    if output is not None:
        output.write_text(text + "\n")
    if json_path is not None:
        json_path.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
