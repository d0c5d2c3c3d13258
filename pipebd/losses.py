"""Block losses and the soft-target (knowledge distillation) loss.

Every loss here is a mean over the rows of the batch it is given. The runtime scales a replica's
loss by ``rows / global_batch`` before the gradient sum-allreduce, so the step equals the
full-batch step however the batch is sliced (Goyal et al., 2017, remark 3).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BlockLoss = Callable[[Tensor, Tensor], Tensor]

_BLOCK_LOSSES: dict[str, BlockLoss] = {"mse": F.mse_loss, "l1": F.l1_loss}
_REDUCTIONS = ("batchmean", "sum", "none")


def resolve_block_loss(loss: str | BlockLoss) -> BlockLoss:
    """``"mse"``/``"l1"`` or a callable ``(student_out, teacher_out) -> scalar``."""
    if callable(loss):
        return loss
    try:
        return _BLOCK_LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown block_loss {loss!r}; use one of {sorted(_BLOCK_LOSSES)} "
                         f"or a callable (student_out, teacher_out) -> scalar") from None


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                     reduction: str = "batchmean") -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last dimension of 2-D logits.

    ``reduction``: ``"batchmean"`` (sum over rows / rows), ``"sum"`` or ``"none"`` (one value per
    row). The gradient wrt the student logits is ``T * (softmax(s/T) - softmax(t/T))`` per row
    (divided by rows for batchmean). Computed in float32 at least; teacher entries of probability
    zero (``-inf`` logits) contribute nothing.
    """
    _check_logits(student_logits, teacher_logits, temperature, reduction)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    pt = log_pt.exp()
    per_row = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros((), dtype=dtype)).sum(-1)
    per_row = per_row * temperature**2
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / student_logits.shape[0] if reduction == "batchmean" else total


def _check_logits(student: Tensor, teacher: Tensor, temperature: float, reduction: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"soft-target loss needs 2-D [rows, classes] logits, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise TypeError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


class SoftTargetLoss(nn.Module):
    """Hinton's distillation loss on logits: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Use as ``Distiller(..., final_loss=SoftTargetLoss(temperature=4.0))`` to train the last
    student block on the teacher's softened logits instead of the block loss.
    """

    needs_labels = False
    backends = ("auto", "torch")

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if backend not in self.backends:
            raise ValueError(f"backend must be one of {self.backends}, got {backend!r}")
        self.temperature, self.reduction, self.backend = float(temperature), reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return soft_target_loss(student_logits, teacher_logits, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"
