"""The cost model and the optimal planner of automatic hybrid distribution (AHD).

A plan splits the N blocks into contiguous stages and gives stage s ``k_s >= 1`` replicas, with
``sum(k_s) <= world_size``. In steady state every stage handles one batch per period, so the
pipeline moves ``B / max_s T_s`` samples per second, where a stage's time per batch is

    T(first, stop, k) = [load(B/k) if first == 0]
                        + sum over its blocks of teacher(b, B/k) + student(b, B/k)
                        + p2p(B/k rows in) + p2p(B/k rows out)
                        + sum over its blocks of allreduce(k, gradient bytes of b)
                        [+ 2 allreduces per BatchNorm layer of its students, with sync_batchnorm]

with ``B/k`` the rows of the slowest replica's slice (``ceil(B/k)`` or ``floor(B/k)``: measured
costs need not rise with the rows) and ``ceil(B/k)`` for the transfers (``stage_cost``). With
``num_workers`` loader processes per rank, stage 0 does not load itself but can go no faster than
they deliver: ``T(0, stop, k) = max(T without load, load(B/k) / num_workers)``. Communication is
charged in full, although the runtime overlaps part of it, so predictions lean low.

``best_plan`` is an exact dynamic program over (first block, ranks left): ``f(i, r)``, the least
possible slowest-stage time for blocks ``i..N-1`` on at most ``r`` ranks, is
``min over stop, k <= r of max(T(i, stop, k), f(stop, r - k))``. Among the plans that reach the
optimum a second pass picks the one with the smallest sum of squared stage times: balanced
stages, and spare ranks spent where they shorten a stage rather than left idle (or added where
they only add allreduce time). Both passes try, for each stage, only the replica counts that make
it faster than any fewer do (``useful_replicas``): O(N^2 W P) time, vectorized over ranks, where P
is at most W and, when allreduce time does not fall with more ranks, at most the number of distinct
slices ``ceil(B/k)``, about ``2 sqrt(B)``.
A stage whose blocks have BatchNorm over one value per channel per row (``Profile.min_rows``)
gets only replica counts that leave every slice two rows (``floor(B/k) >= 2``): torch cannot train
such a layer on one row, nor can the profiler time it there (so also with ``sync_batchnorm``, under
which the runtime could).
Pipe-BD's own search enumerates plans for 1 or 4 GPUs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import check_int
from .plan import Plan
from .profiler import Profile


@dataclass(frozen=True)
class StageCost:
    """Seconds per batch of one stage, by what it spends them on, in the order it does it."""

    p2p_in: float         # receiving activations (and labels) from the previous stage
    forward: float        # data loading (stage 0) and the teacher forward of its blocks
    p2p_out: float        # sending the last activation to the next stage
    student: float        # student forward, backward and optimizer step of its blocks
    allreduce: float      # gradient allreduce over the stage's replicas (and sync_batchnorm's)
    data_period: float = 0.0   # stage 0 with loader processes: the least time between their batches

    @property
    def compute(self) -> float:
        return self.forward + self.student

    @property
    def p2p(self) -> float:
        return self.p2p_in + self.p2p_out

    @property
    def time(self) -> float:
        return max(self.compute + self.p2p + self.allreduce, self.data_period)


def slice_rows(batch_size: int, replicas: int) -> list[int]:
    """The row counts of a batch's slices over ``replicas`` replicas, largest first: ``ceil(B/k)``
    and, if some replicas get a row less, ``floor(B/k)``."""
    hi, lo = math.ceil(batch_size / replicas), batch_size // replicas
    return [hi, lo] if lo != hi and lo > 0 else [hi]


def stage_cost(profile: Profile, first: int, stop: int, replicas: int) -> StageCost:
    """Cost of a stage owning blocks ``first .. stop-1`` with ``replicas`` ranks: its slowest
    replica's compute (usually that of the largest slice, but measured costs need not rise
    with the rows), transfers of the largest slice."""
    slowest, period = None, 0.0
    for rows in slice_rows(profile.batch_size, replicas):
        forward = profile.data_time(rows) if first == 0 else 0.0
        forward += sum(profile.teacher_time(b, rows) for b in range(first, stop))
        student = sum(profile.student_time(b, rows) for b in range(first, stop))
        if slowest is None or forward + student > sum(slowest):
            slowest = (float(forward), float(student))
        if first == 0:
            period = max(period, float(profile.data_period(rows)))
    rows = math.ceil(profile.batch_size / replicas)
    p2p_in = float(profile.p2p_time(rows * profile.act_bytes[first])) if first > 0 else 0.0
    p2p_out = float(profile.p2p_time(rows * profile.act_bytes[stop])) if stop < profile.num_blocks else 0.0
    allreduce = sum(float(profile.allreduce_time(replicas, profile.grad_bytes[b])) + profile.sync_bn_time(b, replicas)
                    for b in range(first, stop))
    return StageCost(p2p_in, slowest[0], p2p_out, slowest[1], allreduce, period)


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of a plan in steady state."""

    plan: Plan
    batch_size: int
    stage_costs: tuple[StageCost, ...]

    @property
    def stage_times(self) -> list[float]:
        return [c.time for c in self.stage_costs]

    @property
    def bottleneck_s(self) -> float:
        return max(self.stage_times)

    @property
    def samples_per_s(self) -> float:
        """The throughput bound: one batch per period of the slowest stage."""
        return self.batch_size / self.bottleneck_s if self.bottleneck_s > 0 else float("inf")

    @property
    def stage_utilization(self) -> list[float]:
        """Compute time over the period, per stage, of its slowest replica (taking batches from
        loader processes included): the bound's view. ``simulate`` gives the report's, the mean
        over the replicas."""
        return [c.compute / self.bottleneck_s if self.bottleneck_s > 0 else 0.0 for c in self.stage_costs]

    def __str__(self) -> str:
        util = ", ".join(f"{u:.0%}" for u in self.stage_utilization)
        times = ", ".join(f"{t * 1e3:.2f}" for t in self.stage_times)
        return (f"plan {self.plan.describe()}: predicted {self.samples_per_s:.1f} samples/s in steady state "
                f"(stage ms per batch {times}; each stage's slowest replica computes {util} of the period)")


def check_plan(profile: Profile, plan: Plan) -> None:
    """TypeError or ValueError, as ``fit`` would refuse it, unless ``plan`` can run the blocks
    of ``profile`` on its batch: every block once, in contiguous stages; every replica's slice
    at least a row, and two for blocks that need them (``Profile.min_rows``; one is enough
    with ``sync_batchnorm``, whose statistics cover the stage's batch)."""
    if not isinstance(plan, Plan):
        hint = f" (for a plan written as text: pipebd.Plan.parse({plan!r}))" if isinstance(plan, str) else ""
        raise TypeError(f"plan must be a pipebd.Plan, got {type(plan).__name__}{hint}")
    plan.validate(profile.num_blocks, plan.ranks_used)
    batch = profile.batch_size
    if max(plan.replicas) > batch:
        raise ValueError(f"batch_size {batch} is smaller than the widest stage's replica count "
                         f"({max(plan.replicas)}); every replica needs at least one row")
    for s, (stage, k) in enumerate(zip(plan.stages, plan.replicas)):
        need = max(profile.block_rows(b) for b in stage)
        smallest = batch if profile.sync_batchnorm and k > 1 else batch // k
        if smallest < need:
            block = next(b for b in stage if profile.block_rows(b) == need)
            raise ValueError(f"the plan gives a replica of stage {s} {smallest} row of batch {batch}, but "
                             f"block {block} runs on no fewer than {need} (BatchNorm over one value per channel)")


def predict(profile: Profile, plan: Plan) -> Prediction:
    """The cost model's steady-state prediction for ``plan``."""
    check_plan(profile, plan)
    costs = tuple(stage_cost(profile, stage[0], stage[-1] + 1, k) for stage, k in zip(plan.stages, plan.replicas))
    return Prediction(plan, profile.batch_size, costs)


def cost_table(profile: Profile, world_size: int) -> np.ndarray:
    """``C[first, stop, k]``: ``stage_cost(first, stop, k).time`` for every stage (``k`` from 1;
    index 0 unused), built from prefix sums over the blocks."""
    n, batch = profile.num_blocks, profile.batch_size
    ks = np.arange(1, world_size + 1)
    rows = np.ceil(batch / ks)
    smallest = batch // ks           # every replica needs at least one row, some blocks two

    def computing(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums over the blocks of teacher + student seconds [k, block], loading, its pace."""
        per_block = np.stack([profile.teacher_time(b, r) + profile.student_time(b, r) for b in range(n)], axis=1)
        return (np.concatenate([np.zeros((world_size, 1)), np.cumsum(per_block, axis=1)], axis=1),
                profile.data_time(r), profile.data_period(r))

    largest, least = computing(rows), computing(np.maximum(smallest, 1))   # the two slice sizes
    period = np.maximum(largest[2], least[2])
    per_block = np.stack([profile.allreduce_time(ks, profile.grad_bytes[b]) + profile.sync_bn_time(b, ks)
                          for b in range(n)], axis=1)
    reduce = np.concatenate([np.zeros((world_size, 1)), np.cumsum(per_block, axis=1)], axis=1)   # [k, block]
    inbound = np.stack([profile.p2p_time(rows * profile.act_bytes[i]) if 0 < i < n else np.zeros(world_size)
                        for i in range(n + 1)])                                                   # [boundary, k]
    table = np.full((n + 1, n + 1, world_size + 1), np.inf)
    for first in range(n):
        need = 1
        for stop in range(first + 1, n + 1):
            need = max(need, profile.block_rows(stop - 1))
            compute = [prefix[:, stop] - prefix[:, first] + (load if first == 0 else 0.0)
                       for prefix, load, _ in (largest, least)]
            t = np.maximum(*compute) + reduce[:, stop] - reduce[:, first] + inbound[first] + inbound[stop]
            if first == 0:
                t = np.maximum(t, period)
            table[first, stop, 1:] = np.where(smallest >= need, t, np.inf)
    return table


def useful_replicas(times: np.ndarray) -> np.ndarray:
    """The replica counts ``k`` (from 1) at which a stage with per-``k`` times ``times[k - 1]``
    is faster than with any fewer replicas. The others never need be tried: fewer replicas are as
    fast and leave more ranks to the later stages, and both passes of ``best_plan`` pick, among
    equal candidates, the one with the fewest replicas."""
    fastest_before = np.minimum.accumulate(np.concatenate([[np.inf], times[:-1]]))
    return np.flatnonzero(times < fastest_before) + 1


def best_plan(table: np.ndarray, world_size: int) -> tuple[Plan, float]:
    """The exact optimum over all plans on at most ``world_size`` ranks for a cost table
    ``table[first, stop, k]`` (see ``cost_table``): the plan and its slowest stage's time."""
    n = table.shape[0] - 1
    w = world_size
    ranks = np.arange(w + 1)[:, None]
    # For each stage, the replica counts worth trying and their times.
    options = {}
    for i in range(n):
        for stop in range(i + 1, n + 1):
            ks = useful_replicas(table[i, stop, 1:w + 1])
            if len(ks):
                options[i, stop] = ks, table[i, stop, ks]

    def left(ks):
        """Out of r = 0..w ranks, those left to the later stages with each of ``ks``, and whether any are."""
        rest = ranks - ks
        return np.maximum(rest, 0), rest >= 0

    # Pass 1: f[i, r] = least slowest-stage time for blocks i.. on at most r ranks.
    f = np.full((n + 1, w + 1), np.inf)
    f[n, :] = 0.0
    for (i, stop), (ks, t) in sorted(options.items(), reverse=True):
        rest, fits = left(ks)
        cand = np.where(fits, np.maximum(t, f[stop][rest]), np.inf)
        f[i] = np.minimum(f[i], cand.min(axis=1))
    best = f[0, w]
    if not np.isfinite(best):
        raise ValueError(f"no plan fits {n} blocks on {world_size} ranks")

    # Pass 2: among plans whose every stage takes <= best, the least sum of squared stage times.
    g = np.full((n + 1, w + 1), np.inf)
    g[n, :] = 0.0
    choice = np.zeros((n + 1, w + 1, 2), dtype=np.int64)
    for (i, stop), (ks, t) in sorted(options.items(), key=lambda item: (-item[0][0], item[0][1])):
        rest, fits = left(ks)
        cand = np.where(fits & (t <= best), np.square(t) + g[stop][rest], np.inf)
        pick = cand.argmin(axis=1)
        value = cand[np.arange(w + 1), pick]
        better = value < g[i]
        g[i] = np.where(better, value, g[i])
        choice[i][better] = np.stack([np.full(better.sum(), stop), ks[pick[better]]], axis=1)
    stages, replicas, i, r = [], [], 0, w
    while i < n:
        stop, k = (int(v) for v in choice[i, r])
        stages.append(list(range(i, stop)))
        replicas.append(k)
        i, r = stop, r - k
    return Plan(stages, replicas), float(best)


def auto_plan(profile: Profile, world_size: int | None = None) -> Prediction:
    """The best plan for ``profile`` on ``world_size`` ranks (default: the profiled world size)
    with its predicted throughput and utilization."""
    world_size = profile.world_size if world_size is None else check_int("world_size", world_size, 1)
    plan, _ = best_plan(cost_table(profile, world_size), world_size)
    return predict(profile, plan)
