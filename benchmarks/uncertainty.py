"""Calibration of the uncertainty ensemble on the accuracy matrix's subjects: per-voxel 90 % interval coverage of
the held-out images over the foreground (against the noise-free truth), the correlation between the predicted
standard deviation and the actual absolute error, 90 % structure-volume band coverage against the truth's volumes,
and the cost of the ensemble as a ratio to one default fit of the same subject (measured in the same run).

    python benchmarks/uncertainty.py --threads 2 --json uncertainty.json --output uncertainty.md
    python benchmarks/uncertainty.py --cases cardiac --scales fine --noises high
    python benchmarks/uncertainty.py --merge part1.json part2.json --output uncertainty.md

Subjects are ``benchmarks/accuracy.py``'s (same cells and seeds); the default fit (no preset), then
``fit_ensemble`` with its defaults. Structures: the cardiac phantom's labels, or three intensity classes of the
baseline's foreground for the brain anatomies (:func:`structures`). The truth's volumes are the baseline's structures
as partial-volume images
warped by the true fields and summed at the held-out times; the predicted band integrates the Jacobian determinant
of the fitted map over the same baseline structures.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import regression  # noqa: E402

from noder_monai.engines import FitConfig, fit_ensemble, fit_sequence  # noqa: E402
from noder_monai.functional import warp_border  # noqa: E402
from noder_monai.io import voxel_volume_mm3  # noqa: E402
from noder_monai.model.uncertainty import Z90  # noqa: E402


def structures(subject: regression.Subject) -> torch.Tensor:
    """``(1, *S)`` the baseline's structures: the phantom's own labels (cardiac: body, myocardium, blood pool), or
    for an anatomy that comes with a foreground mask only, its foreground split into three intensity classes of the
    noise-free baseline (darkest third: CSF and ventricles; then grey- and white-matter-like tissue), whose volumes the
    local changes move."""
    labels = subject.truth.label_sequence[subject.observed[0]]
    if int(labels.max()) > 1:
        return labels
    image = subject.truth.clean[subject.observed[0]]
    inside = labels > 0
    cuts = torch.quantile(image[inside].float(), torch.tensor([1 / 3, 2 / 3]))
    return torch.where(inside, 1 + (image > cuts[0]).long() + (image > cuts[1]).long(), 0)


def partial_volumes(subject: regression.Subject, baseline: torch.Tensor, index: Sequence[int], values: Sequence[int],
                    voxel_mm3: float) -> torch.Tensor:
    """``(Q, L)`` the truth's volumes of the ``baseline`` structures ``(1, *S)`` at the sequence indices ``index``:
    each structure as a partial-volume (one-hot) image warped by the true field (linear interpolation) and summed,
    so that the truth is not rounded to whole voxels."""
    fields = subject.truth.ddfs[index]
    return torch.stack([warp_border((baseline == value).float()[None].expand(len(index), *baseline.shape), fields)
                        .flatten(1).sum(dim=1).double() * voxel_mm3 for value in values], dim=1)


def measure(cell: accuracy.Cell, seed: int, fit: dict) -> list[dict]:
    """One subject: fit, ensemble, then one record per held-out split."""
    subject = accuracy.make_subject(cell, seed)
    started = time.perf_counter()
    fitted = fit_sequence(subject.sequence, FitConfig(**fit), seed=0, progress=False)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ensemble = fit_ensemble(fitted)
    ensemble_seconds = time.perf_counter() - started
    records, baseline = [], structures(subject)
    for split in accuracy.SPLITS:
        index = subject.heldout[split]
        times = subject.truth.times[index]
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prediction = fitted.predict(times, uncertainty=True)
            bands = fitted.structure_volumes(times, baseline, True)
        predict_seconds = time.perf_counter() - started
        truth = subject.truth.clean[index]
        mask = subject.truth.label_sequence[index] > 0
        error = (prediction.images - truth).abs()[mask]
        std = prediction.image_std[mask]
        true_volumes = partial_volumes(subject, baseline, index, bands["labels"], voxel_volume_mm3(fitted.affine))
        inside = (bands["lower"] <= true_volumes) & (true_volumes <= bands["upper"])
        width = ((bands["upper"] - bands["lower"]) / true_volumes.clamp_min(1e-12)).median()
        records.append({
            "cell": cell.name, "seed": seed, "split": split,
            "coverage": float((error <= Z90 * std).double().mean()),
            "correlation": float(torch.corrcoef(torch.stack([error, std]).double())[0, 1]),
            "mean_std": float(std.mean()), "mean_error": float(error.mean()),
            "volume_coverage": float(inside.double().mean()), "volume_band_percent": 100 * float(width),
            "structures": len(bands["labels"]),
            "scale": ensemble.scale, "edge_scale": ensemble.edge_scale, "noise_scale": ensemble.noise_scale,
            "calibration_coverage": ensemble.coverage,
            "fit_s": fit_seconds, "ensemble_s": ensemble_seconds, "predict_s": predict_seconds,
            "cost_ratio": (fit_seconds + ensemble_seconds) / fit_seconds,
        })
    return records


def report(records: list[dict], header: str = "") -> str:
    """The per-case table, the worst cases and the cost."""
    lines = [header, "| cell / seed | split | coverage of 90% intervals | corr(std, abs error) | volume band coverage "
             "| band width (% of volume) | scales s / e / k | cost (fit + ensemble) / fit |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['cell']} / {r['seed']} | {r['split']} | {100 * r['coverage']:.1f}% | {r['correlation']:.2f} "
                     f"| {100 * r['volume_coverage']:.0f}% ({r['structures']} structures) | {r['volume_band_percent']:.2f} "
                     f"| {r['scale']:.2f} / {r['edge_scale']:.2f} / {r['noise_scale']:.2f} | {r['cost_ratio']:.2f} |")
    coverages = [r["coverage"] for r in records]
    worst = max(records, key=lambda r: abs(r["coverage"] - 0.9))
    lines += ["", f"Voxel coverage: median {100 * statistics.median(coverages):.1f}%, range "
                  f"{100 * min(coverages):.1f}-{100 * max(coverages):.1f}%; worst case {worst['cell']} / {worst['seed']} "
                  f"{worst['split']} at {100 * worst['coverage']:.1f}%; outside 85-95%: "
                  f"{sum(not 0.85 <= c <= 0.95 for c in coverages)} of {len(coverages)}.",
              f"Correlation of std with absolute error: median {statistics.median(r['correlation'] for r in records):.2f}, "
              f"min {min(r['correlation'] for r in records):.2f}.",
              f"Volume bands: {100 * statistics.mean(r['volume_coverage'] for r in records):.0f}% of (structure, time) "
              f"pairs inside on average, min {100 * min(r['volume_coverage'] for r in records):.0f}%.",
              f"Cost (fit + ensemble) / fit: median {statistics.median(r['cost_ratio'] for r in records):.2f}, max "
              f"{max(r['cost_ratio'] for r in records):.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    args = accuracy.matrix_arguments(__doc__.split("\n")[0]).parse_args(argv)
    if accuracy.emit_merged(args, report):
        return
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    records = []
    for cell in accuracy.chosen_cells(args):
        for seed in range(args.subjects or 1):
            records += measure(cell, seed, {})
            print("\n".join(report(records[-2:]).splitlines()[3:5]), flush=True)
            if args.json is not None:
                args.json.write_text(json.dumps(records, indent=1))
    header = (f"Uncertainty calibration: {len(records) // 2} subject(s), torch threads {args.threads}; "
              + accuracy.load_header(started, load_before) + "\n")
    regression.emit(report(records, header), records, args.output, args.json)


if __name__ == "__main__":
    main()
