"""Measure a real six-block pair on one device and save it as an emulated profile.

    python bench/gpu_profile.py --out bench/results/profile-h200.json          # on a GPU
    python bench/planner.py --profile-file bench/results/profile-h200.json --world-size 4

The planner benchmark runs many ranks of ``pipebd.models.EmulatedBlock``, each sleeping what a
call of its block costs. This script supplies those costs from a measurement instead of a guess:
it profiles the CNN pair cut into ``--blocks`` blocks (``cnn_pair(blocks=6)``: two
blocks at 32x32, two at 16x16, one each at 8x8 and 4x4) on ``--device``, teacher forward and
student forward + backward + step of every block at every per-replica batch ``ceil(B / k)``,
``k = 1 .. --world-size``. The JSON keeps every measured cost: an emulated block sleeps the
measured seconds at the measured batch sizes (straight lines between them). The table also shows
a straight-line fit ``a + b * rows`` per block, to read how much of a call's cost is fixed. One
device stands in for all ranks, so no communication is measured here; the emulated ranks
communicate over gloo on the machine that runs ``bench/planner.py``.

The fixed part ``a`` is what makes small per-replica batches expensive on a GPU (kernel launches
and other per-call work), and what the baseline, which runs every block at ``B / W`` rows, pays
most often. Emulated sleeps shorter than about 2 ms are dominated by the host's own per-call
overhead, so ``bench/planner.py`` stretches a measured profile's costs until the cheapest call
sleeps 5 ms (or by ``--scale``); the ratios between configurations do not depend on it.
"""

from __future__ import annotations

import argparse
import os

import torch

import pipebd
from pipebd.models import cnn_input_shape, cnn_pair
from pipebd.models.emulated import EmulatedProfile

from common import command_line, machine, publish


def measure(args: argparse.Namespace) -> tuple[pipebd.profiler.Profile, EmulatedProfile]:
    teacher, student = cnn_pair(width=args.width, depth=args.depth, blocks=args.blocks, seed=0)
    data = torch.randn(args.batch_size, *cnn_input_shape(), generator=torch.Generator().manual_seed(0))
    distiller = pipebd.Distiller(teacher, student, device=args.device)
    measured = distiller.profile(data, args.batch_size, args.world_size, threads=args.threads,
                                 warmup=args.warmup, repeats=args.repeats, comm=False)
    return measured, EmulatedProfile.from_measured(measured)


def fit_error(cost, rows: list[int], times: list[float]) -> float:
    """Worst relative error of the line ``a + b * rows`` at the measured batch sizes."""
    return max(abs((cost.a + cost.b * r) / t - 1) for r, t in zip(rows, times))


def table(measured: pipebd.profiler.Profile, fitted: EmulatedProfile) -> tuple[list[str], float]:
    """Per block: the fitted lines, their worst errors, and the measured total at each batch size;
    and the worst error of all."""
    rows = measured.rows
    lines = ["| block | teacher a (ms) | teacher b (us/row) | fit error | student a (ms) | student b (us/row) | fit error | "
             + " | ".join(f"teacher+student ms at {r} rows" for r in rows) + " |",
             "|---" * (7 + len(rows)) + "|"]
    worst = 0.0
    for i in range(measured.num_blocks):
        cells = [str(i)]
        for cost, times in ((fitted.teacher[i], measured.teacher[i]), (fitted.student[i], measured.student[i])):
            error = fit_error(cost, rows, times)
            worst = max(worst, error)
            cells += [f"{cost.a * 1e3:.3f}", f"{cost.b * 1e6:.2f}", f"{error:.0%}"]
        cells += [f"{(measured.teacher[i][j] + measured.student[i][j]) * 1e3:.2f}" for j in range(len(rows))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2, help="teacher residual blocks per block")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch; rows ceil(B/k) are measured")
    parser.add_argument("--world-size", type=int, default=4, help="largest replica count k")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True, help="JSON file for bench/planner.py --profile-file")
    parser.add_argument("--append", metavar="PATH", help="append the result as markdown to PATH")
    args = parser.parse_args(argv)
    if min(args.world_size, args.batch_size) < 2:
        parser.error("--world-size and --batch-size must be >= 2: the profile needs at least two batch sizes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    measured, fitted = measure(args)
    print(measured, flush=True)
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else machine()
    fitted = fitted._replace(device=device)
    lines, worst = table(measured, fitted)
    lines += ["", f"Device: {device}. CNN pair width {args.width}, teacher depth {args.depth}, {args.blocks} blocks, "
              f"global batch {args.batch_size}; median of {args.repeats} after {args.warmup} warm-up calls; "
              f"worst straight-line fit error {worst:.0%}."]
    print(*lines, sep="\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fitted.save(args.out, measured, machine=machine(), blocks=args.blocks, width=args.width, depth=args.depth,
                command=command_line("gpu_profile.py", argv))
    print(f"wrote {args.out}")
    publish(f"Measured block profile, {args.blocks}-block CNN pair on {device}", "gpu_profile.py", argv, lines, args.append)


if __name__ == "__main__":
    main()
