"""Timed spans per rank, and their export as Chrome trace events (Perfetto, chrome://tracing).

Span kinds (``Span.kind``): compute (``data``, ``teacher``, ``student``, ``step``, and the
``checkpoint`` writes, which keep a rank as busy), communication (``allreduce``: starting the
gradient allreduce and waiting for it; ``send``/``recv``: posting the transfers of activations;
codistillation's ``exchange``: publishing checkpoints and gathering the peers' logits online),
and waiting (``recv-wait``, ``send-wait``, codistillation's ``exchange-wait``, and ``data-wait``
for batches from loader worker processes). Time outside any span is idle.
Each span is also a ``torch.profiler`` range (``record_function``), so the same names appear in
torch profiler traces of the process that runs the rank.

The ranks' spans share one time axis: ``Recorder.align`` starts it when the last rank arrives
(by the wall clock, so across hosts to the accuracy of their clock sync).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.profiler import record_function

COMPUTE = ("data", "teacher", "student", "step", "checkpoint")
COMMUNICATION = ("allreduce", "send", "recv", "exchange")
WAITING = ("recv-wait", "send-wait", "exchange-wait", "data-wait")


@dataclass
class Span:
    kind: str
    start: float      # seconds on the ranks' shared time axis (``Recorder``)
    end: float
    step: int
    block: int | None = None


@dataclass
class Recorder:
    """Collects the spans of one rank. ``now()`` and ``elapsed`` are seconds on this rank's own
    clock since ``origin`` (``perf_counter``); spans are stored ``shift`` seconds later, on the
    time axis the ranks share (``align``)."""

    origin: float = field(default_factory=time.perf_counter)
    spans: list[Span] = field(default_factory=list)
    stopped: float | None = None     # the elapsed time frozen by ``stop``
    shift: float = 0.0               # this rank's origin on the shared time axis

    def restart(self) -> None:
        """Move the clock origin to now and drop earlier spans (call after the start barrier)."""
        self.origin = time.perf_counter()
        self.spans.clear()
        self.stopped = None
        self.shift = 0.0

    def align(self) -> None:
        """Put the spans of the ranks of the default process group on one time axis whose zero is
        the moment the last rank entered this exchange (a collective: every rank calls it after
        ``restart``, then restarts its clock as it leaves). Ranks leave a barrier up to
        milliseconds apart; without this a receive could show as ending before its send. The
        ranks' origins are compared on the wall clock, so across hosts the spans line up only as
        well as the hosts' clocks agree (a host whose clock is behind shows its spans early, even
        before zero); the elapsed time each rank reports is its own clock's, and this exchange is
        not part of it."""
        import torch.distributed as dist

        mine = time.time() - self.now()          # this rank's origin on the wall clock
        origins: list[float | None] = [None] * dist.get_world_size()
        dist.all_gather_object(origins, mine)
        # No rank leaves the exchange before the last one has entered it, so that moment, not the
        # earliest entry, is the zero that leaves no empty stretch before the first span.
        zero = max(o for o in origins if o is not None)
        self.restart()
        self.shift = time.time() - self.now() - zero

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def stop(self) -> None:
        """End the rank's timed run now; shutting down loader processes after it is not counted."""
        self.stopped = self.now()

    @property
    def elapsed(self) -> float:
        return self.now() if self.stopped is None else self.stopped

    def span(self, kind: str, step: int, block: int | None = None) -> "_Timed":
        """Time the body as a span of ``kind`` (kept only if the body completes)."""
        return _Timed(self, kind, step, block)


class _Timed:
    """The context manager of ``Recorder.span``: a class rather than a generator, and the
    ``torch.profiler`` range only while a profiler runs (it costs microseconds even when none
    does, and a step has about ten spans)."""

    __slots__ = ("recorder", "kind", "step", "block", "start", "range")

    def __init__(self, recorder: Recorder, kind: str, step: int, block: int | None):
        self.recorder, self.kind, self.step, self.block = recorder, kind, step, block

    def __enter__(self) -> None:
        self.range = None
        if torch.autograd._profiler_enabled():
            self.range = record_function(f"pipebd/{self.kind}" if self.block is None
                                         else f"pipebd/{self.kind}[{self.block}]")
            self.range.__enter__()
        self.start = self.recorder.now()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        end = self.recorder.now()
        if self.range is not None:
            self.range.__exit__(kind, error, traceback)
        if kind is None:
            shift = self.recorder.shift
            self.recorder.spans.append(Span(self.kind, self.start + shift, end + shift, self.step, self.block))


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
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "spans"}})
        for s in spans:
            args = {"step": s.step} if s.block is None else {"step": s.step, "block": s.block}
            events.append({"name": s.kind if s.block is None else f"{s.kind}[{s.block}]",
                           "cat": s.kind, "ph": "X", "pid": pid, "tid": 0,
                           "ts": round(s.start * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3),
                           "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, tracks: list[tuple[str, list[Span]]]) -> None:
    """Write the trace to ``path`` as ``pipebd.outputs.write_output`` does: a file whole or not at
    all (a full disk leaves any older file)."""
    from .outputs import write_output

    events = chrome_trace(tracks)
    write_output(path, lambda f: f.write(json.dumps(events) + "\n"), mode="w")
