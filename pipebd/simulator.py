"""A discrete-event model of the runtime's schedule, for predicting any plan on any number of
devices from a ``Profile``.

Pipe-BD (``simulate``) follows ``runtime/relay.py`` step by step. Stage s at step t:

1. waits for batch t. Stage s-1 must have sent it and stage s must have posted its receive,
   which it does as soon as it has finished waiting for batch t-1 (one batch ahead);
2. receives it (``p2p_in``), loads data (stage 0) and runs its teacher blocks (``forward``). With
   loader processes (``Profile.num_workers``) stage 0 instead takes the batch from them, waiting
   if it is not ready yet (``_Feed`` models DataLoader's workers and prefetch queue);
3. if a next stage exists: waits until its send of batch ``t - max_inflight`` has arrived there
   (backpressure), then sends batch t (``p2p_out``);
4. trains its student blocks (``student``), waits for the gradient allreduce and steps. There
   is no barrier with the other stages (decoupled updates).

The replicas of a stage run in lockstep (their allreduce synchronizes them every step), so a
stage's timing is its slowest replica's (usually the one with ``ceil(B/k)`` rows, but measured
costs need not rise with the rows); the costs are ``planner.stage_cost``'s. Its fractions are the means over its replicas, as the report's: a
replica with a row fewer computes less and waits that much longer in the allreduce
(communication). Taking a batch from loader processes counts as waiting, as in the runtime's
``data-wait`` span, and after its last step a stage waits for its last send to arrive. A resumed
run (``start``) relays from its earliest block's step; the blocks that had completed a step
only relay it. Checkpoint writes are not modelled. The baseline (``simulate_baseline``) trains
block j for all steps before block j+1, data parallel over all ranks, re-running teacher blocks
0..j each step and loading every batch again. Fractions are of the wall time, as in ``Report``. The work is
O(steps * stages): 1024 devices and 64 blocks take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_int
from .data import PREFETCH
from .plan import Plan, even_split
from .planner import check_plan, slice_rows, stage_cost
from .profiler import Profile


@dataclass(frozen=True)
class Simulation:
    strategy: str
    plan: Plan
    batch_size: int
    steps: int                           # batches relayed (a resumed run: from its earliest block's step)
    wall_s: float
    stage_utilization: list[float]       # compute / wall, per stage (mean over its replicas)
    stage_communication: list[float]     # p2p and allreduce / wall (a lighter replica's allreduce wait too)
    stage_waiting: list[float]           # blocked on the previous or the next stage, or on loaders / wall
    trained_steps: list[int] | None = None   # per block, when a resumed run trains some for fewer steps
    stage_done_s: list[float] | None = None  # per stage, when it finished its last step (Pipe-BD)

    @property
    def samples_per_s(self) -> float:
        """As ``Report.samples_per_s``: batches times batch size over the wall time, the batches
        averaged over the blocks when some train for fewer steps."""
        steps = sum(self.trained_steps) / len(self.trained_steps) if self.trained_steps else self.steps
        return steps * self.batch_size / self.wall_s if self.wall_s > 0 else float("inf")

    def __str__(self) -> str:
        util = ", ".join(f"{u:.0%}" for u in self.stage_utilization)
        return (f"simulated {self.strategy} {self.plan.describe()}: {self.samples_per_s:.1f} samples/s "
                f"over {self.steps} steps (utilization {util}, mean over each stage's replicas)")


class _StageWork:
    """What a stage on ``replicas`` ranks computes per step, per replica (the slices differ by a
    row at most): its loading (``loads``), the teacher blocks ``teacher`` and the student steps
    of ``blocks``, which a resumed run skips for the blocks that had completed the step."""

    def __init__(self, profile: Profile, teacher: range, blocks: range, replicas: int, loads: bool):
        loaders = profile.num_workers > 0
        self.blocks = blocks
        self.forward, self.student, self.taking = [], [], []
        self.splits: dict[tuple[bool, ...], tuple[float, float, float]] = {}   # ``split`` by due blocks
        sizes = even_split(profile.batch_size, replicas)
        for rows in sorted(set(sizes), reverse=True):
            share = sizes.count(rows) / replicas
            data = float(profile.data_time(rows)) if loads else 0.0
            # Taking a batch from loader processes is timed inside the runtime's data-wait span.
            self.taking.append((share, data if loaders else 0.0))
            self.forward.append((share, sum(float(profile.teacher_time(b, rows)) for b in teacher)
                                 + (0.0 if loaders else data)))
            self.student.append((share, [float(profile.student_time(b, rows)) for b in blocks]))

    def training(self, due: tuple[bool, ...], forward: float) -> float:
        """What the slowest replica adds, training the blocks ``due``, to the stage's ``forward``
        (its slowest replica's loading and teacher time with every block due)."""
        return max(f + take + sum(t for t, d in zip(times, due) if d)
                   for (_, f), (_, times), (_, take) in zip(self.forward, self.student, self.taking)) - forward

    def split(self, due: tuple[bool, ...]) -> tuple[float, float, float]:
        """Per step, means over the replicas: compute, the time a lighter replica then waits in
        the allreduce for the slowest, and the time taking a batch from loader processes (the
        same every step but a resumed run's first ones: computed once per set of due blocks)."""
        if due not in self.splits:
            work = [(share, f + sum(t for t, d in zip(times, due) if d))
                    for (share, f), (_, times) in zip(self.forward, self.student)]
            taking = [take for _, take in self.taking]
            slowest = max(w + take for (_, w), take in zip(work, taking))   # not always the largest slice
            self.splits[due] = (sum(share * w for share, w in work),
                                sum(share * (slowest - w - take) for (share, w), take in zip(work, taking)),
                                sum(share * take for share, take in self.taking))
        return self.splits[due]


def simulate(profile: Profile, plan: Plan, steps: int, max_inflight: int = 2,
             start: list[int] | None = None) -> Simulation:
    """Simulate batches ``min(start) .. steps-1`` of Pipe-BD teacher relaying under ``plan``,
    block b training from batch ``start[b]`` on, as a resumed fit does (default: all from 0)."""
    steps, max_inflight = _check(steps, max_inflight)
    check_plan(profile, plan)
    start = _check_start(start, profile.num_blocks, steps)
    first = min(start)
    costs = [stage_cost(profile, st[0], st[-1] + 1, k) for st, k in zip(plan.stages, plan.replicas)]
    work = [_StageWork(profile, range(st[0], st[-1] + 1), range(st[0], st[-1] + 1), k, st[0] == 0)
            for st, k in zip(plan.stages, plan.replicas)]
    reduce = [float(profile.allreduce_time(k, profile.grad_bytes[b])) + profile.sync_bn_time(b, k)
              for st, k in zip(plan.stages, plan.replicas) for b in st]
    n = len(costs)
    free = [0.0] * n                                    # when stage s finished its last step
    recv_done: list[list[float]] = [[] for _ in range(n)]   # [s][i]: stage s stopped waiting for batch first+i
    arrival: list[list[float]] = [[] for _ in range(n)]     # [s][i]: batch first+i reached stage s
    sent: list[list[float]] = [[] for _ in range(n)]        # [s][i]: stage s finished sending batch first+i
    compute, comm, wait = [0.0] * n, [0.0] * n, [0.0] * n
    feed = _feed(profile, plan.replicas[0])
    for i, t in enumerate(range(first, steps)):
        for s, c in enumerate(costs):
            now = free[s]
            if s == 0 and feed is not None:
                got = feed.take(now)
                wait[s], now = wait[s] + got - now, got
            if s > 0:
                posted = recv_done[s][i - 1] if i > 0 else 0.0
                arrival[s].append(max(sent[s - 1][i], posted))
                wait[s] += max(0.0, arrival[s][i] - now)
                now = max(now, arrival[s][i])
            recv_done[s].append(now)
            now += c.p2p_in + c.forward
            if s < n - 1:
                if i >= max_inflight:
                    taken = arrival[s + 1][i - max_inflight]
                    wait[s] += max(0.0, taken - now)
                    now = max(now, taken)
                now += c.p2p_out
                sent[s].append(now)
            due = tuple(t >= start[b] for b in work[s].blocks)
            if all(due):
                now += c.student + c.allreduce
                reduced = c.allreduce
            else:       # a resumed run: the blocks that had completed batch t only relay it
                reduced = sum(reduce[b] for b, d in zip(work[s].blocks, due) if d)
                now += work[s].training(due, c.forward) + reduced
            free[s] = now
            busy, lag, taking = work[s].split(due)
            compute[s] += busy
            comm[s] += c.p2p + reduced + lag
            wait[s] += taking
    # After its last step a stage waits for its last send to arrive (the runtime's send-wait).
    for s in range(n - 1):
        wait[s] += max(0.0, arrival[s + 1][-1] - free[s])
    wall = max(free)
    trained = [steps - b for b in start] if any(start) else None
    return Simulation("pipebd", plan, profile.batch_size, steps - first, wall, _frac(compute, wall),
                      _frac(comm, wall), _frac(wait, wall), trained, list(free))


def simulate_baseline(profile: Profile, world_size: int, steps: int) -> Simulation:
    """Simulate the DNA-style baseline: blocks one after another, data parallel on
    ``world_size`` ranks, the teacher re-run from the input for every block."""
    steps, _ = _check(steps, 1)
    world_size = check_int("world_size", world_size, 1)
    n = profile.num_blocks
    check_plan(profile, Plan([list(range(n))], [world_size]))
    feed = _feed(profile, world_size)
    now = compute = comm = wait = 0.0
    for j in range(n):
        block_compute = max(float(profile.data_time(rows)) + profile.student_time(j, rows)   # the slowest replica
                            + sum(profile.teacher_time(i, rows) for i in range(j + 1))
                            for rows in slice_rows(profile.batch_size, world_size))
        block_comm = float(profile.allreduce_time(world_size, profile.grad_bytes[j])) + profile.sync_bn_time(j, world_size)
        for _ in range(steps):
            if feed is not None:
                got = feed.take(now)
                wait, now = wait + got - now, got
            now += block_compute + block_comm
        # Its blocks 0..j as one stage, to split the same time as the relay's stages do.
        busy, lag, taking = _StageWork(profile, range(j + 1), range(j, j + 1), world_size, True).split((True,))
        compute += steps * busy
        comm += steps * (block_comm + lag)
        wait += steps * taking
    plan = Plan([list(range(n))], [world_size])
    return Simulation("baseline", plan, profile.batch_size, steps, now, _frac([compute], now),
                      _frac([comm], now), _frac([wait], now))


class _Feed:
    """When DataLoader worker processes deliver each batch. Batch t goes to worker
    ``t % workers``, which starts it once it has finished its previous batch and once batch t
    has been requested: once the workers have started (``start`` seconds) for the first
    ``PREFETCH * workers`` batches, otherwise when the consumer takes batch
    ``t - PREFETCH * workers``. Each batch takes ``load`` seconds."""

    def __init__(self, load: float, workers: int, start: float = 0.0):
        self.load, self.workers, self.start = load, workers, start
        self.done: list[float] = []     # [t]: batch t is ready
        self.taken: list[float] = []    # [t]: the consumer has batch t

    def take(self, now: float) -> float:
        """The consumer asks for its next batch at ``now``; returns when it has it."""
        t, ahead = len(self.done), PREFETCH * self.workers
        requested = self.taken[t - ahead] if t >= ahead else self.start
        previous = self.done[t - self.workers] if t >= self.workers else self.start
        self.done.append(max(requested, previous) + self.load)
        self.taken.append(max(now, self.done[t]))
        return self.taken[t]


def _feed(profile: Profile, replicas: int) -> _Feed | None:
    """The loader processes of the slowest-fed loading rank (loading the slice that takes
    longest, as ``stage_cost``'s pace), or None when the rank loads in its own process (its
    ``forward`` holds the loading)."""
    if profile.num_workers == 0:
        return None
    load = max(float(profile.load_time(rows)) for rows in slice_rows(profile.batch_size, replicas))
    return _Feed(load, profile.num_workers, profile.loader_start)


def _check_start(start: list[int] | None, blocks: int, steps: int) -> list[int]:
    """Each block's first trained batch (``steps``: it trains none), as ints; all 0 when None."""
    if start is None:
        return [0] * blocks
    start = [check_int("start", b, 0) for b in start]
    if len(start) != blocks or max(start) > steps or min(start) == steps:
        raise ValueError(f"start needs one step per block ({blocks}), at most steps={steps} and one of them "
                         f"below it, got {start}")
    return start


def _check(steps: int, max_inflight: int) -> tuple[int, int]:
    return check_int("steps", steps, 1), check_int("max_inflight", max_inflight, 1)


def _frac(values: list[float], wall: float) -> list[float]:
    return [v / wall if wall > 0 else 0.0 for v in values]
