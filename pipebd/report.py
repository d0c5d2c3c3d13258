"""The result of a fit: throughput, per-stage utilization, teacher work and losses.

Time fractions are of the run's wall time (start barrier to the last rank's end), averaged over a
stage's replicas: ``utilization`` is compute (data, teacher, student, optimizer step) and
checkpoint writes, ``communication`` starting and waiting for the gradient allreduce and posting
activation sends and receives, ``waiting`` the time blocked on activations (receive), on the next
stage (send backpressure) or on loader worker processes (``num_workers``), and ``idle`` the rest:
pipeline fill and drain, and the loop's own overhead between spans (loss checks, bookkeeping).
``bubble`` is waiting and idle together: the time a device does neither compute nor
communication. The report's ``compute_fraction``, ``communication_fraction`` and
``bubble_fraction`` are the same over all ``world_size`` devices (a rank the plan leaves out is
all bubble).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .plan import Plan
from .runtime.worker import RankResult
from .trace import COMMUNICATION, COMPUTE, WAITING, Span, busy_time, write_chrome_trace


@dataclass
class StageStats:
    blocks: tuple[int, ...]
    ranks: list[int]
    utilization: float
    communication: float
    waiting: float

    @property
    def idle(self) -> float:
        return max(0.0, 1.0 - self.utilization - self.communication - self.waiting)

    @property
    def bubble(self) -> float:
        return self.waiting + self.idle


@dataclass
class Report:
    strategy: str
    world_size: int
    plan: Plan
    batch_size: int
    steps: int
    wall_s: float
    teacher_block_runs: list[int]
    stages: list[StageStats]
    losses: list[list[float]] = field(repr=False)   # per block: global-batch loss at each step (NaN before start)
    tracks: list[tuple[str, list[Span]]] = field(repr=False)
    prediction: Any = None       # plan="auto": the planner's steady-state Prediction
    simulation: Any = None       # plan="auto": the simulator's Simulation of this run's steps
    start: list[int] = field(default_factory=list)   # per block: steps completed before this fit (resume)

    @property
    def trained_steps(self) -> list[int]:
        """Steps each block trained in this fit: ``steps``, less what a resumed block had done."""
        return [self.steps - s for s in self.start] if self.start else [self.steps] * len(self.losses)

    @property
    def samples_per_s(self) -> float:
        """Samples per second through the whole distillation: steps * batch_size / wall time,
        with steps averaged over the blocks when a resumed fit trains some blocks for fewer steps.
        For the baseline this covers all of its block-by-block phases."""
        trained = self.trained_steps
        samples = sum(trained) / len(trained) * self.batch_size
        return samples / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def stage_utilization(self) -> list[float]:
        return [s.utilization for s in self.stages]

    def _devices(self, part: str) -> float:
        """``part`` of the stages' time, over all ``world_size`` devices."""
        return sum(len(s.ranks) * getattr(s, part) for s in self.stages) / self.world_size

    @property
    def compute_fraction(self) -> float:
        return self._devices("utilization")

    @property
    def communication_fraction(self) -> float:
        return self._devices("communication")

    @property
    def bubble_fraction(self) -> float:
        """The devices' time in neither compute nor communication: waiting, idle, and unused ranks."""
        unused = self.world_size - sum(len(s.ranks) for s in self.stages)
        return self._devices("bubble") + unused / self.world_size

    def final_losses(self, window: int = 5) -> list[float]:
        """Mean loss of each block over its last ``window`` steps trained in this fit."""
        return [sum(h[-window:]) / len(h[-window:]) for h in (self._trained(i) for i in range(len(self.losses)))]

    def _trained(self, block: int) -> list[float]:
        return self.losses[block][self.start[block] if self.start else 0:] or [float("nan")]

    def save_trace(self, path: str) -> None:
        """Write a Chrome trace (one track per rank) for Perfetto or chrome://tracing."""
        write_chrome_trace(path, self.tracks)

    def plot(self, path: str) -> None:
        """Draw the timeline of every rank and each stage's time breakdown to ``path`` (PNG, or
        the format its suffix names; needs the ``plot`` extra, matplotlib). See ``pipebd.plot``."""
        from .plot import plot_report
        plot_report(self, path)

    def __str__(self) -> str:
        sim = self.simulation
        lines = [
            f"pipebd report: strategy={self.strategy} world_size={self.world_size} plan={self.plan.describe()} "
            f"batch_size={self.batch_size} steps={self.steps}",
            f"throughput {self.samples_per_s:.1f} samples/s (wall {self.wall_s:.3f} s)",
        ]
        if sim is not None:
            lines.append(f"predicted {sim.samples_per_s:.1f} samples/s for these {sim.steps} steps "
                         f"(steady-state bound {self.prediction.samples_per_s:.1f}); measured/predicted "
                         f"{self.samples_per_s / sim.samples_per_s:.2f}")
        lines.append(f"devices: {self.compute_fraction:.1%} compute, {self.communication_fraction:.1%} "
                     f"communication, {self.bubble_fraction:.1%} bubble (waiting and idle)")
        lines.append(f"{'stage':>5} {'blocks':>7} {'ranks':>9} {'util':>6} {'comm':>6} {'wait':>6} {'idle':>6}"
                     + (f" {'pred util':>9}" if sim is not None else ""))
        for s, st in enumerate(self.stages):
            blocks = f"{st.blocks[0]}-{st.blocks[-1]}" if len(st.blocks) > 1 else f"{st.blocks[0]}"
            ranks = f"{st.ranks[0]}-{st.ranks[-1]}" if len(st.ranks) > 1 else f"{st.ranks[0]}"
            lines.append(f"{s:>5} {blocks:>7} {ranks:>9} {st.utilization:>6.1%} {st.communication:>6.1%} "
                         f"{st.waiting:>6.1%} {st.idle:>6.1%}"
                         + (f" {sim.stage_utilization[s]:>9.1%}" if sim is not None else ""))
        used = sum(len(st.ranks) for st in self.stages)
        if used < self.world_size:   # a plan may leave ranks out (auto does where more would not pay)
            idle = f"rank {used}" if used == self.world_size - 1 else f"ranks {used}-{self.world_size - 1}"
            lines.append(f"{idle} idle: the plan uses {used} of {self.world_size}")
        lines.append(f"teacher block runs: {self.teacher_block_runs}")
        if any(self.start):
            lines.append(f"resumed: blocks had completed steps {self.start}")
        first = [self._trained(i)[0] for i in range(len(self.losses))]
        lines.append("block loss first -> last: " + ", ".join(
            f"{i}: {a:.4g} -> {b:.4g}" for i, (a, b) in enumerate(zip(first, self.final_losses()))))
        return "\n".join(lines)


def build_report(strategy: str, world_size: int, plan: Plan, batch_size: int, steps: int,
                 num_blocks: int, results: list[RankResult], start: list[int] | None = None) -> Report:
    """Aggregate the gathered per-rank results. For the baseline, ``plan`` is its single stage
    of all blocks on all ranks; ``start`` gives the steps each block had completed before."""
    wall = max(r.elapsed for r in results)
    runs = [0] * num_blocks
    losses = [[0.0] * steps for _ in range(num_blocks)]
    for r in results:
        for block, rows in r.teacher_rows.items():
            runs[block] += rows
        for block, history in r.losses.items():
            # Each replica holds its slice's share of the global-batch loss.
            losses[block] = [a + b for a, b in zip(losses[block], history)]
    stages = []
    for s, blocks in enumerate(plan.stages):
        ranks = plan.stage_ranks(s)
        spans = [results[r].spans for r in ranks]

        def fraction(kinds: tuple[str, ...]) -> float:
            return sum(busy_time(sp, kinds) for sp in spans) / (len(ranks) * wall) if wall > 0 else 0.0

        stages.append(StageStats(blocks, ranks, fraction(COMPUTE), fraction(COMMUNICATION), fraction(WAITING)))
    tracks = []
    for r in results:
        role = "idle" if r.stage is None else f"stage {r.stage}, replica {r.replica}"
        tracks.append((f"rank {r.rank} ({role})", r.spans))
    return Report(strategy, world_size, plan, batch_size, steps, wall, runs, stages, losses, tracks,
                  start=list(start) if start is not None else [0] * num_blocks)
