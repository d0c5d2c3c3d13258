"""pipebd: fast blockwise distillation (Pipe-BD teacher relaying, hybrid parallelism), codistillation
and online distillation in PyTorch."""

from . import lr
from .api import Distiller
from .codistill import Codistillation, CodistillReport
from .losses import SoftTargetLoss, soft_target_loss
from .plan import Plan
from .report import Report
from .runtime.exchange import ExchangeError
from .runtime.launch import WorkerError
from .runtime.worker import NonFiniteLoss

__version__ = "0.1.0"

__all__ = ["CodistillReport", "Codistillation", "Distiller", "ExchangeError", "NonFiniteLoss", "Plan", "Report",
           "SoftTargetLoss", "WorkerError", "lr", "soft_target_loss", "__version__"]
