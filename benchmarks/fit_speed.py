"""Fit and predict speed, peak memory and held-out accuracy of the default NODER fit.

A 64^3 brain-like sequence (the shipped Colin27 volume, deformed by the package's synthetic non-linear dynamics,
noise 2% of the range) observed at 9 irregular times over 6 years; three more times are held out (two between
visits, one a year after the last). Each repeat runs in a fresh process so its peak resident memory is its own.
Accuracy is measured against the noise-free truth, next to the nearest observed scan and linear intensity
interpolation. Prints a markdown table of medians over the repeats.

``--compare-tree DIR`` also fits with the package of another source tree (e.g. ``git worktree add /tmp/old <commit>``)
with its own defaults, alternating the two in fresh processes, and prints the ratio of their median fit times: the
way to compare versions on a shared machine, whose absolute times drift between runs. ``--observed`` replaces the
observed times (e.g. six visits: ``--observed 0 1 2.2 3.5 5 6.5``).

    python benchmarks/fit_speed.py [--repeats 3] [--threads 2] [--size 64] [--device cpu] [--epochs 300]
        [--observed T ...] [--compare-tree DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time

OBSERVED_TIMES = (0.0, 0.7, 1.5, 2.1, 3.0, 3.6, 4.4, 5.2, 6.0)
HELDOUT_TIMES = (1.0, 4.0, 7.0)


def _sequence(size: int, observed_times: tuple):
    from noder_monai.data import demo_labels, demo_volume, synthetic_sequence

    volume, _ = demo_volume(size)
    labels, _ = demo_labels(size)
    times = sorted(set(observed_times) | set(HELDOUT_TIMES))
    return synthetic_sequence(spatial_dims=3, times=times, kind="brain", noise=0.02, seed=0, base_image=volume, base_label=labels)


def _one_run(args: argparse.Namespace, tree: str | None = None) -> dict:
    if tree is not None:
        sys.path.insert(0, tree)  # this fresh process imports noder_monai from that tree
    import torch

    from noder_monai.baselines import linear_interpolation, nearest_scan
    from noder_monai.data import SubjectSequence
    from noder_monai.engines import FitConfig, fit_sequence
    from noder_monai.metrics import nrmse, psnr, ssim
    from noder_monai.networks import NODER

    torch.set_num_threads(args.threads)
    observed_times = tuple(args.observed)
    synthetic = _sequence(args.size, observed_times)
    times = synthetic.times.tolist()
    observed = [times.index(t) for t in observed_times]
    heldout = [times.index(t) for t in HELDOUT_TIMES]
    sequence = SubjectSequence.from_tensors(synthetic.images[observed], synthetic.times[observed], subject="bench")
    start = time.perf_counter()
    fitted = fit_sequence(sequence, FitConfig(epochs=args.epochs), device=args.device, seed=0, progress=False)
    fit_seconds = time.perf_counter() - start
    result = {"fit_s": fit_seconds, "epochs": len(fitted.history), "s_per_epoch": fit_seconds / len(fitted.history)}
    result["package"] = sys.modules["noder_monai"].__file__

    query = synthetic.times[heldout]
    fitted.predict(query[:1])
    start = time.perf_counter()
    prediction = fitted.predict(query)
    result["predict_s_64"] = (time.perf_counter() - start) / len(heldout)

    truth = synthetic.clean[heldout]
    data_range = float(truth.max() - truth.min())
    observed_images, observed_times = synthetic.images[observed], synthetic.times[observed]
    methods = {
        "NODER": prediction.images,
        "nearest scan": nearest_scan(observed_images, observed_times, query),
        "linear interpolation": linear_interpolation(observed_images, observed_times, query),
    }
    for name, images in methods.items():
        result[name] = {
            "nrmse": nrmse(images, truth).tolist(),
            "ssim": ssim(images, truth, data_range).tolist(),
            "psnr": psnr(images, truth, data_range).tolist(),
        }

    big = NODER((128, 128, 128))
    big.set_initial_state()
    subject = type(fitted)(big, torch.rand(1, 1, 128, 128, 128), fitted.times, fitted.affine, fitted.intensity)
    subject.predict([1.0])
    start = time.perf_counter()
    subject.predict(HELDOUT_TIMES, batch_size=1)
    result["predict_s_128"] = (time.perf_counter() - start) / len(HELDOUT_TIMES)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set to the number of idle cores)")
    parser.add_argument("--size", type=int, default=64, help="edge length of the fitted volume")
    parser.add_argument("--epochs", type=int, default=300, help="epochs of the fit (FitConfig.epochs)")
    parser.add_argument("--device", default="cpu", help="torch device of the fit")
    parser.add_argument("--observed", type=float, nargs="+", default=OBSERVED_TIMES, help="observed times (years)")
    parser.add_argument("--compare-tree", default=None, help="also fit with the package of this source tree")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    runs, others = [], []
    versions = [(None, runs)] + ([(args.compare_tree, others)] if args.compare_tree else [])
    for _ in range(args.repeats):
        for tree, results in versions:
            with context.Pool(1) as pool:
                results.append(pool.apply(_one_run, (args, tree)))

    def median(key: str, results: list = runs) -> float:
        return statistics.median(run[key] for run in results)

    print(f"## fit_speed: {args.size}^3, {len(args.observed)} observed scans, {args.threads} thread(s), {args.device}, "
          f"median of {args.repeats} run(s)\n")
    if others:
        print(f"| package | fit time (s), median | runs (s) |\n|---|---|---|")
        for results in (runs, others):
            name = results[0]["package"]
            seconds = ", ".join(f"{run['fit_s']:.1f}" for run in results)
            print(f"| {name} | {median('fit_s', results):.1f} | {seconds} |")
        print(f"\nratio {runs[0]['package']} / {others[0]['package']}: {median('fit_s') / median('fit_s', others):.2f}\n")
    print("| quantity | value |\n|---|---|")
    print(f"| fit time (s) | {median('fit_s'):.1f} |")
    print(f"| epochs run | {median('epochs'):.0f} |")
    print(f"| seconds per epoch (mean over levels) | {median('s_per_epoch'):.3f} |")
    print(f"| predict, s per time point, {args.size}^3 (image + ddf + Jacobian) | {median('predict_s_64'):.3f} |")
    print(f"| predict, s per time point, 128^3 | {median('predict_s_128'):.3f} |")
    print(f"| peak resident memory (GB) | {median('peak_rss_gb'):.2f} |")
    labels = [f"t={t:g}" + (" (extrapolation)" if t > max(args.observed) else "") for t in HELDOUT_TIMES]
    print("\nHeld-out accuracy against the noise-free truth (median over runs):\n")
    print("| method | metric | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name in ("NODER", "nearest scan", "linear interpolation"):
        for metric, digits in (("nrmse", 4), ("ssim", 4), ("psnr", 2)):
            values = [statistics.median(run[name][metric][i] for run in runs) for i in range(len(labels))]
            print(f"| {name} | {metric.upper()} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")


if __name__ == "__main__":
    main()
