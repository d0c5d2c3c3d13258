"""A discrete-event model of the runtime's schedule, for predicting any plan on any number of
devices from a ``Profile``.

Pipe-BD (``simulate``) follows ``runtime/relay.py`` step by step. Stage s at step t:

1. waits for batch t. Stage s-1 must have sent it and stage s must have posted its receive,
   which it does as soon as it has finished waiting for batch t-1 (one batch ahead);
2. receives it (``p2p_in``), loads data (stage 0) and runs its teacher blocks (``forward``);
3. if a next stage exists: waits until its send of batch ``t - max_inflight`` has arrived there
   (backpressure), then sends batch t (``p2p_out``);
4. trains its student blocks (``student``), waits for the gradient allreduce and steps. There
   is no barrier with the other stages (decoupled updates).

The replicas of a stage run in lockstep (their allreduce synchronizes them every step), so a
stage is modelled by its slowest replica, the one with ``ceil(B/k)`` rows; the costs are
``planner.stage_cost``'s. The baseline (``simulate_baseline``) trains block j for all steps
before block j+1, data parallel over all ranks, re-running teacher blocks 0..j each step.
Fractions are of the wall time, as in ``Report``. The work is O(steps * stages): 1024 devices
and 64 blocks take well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .plan import Plan
from .planner import stage_cost
from .profiler import Profile


@dataclass(frozen=True)
class Simulation:
    strategy: str
    plan: Plan
    batch_size: int
    steps: int
    wall_s: float
    stage_utilization: list[float]       # compute / wall, per stage
    stage_communication: list[float]     # p2p and allreduce / wall
    stage_waiting: list[float]           # blocked on the previous or the next stage / wall

    @property
    def samples_per_s(self) -> float:
        return self.steps * self.batch_size / self.wall_s if self.wall_s > 0 else float("inf")

    def __str__(self) -> str:
        util = ", ".join(f"{u:.0%}" for u in self.stage_utilization)
        return (f"simulated {self.strategy} {self.plan.describe()}: {self.samples_per_s:.1f} samples/s "
                f"over {self.steps} steps (utilization {util})")


def simulate(profile: Profile, plan: Plan, steps: int, max_inflight: int = 2) -> Simulation:
    """Simulate ``steps`` batches of Pipe-BD teacher relaying under ``plan``."""
    _check(steps, max_inflight)
    plan.validate(profile.num_blocks, plan.ranks_used)
    costs = [stage_cost(profile, st[0], st[-1] + 1, k) for st, k in zip(plan.stages, plan.replicas)]
    n = len(costs)
    free = [0.0] * n                                    # when stage s finished its last step
    recv_done: list[list[float]] = [[] for _ in range(n)]   # [s][t]: stage s stopped waiting for batch t
    arrival: list[list[float]] = [[] for _ in range(n)]     # [s][t]: batch t reached stage s
    sent: list[list[float]] = [[] for _ in range(n)]        # [s][t]: stage s finished sending batch t
    compute, comm, wait = [0.0] * n, [0.0] * n, [0.0] * n
    for t in range(steps):
        for s, c in enumerate(costs):
            now = free[s]
            if s > 0:
                posted = recv_done[s][t - 1] if t > 0 else 0.0
                arrival[s].append(max(sent[s - 1][t], posted))
                wait[s] += max(0.0, arrival[s][t] - now)
                now = max(now, arrival[s][t])
            recv_done[s].append(now)
            now += c.p2p_in + c.forward
            if s < n - 1:
                if t >= max_inflight:
                    taken = arrival[s + 1][t - max_inflight]
                    wait[s] += max(0.0, taken - now)
                    now = max(now, taken)
                now += c.p2p_out
                sent[s].append(now)
            now += c.student + c.allreduce
            free[s] = now
            compute[s] += c.compute
            comm[s] += c.p2p + c.allreduce
    wall = max(free)
    return Simulation("pipebd", plan, profile.batch_size, steps, wall, _frac(compute, wall), _frac(comm, wall),
                      _frac(wait, wall))


def simulate_baseline(profile: Profile, world_size: int, steps: int) -> Simulation:
    """Simulate the DNA-style baseline: blocks one after another, data parallel on
    ``world_size`` ranks, the teacher re-run from the input for every block."""
    _check(steps, 1)
    n = profile.num_blocks
    rows = math.ceil(profile.batch_size / world_size)
    compute = comm = 0.0
    for j in range(n):
        compute += profile.load_time(rows) + profile.student_time(j, rows)
        compute += sum(profile.teacher_time(i, rows) for i in range(j + 1))
        comm += float(profile.allreduce_time(world_size, profile.grad_bytes[j])) + profile.sync_bn_time(j, world_size)
    wall = steps * (compute + comm)
    plan = Plan([list(range(n))], [world_size])
    return Simulation("baseline", plan, profile.batch_size, steps, wall, _frac([steps * compute], wall),
                      _frac([steps * comm], wall), [0.0])


def _check(steps: int, max_inflight: int) -> None:
    if steps < 1 or max_inflight < 1:
        raise ValueError(f"need steps >= 1 and max_inflight >= 1, got {steps}, {max_inflight}")


def _frac(values: list[float], wall: float) -> list[float]:
    return [v / wall if wall > 0 else 0.0 for v in values]
