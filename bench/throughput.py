"""Baseline (DNA-style) vs Pipe-BD teacher relaying on the CNN pair, side by side in one run.

    python bench/throughput.py                      # world size 2, CPU
    python bench/throughput.py --plan "0|1-3" --plan "0-2|3" --append BENCHMARKS.md

The baseline and Pipe-BD with the default plan (plus each ``--plan``) run in turn ``--repeats``
times (this machine is shared and noisy); each row reports the median samples/s, its ratio to the
baseline's, the teacher block runs and the per-stage utilization of the median run.
"""

from __future__ import annotations

import argparse
from datetime import date

import torch

import pipebd
from common import cell, cnn_run_arguments, command_line, machine
from pipebd.models import cnn_input_shape, cnn_pair


def run(strategy: str, plan: pipebd.Plan | None, args: argparse.Namespace, data: torch.Tensor,
        steps: int) -> pipebd.Report:
    teacher, student = cnn_pair(width=args.width, depth=args.depth, expand=args.expand, seed=0)
    distiller = pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
                                 device="cpu")
    return distiller.fit(data, batch_size=args.batch_size, steps=steps, world_size=args.world_size,
                         strategy=strategy, plan=plan, seed=0, threads=args.threads, progress=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cnn_run_arguments(parser)
    parser.add_argument("--plan", action="append", default=[], type=pipebd.Plan.parse, metavar="PLAN",
                        help='also run pipebd with this plan, e.g. "0|1-3" or "[0-1]x1 | [2-3]x2"')
    parser.add_argument("--append", metavar="PATH", help="append the result as markdown to PATH")
    args = parser.parse_args(argv)
    for plan in args.plan:      # before anything runs, not when its turn comes
        try:
            plan.validate(4, args.world_size)     # cnn_pair's 4 blocks
        except ValueError as e:
            parser.error(f"--plan {plan.describe()}: {e}")
    configs = {"baseline": ("baseline", None), "pipebd": ("pipebd", None)}
    configs.update({f"pipebd {p.describe()}": ("pipebd", p) for p in args.plan})

    data = torch.randn(args.batch_size * args.steps, *cnn_input_shape(), generator=torch.Generator().manual_seed(0))
    run("pipebd", None, args, data, steps=2)  # start the worker pool and warm up once
    reports: dict[str, list[pipebd.Report]] = {label: [] for label in configs}
    for _ in range(args.repeats):
        for label, (strategy, plan) in configs.items():
            reports[label].append(run(strategy, plan, args, data, args.steps))
    median = {s: sorted(rs, key=lambda r: r.samples_per_s)[(len(rs) - 1) // 2] for s, rs in reports.items()}
    base = median["baseline"].samples_per_s

    cmd = command_line("throughput.py", argv)
    lines = [
        f"### Throughput: baseline vs pipebd, CNN pair, world size {args.world_size} ({date.today()})",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}  ",
        f"Shapes: batch {args.batch_size} x 3x32x32, {args.steps} steps, teacher ResNet-style width "
        f"{args.width} depth {args.depth}, student MobileNetV2-style expand {args.expand}, "
        f"{args.threads} thread(s) per rank, median of {args.repeats} alternating runs",
        "",
        "| run | plan | samples/s (median) | vs baseline | all runs | teacher block runs | stage utilization |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rs in reports.items():
        m = median[label]
        runs = ", ".join(f"{r.samples_per_s:.1f}" for r in rs)
        util = ", ".join(f"{u:.0%}" for u in m.stage_utilization)
        plan = cell(m.plan.describe())
        lines.append(f"| {label.split()[0]} | {plan} | {m.samples_per_s:.1f} | "
                     f"{m.samples_per_s / base:.2f}x | {runs} | {m.teacher_block_runs} | {util} |")
    text = "\n".join(lines + [""])
    print(text)
    print(*median.values(), sep="\n\n")
    if args.append:
        with open(args.append, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
