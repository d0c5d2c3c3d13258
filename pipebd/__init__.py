"""pipebd: fast blockwise distillation (Pipe-BD teacher relaying, hybrid parallelism) in PyTorch."""

from .api import Distiller
from .losses import SoftTargetLoss, soft_target_loss
from .plan import Plan
from .report import Report
from .runtime.launch import WorkerError
from .runtime.worker import NonFiniteLoss

__version__ = "0.1.0"

__all__ = ["Distiller", "NonFiniteLoss", "Plan", "Report", "SoftTargetLoss", "WorkerError",
           "soft_target_loss", "__version__"]
