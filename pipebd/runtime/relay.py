"""The teacher relay loop of Pipe-BD (Jang et al., "Pipe-BD: Pipelined Parallel Blockwise
Distillation", DATE 2023): teacher relaying (TR) with decoupled parameter updates (DPU).

Each stage runs the teacher blocks it owns exactly once per sample, starts an asynchronous send of
the last activation to the next stage, and trains its student blocks on the activations it already
holds. Only stage 0 touches the dataset. Optimizers step as soon as a stage's own gradients are
ready; there is no barrier between stages. A stage runs at most ``max_inflight`` batches ahead of
the next one: before sending batch t it waits until the send of batch ``t - max_inflight`` is done.
"""

from __future__ import annotations

from collections import deque

import torch.distributed as dist
from torch import Tensor

from .redistribute import overlaps, slices
from .worker import RankRuntime

ACTIVATION_TAG, LABEL_TAG = 0, 1


def run_relay(rt: RankRuntime) -> None:
    job, plan, s, q = rt.job, rt.job.plan, rt.stage, rt.replica
    last_stage = len(plan.stages) - 1
    batch = job.batch_size
    lo, hi = slices(batch, plan.replicas[s])[q]
    blocks = list(plan.stages[s])
    inbound = [ov for ov in overlaps(batch, plan.replicas[s - 1], plan.replicas[s]) if ov.dst == q] if s > 0 else []
    outbound = [ov for ov in overlaps(batch, plan.replicas[s], plan.replicas[s + 1]) if ov.src == q] \
        if s < last_stage else []
    src_ranks = plan.stage_ranks(s - 1) if s > 0 else []
    dst_ranks = plan.stage_ranks(s + 1) if s < last_stage else []

    def post_recv() -> tuple[Tensor, Tensor | None, list]:
        x = job.boundary[blocks[0]].empty(hi - lo, rt.device)
        y = job.labels.empty(hi - lo, rt.device) if job.labels is not None else None
        handles = []
        for ov in inbound:
            rows = slice(ov.lo - lo, ov.hi - lo)
            handles.append(dist.irecv(x[rows], src=src_ranks[ov.src], tag=ACTIVATION_TAG))
            if y is not None:
                handles.append(dist.irecv(y[rows], src=src_ranks[ov.src], tag=LABEL_TAG))
        return x, y, handles

    def post_send(out: Tensor, y: Tensor | None) -> tuple[list, tuple]:
        handles = []
        for ov in outbound:
            rows = slice(ov.lo - lo, ov.hi - lo)
            handles.append(dist.isend(out[rows], dst=dst_ranks[ov.dst], tag=ACTIVATION_TAG))
            if y is not None:
                handles.append(dist.isend(y[rows], dst=dst_ranks[ov.dst], tag=LABEL_TAG))
        return handles, (out, y)  # the tensors must outlive their sends

    sends: deque = deque()
    incoming = post_recv() if s > 0 else None
    bar = rt.progress(job.steps, show=s == last_stage and q == 0)
    for t in range(job.steps):
        if s == 0:
            x, y = rt.load(t, lo, hi)
        else:
            x, y, handles = incoming
            with rt.recorder.span("recv-wait", t):
                for h in handles:
                    h.wait()
            if t + 1 < job.steps:
                incoming = post_recv()  # the next batch arrives while this one trains
        acts = [x]
        for i in blocks:
            acts.append(rt.teacher_forward(i, acts[-1], t))
        if outbound:
            if len(sends) >= job.max_inflight:
                with rt.recorder.span("send-wait", t):
                    for h in sends.popleft()[0]:
                        h.wait()
            sends.append(post_send(acts[-1].contiguous(), y))
        grads = [rt.train_block(i, acts[j], acts[j + 1], y, t) for j, i in enumerate(blocks)]
        rt.finish_step(blocks, grads, t)
        bar.update()
    with rt.recorder.span("send-wait", job.steps - 1):
        while sends:
            for h in sends.popleft()[0]:
                h.wait()
    bar.close()
