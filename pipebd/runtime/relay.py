"""The teacher relay loop of Pipe-BD (Jang et al., "Pipe-BD: Pipelined Parallel Blockwise
Distillation", DATE 2023): teacher relaying (TR) with decoupled parameter updates (DPU).

Each stage runs the teacher blocks it owns exactly once per sample, starts an asynchronous send of
the last activation to the next stage, and trains its student blocks on the activations it already
holds. Only stage 0 touches the dataset. Optimizers step as soon as a stage's own gradients are
ready; there is no barrier between stages. Before sending batch t a stage waits until its send of
batch ``t - max_inflight`` has completed. With gloo a send completes once the receiver has
posted the matching receive, and a stage posts its receive one batch ahead, so a stage runs at
most ``max_inflight + 1`` batches ahead of the next and the activations in flight stay bounded on
long runs (tested). With NCCL ``wait`` only makes the CUDA stream wait, so there the host also
polls the sends until they have completed (``_drain``); that path has not been run on a GPU yet.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

from .redistribute import overlaps, slices
from .worker import RankRuntime


def _post(op, tensors: tuple[Tensor, ...], links: list[tuple[int, slice]]) -> list:
    """Start ``op`` (``dist.isend`` or ``dist.irecv``) on the rows each peer rank exchanges with
    this one; the position of a tensor in ``tensors`` is its tag (activation 0, labels 1)."""
    return [op(t[rows], peer, tag=tag) for peer, rows in links for tag, t in enumerate(tensors)]


_POLL_S = 50e-6   # between checks of the sends on the host: a small share of a step


def _drain(handles: list, device: torch.device, timeout: float) -> None:
    """Wait for the sends ``handles`` to complete, on the host as well: with NCCL ``wait`` only
    orders the CUDA streams, and a host that ran on would hold ever more activations in flight."""
    for h in handles:
        h.wait()
    if device.type != "cuda":
        return     # gloo's wait blocks until the receiver has the data
    deadline = time.monotonic() + timeout
    while not all(h.is_completed() for h in handles):
        if time.monotonic() > deadline:
            raise TimeoutError(f"a send of activations did not complete within {timeout:g} s")
        time.sleep(_POLL_S)
    for h in handles:
        h.wait()   # a send that completed by failing raises here


def run_relay(rt: RankRuntime) -> None:
    job, plan, s, q = rt.job, rt.job.plan, rt.stage, rt.replica
    last_stage = len(plan.stages) - 1
    batch = job.batch_size
    lo, hi = slices(batch, plan.replicas[s])[q]
    blocks = list(plan.stages[s])
    # (peer rank, rows of this rank's slice) for each overlap with the previous / next stage.
    inbound = [(plan.stage_ranks(s - 1)[ov.src], slice(ov.lo - lo, ov.hi - lo))
               for ov in overlaps(batch, plan.replicas[s - 1], plan.replicas[s]) if ov.dst == q] if s > 0 else []
    outbound = [(plan.stage_ranks(s + 1)[ov.dst], slice(ov.lo - lo, ov.hi - lo))
                for ov in overlaps(batch, plan.replicas[s], plan.replicas[s + 1]) if ov.src == q] \
        if s < last_stage else []
    specs = [job.boundary[blocks[0]]] + ([job.labels] if job.labels is not None else [])

    def post_recv() -> tuple[tuple[Tensor, ...], list]:
        bufs = tuple(spec.empty(hi - lo, rt.device) for spec in specs)
        return bufs, _post(dist.irecv, bufs, inbound)

    sends: deque = deque()
    first = job.first_step     # after a resume, blocks that completed step t skip its training
    incoming = None
    if s > 0:
        with rt.recorder.span("recv", first):
            incoming = post_recv()
    bar = rt.progress(job.steps - first, show=s == last_stage and q == 0)
    feed = rt.feed(list(range(first, job.steps)), lo, hi) if s == 0 else None
    for t in range(first, job.steps):
        if feed is not None:
            x, y = next(feed)
        else:
            (x, *rest), handles = incoming
            y = rest[0] if rest else None
            with rt.recorder.span("recv-wait", t):
                for h in handles:
                    h.wait()
            if t + 1 < job.steps:
                with rt.recorder.span("recv", t + 1):
                    incoming = post_recv()  # the next batch arrives while this one trains
        acts = [x]
        for i in blocks:
            acts.append(rt.teacher_forward(i, acts[-1], t))
        if outbound:
            if len(sends) >= job.max_inflight:
                with rt.recorder.span("send-wait", t):
                    _drain(sends.popleft()[0], rt.device, job.timeout)
            out = (acts[-1].contiguous(),) + ((y,) if y is not None else ())
            with rt.recorder.span("send", t):
                sends.append((_post(dist.isend, out, outbound), out))  # out outlives its sends
        due = [j for j, i in enumerate(blocks) if t >= job.start_of(i)]
        grads = [rt.train_block(blocks[j], acts[j], acts[j + 1], y, t) for j in due]
        rt.finish_step([blocks[j] for j in due], grads, t)
        bar.update()
    if sends:
        with rt.recorder.span("send-wait", job.steps - 1):
            while sends:
                _drain(sends.popleft()[0], rt.device, job.timeout)
    bar.close()
