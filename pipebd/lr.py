"""Large-minibatch SGD rules (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
1 Hour", 2017), for replicated stages, data-parallel codistillation groups and any torch loop.

- ``linear_scaling``: when the global batch grows k times, multiply the learning rate by k.
- ``warmup``: raise the rate linearly from ``start_factor`` times its value to its full value over
  the first steps (Goyal et al.'s gradual warmup starts from the unscaled rate: ``start_factor =
  base_batch_size / batch_size``). It is torch's ``LinearLR``; given ``then``, the two are chained
  (``ChainedScheduler``) so the warmup multiplies a step, multistep, exponential, polynomial or
  cosine schedule (with ``eta_min=0``) from step 0 on; a scheduler that sets the rate outright
  (``LambdaLR``, ``OneCycleLR``) is refused, as chaining would undo the warmup.
- ``param_groups``: optimizer parameter groups with no weight decay on normalization layers and
  biases (the option Goyal et al. describe; their experiments decay all parameters).

Momentum correction. Goyal et al. write momentum SGD as ``v = m v + lr g; w = w - v`` and note
that, in that form, a change of learning rate from ``lr`` to ``lr'`` needs the velocity scaled by
``lr'/lr``. ``torch.optim.SGD`` keeps the velocity in gradient units (``v = m v + g;
w = w - lr v``), so the learning rate applies outside the momentum buffer: warmup and schedules
need no momentum correction with it.

Loss normalization (the other rule) is built into the runtimes: each replica scales its loss by
its share of the global batch before the gradient allreduce.
"""

from __future__ import annotations

import math

from typing import Any, Iterable

from torch import nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler
from torch.optim.lr_scheduler import ChainedScheduler, CosineAnnealingLR, LinearLR, LRScheduler

from .checks import check_int

# Layers whose affine parameters are scales and shifts of a normalized activation.
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)


def linear_scaling(base_lr: float, batch_size: int, base_batch_size: int = 256) -> float:
    """The learning rate for ``batch_size`` given ``base_lr`` tuned at ``base_batch_size``:
    ``base_lr * batch_size / base_batch_size``."""
    if not 0 < base_lr < math.inf:
        raise ValueError(f"base_lr must be > 0 and finite, got {base_lr}")
    return base_lr * check_int("batch_size", batch_size, 1) / check_int("base_batch_size", base_batch_size, 1)


def warmup(optimizer: Optimizer, steps: int, start_factor: float = 0.1,
           then: LRScheduler | None = None) -> LRScheduler:
    """Linear warmup over ``steps`` scheduler steps: the rate of every parameter group goes from
    ``start_factor * lr`` (at step 0) to ``lr`` (at step ``steps``) and stays there. With
    ``then`` (a scheduler on the same optimizer), returns both chained: the rate at step t is
    ``lr * warmup_factor(t) * then_factor(t)``. Call ``step()`` once per optimizer step."""
    steps = check_int("warmup steps", steps, 0)
    if not 0 < start_factor <= 1:
        raise ValueError(f"start_factor must be in (0, 1], got {start_factor}")
    if then is not None and then.optimizer is not optimizer:
        raise ValueError("then must schedule the same optimizer as the warmup")
    if then is not None and steps and not _multiplies(then):   # no warmup: nothing to undo
        raise ValueError(f"then={type(then).__name__}{'(eta_min != 0)' if isinstance(then, CosineAnnealingLR) else ''} "
                         f"sets the rate from its own formula rather than multiplying the current one, so chained "
                         f"it would undo the warmup after its first step; use one of {', '.join(_MULTIPLYING)} "
                         f"or CosineAnnealingLR with eta_min=0, or fold the warmup into the schedule "
                         f"(a LambdaLR of warmup factor times schedule factor)")
    # LinearLR over 0 steps would keep start_factor for good; no warmup means factor 1.
    ramp = LinearLR(optimizer, start_factor=start_factor if steps else 1.0, end_factor=1.0, total_iters=steps)
    return ramp if then is None else ChainedScheduler([ramp, then])


# Schedulers whose step multiplies the current rate by a factor, which ChainedScheduler needs to
# combine two of them (LambdaLR, OneCycleLR, CyclicLR and the like set the rate outright).
_MULTIPLYING = ("StepLR", "MultiStepLR", "ExponentialLR", "PolynomialLR", "ConstantLR", "LinearLR",
                "MultiplicativeLR")


def _multiplies(scheduler: LRScheduler) -> bool:
    if isinstance(scheduler, CosineAnnealingLR):   # chainable only without a floor
        return scheduler.eta_min == 0
    if isinstance(scheduler, ChainedScheduler):
        return all(_multiplies(s) for s in scheduler._schedulers)
    return isinstance(scheduler, tuple(getattr(lr_scheduler, name) for name in _MULTIPLYING))


def param_groups(params: nn.Module | Iterable[nn.Parameter], weight_decay: float,
                 no_decay_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not decayed, "weight_decay": 0.0}]`` for any torch optimizer.

    Given a module, the parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm,
    RMSNorm, ...) and every parameter whose name ends in ``bias`` are not decayed. Given only
    parameters (what a ``Distiller`` hands its optimizer factory), the one-dimensional ones are not
    decayed: in most torch layers those are the biases and the normalization scales and shifts,
    but other 1-D parameters (PReLU's weight, for one) are exempted too.
    Empty groups are left out; shared parameters appear once.
    """
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay}")
    if isinstance(params, nn.Module):
        exempt = {id(p) for m in params.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
        exempt |= {id(p) for name, p in params.named_parameters() if name.rsplit(".", 1)[-1].endswith("bias")}
        trainable = [p for p in params.parameters() if p.requires_grad]
    else:
        trainable = [p for p in params if p.requires_grad]
        exempt = {id(p) for p in trainable if p.dim() <= 1}
    if not no_decay_norm_and_bias:
        exempt = set()
    seen: set[int] = set()
    decay, keep = [], []
    for p in trainable:
        if id(p) not in seen:
            seen.add(id(p))
            (keep if id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
