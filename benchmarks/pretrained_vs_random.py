"""Does the pretrained deformation autoencoder help NODER's fit? Pretrained versus random initial weights.

The same synthetic sequences (``noder_monai.data.synthetic_sequence``, kinds brain and cardiac, 3D 32^3 and 2D
64^2, several seeds, noise 0.02) are fitted twice with the same ``FitConfig`` and seed: once starting from the shipped
autoencoder (``default_autoencoder_path``, or ``--weights-3d`` / ``--weights-2d``) and once from random weights.
Some time points are held out: interior ones (interpolation) and the last one (extrapolation). Reported per case,
averaged over seeds: held-out NRMSE (interpolation and extrapolation), SSIM and PSNR against the noise-free truth,
% folded voxels, fit seconds, and the epochs each run needs to reach 90% of the loss decrease of the coarsest level
(the level where the two runs' losses are comparable over the most epochs; target = initial loss + 0.9 * (best
final coarse-level loss of the two runs - initial loss)).

Run from the repository root (one thread, as on the shared 2-core CPU)::

    python benchmarks/pretrained_vs_random.py --seeds 0 1 2 --epochs 300 100 --json results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from noder_monai.data import SubjectSequence, synthetic_sequence
from noder_monai.engines import FitConfig, fit_sequence
from noder_monai.engines.pretrain import default_autoencoder_path
from noder_monai.metrics import nrmse, percent_folded, psnr, ssim

CASES = [("brain", 3, 32), ("cardiac", 3, 32), ("brain", 2, 64), ("cardiac", 2, 64)]
HELDOUT = {
    "brain": {"interpolation": (2, 5), "extrapolation": (8,)},
    "cardiac": {"interpolation": (2, 5), "extrapolation": (9,)},
}
"""Held-out indices into ``DEFAULT_TIMES`` (brain: 1.5 and 3.6 years, last 6.0; cardiac: 0.2 and 0.5, last 0.9)."""


def epochs_to_target(history: list[dict], target: float) -> int | None:
    """First epoch (1-based count) whose total loss is <= target, among the coarsest level's epochs."""
    level = history[0]["level"]
    for record in history:
        if record["level"] != level:
            return None
        if record["total"] <= target:
            return record["epoch"] + 1
    return None


def run_case(kind: str, spatial_dims: int, size: int, seed: int, epochs: int, weights: Path | None) -> dict:
    """Fit one sequence from ``weights`` (None: random) and score the held-out time points."""
    truth = synthetic_sequence(spatial_dims, size, kind=kind, noise=0.02, seed=seed)
    held = sorted(i for split in HELDOUT[kind].values() for i in split)
    observed = [i for i in range(len(truth.times)) if i not in held]
    sequence = SubjectSequence.from_tensors(truth.images[observed], truth.times[observed], subject=f"{kind}-{seed}")
    started = time.perf_counter()
    fitted = fit_sequence(sequence, FitConfig(epochs=epochs), pretrained=weights, seed=0, progress=False)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "history": [{k: r[k] for k in ("epoch", "level", "total")} for r in fitted.history]}
    for split, indices in HELDOUT[kind].items():
        prediction = fitted.predict(truth.times[list(indices)])
        target = truth.clean[list(indices)]
        data_range = float(truth.clean.max() - truth.clean.min())
        result[f"nrmse_{split}"] = nrmse(prediction.images, target).tolist()
        result[f"ssim_{split}"] = ssim(prediction.images, target, data_range=data_range).tolist()
        result[f"psnr_{split}"] = psnr(prediction.images, target, data_range=data_range).tolist()
        result[f"folded_{split}"] = percent_folded(prediction.ddfs).tolist()
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(runs: dict, seeds: list[int]) -> list[dict]:
    """One row per (case, epochs, init), averaged over seeds."""
    rows = []
    for (kind, dims, size, epochs), by_init in runs.items():
        reach: dict[str, list] = {"pretrained": [], "random": []}
        for seed in seeds:
            histories = {init: by_init[init][seed]["history"] for init in reach}
            coarse = {init: [r["total"] for r in h if r["level"] == h[0]["level"]] for init, h in histories.items()}
            start = coarse["random"][0]
            target = start + 0.9 * (min(c[-1] for c in coarse.values()) - start)
            for init in reach:
                reach[init].append(epochs_to_target(histories[init], target))
        for init in ("pretrained", "random"):
            results = [by_init[init][seed] for seed in seeds]
            reached = [e for e in reach[init] if e is not None]
            rows.append({
                "case": f"{kind} {dims}D {size}^{dims}",
                "epochs": epochs,
                "init": init,
                "nrmse_interpolation": mean([mean(r["nrmse_interpolation"]) for r in results]),
                "nrmse_extrapolation": mean([mean(r["nrmse_extrapolation"]) for r in results]),
                "ssim": mean([mean(r["ssim_interpolation"] + r["ssim_extrapolation"]) for r in results]),
                "psnr": mean([mean(r["psnr_interpolation"] + r["psnr_extrapolation"]) for r in results]),
                "folded": mean([mean(r["folded_interpolation"] + r["folded_extrapolation"]) for r in results]),
                "seconds": mean([r["seconds"] for r in results]),
                "epochs_to_90": mean(reached) if len(reached) == len(seeds) else None,
                "reached": f"{len(reached)}/{len(seeds)}",
            })
    return rows


def print_table(rows: list[dict]) -> None:
    print("| case | epochs | init | NRMSE interp | NRMSE extrap | SSIM | PSNR | % folded | fit s "
          "| epochs to 90% (coarse level) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        reach = "n/a" if row["epochs_to_90"] is None else f"{row['epochs_to_90']:.0f}"
        print(
            f"| {row['case']} | {row['epochs']} | {row['init']} | {row['nrmse_interpolation']:.4f} | "
            f"{row['nrmse_extrapolation']:.4f} | {row['ssim']:.4f} | {row['psnr']:.2f} | {row['folded']:.3f} | "
            f"{row['seconds']:.1f} | {reach} ({row['reached']}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[300, 100], help="FitConfig.epochs budgets to compare")
    parser.add_argument("--cases", nargs="+", default=[f"{k}{d}d" for k, d, _ in CASES], help="e.g. brain3d cardiac2d")
    parser.add_argument("--weights-3d", type=Path, default=None, help="autoencoder file (default: the shipped one)")
    parser.add_argument("--weights-2d", type=Path, default=None, help="autoencoder file (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = {3: args.weights_3d or default_autoencoder_path(3), 2: args.weights_2d or default_autoencoder_path(2)}
    runs: dict = {}
    for kind, dims, size in CASES:
        if f"{kind}{dims}d" not in args.cases:
            continue
        for epochs in args.epochs:
            by_init = runs.setdefault((kind, dims, size, epochs), {"pretrained": {}, "random": {}})
            for seed in args.seeds:
                for init, path in (("pretrained", weights[dims]), ("random", None)):
                    by_init[init][seed] = run_case(kind, dims, size, seed, epochs, path)
                    print(f"{kind} {dims}D seed {seed} epochs {epochs} {init}: "
                          f"NRMSE {mean(by_init[init][seed]['nrmse_interpolation']):.4f} / "
                          f"{mean(by_init[init][seed]['nrmse_extrapolation']):.4f}, "
                          f"{by_init[init][seed]['seconds']:.1f} s", flush=True)
    rows = summarise(runs, args.seeds)
    print_table(rows)
    if args.json is not None:
        named = {"/".join(map(str, key)): value for key, value in runs.items()}
        args.json.write_text(json.dumps({"rows": rows, "runs": named}, indent=1))


if __name__ == "__main__":
    main()
