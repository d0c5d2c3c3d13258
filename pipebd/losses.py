"""Block losses and the soft-target (knowledge distillation) loss.

Every block loss here, and the soft-target loss with its default ``batchmean``, is a mean over
the rows of the batch it is given. The runtime scales a replica's
loss by ``rows / global_batch`` before the gradient sum-allreduce, so the step equals the
full-batch step however the batch is sliced (Goyal et al., 2017, remark 3).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_bool, check_integer, check_real

BlockLoss = Callable[[Tensor, Tensor], Tensor]

_BLOCK_LOSSES: dict[str, BlockLoss] = {"mse": F.mse_loss, "l1": F.l1_loss}
_REDUCTIONS = ("batchmean", "sum", "none")
_BACKENDS = ("auto", "triton", "torch")


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
                     reduction: str = "batchmean", *, labels: Tensor | None = None, alpha: float = 0.0,
                     ignore_index: int = -100, teacher_grad: bool = False, backend: str = "auto") -> Tensor:
    """Soft-target distillation loss on logits, per row ``r``::

        (1 - alpha) * T^2 * KL(p_t || softmax(s_r / T)) + alpha * cross_entropy(s_r, labels_r)

    ``student_logits`` is [rows, V], or [batch, ..., V] (a sequence model's [batch, positions,
    V]), whose every position is a row. ``teacher_logits`` has the student's shape, or [n, *that]
    for a teacher that is the average of n prediction sets: ``p_t = mean_k softmax(t_k / T)``
    (codistillation). Teacher entries of probability zero (``-inf`` logits) contribute nothing.

    ``alpha`` mixes in the hard-label cross-entropy (at temperature 1) and then needs ``labels``
    of the student's shape less V (integers in [0, V), or ``ignore_index`` for rows with no hard
    term). ``reduction``: ``"batchmean"`` (sum over rows / rows, so a mean over all positions;
    ignored rows count in the denominator, unlike ``F.cross_entropy``'s mean, so that a batch
    split into slices sums to the full-batch loss), ``"sum"`` or ``"none"`` (one value per row,
    in the student's shape less V). The loss is float32 (float64 for float64 input).

    The gradient wrt the student is ``(1 - alpha) * T * (softmax(s/T) - p_t)`` plus
    ``alpha * (softmax(s) - onehot(labels))`` per row. The teacher gets no gradient unless
    ``teacher_grad=True`` (mutual learning).

    ``backend``: ``"triton"`` (the fused kernels of ``pipebd.kernels``: CUDA, or CPU under
    ``TRITON_INTERPRET=1``), ``"torch"`` (plain torch), or ``"auto"`` (Triton for CUDA tensors).
    Raises ``ValueError``/``TypeError`` naming the bad argument.
    """
    sets = _check_logits(student_logits, teacher_logits, temperature, reduction, alpha, backend)
    triton = _use_triton(backend, student_logits)
    _check_range(temperature, torch.float32 if triton else torch.promote_types(student_logits.dtype, sets.dtype))
    ignore_index, teacher_grad = _check_ignore_index(ignore_index), check_bool("teacher_grad", teacher_grad)
    temperature, alpha = _number("temperature", temperature), _number("alpha", alpha)
    if alpha > 0:
        labels = _check_labels(labels, student_logits, ignore_index)
    else:
        labels = None
    if not teacher_grad:
        sets = sets.detach()
    positions = student_logits.shape[:-1]     # [batch, ...]: each position is a row
    student = student_logits.reshape(-1, student_logits.shape[-1])
    if triton:
        for name, value in (("temperature", temperature), ("alpha", alpha)):
            if isinstance(value, Tensor) and value.requires_grad:
                raise ValueError(f"{name} that requires grad is differentiated only by backend='torch'; "
                                 f"the Triton kernels take it as a number")
        from pipebd.kernels.softmax_kd import fused_soft_target_loss
        loss = fused_soft_target_loss(student, sets, labels, temperature, alpha, ignore_index, reduction, teacher_grad)
    else:
        loss = _torch_soft_target_loss(student, sets, labels, temperature, alpha, ignore_index, reduction)
    return loss.reshape(positions) if reduction == "none" else loss


def _torch_soft_target_loss(student: Tensor, sets: Tensor, labels: Tensor | None, temperature: float,
                            alpha: float, ignore_index: int, reduction: str) -> Tensor:
    dtype = torch.promote_types(torch.promote_types(student.dtype, sets.dtype), torch.float32)
    log_ps = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    if len(sets) == 1:
        log_pt = F.log_softmax(sets[0].to(dtype) / temperature, dim=-1)
        pt = log_pt.exp()
    else:
        # Not logsumexp over the sets: its backward is nan where every set is -inf.
        pt = F.softmax(sets.to(dtype) / temperature, dim=-1).mean(0)
        log_pt = torch.where(pt != 0, pt, 1.0).log()
    # pt outside the where: the masked branch then passes no nan (0 * -inf) to either gradient.
    # pt != 0 rather than > 0: a NaN teacher row gives a NaN gradient, as the Triton kernel's does.
    g = torch.where(pt != 0, log_pt - log_ps, 0.0)
    kl = (pt * g).sum(-1)
    with torch.no_grad():   # the accurate value (kl_terms), without the graph of its many rows x V steps
        exact = kl_terms(pt, log_ps.exp(), g).sum(-1)
    # kl's gradient (its second derivative too) with exact's value: the rounding of kl's value,
    # not of its gradient, is what kl_terms avoids. An infinite or NaN kl stands (inf - inf).
    per_row = temperature * temperature * (kl + torch.where(kl.isfinite(), exact - kl.detach(), 0.0))
    if labels is not None:
        hard = F.cross_entropy(student.to(dtype), labels, ignore_index=ignore_index, reduction="none")
        # alpha = 1: the soft term is left out, not multiplied by 0 (it may be inf).
        per_row = hard if alpha == 1 else (1 - alpha) * per_row + alpha * hard
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / student.shape[0] if reduction == "batchmean" else total


def kl_terms(pt: Tensor, ps: Tensor, g: Tensor) -> Tensor:
    """Per class, ``pt * (g + exp(-g) - 1)`` with ``g = log pt - log ps``, or ``ps`` where ``pt`` is
    zero: each >= 0, and they sum to KL(pt || ps), since the added ``ps - pt`` sum to zero. A
    constant error in g (the rounding of the two log-normalizers) then enters only at second
    order; ``sum(pt * g)`` (``F.kl_div``) came out negative near convergence and far off at large T.
    Near ``g = 0`` the bracket is its Taylor series, ``sum_k (-g)^k / k!`` from k = 2, which the
    subtraction would cancel away. The same as the Triton kernel's ``_kl_terms``. A value without
    a graph (in place: run it under ``torch.no_grad()``)."""
    small = g.abs() < 0.25
    x = torch.where(small, g, 0.0)
    n = series_terms(x.dtype)
    h = torch.full_like(x, (-1) ** n / math.factorial(n))
    for k in range(n - 1, 1, -1):     # Horner, in place: the loss's time is in these passes over rows x V
        h.mul_(x).add_((-1) ** k / math.factorial(k))
    h.mul_(x).mul_(x).mul_(pt)
    return torch.where(pt != 0, torch.where(small, h, torch.addcmul(ps, pt, g - 1.0)), ps)


def series_terms(dtype: torch.dtype) -> int:
    """The last power of g in ``kl_terms``' series: its remainder, relative to the sum, is below
    the dtype's rounding for |g| < 0.25 (about 1e-11 for float64 at 9)."""
    return 17 if dtype == torch.float64 else 9


def _use_triton(backend: str, logits: Tensor) -> bool:
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        return False
    try:
        import triton  # noqa: F401
    except ImportError as err:
        if backend == "triton":
            raise ImportError("backend='triton' needs the triton package (pip install triton)") from err
        return False
    return True


def _check_logits(student: Tensor, teacher: Tensor, temperature: float, reduction: str, alpha: float,
                  backend: str) -> Tensor:
    """Validate the arguments; return the teacher as [n, rows, V]."""
    for name, logits in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(logits).__name__}")
        if not logits.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if student.dim() < 2 or teacher.dim() not in (student.dim(), student.dim() + 1):
        raise ValueError(f"soft-target loss needs student logits [rows, classes] (or [batch, ..., classes]) "
                         f"and teacher logits of that shape or [n, *that shape], got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if student.shape != teacher.shape[teacher.dim() - student.dim():]:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} differ in shape")
    if min(teacher.shape) == 0:
        raise ValueError(f"soft-target loss needs at least one row, class and teacher set, got teacher "
                         f"{tuple(teacher.shape)}")
    _check_options(temperature, reduction, alpha, backend)
    sets = teacher if teacher.dim() > student.dim() else teacher.unsqueeze(0)
    return sets.reshape(len(sets), -1, student.shape[-1])


def _check_range(temperature: Any, dtype: torch.dtype) -> None:
    """T^2 and 1/T finite in the loss's arithmetic: float32, float64 for float64 input to the
    torch backend (``dtype`` promoted to at least float32); the Triton kernels take T's terms as
    float32 arguments on a GPU, whatever the input."""
    dtype = torch.promote_types(dtype, torch.float32)
    largest, t = torch.finfo(dtype).max, check_real("temperature", temperature)
    if not (t * t <= largest and 1 / t <= largest):
        raise ValueError(f"temperature={temperature} is out of range for this loss's {str(dtype)[6:]} arithmetic: "
                         f"T^2 and 1/T must be at most {largest:.3g}")


def _number(name: str, value: Any) -> float | Tensor:
    """A floating tensor as a 0-d one (it may be learned; 0-d, it changes neither the loss's
    shape nor its dtype), any other real number as a float (a numpy scalar, an integer tensor);
    checked by ``_check_options`` before."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.reshape(())
    return check_real(name, value)


def _check_options(temperature: float | Tensor, reduction: str, alpha: float, backend: str) -> None:
    t = check_real("temperature", temperature)
    if not (0 < t and t * t < math.inf):      # T^2 scales the loss
        raise ValueError(f"temperature must be > 0 and its square finite, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0 <= check_real("alpha", alpha) <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _check_ignore_index(value: Any) -> int:
    """``ignore_index`` as an int that labels (int64) can hold."""
    index = check_integer("ignore_index", value)
    if not -2 ** 63 <= index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64, as the labels do, got {value!r}")
    return index


def _check_labels(labels: Tensor | None, student: Tensor, ignore_index: int) -> Tensor:
    """``labels`` as int64 [rows], checked against the student's logits [..., classes]."""
    positions, classes = tuple(student.shape[:-1]), student.shape[-1]
    if labels is None:
        raise ValueError("alpha > 0 mixes in a hard-label cross-entropy and needs labels [rows]")
    labels = torch.as_tensor(labels, device=student.device)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.shape != positions:
        raise ValueError(f"labels must have shape {positions} for logits {tuple(student.shape)}, "
                         f"got {tuple(labels.shape)}")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    bad = out_of_range(labels, classes, ignore_index)
    if bad:
        raise ValueError(f"labels must be in [0, {classes}) or ignore_index={ignore_index}, got {bad}")
    return labels


def out_of_range(labels: Tensor, classes: int, ignore_index: int) -> list[int]:
    """Up to four of the integer ``labels`` that are neither a class in ``[0, classes)`` nor
    ``ignore_index`` (compared as int64: uint8 labels must not wrap -100 to 156)."""
    labels = labels.long()
    return labels[(labels != ignore_index) & ((labels < 0) | (labels >= classes))][:4].tolist()


def _kept(name: str, value: Any) -> float | Tensor:
    """A floating tensor as it is (it may be learned), any other real number as a float."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value
    return check_real(name, value)


class SoftTargetLoss(nn.Module):
    """Hinton's distillation loss on logits; see ``soft_target_loss`` for the formula, shapes and
    options.

    Use as ``Distiller(..., final_loss=SoftTargetLoss(temperature=4.0))`` to train the last
    student block on the teacher's softened logits instead of the block loss; with ``alpha > 0``
    the dataset's labels are passed too.
    """

    backends = _BACKENDS

    def __init__(self, temperature: float = 1.0, *, alpha: float = 0.0, reduction: str = "batchmean",
                 ignore_index: int = -100, teacher_grad: bool = False, backend: str = "auto"):
        super().__init__()
        _check_options(temperature, reduction, alpha, backend)
        # A floating tensor is kept as it is, so that it can be learned (with backend "torch"), as
        # in the functional form; an nn.Parameter is then one of this module's parameters.
        self.temperature, self.alpha = (_kept("temperature", temperature), _kept("alpha", alpha))
        self.reduction, self.ignore_index = reduction, _check_ignore_index(ignore_index)
        self.teacher_grad, self.backend = check_bool("teacher_grad", teacher_grad), backend

    @property
    def needs_labels(self) -> bool:
        return bool(self.alpha > 0)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return soft_target_loss(student_logits, teacher_logits, self.temperature, self.reduction, labels=labels,
                                alpha=self.alpha, ignore_index=self.ignore_index,
                                teacher_grad=self.teacher_grad, backend=self.backend)

    def extra_repr(self) -> str:
        def shown(value: float | Tensor) -> str:     # a tensor by its value, not its multi-line repr
            return f"{float(value.detach())}" if isinstance(value, Tensor) else f"{value}"

        return (f"temperature={shown(self.temperature)}, alpha={shown(self.alpha)}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, teacher_grad={self.teacher_grad}, backend={self.backend!r}")
