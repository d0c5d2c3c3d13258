"""BatchNorm with statistics over the whole batch of a replicated stage, on any backend.

By default the replicas of a stage normalize with the statistics of their own slice, as DDP does
(Goyal et al. find per-replica statistics fine). ``fit(..., sync_batchnorm=True)`` replaces the
BatchNorm layers of replicated student blocks with ``GroupBatchNorm``, which combines the
replicas' statistics so that every replica normalizes with the mean and variance of the full
batch: the same function, gradients and running statistics as one process on the whole batch,
even when the slices differ in size. ``torch.nn.SyncBatchNorm`` does the same on GPUs only;
this one runs on gloo as well, which is what lets the tests check it against a one-process run.

Per layer and training step it adds one allreduce of ``k * (2C + 1)`` floats in the forward and
one of the same size in the backward (``C`` channels, ``k`` replicas).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class GroupBatchNorm(_BatchNorm):
    """A BatchNorm layer whose batch statistics cover every rank of ``group``.

    Each rank contributes its row count, per-channel mean and sum of squared deviations; the
    contributions are summed with an autograd-aware allreduce (each rank writes its own slot)
    and combined exactly (Chan et al.'s pairwise update), so the gradient flows to every
    rank's rows as it would through one full-batch BatchNorm. Accepts the inputs of BatchNorm1d,
    2d and 3d; parameters, buffers and state-dict keys are those of the layer it replaces.
    ``group=None`` normalizes each rank's own rows, as BatchNorm does (``local_batchnorm``);
    for the default group pass ``torch.distributed.group.WORLD``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: Any = None, device: Any = None, dtype: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.group = group
        self.input_dims: tuple[int, ...] | None = None   # set by sync_batchnorm: the replaced layer's

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (rows, channels, ...), got {input.dim()}")
        if self.input_dims is not None and input.dim() not in self.input_dims:
            raise ValueError(f"expected {' or '.join(map(str, self.input_dims))}D input, got {input.dim()}D input")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # Only training synchronizes (as torch's SyncBatchNorm): in eval mode a layer without
        # running statistics normalizes with its own rows, and no rank waits for the others.
        if not self.training or self.group is None or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        mean, var, rows = _group_moments(x, self.group)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (rows / (rows - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _group_moments(x: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance per channel over the rows of every rank in ``group``, and the
    number of values per channel (rows times the spatial size), without a host sync."""
    k, me = dist.get_world_size(group), dist.get_rank(group)
    acc = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dims = [0] + list(range(2, x.dim()))
    channels = x.shape[1]
    count = x.numel() // channels
    local_mean = acc.mean(dims)
    local_m2 = ((acc - local_mean.view((1, -1) + (1,) * (x.dim() - 2))) ** 2).sum(dims)
    width = 2 * channels + 1
    mine = torch.cat([local_mean.new_full((1,), float(count)), local_mean, local_m2])
    slots = torch.cat([mine.new_zeros(me * width), mine, mine.new_zeros((k - me - 1) * width)])
    table = _AllReduce.apply(slots, group).view(k, width)
    counts, means, m2s = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    rows = counts.sum()
    mean = (counts * means).sum(0) / rows
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return mean, m2 / rows, rows


class _AllReduce(torch.autograd.Function):
    """Sum over ``group``; the gradient of every rank's input is the sum of the ranks' output
    gradients (each rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sync_batchnorm(module: nn.Module, group: Any, shared: Iterable[nn.Module] = ()) -> nn.Module:
    """A copy of ``module`` whose BatchNorm layers (1d/2d/3d, and torch's SyncBatchNorm) are
    ``GroupBatchNorm`` over ``group``, holding copies of the same parameters and buffers, so its
    state dict loads into ``module`` and back. ``module`` is returned unchanged (not copied)
    when it has no BatchNorm. Modules in ``shared`` (a frozen teacher block that a student
    block holds) stay in the copy as they are: the same objects, not converted. ``group=None``
    is the default group, as for ``torch.nn.SyncBatchNorm``."""
    if group is None:   # was taken as "no group": per-rank statistics, without a word
        if not dist.is_initialized():
            raise ValueError("sync_batchnorm(group=None) means the default process group, and none is "
                             "initialized: call torch.distributed.init_process_group first")
        group = dist.group.WORLD
    return _converted(module, group, _BatchNorm, shared)


def local_batchnorm(module: nn.Module, shared: Iterable[nn.Module] = ()) -> nn.Module:
    """``module`` with its ``torch.nn.SyncBatchNorm`` layers replaced as ``sync_batchnorm``
    does but without a group: per-rank statistics, like the plain BatchNorm layers beside them.
    Left as they are, they would synchronize over the default group, which holds ranks (other
    stages, other models) that never call them: a hang on GPUs, an error on CPUs. ``module`` is
    returned unchanged (not copied) when it has no SyncBatchNorm."""
    return _converted(module, None, nn.SyncBatchNorm, shared)


def replica_batchnorm(module: nn.Module, group: Any, sync: bool, shared: Iterable[nn.Module] = ()) -> nn.Module:
    """``module`` as a replica of a data-parallel ``group`` (None: no replicas) trains it: with
    ``sync``, every BatchNorm over the group (``sync_batchnorm``); otherwise per rank, torch's
    SyncBatchNorm included (``local_batchnorm``)."""
    return sync_batchnorm(module, group, shared) if sync and group is not None else local_batchnorm(module, shared)


def _converted(module: nn.Module, group: Any, kind: type, shared: Iterable[nn.Module]) -> nn.Module:
    shared = list(shared)
    kept = {id(m): m for block in shared for m in block.modules()}
    if not any(isinstance(m, kind) and id(m) not in kept for m in module.modules()):
        return module
    memo: dict[int, Any] = {id(t): t for block in shared for t in (*block.parameters(), *block.buffers())}
    return _convert(copy.deepcopy(module, memo={**memo, **kept}), group, kind, kept)


_INPUT_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _convert(module: nn.Module, group: Any, kind: type, kept: dict[int, nn.Module]) -> nn.Module:
    if id(module) in kept:
        return module
    if isinstance(module, kind) and not isinstance(module, GroupBatchNorm):
        out = GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, group)
        out.input_dims = _INPUT_DIMS.get(type(module))
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group, kind, kept))
    return module
