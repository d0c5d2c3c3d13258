"""Emulated devices: blocks whose cost is a sleep, so that many local processes really run in
parallel on a machine with few cores.

``EmulatedBlock(features, a, b)`` sleeps ``a + b * rows`` seconds per call (rows: the batch
dimension of its input) and then applies a tiny real linear map, so data still flows, the student
still learns, and shapes are checked as for any block. A sleeping process needs no core, which is
what lets ``bench/planner.py`` measure pipelines of 8 ranks on 2 cores. The sleep stands for the
whole cost of a call: for a student block that is forward, backward and optimizer step together
(the backward of the linear map is negligible).

``PROFILES`` holds the per-block costs the planner benchmark uses: ``balanced`` (six equal blocks)
and ``unbalanced`` (a Pipe-BD-like profile: early, high-resolution teacher blocks cost the most and
the last block is cheap, so one block range per rank leaves stages waiting). A profile can also
be measured: ``EmulatedProfile.from_measured`` takes each block's costs from a real pair's
``pipebd`` profile (``bench/gpu_profile.py`` does it on a GPU and saves it as JSON), so that
ranks emulating that device run here.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from pipebd.profiler import Profile


class Cost(NamedTuple):
    """Seconds per call: ``a`` fixed plus ``b`` per row or, for a measured block, ``curve``:
    ``(rows, seconds)`` points, joined by straight lines and extended as the profiler extends
    them, so the cost is the measured one at every measured batch size (``a`` and ``b`` are
    then the straight-line fit, for display)."""

    a: float
    b: float
    curve: tuple[tuple[int, float], ...] = ()

    def at(self, rows: int) -> float:
        if self.curve:
            from pipebd.profiler import _interp
            return _interp([r for r, _ in self.curve], [t for _, t in self.curve], rows)
        return self.a + self.b * rows

    def scaled(self, factor: float) -> "Cost":
        return Cost(self.a * factor, self.b * factor, tuple((r, t * factor) for r, t in self.curve))


class EmulatedBlock(nn.Module):
    """``features -> features`` linear map that first sleeps ``a + b * rows`` seconds (or the
    measured ``curve``'s seconds at ``rows``, see ``Cost``)."""

    def __init__(self, features: int, a: float, b: float, curve: Sequence[tuple[int, float]] = ()):
        super().__init__()
        self.cost = _checked(Cost(float(a), float(b), tuple((int(r), float(t)) for r, t in curve)))
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.cost.at(x.shape[0]))
        return torch.tanh(self.linear(x))

    def extra_repr(self) -> str:
        # Part of the profiler's cache key: blocks of different cost must not share a profile.
        curve = f", curve={[(r, float(f'{t:g}')) for r, t in self.cost.curve]}" if self.cost.curve else ""
        return f"a={self.cost.a:g}, b={self.cost.b:g}{curve}"


class EmulatedProfile(NamedTuple):
    """Per-block costs of an emulated pair; ``batch_size`` and ``device`` say where a measured
    profile came from (the global batch it was measured at, the device's name)."""

    teacher: tuple[Cost, ...]
    student: tuple[Cost, ...]
    batch_size: int | None = None
    device: str = ""

    @classmethod
    def from_measured(cls, profile: "Profile") -> "EmulatedProfile":
        """Each block of a measured ``pipebd`` profile: its measured seconds at each batch size
        (what the emulated block sleeps) and their straight-line fit ``a + b * rows`` (see
        ``Profile.linear_costs``), which says how much of the cost is per call."""
        def costs(lines: list[tuple[float, float]], measured: list[list[float]]) -> tuple[Cost, ...]:
            return tuple(Cost(a, b, tuple(zip(profile.rows, times))) for (a, b), times in zip(lines, measured))

        teacher_lines, student_lines = profile.linear_costs()
        return cls(costs(teacher_lines, profile.teacher), costs(student_lines, profile.student),
                   profile.batch_size, profile.device)

    def save(self, path: str, measured: "Profile | None" = None, **source: Any) -> None:
        """Write as JSON (``pipebd.outputs.write_output``), with the measured profile and
        ``source`` facts beside it."""
        from pipebd.outputs import write_output
        data = {"kind": _KIND, "teacher": [_row(c) for c in self.teacher], "student": [_row(c) for c in self.student],
                "batch_size": self.batch_size, "device": self.device, "source": source,
                "measured": None if measured is None else measured.to_dict()}
        write_output(path, lambda f: f.write(json.dumps(data, indent=1)), "w")

    @classmethod
    def load(cls, path: str) -> "EmulatedProfile":
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("kind") != _KIND:
                raise ValueError(f"not an emulated profile (kind {data.get('kind')!r})")
            teacher, student = _costs(data["teacher"]), _costs(data["student"])
            if not teacher or len(teacher) != len(student):
                raise ValueError(f"{len(teacher)} teacher and {len(student)} student block costs")
            for c in teacher + student:
                _checked(c)
            return cls(teacher, student, data.get("batch_size"), data.get("device", ""))
        except (KeyError, TypeError, ValueError) as e:   # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: cannot read an emulated profile: {e}") from None


_KIND = "pipebd-emulated-profile"


def _checked(cost: Cost) -> Cost:
    """``cost`` if its numbers are finite and non-negative and its curve rows increase from 1."""
    numbers = [cost.a, cost.b, *(t for _, t in cost.curve)]
    if not all(math.isfinite(x) and x >= 0 for x in numbers) or any(r < 1 for r, _ in cost.curve):
        raise ValueError(f"emulated costs must be finite and non-negative, got {cost}")
    if any(r1 <= r0 for (r0, _), (r1, _) in zip(cost.curve, cost.curve[1:])):
        raise ValueError(f"curve rows must be increasing, got {[r for r, _ in cost.curve]}")
    return cost


def _costs(values: Sequence[Sequence[Any]]) -> tuple[Cost, ...]:
    """``[a, b]`` or ``[a, b, [[rows, seconds], ...]]`` per block."""
    return tuple(Cost(float(v[0]), float(v[1]), tuple((int(r), float(t)) for r, t in (v[2] if len(v) > 2 else ())))
                 for v in values)


def _row(cost: Cost) -> list:
    return [cost.a, cost.b, [list(p) for p in cost.curve]] if cost.curve else [cost.a, cost.b]


_MS = 1e-3
PROFILES = {
    # Six equal blocks: 1 ms per call plus 0.25 ms per row for the teacher, 0.6x that for the student.
    "balanced": EmulatedProfile(_costs([(1 * _MS, 0.25 * _MS)] * 6),
                                _costs([(0.6 * _MS, 0.15 * _MS)] * 6)),
    # Pipe-BD-like: teacher cost falls with depth (resolution halves), the last block (pooling and
    # a classifier) is cheap; students cost about a third of their teacher block.
    "unbalanced": EmulatedProfile(
        _costs([(1 * _MS, 0.50 * _MS), (1 * _MS, 0.40 * _MS), (1 * _MS, 0.30 * _MS),
                (1 * _MS, 0.20 * _MS), (1 * _MS, 0.12 * _MS), (0.5 * _MS, 0.03 * _MS)]),
        _costs([(0.5 * _MS, 0.15 * _MS), (0.5 * _MS, 0.12 * _MS), (0.5 * _MS, 0.10 * _MS),
                (0.5 * _MS, 0.07 * _MS), (0.5 * _MS, 0.04 * _MS), (0.3 * _MS, 0.01 * _MS)])),
}


def resolve_profile(profile: "str | EmulatedProfile") -> EmulatedProfile:
    """A profile given by name (``PROFILES``), as a JSON file written by ``EmulatedProfile.save``
    (``bench/gpu_profile.py``), or as itself."""
    if isinstance(profile, EmulatedProfile):
        return profile
    if isinstance(profile, str) and profile in PROFILES:
        return PROFILES[profile]
    if isinstance(profile, str) and profile.endswith(".json"):
        if not os.path.isfile(profile):
            raise ValueError(f"emulated profile file {profile!r} does not exist")
        return EmulatedProfile.load(profile)
    raise ValueError(f"profile must be one of {sorted(PROFILES)}, a .json file from bench/gpu_profile.py "
                     f"or an EmulatedProfile, got {profile!r}")


def emulated_pair(profile: "str | EmulatedProfile" = "balanced", features: int = 8, scale: float = 1.0,
                  seed: int = 0) -> tuple[list[nn.Module], list[nn.Module]]:
    """Teacher and student blocks with the costs of ``profile`` (see ``resolve_profile``) times
    ``scale``."""
    costs = resolve_profile(profile)
    if scale < 0:
        raise ValueError(f"scale must be non-negative, got {scale}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = [EmulatedBlock(features, *c.scaled(scale)) for c in costs.teacher]
        student = [EmulatedBlock(features, *c.scaled(scale)) for c in costs.student]
    return teacher, student


def emulated_input_shape(features: int = 8, **_: object) -> tuple[int, ...]:
    """Per-sample input shape of ``emulated_pair(**same_kwargs)``."""
    return (features,)
