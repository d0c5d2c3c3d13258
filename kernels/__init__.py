"""Triton kernels of pipebd (imported as ``pipebd.kernels``; importing it imports triton).

``softmax_kd``: row softmax and log-softmax with temperature, and the fused soft-target loss
behind ``pipebd.soft_target_loss(..., backend="triton")``.
"""

from .softmax_kd import INTERPRET, SoftmaxWithTemperature, SoftTargetFunction, fused_soft_target_loss, log_softmax, softmax

__all__ = ["INTERPRET", "SoftTargetFunction", "SoftmaxWithTemperature", "fused_soft_target_loss", "log_softmax",
           "softmax"]
