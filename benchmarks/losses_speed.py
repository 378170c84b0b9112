"""Speed of the local NCC loss and of the box filter against their library / textbook counterparts.

Forward + backward (gradient with respect to the input), one 1-channel volume, ``torch.set_num_threads(1)``,
median of 5 runs after a warm-up, the compared functions run in turn. Run from the repository root::

    python benchmarks/losses_speed.py

Measured on 2-core CPU, 1 thread (torch 2.13.0+cpu, monai 1.6.1), while other jobs shared the machine
(load average 4-5: absolute times are about twice the idle ones; the ratios are what to read):

    Local NCC loss, forward + backward, median of 5, 1 thread
    | size | k | MONAI LNCC s | ours s | MONAI / ours | abs value diff |
    |---|---|---|---|---|---|
    | 64^3 | 9 | 0.087 | 0.067 | 1.3x | 0.0e+00 |
    | 64^3 | 21 | 0.471 | 0.075 | 6.2x | 0.0e+00 |
    | 128^3 | 9 | 2.082 | 0.715 | 2.9x | 0.0e+00 |
    | 128^3 | 21 | 5.464 | 0.759 | 7.2x | 0.0e+00 |

    Box mean k=15, forward + backward, median of 5, 1 thread
    | size | box_filter k=15 (cumsum) s | separable avg_pool s | conv k^3 s | pool / cumsum | conv / cumsum |
    |---|---|---|---|---|---|
    | 64^3 | 0.015 | 0.053 | 3.417 | 3.5x | 225x |
    | 128^3 | 0.123 | 0.330 | skipped (~27 s est.) | 2.7x | - |

    total 87 s

Notes: MONAI's ``LocalNormalizedCrossCorrelationLoss`` sums each window with separable convolutions
(``kernel_size`` taps per axis), ``noder_monai.losses.LocalNCCLoss`` with running sums; both give the same value
(MONAI built with ``smooth_nr=0.0``, this package's default).
"conv k^3" is one dense ``conv3d`` with a 15^3 averaging kernel (k^3 taps per voxel); it is skipped at 128^3
when eight times its 64^3 time exceeds 5 s.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss

from noder_monai.functional import box_filter
from noder_monai.losses import LocalNCCLoss

SIZES = (64, 128)
NCC_KERNELS = (9, 21)
BOX_KERNEL = 15
RUNS = 5
CONV_LIMIT_S = 5.0


def time_forward_backward(
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor
) -> dict[str, float]:
    """Median wall time in seconds of ``function(x).sum().backward()`` for each function over ``RUNS`` runs.

    The functions run in turn (one run of each per round, after a warm-up round), so a change in the load of a
    shared machine affects them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in functions}
    for run in range(RUNS + 1):
        for name, function in functions.items():
            leaf = x.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            function(leaf).sum().backward()
            if run:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def separable_avg_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-padded box mean by three 1D ``avg_pool3d`` passes of ``kernel_size`` taps."""
    for axis in range(3):
        kernel = [1, 1, 1]
        padding = [0, 0, 0]
        kernel[axis], padding[axis] = kernel_size, kernel_size // 2
        x = F.avg_pool3d(x, kernel, stride=1, padding=padding, count_include_pad=True)
    return x


def dense_conv(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-padded box mean by one ``conv3d`` with a ``kernel_size ** 3`` averaging kernel."""
    weight = torch.full((1, 1, kernel_size, kernel_size, kernel_size), kernel_size**-3.0, dtype=x.dtype)
    return F.conv3d(x, weight, padding=kernel_size // 2)


def lncc_rows() -> list[str]:
    rows = ["| size | k | MONAI LNCC s | ours s | MONAI / ours | abs value diff |", "|---|---|---|---|---|---|"]
    for size in SIZES:
        generator = torch.Generator().manual_seed(0)
        target = torch.rand(1, 1, size, size, size, generator=generator)
        pred = 0.5 * target + 0.5 * torch.rand(1, 1, size, size, size, generator=generator)
        for kernel_size in NCC_KERNELS:
            monai = LocalNormalizedCrossCorrelationLoss(3, kernel_size, "rectangular", smooth_nr=0.0, smooth_dr=1e-5)
            ours = LocalNCCLoss(3, kernel_size)
            losses = {"monai": lambda p: monai(p, target), "ours": lambda p: ours(p, target)}
            times = time_forward_backward(losses, pred)
            t_monai, t_ours = times["monai"], times["ours"]
            with torch.no_grad():
                diff = abs(monai(pred, target).item() - ours(pred, target).item())
            rows.append(
                f"| {size}^3 | {kernel_size} | {t_monai:.3f} | {t_ours:.3f} | {t_monai / t_ours:.1f}x | {diff:.1e} |"
            )
    return rows


def box_rows() -> list[str]:
    rows = [
        f"| size | box_filter k={BOX_KERNEL} (cumsum) s | separable avg_pool s | conv k^3 s | pool / cumsum "
        "| conv / cumsum |",
        "|---|---|---|---|---|---|",
    ]
    conv_estimate = 0.0
    for size in SIZES:
        x = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
        times = time_forward_backward(
            {"cumsum": lambda v: box_filter(v, BOX_KERNEL), "pool": lambda v: separable_avg_pool(v, BOX_KERNEL)}, x
        )
        t_cumsum, t_pool = times["cumsum"], times["pool"]
        if conv_estimate <= CONV_LIMIT_S:
            t_conv = time_forward_backward({"conv": lambda v: dense_conv(v, BOX_KERNEL)}, x)["conv"]
            conv_estimate = 8.0 * t_conv
            conv, ratio = f"{t_conv:.3f}", f"{t_conv / t_cumsum:.0f}x"
        else:
            conv, ratio = f"skipped (~{conv_estimate:.0f} s est.)", "-"
        rows.append(f"| {size}^3 | {t_cumsum:.3f} | {t_pool:.3f} | {conv} | {t_pool / t_cumsum:.1f}x | {ratio} |")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    print("Local NCC loss, forward + backward, median of 5, 1 thread")
    print("\n".join(lncc_rows()))
    print()
    print(f"Box mean k={BOX_KERNEL}, forward + backward, median of 5, 1 thread")
    print("\n".join(box_rows()))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
