"""Held-out accuracy at the size users run (64^3): NODER's default and its variants against every baseline.

Subjects (``--subjects`` per kind, seeds 0, 1, ...; each seed draws the random field components, the jitter of the
local regions, the texture and the noise):

- brain: the shipped Colin27 head at 64^3, deformed by smooth atrophy-like dynamics (a sigmoid in time plus a
  growing random component, ``amplitude`` 1: about 4 voxels at most) and local deformations about 3 voxels wide
  (both lateral ventricles expand, two hippocampus-like regions shrink, accelerating in time, up to 2 voxels); six
  visits over 6.5 years observed (0, 1, 2.2, 3.5, 5, 6.5), held out 1.6 and 4.2 (between visits) and 7.5 (after);
- cardiac: the procedural chest phantom at 64^3, contraction and twist over a cycle plus a myocardial thickening
  about 3 voxels wide (up to 2 voxels); 9 of 12 frames observed, held out frames 3 and 6 (0.25, 0.5) and 11
  (0.917, after the last observed frame);
- cine (``--cases cine``): the cardiac phantom in 2D at 128^2 with ultrasound-like speckle that moves with the tissue
  and decorrelates from frame to frame (``synthetic_sequence(noise_model="speckle")``); 11 of 15 frames observed,
  held out frames 3, 7, 11 and 14; scored against the held-out frames themselves (the speckle is the signal).

Observations carry Rician noise (3% of the image range); predictions are scored against the noise-free truth with
``benchmarks/regression.py``'s scoring: NRMSE, SSIM, PSNR per split; field error (mean distance in voxels to the true
displacement over the foreground); % folded voxels; fit and predict seconds; peak memory. Rows: NODER variants
(:data:`VARIANTS`), geodesic regression, linear intensity interpolation, nearest scan, and the true field applied to
the noisy first scan (what any method that warps the first scan reaches with a perfect field).

    python benchmarks/accuracy.py --threads 1 [--subjects 3] [--variants default template] [--output table.md]
    python benchmarks/accuracy.py --quick      # tiny volumes: what the tests run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regression  # noqa: E402
from regression import SPLITS, Case, MethodOutput, Subject  # noqa: E402

from noder_monai.data import SubjectSequence, demo_volume, synthetic_sequence  # noqa: E402
from noder_monai.engines import FitConfig, fit_sequence  # noqa: E402

__all__ = ["PROTOCOLS", "VARIANTS", "AccuracySettings", "full_settings", "make_subject", "quick_settings", "run", "main"]

PROTOCOLS = {
    "brain": regression.Protocol(
        observed={6: (0.0, 1.0, 2.2, 3.5, 5.0, 6.5)}, interpolation=(1.6, 4.2), extrapolation=(7.5,)
    ),
    "cardiac": regression.Protocol(
        observed={9: tuple(k / 12 for k in (0, 1, 2, 4, 5, 7, 8, 9, 10))},
        interpolation=(3 / 12, 6 / 12),
        extrapolation=(11 / 12,),
    ),
    "cine": regression.Protocol(
        observed={11: tuple(k / 15 for k in (0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13))},
        interpolation=(3 / 15, 7 / 15, 11 / 15),
        extrapolation=(14 / 15,),
    ),
}
SPECKLE_NOISE = 0.01
"""Additive noise under the cine case's speckle (``synthetic_sequence(noise_model="speckle")``)."""

#: NODER fits: name -> (FitConfig overrides, NODER overrides, the prediction sources scored from that one fit).
VARIANTS: dict[str, tuple[dict, dict, tuple[str, ...]]] = {
    "default": ({}, {}, ("template", "baseline")),
    "previous default": ({"level_fractions": (0.45, 0.45, 0.1), "finest_time_groups": 1,
                          "image_smoothing_sigma": 0.0}, {}, ("template",)),
    "image smoothing 0": ({"image_smoothing_sigma": 0.0}, {}, ("template",)),
    "image smoothing 1": ({"image_smoothing_sigma": 1.0}, {}, ("template",)),
    "all times in every full-resolution epoch": ({"finest_time_groups": 1}, {}, ("template",)),
    "cine preset": ({"source": "nearest"}, {}, ("nearest",)),
    "levels (2, 1), fractions (0.8, 0.2)": ({"levels": (2, 1), "level_fractions": (0.8, 0.2)}, {}, ("baseline",)),
    "box 7": ({}, {"smoothing_kernel": 7}, ("baseline",)),
    "NCC window 9": ({"ncc_kernel_size": 9}, {}, ("baseline",)),
    "smoothness 0.01": ({"smoothness_weight": 0.01}, {}, ("baseline",)),
    "smoothness 0.2": ({"smoothness_weight": 0.2}, {}, ("baseline",)),
    "RK4 step 0.05": ({}, {"step_size": 0.05}, ("baseline",)),
    "learning rate 0.01": ({"learning_rate": 0.01}, {}, ("baseline",)),
    "template refit (3 rounds)": ({"template_rounds": 3}, {}, ("template",)),
}

BASELINES = ("geodesic regression", "linear interpolation", "nearest scan", "true field on noisy first scan")


@dataclasses.dataclass
class AccuracySettings:
    """What one run measures: ``cases`` at ``size``, ``subjects`` seeds each, the NODER ``variants`` and baselines."""

    cases: Sequence[Case]
    subjects: int = 3
    variants: Sequence[str] = ("default",)
    baselines: Sequence[str] = BASELINES
    noise: float = 0.03
    amplitude: float = 1.0
    local: float = 2.0
    epochs: int | None = None
    fit_overrides: dict = dataclasses.field(default_factory=dict)
    geodesic: regression.Settings = dataclasses.field(
        default_factory=lambda: regression.Settings(cases=[], kernel_reference=64)
    )
    threads: int = 1


def full_settings(threads: int = 1) -> AccuracySettings:
    """Brain and cardiac at 64^3; ``--cases cine`` selects the 2D speckle cine at 128^2 instead."""
    return AccuracySettings(
        cases=[Case("brain", 3, 64), Case("cardiac", 3, 64), Case("cine", 2, 128)], threads=threads
    )


def quick_settings(threads: int = 1) -> AccuracySettings:
    """Tiny subjects for the tests: 16^3 brain and cardiac, one subject each, a few epochs at small windows."""
    geodesic = regression.Settings(cases=[], geodesic_iterations=4, kernel_reference=64)
    return AccuracySettings(
        cases=[Case("brain", 3, 16), Case("cardiac", 3, 16)],
        subjects=1,
        local=0.5,
        epochs=6,
        fit_overrides={"levels": (2, 1), "level_fractions": (0.5, 0.5), "ncc_kernel_size": 5},
        geodesic=geodesic,
        threads=threads,
    )


@functools.lru_cache(maxsize=4)
def _brain_base(size: int) -> torch.Tensor:
    return demo_volume(size)[0]


def make_subject(case: Case, seed: int, settings: AccuracySettings) -> Subject:
    """The subject of ``case`` and ``seed`` (observed scans, truth at every time, held-out indices)."""
    protocol = PROTOCOLS[case.kind]
    (count, observed_times), = protocol.observed.items()
    times = sorted(set(observed_times) | set(protocol.interpolation) | set(protocol.extrapolation))
    cine = case.kind == "cine"
    truth = synthetic_sequence(
        spatial_dims=case.spatial_dims,
        size=case.size,
        times=times,
        kind="cardiac" if cine else case.kind,
        noise=SPECKLE_NOISE if cine else settings.noise,
        noise_model="speckle" if cine else "rician",
        seed=seed,
        base_image=_brain_base(case.size) if case.kind == "brain" else None,
        amplitude=2 * settings.amplitude if cine else settings.amplitude,
        local=settings.local,
    )
    if cine:  # the speckle is the signal: score against the held-out frames themselves
        truth = dataclasses.replace(truth, clean=truth.images)
    observed = [times.index(t) for t in observed_times]
    name = f"{case.name} / seed {seed}"
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject=name)
    heldout = {split: [times.index(t) for t in protocol.heldout(split)] for split in SPLITS}
    return Subject(case=case, seed=seed, name=name, sequence=sequence, truth=truth, heldout=heldout, observed=observed)


def _noder(variant: str, source: str, fits: dict) -> Callable[[Subject, AccuracySettings], MethodOutput]:
    """Predictions of ``variant`` with ``source``; one fit per (subject, variant), kept in ``fits`` for its sources."""
    fit_overrides, network, _ = VARIANTS[variant]

    def run(subject: Subject, settings: AccuracySettings) -> MethodOutput:
        key = (subject.name, variant)
        if key not in fits:
            overrides = {**settings.fit_overrides, **fit_overrides}
            if settings.epochs is not None:
                overrides["epochs"] = settings.epochs
            started = time.perf_counter()
            fitted = fit_sequence(subject.sequence, FitConfig(**overrides), network=network, seed=0, progress=False)
            fits.clear()
            fits[key] = (fitted, time.perf_counter() - started)
        fitted, fit_seconds = fits[key]
        started = time.perf_counter()
        prediction = fitted.predict(subject.heldout_times, source=source)
        return MethodOutput(prediction.images, prediction.ddfs, fit_seconds, time.perf_counter() - started)

    return run


def _baseline(method: str) -> Callable[[Subject, AccuracySettings], MethodOutput]:
    runner = regression._RUNNERS[method]
    return lambda subject, settings: runner(subject, settings.geodesic)


def _methods(settings: AccuracySettings) -> dict[str, Callable[[Subject, AccuracySettings], MethodOutput]]:
    unknown = [v for v in settings.variants if v not in VARIANTS] + [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"variants must be from {tuple(VARIANTS)} and baselines from {BASELINES}, got {unknown}.")
    fits: dict = {}
    methods = {
        f"NODER {variant}, source {source}": _noder(variant, source, fits)
        for variant in settings.variants
        for source in VARIANTS[variant][2]
    }
    methods.update({method: _baseline(method) for method in settings.baselines})
    return methods


def run(settings: AccuracySettings, log: Callable[[str], None] | None = None) -> list[dict]:
    """Every method on every subject; one record per (subject, method, split), as ``regression.run_method``."""
    torch.set_num_threads(settings.threads)
    methods = _methods(settings)
    records = []
    for case in settings.cases:
        for seed in range(settings.subjects):
            subject = make_subject(case, seed, settings)
            for name, method in methods.items():
                with regression.PeakMemory() as memory:
                    output = method(subject, settings)
                output.peak_mib = memory.mib
                results = regression.score(name, subject, output)
                records += results
                if log is not None:
                    scores = ", ".join(
                        f"{r['split'][:6]} NRMSE {r['nrmse']:.4f} SSIM {r['ssim']:.3f}" for r in results
                    )
                    log(f"{subject.name} | {name}: {scores}, fit {results[0]['fit_s']:.1f} s")
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny volumes (what the tests run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (use the idle cores)")
    parser.add_argument("--subjects", type=int, default=None, help="subjects (seeds) per kind (default 3)")
    parser.add_argument("--cases", nargs="+", default=None, help="brain, cardiac, cine (default brain cardiac)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"NODER variants from {tuple(VARIANTS)}")
    parser.add_argument("--baselines", nargs="*", default=None, help=f"from {BASELINES}")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    args = parser.parse_args(argv)
    settings = quick_settings(args.threads) if args.quick else full_settings(args.threads)
    if args.subjects is not None:
        settings.subjects = args.subjects
    kinds = args.cases or ["brain", "cardiac"]
    settings.cases = [c for c in settings.cases if c.kind in kinds]
    if args.variants is not None:
        settings.variants = tuple(args.variants)
    if args.baselines is not None:
        settings.baselines = tuple(args.baselines)
    started, load_before = time.perf_counter(), os.getloadavg()
    records = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    rows = regression.summarise(records)
    text = "\n\n".join([
        f"{len(settings.cases)} case(s) x {settings.subjects} subject(s), Rician noise {settings.noise}, torch threads "
        f"{settings.threads}; load average {' '.join(f'{v:.2f}' for v in load_before)} at the start, "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end; total {time.perf_counter() - started:.0f} s. "
        "Cells: median over subjects (worst subject).",
        regression.markdown_table(rows),
    ])
    regression.emit(text, records, args.output, args.json)


if __name__ == "__main__":
    main()
