"""Execution plans: which blocks each pipeline stage owns and how many replica ranks it has.

A plan is plain data. The runtime executes it, the planner (Pipe-BD's automatic hybrid
distribution) produces it, and a simulator can read it; nothing in it depends on a device.
Ranks are assigned to stages in order: stage 0 gets global ranks ``0 .. replicas[0]-1``, stage 1
the next ``replicas[1]`` ranks, and so on. Ranks beyond ``sum(replicas)`` stay idle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .checks import integer

_RANGE = r"([0-9]+)\s*(?:-\s*([0-9]+))?"     # ASCII digits only: int() would take others too
_STAGE = re.compile(rf"(?:\[\s*{_RANGE}\s*\]|{_RANGE})\s*(?:x\s*([0-9]+))?")


MAX_BLOCKS = 1 << 20   # Plan.parse builds every stage's block list: a typo must not take the memory


def _listed(value: Any) -> Any:
    """A one-pass iterable (a generator, a map) as a list; anything else as it is."""
    one_pass = hasattr(value, "__iter__") and not hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))
    return list(value) if one_pass else value


def _sequence(value: Any) -> bool:
    """A list, tuple, array or tensor of items: not a string, mapping or single number."""
    return hasattr(value, "__iter__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))


def _integer(value: Any, what: str) -> int:
    number = integer(value)
    if number is None:
        raise ValueError(f"a plan's {what} must be an integer, got {value!r}")
    return number


@dataclass(frozen=True)
class Plan:
    """Contiguous block ranges (``stages``) and the data-parallel width of each (``replicas``).

    ``Plan(stages=[[0, 1], [2, 3, 4, 5]], replicas=[1, 3])`` runs blocks 0-1 on one rank and
    blocks 2-5 on three ranks that split each batch between them. ``replicas`` defaults to one
    rank per stage.
    """

    stages: tuple[tuple[int, ...], ...]
    replicas: tuple[int, ...] = field(default=())

    def __init__(self, stages: Sequence[Sequence[int]], replicas: Sequence[int] | None = None):
        if isinstance(stages, str):
            raise TypeError(f"a plan's stages are lists of blocks; for a plan written as text use "
                            f"pipebd.Plan.parse({stages!r})")
        stages = _listed(stages)
        if _sequence(stages):
            stages = [_listed(stage) for stage in stages]
        if not _sequence(stages) or not all(_sequence(stage) for stage in stages):
            raise TypeError(f"a plan's stages are a list of block lists, one per stage, e.g. [[0, 1], [2, 3]]; "
                            f"got {stages!r:.80}")
        replicas = _listed(replicas)
        if replicas is not None and not _sequence(replicas):
            raise TypeError(f"a plan's replicas are a list of counts, one per stage, e.g. [1, 3]; got {replicas!r:.80}")
        stages_t = tuple(tuple(_integer(b, "block") for b in stage) for stage in stages)
        replicas_t = tuple(_integer(k, "replica count") for k in replicas) if replicas is not None else (1,) * len(stages_t)
        object.__setattr__(self, "stages", stages_t)
        object.__setattr__(self, "replicas", replicas_t)

    @property
    def ranks_used(self) -> int:
        return sum(self.replicas)

    def stage_ranks(self, stage: int) -> list[int]:
        """Global ranks of ``stage``, in replica order."""
        first = sum(self.replicas[:stage])
        return list(range(first, first + self.replicas[stage]))

    def locate(self, rank: int) -> tuple[int, int] | None:
        """``(stage, replica)`` of a global rank, or None if the plan leaves the rank idle."""
        if rank < 0:
            return None
        first = 0
        for stage, k in enumerate(self.replicas):
            if rank < first + k:
                return stage, rank - first
            first += k
        return None

    def validate(self, num_blocks: int, world_size: int) -> None:
        """Raise ValueError unless the plan covers blocks ``0..num_blocks-1`` exactly once, in
        contiguous ascending stages, and fits in ``world_size`` ranks."""
        if not self.stages:
            raise ValueError("plan has no stages")
        if len(self.replicas) != len(self.stages):
            raise ValueError(
                f"plan has {len(self.stages)} stages but {len(self.replicas)} replica counts")
        for s, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"plan stage {s} has no blocks")
            if self.replicas[s] < 1:
                raise ValueError(f"plan stage {s} has {self.replicas[s]} replicas (need >= 1)")
        flat = [b for stage in self.stages for b in stage]
        seen: set[int] = set()
        for b in flat:
            if not 0 <= b < num_blocks:
                raise ValueError(f"plan names block {b}, but the models have {num_blocks} blocks "
                                 f"(0..{num_blocks - 1})")
            if b in seen:
                raise ValueError(f"plan repeats block {b}")
            seen.add(b)
        missing = sorted(set(range(num_blocks)) - seen)
        if missing:
            raise ValueError(f"plan misses block(s) {missing}")
        if flat != list(range(num_blocks)):
            raise ValueError(
                f"plan stages must be contiguous ascending block ranges, got {list(map(list, self.stages))}")
        if self.ranks_used > world_size:
            raise ValueError(
                f"plan needs {self.ranks_used} ranks (replicas {list(self.replicas)}) but "
                f"world_size is {world_size}")

    @classmethod
    def parse(cls, text: str) -> "Plan":
        """Read the form ``describe`` writes: ``"[0-1]x1 | [2-5]x3"``; brackets and ``x1`` may be
        left out (``"0-1|2-5x3"``)."""
        if not isinstance(text, str):
            raise TypeError(f"a plan to parse is a string like '[0-1]x1 | [2-5]x3', got {type(text).__name__}")
        stages, replicas = [], []
        for part in text.split("|"):
            m = _STAGE.fullmatch(part.strip())
            if m is None:
                raise ValueError(f"cannot read stage {part.strip()!r} of plan {text!r}; "
                                 f"use the form '[0-1]x1 | [2-5]x3'")
            first, last, width = m.group(1) or m.group(3), m.group(2) or m.group(4), m.group(5)
            if last is not None and int(last) < int(first):
                raise ValueError(f"stage {part.strip()!r} of plan {text!r} counts down; write blocks first-last")
            if int(last or first) >= MAX_BLOCKS:
                raise ValueError(f"plan {text!r} names block {int(last or first)}; models have fewer than "
                                 f"{MAX_BLOCKS} blocks")
            stages.append(list(range(int(first), int(last or first) + 1)))
            replicas.append(int(width or 1))
        return cls(stages, replicas)

    def describe(self) -> str:
        parts = []
        for stage, k in zip(self.stages, self.replicas):
            if stage and list(stage) == list(range(stage[0], stage[0] + len(stage))):
                blocks = f"{stage[0]}" if len(stage) == 1 else f"{stage[0]}-{stage[-1]}"
            else:   # not a plan validate accepts; shown as it is
                blocks = ", ".join(map(str, stage))
            parts.append(f"[{blocks}]x{k}")
        return " | ".join(parts)


def even_split(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` items, differing by at most one,
    larger pieces first."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def default_plan(num_blocks: int, world_size: int) -> Plan:
    """One contiguous block range per rank, balanced by block count.

    With more ranks than blocks, each block gets a stage of its own and the spare ranks become
    replicas, spread evenly (earlier stages first).
    """
    if num_blocks < 1 or world_size < 1:
        raise ValueError(f"need at least one block and one rank (got {num_blocks}, {world_size})")
    if world_size <= num_blocks:
        stages, start = [], 0
        for size in even_split(num_blocks, world_size):
            stages.append(list(range(start, start + size)))
            start += size
        return Plan(stages)
    return Plan([[b] for b in range(num_blocks)], even_split(world_size, num_blocks))
