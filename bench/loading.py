"""Data loading: the baseline and Pipe-BD's auto plan on emulated devices, with a dataset whose
samples take time to load, loading in the rank itself and in ``--num-workers`` DataLoader
processes per loading rank, side by side in one run, measured next to the simulator.

    python bench/loading.py                                   # W=4, 1 ms per sample, 0 and 2 workers
    python bench/loading.py --append BENCHMARKS.md

Each sample sleeps ``--item-ms`` when loaded (like reading a file: it needs no core), so the
ranks and their loader processes really run in parallel on a 2-core machine. The blocks are the
``unbalanced`` emulated profile (``bench/planner.py``), costs x``--scale``. The baseline loads
every batch once per block; Pipe-BD loads it once, on stage 0. The profile (and so the auto plan
and the simulation) is taken with the same ``num_workers`` as the run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Dataset

import pipebd
from pipebd.models import PROFILES, emulated_pair
from pipebd.simulator import simulate, simulate_baseline

from common import cell, publish

FEATURES = 8


class SlowSamples(Dataset):
    """``count`` random samples, each taking ``delay`` seconds to load."""

    def __init__(self, count: int, delay: float):
        self.data = torch.randn(count, FEATURES, generator=torch.Generator().manual_seed(0))
        self.delay = delay

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        return self.data[i]


def pct(values) -> str:
    return " ".join(f"{v:.0%}" for v in values)


def run(args: argparse.Namespace) -> list[str]:
    teacher, student = emulated_pair(PROFILES["unbalanced"], features=FEATURES, scale=args.scale)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    data = SlowSamples(4 * args.batch_size, args.item_ms * 1e-3)
    lines = ["| strategy | num_workers | plan | measured samples/s | simulated | sim error | vs baseline, same loading | "
             f"vs baseline, num_workers {args.num_workers[0]} | stage waiting | stage utilization |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    baseline = {}
    for workers in args.num_workers:
        profile = distiller.profile(data, args.batch_size, args.world_size, num_workers=workers)
        for strategy, plan in (("baseline", None), ("pipebd", "auto")):
            report = distiller.fit(data, batch_size=args.batch_size, steps=args.steps, world_size=args.world_size,
                                   strategy=strategy, plan=plan, seed=0, num_workers=workers, progress=False)
            sim = (simulate_baseline(profile, args.world_size, args.steps) if strategy == "baseline"
                   else simulate(profile, report.plan, args.steps))
            if strategy == "baseline":
                baseline[workers] = report.samples_per_s
            measured = report.samples_per_s
            lines.append(f"| {strategy} | {workers} | {cell(report.plan.describe())} | {measured:.0f} | "
                         f"{sim.samples_per_s:.0f} | {sim.samples_per_s / measured - 1:+.1%} | "
                         f"{measured / baseline[workers]:.2f}x | {measured / baseline[args.num_workers[0]]:.2f}x | "
                         f"{pct(s.waiting for s in report.stages)} | {pct(report.stage_utilization)} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--item-ms", type=float, default=1.0, help="milliseconds to load one sample")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2],
                        help="loader processes per loading rank, one configuration each (the first is the "
                             "reference of the last ratio column)")
    parser.add_argument("--scale", type=float, default=2.0, help="multiply every emulated block cost")
    parser.add_argument("--append", metavar="PATH", help="append the result as markdown to PATH")
    args = parser.parse_args(argv)
    for name in ("world_size", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.item_ms < 0 or args.scale <= 0 or min(args.num_workers) < 0:
        parser.error("need --item-ms >= 0, --scale > 0 and --num-workers >= 0")
    title = (f"Data loading on emulated devices: {args.item_ms:g} ms per sample, unbalanced profile x{args.scale:g}, "
             f"W={args.world_size}, batch {args.batch_size}, {args.steps} steps")
    publish(title, "loading.py", argv, run(args), args.append)


if __name__ == "__main__":
    main()
