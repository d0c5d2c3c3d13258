"""pipebd against the training loops a user would write by hand, side by side in one run.

    python bench/handwritten.py                          # world size 2, CPU, CNN pair
    python bench/handwritten.py --repeats 5 --append BENCHMARKS.md

Each pair below trains the same student on the same batches (the order of ``pipebd.data.BatchOrder``
with seed 0) with the same optimizer, so its two sides do the same arithmetic; the script checks
that they end with the same weights before it reports a time.

- ``1 process``: a plain loop (per step: take the batch, then per block teacher forward, student
  forward/backward, optimizer step) against ``fit(world_size=1)``.
- ``data parallel``: W processes with ``DistributedDataParallel`` on every student block, each
  taking B/W rows of every batch, running the teacher chain once and training all blocks, against
  pipebd with the plan ``[0-N]xW`` (one stage, W replicas): the same computation.
- ``blocks in turn``: the DNA-style baseline written with DDP (block after block, the teacher
  recomputed from the input) against ``strategy="baseline"``.

Then pipebd's relay with one block range per rank and with ``plan="auto"``, against the best
hand-written loop. Throughput is samples per second of the training loop (from a barrier after
set-up to the last rank's end, as ``Report.samples_per_s``); ``end to end`` is the wall time of the
whole call, process start and set-up included. All runs alternate, ``--repeats`` times; medians.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pipebd
from common import cell, cnn_run_arguments, machine, publish
from pipebd.data import BatchOrder
from pipebd.models import cnn_input_shape, cnn_pair
from pipebd.runtime.launch import torch_threads

LR, MOMENTUM, SEED = 0.01, 0.9, 0


def build(args: argparse.Namespace) -> tuple[list[nn.Module], list[nn.Module]]:
    return cnn_pair(width=args.width, depth=args.depth, expand=args.expand, seed=SEED)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


# --- the hand-written loops: plain torch and torch.distributed, nothing from pipebd but the order


def train_together(teacher: list[nn.Module], student: list[nn.Module], data: torch.Tensor,
                   args: argparse.Namespace, lo: int, hi: int) -> None:
    """Every step: rows [lo, hi) of the batch through the teacher once, every student block trained."""
    order = BatchOrder(len(data), args.batch_size, SEED)
    optimizers = [sgd(s.parameters()) for s in student]
    for t in range(args.steps):
        x = data[order.indices(t, lo, hi)]
        for i, (tb, sb, opt) in enumerate(zip(teacher, student, optimizers)):
            with torch.no_grad():
                y = tb(x)
            loss = nn.functional.mse_loss(sb(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            x = y


def train_in_turn(teacher: list[nn.Module], student: list[nn.Module], data: torch.Tensor,
                  args: argparse.Namespace, lo: int, hi: int) -> None:
    """Block after block; for block j the teacher runs blocks 0..j from the input."""
    order = BatchOrder(len(data), args.batch_size, SEED)
    for j, sb in enumerate(student):
        opt = sgd(sb.parameters())
        for t in range(args.steps):
            x = data[order.indices(t, lo, hi)]
            with torch.no_grad():
                for tb in teacher[:j]:
                    x = tb(x)
                y = teacher[j](x)
            loss = nn.functional.mse_loss(sb(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


LOOPS: dict[str, Callable[..., None]] = {"together": train_together, "in turn": train_in_turn}


def one_process(loop: str, args: argparse.Namespace, data: torch.Tensor) -> tuple[float, list[dict]]:
    with torch_threads(args.threads):
        teacher, student = build(args)
        for m in teacher:
            m.eval().requires_grad_(False)
        start = time.perf_counter()
        LOOPS[loop](teacher, student, data, args, 0, args.batch_size)
        elapsed = time.perf_counter() - start
    return elapsed, [s.state_dict() for s in student]


def _ddp_rank(rank: int, loop: str, args: argparse.Namespace, data: torch.Tensor, port: int, results: Any) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    teacher, student = build(args)
    for m in teacher:
        m.eval().requires_grad_(False)
    # Per-replica BatchNorm statistics, as pipebd's default (DDP would broadcast rank 0's buffers).
    # torch 2.13 deprecates the flag, but its replacement still syncs buffers at the start.
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    wrapped = [DistributedDataParallel(s, broadcast_buffers=False) for s in student]
    w, b = args.world_size, args.batch_size
    lo, hi = rank * b // w, (rank + 1) * b // w
    dist.barrier()
    start = time.perf_counter()
    LOOPS[loop](teacher, wrapped, data, args, lo, hi)
    elapsed = time.perf_counter() - start
    weights = io.BytesIO()
    torch.save([s.state_dict() for s in student] if rank == 0 else None, weights)
    # As bytes: tensors put on a queue travel as handles into memory that dies with this process.
    results.put((rank, elapsed, weights.getvalue()))
    dist.barrier()   # keep the group until every result is out
    dist.destroy_process_group()


def data_parallel(loop: str, args: argparse.Namespace, data: torch.Tensor) -> tuple[float, list[dict]]:
    """The loop on ``world_size`` spawned ranks with DDP; the slowest rank's time and rank 0's weights."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = 29500 + os.getpid() % 2000
    procs = [ctx.Process(target=_ddp_rank, args=(r, loop, args, data, port, results)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"hand-written rank exited with {p.exitcode}")
    weights = next(w for r, _, w in got if r == 0)
    return max(e for _, e, _ in got), torch.load(io.BytesIO(weights))


# --- pipebd


def pipebd_fit(strategy: str, plan: Any, args: argparse.Namespace, data: torch.Tensor,
               world_size: int) -> tuple[pipebd.Report, list[dict]]:
    teacher, student = build(args)
    distiller = pipebd.Distiller(teacher, student, optimizer=sgd, device="cpu")
    report = distiller.fit(data, batch_size=args.batch_size, steps=args.steps, world_size=world_size,
                           strategy=strategy, plan=plan, seed=SEED, threads=args.threads, progress=False)
    return report, [b.state_dict() for b in distiller.student_model()]


def max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference over the floating-point parameters and buffers of two students."""
    return max(float((x[k].double() - y[k].double()).abs().max()) for x, y in zip(a, b)
               for k in x if x[k].is_floating_point())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cnn_run_arguments(parser)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest weight difference accepted between the two sides of a pair")
    parser.add_argument("--append", metavar="PATH", help="append the result as markdown to PATH")
    args = parser.parse_args(argv)
    w, n = args.world_size, len(build(args)[0])
    data = torch.randn(args.batch_size * args.steps, *cnn_input_shape(), generator=torch.Generator().manual_seed(SEED))

    # label -> (hand-written side or None, pipebd side); each side returns (loop seconds, weights).
    def ours(strategy: str, plan: Any, world_size: int) -> Callable[[], tuple[float, list[dict], Any]]:
        def run() -> tuple[float, list[dict], Any]:
            report, weights = pipebd_fit(strategy, plan, args, data, world_size)
            return report.wall_s, weights, report
        return run

    def theirs(runner: Callable, loop: str) -> Callable[[], tuple[float, list[dict], Any]]:
        return lambda: (*runner(loop, args, data), None)

    pairs: dict[str, tuple[Any, Any]] = {
        "1 process": (theirs(one_process, "together"), ours("pipebd", None, 1)),
        "data parallel": (theirs(data_parallel, "together"), ours("pipebd", pipebd.Plan([range(n)], [w]), w)),
        "blocks in turn": (theirs(data_parallel, "in turn"), ours("baseline", None, w)),
        "relay, one range per rank": (None, ours("pipebd", None, w)),
        "relay, auto": (None, ours("pipebd", "auto", w)),
    }
    # Warm up once (process start, the auto plan's profile cache) and check the weights.
    diffs: dict[str, float] = {}
    for label, (hand, ours_) in pairs.items():
        _, mine, _ = ours_()
        if hand is not None:
            _, theirs_w, _ = hand()
            diffs[label] = max_diff(mine, theirs_w)
            if diffs[label] > args.tolerance:
                sys.exit(f"{label}: pipebd and the hand-written loop end {diffs[label]:.2e} apart "
                         f"(tolerance {args.tolerance:g}); their times would not be comparable")
    loop_s: dict[tuple[str, int], list[float]] = {}
    wall_s: dict[tuple[str, int], list[float]] = {}
    plans: dict[str, str] = {}
    for _ in range(args.repeats):
        for label, sides in pairs.items():
            for side, run in enumerate(sides):
                if run is None:
                    continue
                start = time.perf_counter()
                seconds, _, report = run()
                wall_s.setdefault((label, side), []).append(time.perf_counter() - start)
                loop_s.setdefault((label, side), []).append(seconds)
                if report is not None:
                    plans[label] = report.plan.describe()

    samples = args.batch_size * args.steps
    rate = {key: samples / statistics.median(v) for key, v in loop_s.items()}
    best_hand = max(rate[(label, 0)] for label, (hand, _) in pairs.items() if hand is not None)
    lines = [
        f"Shapes: CNN pair (teacher ResNet-style width {args.width} depth {args.depth}, student "
        f"MobileNetV2-style expand {args.expand}), batch {args.batch_size} x 3x32x32, {args.steps} steps, "
        f"SGD momentum {MOMENTUM}, {args.threads} thread(s) per rank, gloo, median of {args.repeats} "
        f"alternating runs",
        "",
        "| loop | ranks | pipebd plan | hand-written samples/s | pipebd samples/s | pipebd / hand-written "
        "| end to end s (hand / pipebd) | weights max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, (hand, _) in pairs.items():
        ranks = 1 if label == "1 process" else w
        mine = rate[(label, 1)]
        theirs_rate = rate[(label, 0)] if hand is not None else best_hand
        theirs_text = f"{theirs_rate:.1f}" if hand is not None else f"(best: {best_hand:.1f})"
        hand_wall = f"{statistics.median(wall_s[(label, 0)]):.1f}" if hand is not None else "-"
        diff = f"{diffs[label]:.1e}" if label in diffs else "-"
        lines.append(f"| {label} | {ranks} | {cell(plans[label])} | {theirs_text} | {mine:.1f} | "
                     f"{mine / theirs_rate:.2f}x | {hand_wall} / {statistics.median(wall_s[(label, 1)]):.1f} | {diff} |")
    print(f"{machine()}\n")
    print("\n".join(lines))
    publish(f"pipebd vs hand-written loops, CNN pair, world size {w}", "handwritten.py", argv, lines, args.append)


if __name__ == "__main__":
    main()
