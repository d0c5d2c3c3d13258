"""Moving weights and predictions between the models of a codistillation run.

Codistillation (Anil et al., "Large scale distributed neural network training through online
distillation", ICLR 2018) trains n models on disjoint shards and pulls each toward the others'
predictions, computed locally from checkpoints that are exchanged only every K steps.

Staleness rule. Exchange k happens after k*K training steps (K = ``exchange_every``). At exchange
k every model publishes its weights and installs the checkpoints the others published at exchange
k-1. Each transfer therefore overlaps a whole period of training, and which weights a model
distills from does not depend on how long a transfer takes: at step t (t >= 2K) model i distills
from the others' weights after ``K * (t // K - 1)`` steps. Training blocks on the exchange only if
a transfer is still running one period after it started (the ``exchange-wait`` span).

Online mode (deep mutual learning, Zhang et al., CVPR 2018) needs the others' current predictions
on the same rows at every step; ``PeerLogits`` gathers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ExchangeError(RuntimeError):
    """A weight or prediction transfer between codistillation groups failed; the message names
    the exchange, the peers and the rank that saw it fail."""


def checkpoint_tensors(module: nn.Module) -> list[Tensor]:
    """The tensors a checkpoint carries, in a fixed order: parameters, then buffers."""
    return [*module.parameters(), *module.buffers()]


def pack(module: nn.Module) -> dict[torch.dtype, Tensor]:
    """A copy of ``module``'s parameters and buffers as one flat tensor per dtype."""
    parts: dict[torch.dtype, list[Tensor]] = {}
    for t in checkpoint_tensors(module):
        parts.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    return {dtype: torch.cat(ts) for dtype, ts in parts.items()}


def unpack(module: nn.Module, flats: dict[torch.dtype, Tensor]) -> None:
    """Copy a ``pack``ed checkpoint into ``module`` (same architecture)."""
    offsets = dict.fromkeys(flats, 0)
    with torch.no_grad():
        for t in checkpoint_tensors(module):
            start = offsets[t.dtype]
            t.copy_(flats[t.dtype][start:start + t.numel()].view_as(t))
            offsets[t.dtype] = start + t.numel()


def packed_sizes(module: nn.Module) -> dict[torch.dtype, int]:
    """The number of elements of each flat tensor of ``pack(module)``."""
    sizes: dict[torch.dtype, int] = {}
    for t in checkpoint_tensors(module):
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return sizes


def _empty_like_packed(module: nn.Module, device: torch.device) -> dict[torch.dtype, Tensor]:
    return {dtype: torch.empty(n, dtype=dtype, device=device) for dtype, n in packed_sizes(module).items()}


@dataclass
class Transfer:
    """The checkpoints of one exchange on their way; ``received`` is valid after ``wait``."""

    index: int                                          # exchange k
    step: int                                           # published after this many steps
    received: dict[int, dict[torch.dtype, Tensor]]      # model -> packed checkpoint
    sent: dict[torch.dtype, Tensor] | None = None       # kept alive until the send completes
    works: list[tuple[int, Any]] = field(default_factory=list)   # (source model, work handle)
    restored: bool = False                              # read from a checkpoint on resume, not sent

    @property
    def bytes(self) -> int:
        return sum(f.numel() * f.element_size() for packed in self.received.values() for f in packed.values())


class WeightExchange:
    """Publishes each model's checkpoint to every rank that trains another model.

    ``leaders[j]`` is the rank that publishes model j, ``members[j]`` the ranks that train it.
    Distributed (``world_size > 1``): one broadcast per source model and dtype, on a process
    group made of model j's leader and every rank outside model j's group, started with
    ``async_op=True``. In one process (``world_size == 1``) the transfer is a copy.
    Every rank must construct this (it creates process groups) in the same order.
    """

    def __init__(self, structures: list[nn.Module], leaders: list[int], members: list[list[int]],
                 rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.structures, self.leaders, self.members = structures, leaders, members
        self.rank, self.device, self.timeout = rank, device, timedelta(seconds=timeout_s)
        self.distributed = world_size > 1
        self.groups: dict[int, Any] = {}
        if self.distributed and len(structures) > 1:
            for j, leader in enumerate(leaders):
                ranks = sorted({leader} | {r for r in range(world_size) if r not in members[j]})
                group = dist.new_group(ranks, timeout=self.timeout)
                if rank in ranks:
                    self.groups[j] = group

    def publish(self, index: int, step: int, own: dict[int, nn.Module]) -> Transfer:
        """Start exchange ``index`` with the weights of the models this rank trains (``own``)."""
        if not self.distributed:
            return Transfer(index, step, {j: pack(m) for j, m in own.items()})
        transfer = Transfer(index, step, {})
        for j, group in self.groups.items():
            if self.rank == self.leaders[j]:
                transfer.sent = pack(own[j])
                packed = transfer.sent
            else:
                packed = _empty_like_packed(self.structures[j], self.device)
                transfer.received[j] = packed
            for flat in packed.values():
                transfer.works.append((j, dist.broadcast(flat, src=self.leaders[j], group=group, async_op=True)))
        return transfer

    def wait(self, transfer: Transfer) -> dict[int, dict[torch.dtype, Tensor]]:
        """Complete ``transfer`` and return the checkpoints received; raises ``ExchangeError``."""
        for j, work in transfer.works:
            try:
                work.wait(self.timeout)
            except Exception as err:
                what = (f"sending model {j}'s checkpoint (after step {transfer.step}) to the other models' ranks"
                        if self.rank == self.leaders[j] else
                        f"receiving model {j}'s checkpoint (after step {transfer.step}) from rank {self.leaders[j]}")
                raise ExchangeError(f"weight exchange {transfer.index} failed on rank {self.rank}, {what}: {err} "
                                    f"(a peer may have stopped or stalled; timeout "
                                    f"{self.timeout.total_seconds():g} s)") from err
        transfer.works.clear()
        return transfer.received


class PeerLogits:
    """Online mode: every model's predictions on this rank's rows of the shared batch.

    Groups have equal sizes and slice the batch the same way, so local rank q of every group
    holds the same rows; those ranks form a peer group and all-gather their logits each step.
    """

    def __init__(self, n: int, group_size: int, rank: int, world_size: int, timeout_s: float):
        self.n, self.rank = n, rank
        self.group = None
        if world_size > 1 and n > 1:
            for q in range(group_size):
                group = dist.new_group([q + i * group_size for i in range(n)], timeout=timedelta(seconds=timeout_s))
                if rank % group_size == q:
                    self.group = group

    def gather(self, step: int, own: dict[int, Tensor]) -> dict[int, Tensor]:
        """``own``: model -> detached logits of the models this rank trains; returns all n."""
        if self.group is None:
            return own
        (i, logits), = own.items()
        parts = [torch.empty_like(logits) for _ in range(self.n)]
        try:
            dist.all_gather(parts, logits.contiguous(), group=self.group)
        except Exception as err:
            raise ExchangeError(f"prediction exchange at step {step} failed on rank {self.rank} "
                                f"(model {i}): {err}") from err
        return dict(enumerate(parts))
