"""Timed spans per rank, and their export as Chrome trace events (Perfetto, chrome://tracing).

Span kinds (``Span.kind``): compute (``data``, ``teacher``, ``student``, ``step``, and the
``checkpoint`` writes, which keep a rank as busy), communication (``allreduce``), and waiting
(``recv-wait``, ``send-wait``, codistillation's ``exchange-wait``, and ``data-wait`` for batches
from loader worker processes). Time outside any span is idle.
Each span is also a ``torch.profiler`` range (``record_function``), so the same names appear in
torch profiler traces.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from torch.autograd.profiler import record_function

COMPUTE = ("data", "teacher", "student", "step", "checkpoint")
COMMUNICATION = ("allreduce",)
WAITING = ("recv-wait", "send-wait", "exchange-wait", "data-wait")


@dataclass
class Span:
    kind: str
    start: float      # seconds since the rank's clock origin
    end: float
    step: int
    block: int | None = None


@dataclass
class Recorder:
    """Collects the spans of one rank; times are seconds since ``origin`` (``perf_counter``)."""

    origin: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)

    def restart(self) -> None:
        """Move the clock origin to now and drop earlier spans (call after the start barrier)."""
        self.origin = time.perf_counter()
        self.spans.clear()

    def now(self) -> float:
        return time.perf_counter() - self.origin

    @contextmanager
    def span(self, kind: str, step: int, block: int | None = None) -> Iterator[None]:
        label = f"pipebd/{kind}" if block is None else f"pipebd/{kind}[{block}]"
        start = self.now()
        with record_function(label):
            yield
        self.spans.append(Span(kind, start, self.now(), step, block))


def busy_time(spans: list[Span], kinds: tuple[str, ...]) -> float:
    return sum(s.end - s.start for s in spans if s.kind in kinds)


def chrome_trace(tracks: list[tuple[str, list[Span]]]) -> dict:
    """Trace event JSON with one process track per rank. ``tracks``: ``(name, spans)`` per rank."""
    events: list[dict] = []
    for pid, (name, spans) in enumerate(tracks):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        for s in spans:
            args = {"step": s.step} if s.block is None else {"step": s.step, "block": s.block}
            events.append({"name": s.kind if s.block is None else f"{s.kind}[{s.block}]",
                           "cat": s.kind, "ph": "X", "pid": pid, "tid": 0,
                           "ts": round(s.start * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3),
                           "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, tracks: list[tuple[str, list[Span]]]) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(tracks), f)
