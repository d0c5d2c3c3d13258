"""pipebd: fast blockwise distillation (Pipe-BD teacher relaying, hybrid parallelism), codistillation
and online distillation in PyTorch.

The names below load on first use (PEP 562), so that importing the package, as the command line
does before it parses its arguments, does not import torch."""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {"CodistillReport": "codistill", "Codistillation": "codistill", "Distiller": "api",
          "ExchangeError": "runtime.exchange", "NonFiniteLoss": "runtime.worker", "Plan": "plan", "Report": "report",
          "SoftTargetLoss": "losses", "WorkerError": "runtime.launch", "soft_target_loss": "losses"}

__all__ = ["CodistillReport", "Codistillation", "Distiller", "ExchangeError", "NonFiniteLoss", "Plan", "Report",
           "SoftTargetLoss", "WorkerError", "lr", "soft_target_loss", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value   # looked up here from now on
        return value
    return _submodule(__name__, name)


def _submodule(package: str, name: str) -> Any:
    """``package.name`` imported, for a package's ``__getattr__``: its submodules load on first
    access (pipebd.lr, pipebd.api, ...), as when the package imported them all at once; else
    AttributeError."""
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the submodules loaded so far and the dunders; not this file's imports."""
    loaded = {name for name, value in globals().items()
              if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"}
    return sorted(set(__all__) | loaded | {name for name in globals() if name.startswith("__")})


if TYPE_CHECKING:   # for type checkers and editors, which do not run __getattr__
    from . import lr
    from .api import Distiller
    from .codistill import Codistillation, CodistillReport
    from .losses import SoftTargetLoss, soft_target_loss
    from .plan import Plan
    from .report import Report
    from .runtime.exchange import ExchangeError
    from .runtime.launch import WorkerError
    from .runtime.worker import NonFiniteLoss
