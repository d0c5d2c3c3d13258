"""Codistillation against training alone, on small real and synthetic data, in one run.

    python bench/codistill.py                          # digits and synthetic, plot to bench/results/
    python bench/codistill.py --task synthetic --plot '' --append BENCHMARKS.md
    python bench/codistill.py --smoke --plot /tmp/c.png   # a few steps: checks the script

Tasks (no download):
- digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; the optional
  ``data`` extra), a seeded 75/25 train/test split, an MLP 64-64-10.
- synthetic: 32 Gaussian features, 10 classes whose labels are *sampled* from a fixed random
  2-layer network's softmax (its argmax is right on 87% of the rows, the best a model can do), 16384
  train and 4096 test rows, an MLP 32-128-10 that sees too little data to get there.

Methods, each run with seeds 0 and 1 (a seed fixes initialization, shards and batch order):
- alone: one model on all the data (``Codistillation(n=1)``);
- codistill: 2 models on disjoint halves, each distilling from the other's checkpoint exchanged
  every ``--exchange-every`` steps (staleness: the checkpoint of one exchange earlier);
- online: 2 models on the same batches distilling from each other's current predictions;
- ensemble: the averaged predictions of the two "alone" models (seeds 0 and 1).
Every model takes the same number of steps of the same batch size, so codistill and online use
twice the computation of "alone", as in Anil et al.; the ensemble too, and it costs twice at test
time. Learning rate: ``pipebd.lr`` (linear scaling from a rate tuned for alone at 32 samples per
step, warmup over the first 5% of steps chained with a cosine decay, no weight decay on biases).

Printed per task: accuracy on the test rows after the last step (seed 0 / seed 1), the steps each
method's seed-0 model needed to reach the seed-0 "alone" model's final accuracy, and prediction
churn: the fraction of test rows whose predicted class differs between the seed-0 and the seed-1
run (model 0 of each).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import pipebd
from pipebd import datasets
from pipebd.lr import linear_scaling, param_groups, warmup
from pipebd.models import mlp_classifier

from common import machine, publish

SEEDS = (0, 1)
METHODS = ("alone", "codistill", "online", "ensemble")


@dataclass
class Task:
    name: str
    train: TensorDataset
    test: tuple[Tensor, Tensor]
    hidden: int
    batch_size: int
    steps: int
    eval_every: int
    base_lr: float     # at 32 samples per step; pipebd.lr.linear_scaling adapts it to batch_size

    @property
    def features(self) -> int:
        return self.train.tensors[0].shape[1]

    def model(self, i: int) -> nn.Module:
        return mlp_classifier(self.features, self.hidden, 10)


def digits(steps: int, eval_every: int) -> Task:
    try:
        x, y = datasets.digits()
    except ImportError as err:
        raise SystemExit(str(err)) from None
    train, test = datasets.split(x, y, test_rows=len(x) // 4)
    return Task("digits", train, test, hidden=64, batch_size=32, steps=steps, eval_every=eval_every, base_lr=0.2)


def synthetic(steps: int, eval_every: int, rows: int = 16384 + 4096) -> Task:
    x, y = datasets.synthetic(rows)
    train, test = datasets.split(x, y, test_rows=rows // 5)
    return Task("synthetic", train, test, hidden=128, batch_size=64, steps=steps, eval_every=eval_every,
                base_lr=0.025)


def fit(task: Task, method: str, seed: int, args: argparse.Namespace) -> pipebd.CodistillReport:
    lr = linear_scaling(task.base_lr, task.batch_size, base_batch_size=32)

    def optimizer(params):
        return torch.optim.SGD(param_groups(params, weight_decay=1e-4), lr=lr, momentum=0.9)

    def scheduler(opt):
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=task.steps)
        return warmup(opt, max(1, task.steps // 20), start_factor=0.1, then=cosine)

    n, mode = (1, "codistill") if method == "alone" else (2, method)
    cd = pipebd.Codistillation(task.model, n=n, optimizer=optimizer, scheduler=scheduler, alpha=args.alpha,
                               temperature=args.temperature, burn_in=args.burn_in,
                               exchange_every=args.exchange_every, mode=mode, device="cpu")
    world_size = 1 if n == 1 else args.world_size
    return cd.fit(task.train, batch_size=task.batch_size, steps=task.steps, world_size=world_size, seed=seed,
                  eval_data=task.test, eval_every=task.eval_every, progress=False)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(-1) == labels).float().mean().item()


def curves(reports: dict, labels: Tensor) -> dict[str, list[float]]:
    """Seed-0 accuracy at every evaluation, per method (model 0; the ensemble of both seeds)."""
    out = {m: reports[(m, 0)].accuracy[0] for m in METHODS[:-1]}
    alone = [reports[("alone", s)].eval_probs[0] for s in SEEDS]
    out["ensemble"] = [accuracy((a + b) / 2, labels) for a, b in zip(*alone)]
    return out


def churn(reports: dict, method: str) -> float:
    first, second = (reports[(method, s)] for s in SEEDS)
    return first.churn(second)


def run_task(task: Task, args: argparse.Namespace) -> tuple[list[str], dict[str, list[float]], list[int]]:
    reports, wall = {}, {}
    for method in METHODS[:-1]:
        for seed in SEEDS:
            reports[(method, seed)] = fit(task, method, seed, args)
            # Training time from the ranks' start barrier: not the process start or a first
            # call's one-time costs, which fell on whichever method ran first.
            wall[method] = wall.get(method, 0.0) + reports[(method, seed)].wall_s
    labels = task.test[1]
    steps = reports[("alone", 0)].eval_steps
    acc = curves(reports, labels)
    final = {m: [reports[(m, s)].accuracy[0][-1] for s in SEEDS] for m in METHODS[:-1]}
    final["ensemble"] = [acc["ensemble"][-1]]
    target = acc["alone"][-1]
    rows = [f"**{task.name}**: {len(task.train)} train / {len(labels)} test rows, batch {task.batch_size} "
            f"per model, {task.steps} steps, evaluated every {task.eval_every}; alpha {args.alpha}, "
            f"T {args.temperature}, burn-in {args.burn_in}, exchange every {args.exchange_every} steps, "
            f"world_size {args.world_size} for the 2-model runs.",
            "",
            "| method | models trained | test accuracy, seed 0 / 1 | steps to reach alone's final "
            f"({target:.2%}) | churn seed 0 vs 1 | training s (both seeds) |",
            "|---|---|---|---|---|---|"]
    for m in METHODS:
        reached = next((s for s, a in zip(steps, acc[m]) if a >= target), None)
        reach = f"{reached} ({reached / task.steps:.0%})" if reached is not None else "not reached"
        if m == "ensemble":
            rows.append(f"| ensemble | 2 (the alone runs) | {final[m][0]:.2%} (seeds 0+1) | {reach} | - | - |")
        else:
            rows.append(f"| {m} | {1 if m == 'alone' else 2} | {' / '.join(f'{a:.2%}' for a in final[m])} | "
                        f"{reach} | {churn(reports, m):.2%} | {wall[m]:.1f} |")
    cd = reports[("codistill", 0)]
    rows += ["", f"codistill seed 0: distillation from step "
             f"{next((t for t, s in enumerate(cd.sources) if s is not None), None)}, "
             f"{cd.exchanged_bytes / 1e3:.1f} kB received per rank, {cd.exchange_wait_s * 1e3:.1f} ms blocked "
             f"on transfers, {cd.samples_per_s:.0f} samples/s over both models."]
    return rows, acc, steps


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('no plot: matplotlib is not installed (pip install -e ".[plot]")')
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, (acc, steps)) in zip(axes[0], results.items()):
        for m in METHODS:
            ax.plot(steps, acc[m], label=m, linestyle="--" if m == "ensemble" else "-")
        ax.set_title(name)
        ax.set_xlabel("steps (per model)")
        ax.set_ylabel("test accuracy (seed 0)")
        best = max(max(a) for a in acc.values())
        ax.set_ylim(max(0.0, math.floor((best - 0.25) * 10) / 10), min(1.0, best + 0.03))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["digits", "synthetic", "all"], default="all")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--burn-in", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--exchange-every", type=int, default=None, help="default: 2.5%% of the steps")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the 2-model runs (1 or 2 or 4)")
    p.add_argument("--plot", default="bench/results/codistill.png")
    p.add_argument("--append", help="append the tables to this markdown file")
    p.add_argument("--smoke", action="store_true", help="a few steps on less data: checks the script")
    args = p.parse_args()
    torch.set_num_threads(1)
    steps = {"digits": (40, 10) if args.smoke else (800, 20), "synthetic": (40, 10) if args.smoke else (2000, 50)}
    builders = {"digits": digits, "synthetic": synthetic}
    lines, results = [], {}
    for name in (["digits", "synthetic"] if args.task == "all" else [args.task]):
        task = builders[name](*steps[name]) if not (args.smoke and name == "synthetic") else \
            synthetic(*steps[name], rows=1200)
        run = argparse.Namespace(**vars(args))
        run.burn_in = args.burn_in if args.burn_in is not None else task.steps // 10
        run.exchange_every = args.exchange_every if args.exchange_every is not None else max(1, task.steps // 40)
        rows, acc, eval_steps = run_task(task, run)
        print("\n".join(rows), end="\n\n", flush=True)
        lines += rows + [""]
        results[name] = (acc, eval_steps)
    print(machine())
    if args.plot:
        plot(results, args.plot)
    publish("Codistillation vs training alone (CPU)", "codistill.py", None, lines, args.append)


if __name__ == "__main__":
    main()
