"""Argument checks shared by the entry points (fit, profile, codistillation, plans, lr rules)."""

from __future__ import annotations

import inspect
import logging
import numbers
import operator
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("pipebd")


def integer(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (numpy integers and one-element integer
    tensors too), else None: for bools and floats as well, which are never truncated."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int (see ``integer``) of at least ``low``, else ValueError."""
    number = integer(value)
    if number is None or number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return number


def check_integer(name: str, value: Any) -> int:
    """``value`` as an int (see ``integer``), of any sign, else TypeError."""
    number = integer(value)
    if number is None:
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return number


def check_real(name: str, value: Any) -> float:
    """``value`` as a float: a real number (numpy's too, not a bool), a 0-d numpy array of one, or
    a one-element real tensor, else TypeError. Ranges are the caller's to check."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
            return float(value.detach())
    elif isinstance(value, np.ndarray):
        if value.ndim == 0 and value.dtype.kind in "iuf":
            return float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool when it is one (numpy's too), else TypeError: 0 and 1 are not taken."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


_FACTORIES = {"optimizer": "lambda params: torch.optim.SGD(params, lr=0.1)",
              "scheduler": "lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 10)"}


def check_factory(name: str, factory: Any) -> None:
    """``factory`` is None or a callable that makes one (each block or model gets its own), else TypeError."""
    if factory is not None and not callable(factory):
        raise TypeError(f"{name} must be a factory such as {_FACTORIES[name]} (each block or model gets its "
                        f"own), got an instance of {type(factory).__name__}")


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], module: nn.Module) -> torch.optim.Optimizer:
    """``factory``'s optimizer of ``module``'s parameters, handed over as a list: a factory may
    read them more than once (a generator left a second parameter group empty)."""
    return factory(list(module.parameters()))


def check_training(optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None,
                   modules: list[nn.Module], what: str, warn: bool = True) -> None:
    """Before any process starts: warn (with ``warn``) of trainable parameters that ``optimizer``
    leaves out of a module's optimizer, which get gradients and never change, and refuse a
    ``scheduler`` whose ``step()`` needs arguments: the runtime steps it after every optimizer
    step without any (``ReduceLROnPlateau``'s metric failed in the ranks, after they started).
    The optimizers are built, never stepped: the weights stay as they are. A factory that cannot
    build here (``ZeroRedundancyOptimizer`` needs the ranks' process group) is not checked."""
    for index, module in enumerate(modules):
        try:
            built = build_optimizer(optimizer, module)
        except Exception:
            return
        covered = {id(p) for group in built.param_groups for p in group["params"]}
        left = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        if left and warn:
            log.warning("pipebd: the optimizer of %s %d leaves out trainable parameters, which will not change: "
                        "%s. Freeze them with requires_grad_(False) if that is meant", what, index,
                        ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else ""))
        if scheduler is not None and index == 0:
            try:
                made = scheduler(built)
            except Exception:
                continue
            step = getattr(made, "step", None)
            if not callable(step):
                raise TypeError(f"scheduler must build a learning-rate scheduler (with a step() method), "
                                f"got {type(made).__name__}")
            try:
                signature = inspect.signature(step)
            except (TypeError, ValueError):   # a builtin's, say: nothing to tell
                continue
            needs = [p.name for p in signature.parameters.values() if p.default is p.empty
                     and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if needs:
                raise TypeError(f"scheduler: {type(made).__name__}.step() needs {', '.join(needs)}, but pipebd "
                                f"steps the scheduler after every optimizer step without arguments; use one "
                                f"that needs none (ReduceLROnPlateau needs a metric)")


def check_device(device: str | None) -> str:
    """``device`` (None: CUDA when available, else the CPU) as a string, else ValueError: a CPU or
    CUDA device, which the runtime runs on (another, such as "mps" or "meta", failed in training
    or, for "meta", left the caller's modules there without their weights)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: {err}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (what pipebd runs on), got {device!r}")
    return str(parsed)
