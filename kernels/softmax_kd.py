"""Fused softmax-with-temperature kernels for distillation losses.

The soft-target loss of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", with
the teacher given as the average of several prediction sets as in codistillation (Anil et al.,
2018) and an optional hard-label term::

    loss_r = (1 - alpha) * T^2 * KL(p_t || softmax(s_r / T)) + alpha * CE(s_r, y_r)
    p_t    = mean_k softmax(t_kr / T)                      (k over n teacher prediction sets)

    d loss_r / d s_r   = (1 - alpha) * T * (softmax(s_r / T) - p_t) + alpha * (softmax(s_r) - onehot(y_r))
    d loss_r / d t_kr  = (1 - alpha) * (T / n) * q_k * (g - <q_k, g>),
                         q_k = softmax(t_kr / T), g = log p_t - log softmax(s_r / T)

``CE`` is zero for rows whose label is ``ignore_index``. Reductions: ``batchmean`` divides the sum
over rows by the number of rows (ignored rows included, so that a batch split into slices sums
to the full-batch loss), ``sum``, or ``none`` (one value per row).

Every kernel runs one program per row over column blocks of ``BLOCK`` logits, keeping per-lane
running maxima and sums (online softmax) in fp32, or fp64 for fp64 inputs so that gradcheck
applies. Row offsets are int64. A row is swept twice: once for the normalizers, once to write the
gradient (with the loss accumulated alongside); the second sweep usually reads from L2. The
gradient wrt the student is computed in the forward pass, stored in the student's dtype (fp32 for
fp16), and only scaled by the incoming gradient in backward, so the only rows x V buffer is the
gradient itself (plus the scaled copy when the incoming gradient is not exactly 1, and the fp16
copy of an fp16 student's fp32 gradient). On a GPU the
temperature and loss weights are fp32 kernel arguments (Triton's float arguments), so fp64 inputs
are accurate to about 1e-8 relative there; the interpreter keeps them in full precision.
The teacher's gradient, for mutual learning, costs a third sweep and is off by default. Since
the saved gradients carry no graph, the loss has no second derivative: backward with
``create_graph=True`` raises (the torch reference has one).

``softmax``/``log_softmax`` are the plain row kernels (with temperature), forward and backward;
under ``create_graph=True`` their backward is the same formula in torch ops, differentiable again.
Triton runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before this
module is imported.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from pipebd.checks import check_real
from pipebd.losses import series_terms

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK_ELEMENTS = 4096     # logits per column block (all teacher sets together), per program


@triton.jit
def _online(m, z, x, inv_t):
    """Fold the block ``x`` into per-lane running maxima ``m`` (of raw logits) and sums ``z`` of
    ``exp((x - m) / T)``; lanes that have seen only -inf keep ``z == 0``. One exp per element:
    the smaller of ``x`` and ``m``, relative to the larger, scales either the old sum or the new
    term (the exp units, not memory, would bound a two-exp update in bf16)."""
    e = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - m) * inv_t))
    z = tl.where(x > m, z * e + 1.0, z + e)
    return tl.maximum(m, x), z


@triton.jit
def _normalizer(m, z, inv_t, AXIS: tl.constexpr):
    """Combine per-lane ``(m, z)`` along ``AXIS`` into the row maximum and ``log Z``, so that
    ``log softmax(x / T) = (x - max) / T - log Z``."""
    top = tl.max(m, AXIS)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(z * tl.exp((m - tl.expand_dims(top, AXIS)) * inv_t), AXIS)
    return top, tl.log(total)


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, x_stride, y_stride, V, inv_t,
                        LOG: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_stride, y_ptr + row * y_stride
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), ACC)
    z = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m, z = _online(m, z, x, inv_t)
    top, log_z = _normalizer(m, z, inv_t, 0)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        y = (x - top) * inv_t - log_z
        if not LOG:
            y = tl.exp(y)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _softmax_bwd_kernel(y_ptr, dy_ptr, dx_ptr, y_stride, dy_stride, dx_stride, V, inv_t,
                        LOG: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # softmax:      dx = (y * (dy - sum(dy * y))) / T
    # log_softmax:  dx = (dy - exp(y) * sum(dy)) / T
    row = tl.program_id(0).to(tl.int64)
    y_row, dy_row, dx_row = y_ptr + row * y_stride, dy_ptr + row * dy_stride, dx_ptr + row * dx_stride
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        dy = tl.load(dy_row + cols, mask=cols < V, other=0.0).to(ACC)
        if LOG:
            acc += dy
        else:
            acc += dy * tl.load(y_row + cols, mask=cols < V, other=0.0).to(ACC)
    total = tl.sum(acc, 0)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        dy = tl.load(dy_row + cols, mask=cols < V, other=0.0).to(ACC)
        y = tl.load(y_row + cols, mask=cols < V, other=0.0).to(ACC)
        if LOG:
            dx = (dy - tl.exp(y) * total) * inv_t
        else:
            dx = y * (dy - total) * inv_t
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _load_block(s_row, t_rows, sets, start, V, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Student block [BLOCK] and teacher block [NP, BLOCK] at columns ``start + lanes``."""
    cols = start + tl.arange(0, BLOCK)
    s = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
    t = tl.load(t_rows + cols[None, :], mask=sets[:, None] & (cols < V)[None, :], other=float("-inf")).to(ACC)
    return cols, s, t


@triton.jit
def _probabilities(s, t, sets, s_top, s_log_z, t_top, t_log_z, inv_t, n_sets, NP: tl.constexpr):
    """log softmax(s/T), the per-set teacher probabilities q [NP, BLOCK], their mean p_t, and
    g = log p_t - log p_s (zero where p_t is zero)."""
    log_ps = (s - s_top) * inv_t - s_log_z
    log_q = (t - t_top[:, None]) * inv_t - t_log_z[:, None]
    q = tl.where(sets[:, None], tl.exp(log_q), 0.0)
    if NP == 1:
        # One set: subtract the logits before scaling by 1/T, so that the rounding of each log
        # probability (large next to g at large T) does not enter g.
        t1, t1_top, t1_log_z = tl.sum(t, 0), tl.sum(t_top, 0), tl.sum(t_log_z, 0)
        p_t = tl.exp((t1 - t1_top) * inv_t - t1_log_z)
        g = ((t1 - t1_top) - (s - s_top)) * inv_t - (t1_log_z - s_log_z)
    else:
        p_t = tl.sum(q, 0) / n_sets
        g = tl.log(p_t) - log_ps
    g = tl.where(p_t > 0, g, 0.0)
    return log_ps, q, p_t, g


@triton.jit
def _kl_terms(p_t, p_s, g, SERIES: tl.constexpr):
    """Per column, ``p_t * (g + exp(-g) - 1)``, or ``p_s`` where ``p_t`` is zero: each >= 0, and
    they sum to KL(p_t || p_s) since the added ``p_s - p_t`` sum to zero. A constant error in g
    (the rounding of the two log-normalizers) then enters only at second order; as ``sum(p_t * g)``
    KL came out negative near convergence and far off at large T. Near ``g = 0`` the bracket is
    its Taylor series, ``g^2/2 * (1 - g/3 * (1 - g/4 * ...))`` (integer divisors: exact in fp64
    too), which the subtraction would cancel away. A NaN ``p_t`` stays NaN."""
    x = tl.where(tl.abs(g) < 0.25, g, 0.0)
    h = tl.full(x.shape, 1.0, x.dtype)
    for k in tl.static_range(SERIES, 2, -1):    # to g^SERIES (pipebd.losses.series_terms)
        h = 1.0 - x / k * h
    term = tl.where(tl.abs(g) < 0.25, p_t * (x * x / 2.0 * h), p_t * (g - 1.0) + p_s)
    return tl.where(p_t != 0, term, p_s)


@triton.jit
def _soft_target_kernel(
        s_ptr, t_ptr, y_ptr, loss_ptr, ds_ptr, dt_ptr,
        s_stride, t_set_stride, t_stride, ds_stride, dt_set_stride, dt_stride,
        V, n_sets, inv_t, soft_w, hard_w, ignore_index,
        HARD: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
        NP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, SERIES: tl.constexpr):
    # loss_r = soft_w * KL_r + hard_w * CE_r; soft_w = (1 - alpha) T^2 w, hard_w = alpha w, w the
    # reduction's row weight. Sweep 1: normalizers of s/T, s (hard term) and each t_k/T.
    row = tl.program_id(0).to(tl.int64)
    set_index = tl.arange(0, NP)
    sets = set_index < n_sets
    s_row = s_ptr + row * s_stride
    t_rows = t_ptr + row * t_stride + set_index.to(tl.int64)[:, None] * t_set_stride
    s_m = tl.full([BLOCK], float("-inf"), ACC)
    s_z = tl.zeros([BLOCK], ACC)
    s_z1 = tl.zeros([BLOCK], ACC)
    t_m = tl.full([NP, BLOCK], float("-inf"), ACC)
    t_z = tl.zeros([NP, BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols, s, t = _load_block(s_row, t_rows, sets, start, V, BLOCK, ACC)
        if HARD:
            s_m1, s_z1 = _online(s_m, s_z1, s, 1.0)     # s_m1 is the s_m below
        s_m, s_z = _online(s_m, s_z, s, inv_t)
        t_m, t_z = _online(t_m, t_z, t, inv_t)
    s_top, s_log_z = _normalizer(s_m, s_z, inv_t, 0)
    t_top, t_log_z = _normalizer(t_m, t_z, inv_t, 1)

    loss = 0.0
    if HARD:
        s_top1, s_log_z1 = _normalizer(s_m, s_z1, 1.0, 0)  # s_top1 == s_top
        label = tl.load(y_ptr + row)
        labelled = label != ignore_index
        s_label = tl.load(s_row + label, mask=labelled, other=0.0).to(ACC)
        loss = tl.where(labelled, hard_w * (s_top + s_log_z1 - s_label), 0.0)

    # Sweep 2: KL (as _kl_terms), the student's gradient, and <q_k, g> for the teacher's.
    ds_row = ds_ptr + row * ds_stride
    kl = tl.zeros([BLOCK], ACC)
    qg = tl.zeros([NP, BLOCK], ACC)
    for start in range(0, V, BLOCK):
        cols, s, t = _load_block(s_row, t_rows, sets, start, V, BLOCK, ACC)
        log_ps, q, p_t, g = _probabilities(s, t, sets, s_top, s_log_z, t_top, t_log_z, inv_t, n_sets, NP)
        p_s = tl.exp(log_ps)
        kl += _kl_terms(p_t, p_s, g, SERIES)
        if TEACHER_GRAD:
            qg += q * g[None, :]
        if STUDENT_GRAD:
            # alpha = 1: no soft term, even where the teacher is inf or nan.
            ds = tl.where(soft_w == 0, 0.0, (p_s - p_t) * soft_w * inv_t)
            if HARD:
                p1 = tl.exp(s - s_top - s_log_z1)
                ds += tl.where(labelled, hard_w * (p1 - tl.where(cols == label, 1.0, 0.0)), 0.0)
            tl.store(ds_row + cols, ds.to(ds_ptr.dtype.element_ty), mask=cols < V)
    kl_row = tl.sum(kl, 0)
    # alpha = 1: no soft term, even where KL is infinite (0 * inf would be nan).
    tl.store(loss_ptr + row, loss + tl.where(soft_w == 0, 0.0, kl_row * soft_w))

    if TEACHER_GRAD:
        # Sweep 3: d/dt_k = soft_w / (T n) * q_k * (g - <q_k, g>).
        qg_row = tl.sum(qg, 1)
        dt_rows = dt_ptr + row * dt_stride + set_index.to(tl.int64)[:, None] * dt_set_stride
        for start in range(0, V, BLOCK):
            cols, s, t = _load_block(s_row, t_rows, sets, start, V, BLOCK, ACC)
            log_ps, q, p_t, g = _probabilities(s, t, sets, s_top, s_log_z, t_top, t_log_z, inv_t, n_sets, NP)
            # Tensor first: scalar-only products would round to the fp32 of the scalar arguments.
            dt = tl.where(soft_w == 0, 0.0, q * (g[None, :] - qg_row[:, None]) * soft_w * inv_t / n_sets)
            tl.store(dt_rows + cols[None, :], dt.to(dt_ptr.dtype.element_ty),
                     mask=sets[:, None] & (cols < V)[None, :])


def _launch_config(columns: int, sets: int = 1, block_size: int | None = None) -> tuple[int, int]:
    """Column block (a power of two) and warps for rows of ``columns`` logits."""
    if block_size is None:
        block_size = min(triton.next_power_of_2(columns), max(16, MAX_BLOCK_ELEMENTS // sets))
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    # Not yet tuned on a GPU: 8 warps hold a 4096-element block at 16 columns per thread.
    return block_size, 8 if block_size * sets >= 4096 else 4


def _accumulator(*tensors: Tensor) -> tl.dtype:
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _check_device(*tensors: Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"tensors are on different devices: {sorted({str(t.device) for t in tensors})}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {device}); on CPU, set "
                           f"TRITON_INTERPRET=1 before importing pipebd.kernels, or use backend='torch'")


def _on_device(x: Tensor):
    """Launch on ``x``'s GPU: Triton launches on the current CUDA device. In the interpreter
    (numpy), arithmetic on the -inf of masked columns is by design: numpy is not to warn of it."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import numpy as np

    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _rows(x: Tensor) -> Tensor:
    """``x`` as [rows, V] with unit column stride (a view when possible)."""
    x = x.reshape(-1, x.shape[-1]) if x.shape[-1] else x.reshape(x.numel(), 0)
    return x if x.stride(-1) == 1 else x.contiguous()


class SoftmaxWithTemperature(torch.autograd.Function):
    """``softmax(x / T)`` or ``log_softmax(x / T)`` over the last dimension; the output has the
    dtype of ``x``. Backward: ``dx = y * (dy - sum(dy * y)) / T`` (softmax) or
    ``dx = (dy - exp(y) * sum(dy)) / T`` (log-softmax)."""

    @staticmethod
    def forward(ctx, x: Tensor, temperature: float, log: bool, block_size: int | None) -> Tensor:
        _check_device(x)
        rows = _rows(x)
        y = torch.empty_like(rows)
        if rows.numel():
            block, warps = _launch_config(rows.shape[1], block_size=block_size)
            with _on_device(x):
                _softmax_fwd_kernel[(rows.shape[0],)](rows, y, rows.stride(0), y.stride(0), rows.shape[1],
                                                      1.0 / temperature, LOG=log, BLOCK=block,
                                                      ACC=_accumulator(x), num_warps=warps)
        out = y.view(x.shape)
        ctx.save_for_backward(out)          # the output itself, so that a second derivative reaches it
        ctx.temperature, ctx.log, ctx.block_size = temperature, log, block_size
        return out

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None, None]:
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the same formula in torch ops, which autograd can differentiate
            # again (through out, this function's output).
            return _softmax_backward_graph(out, dy, ctx.temperature, ctx.log), None, None, None
        y, dy = _rows(out), _rows(dy)
        dx = torch.empty_like(y)
        if y.numel():
            block, warps = _launch_config(y.shape[1], block_size=ctx.block_size)
            with _on_device(y):
                _softmax_bwd_kernel[(y.shape[0],)](y, dy, dx, y.stride(0), dy.stride(0), dx.stride(0), y.shape[1],
                                                   1.0 / ctx.temperature, LOG=ctx.log, BLOCK=block,
                                                   ACC=_accumulator(y, dy), num_warps=warps)
        return dx.view(out.shape), None, None, None


def _check_softmax_input(x: Tensor, temperature: float) -> float:
    """``temperature`` as a float, after checking it and ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"softmax needs a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("softmax needs at least one dimension")
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError("a temperature that requires grad is not differentiated by the Triton softmax kernels, "
                         "which take it as a number; use torch.softmax(x / temperature, -1) to learn it")
    value = check_real("temperature", temperature)
    if not 0 < value < math.inf:
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    return value


def _softmax_backward_graph(y: Tensor, dy: Tensor, temperature: float, log: bool) -> Tensor:
    """The softmax kernels' gradient wrt x, differentiable (for a second derivative)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    y, grad = y.to(acc), dy.to(acc)
    if log:
        dx = grad - y.exp() * grad.sum(-1, keepdim=True)
    else:
        dx = y * (grad - (grad * y).sum(-1, keepdim=True))
    return (dx / temperature).to(dy.dtype)


def softmax(x: Tensor, temperature: float = 1.0, *, block_size: int | None = None) -> Tensor:
    """``softmax(x / temperature)`` over the last dimension (Triton)."""
    return SoftmaxWithTemperature.apply(x, _check_softmax_input(x, temperature), False, block_size)


def log_softmax(x: Tensor, temperature: float = 1.0, *, block_size: int | None = None) -> Tensor:
    """``log_softmax(x / temperature)`` over the last dimension (Triton)."""
    return SoftmaxWithTemperature.apply(x, _check_softmax_input(x, temperature), True, block_size)


class SoftTargetFunction(torch.autograd.Function):
    """The module docstring's loss for student logits [rows, V] and teacher logits [n, rows, V].

    Returns per-row losses (fp32, fp64 for fp64 input) for ``reduction='none'``, else their sum
    (the ``batchmean`` row weight 1/rows is applied in the kernel). The gradients named in
    ``grads`` (student, teacher) are computed in forward and saved for backward, which hands them
    out as they are when the incoming gradient is exactly 1 (``loss.backward()``) and scales them
    otherwise. fp16 gradients are kept in fp32 until then, so that a loss scale (GradScaler's
    65536) neither overflows nor underflows them.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float, alpha: float,
                ignore_index: int, reduction: str, grads: tuple[bool, bool], block_size: int | None) -> Tensor:
        rows, columns = student.shape
        sets = teacher.shape[0]
        student, teacher = _rows(student), teacher if teacher.stride(-1) == 1 else teacher.contiguous()
        acc = _accumulator(student, teacher)
        losses = torch.empty(rows, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=student.device)
        ds, dt = (_grad_buffer(x) if wanted else None for x, wanted in zip((student, teacher), grads))
        weight = 1.0 / rows if reduction == "batchmean" else 1.0
        hard = labels is not None and alpha > 0
        padded_sets = triton.next_power_of_2(sets)
        block, warps = _launch_config(columns, padded_sets, block_size)
        with _on_device(student):
            _soft_target_kernel[(rows,)](
                student, teacher, labels if hard else losses, losses,
                losses if ds is None else ds, losses if dt is None else dt,
                student.stride(0), teacher.stride(0), teacher.stride(1),
                0 if ds is None else ds.stride(0), 0 if dt is None else dt.stride(0), 0 if dt is None else dt.stride(1),
                columns, sets, 1.0 / temperature, (1.0 - alpha) * temperature**2 * weight, alpha * weight,
                ignore_index, HARD=hard, STUDENT_GRAD=ds is not None, TEACHER_GRAD=dt is not None,
                NP=padded_sets, BLOCK=block, ACC=acc, SERIES=series_terms(losses.dtype), num_warps=warps)
        ctx.save_for_backward(ds, dt)
        ctx.reduction, ctx.dtypes = reduction, (student.dtype, teacher.dtype)
        return losses if reduction == "none" else losses.sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple:
        if torch.is_grad_enabled():
            # The saved gradients carry no graph, so a second derivative through them would
            # silently lack this loss's share.
            raise RuntimeError("the Triton soft-target loss has no second derivative (backward with "
                               "create_graph=True); use backend='torch' for it")
        if ctx.reduction == "none":
            scale = grad_loss.reshape(-1, 1)
        else:
            # A host sync, but loss.backward() passes exactly 1, and then the saved gradients
            # are handed out without another pass over them.
            scale = None if grad_loss.item() == 1.0 else grad_loss
        ds, dt = (_scaled(g, scale, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return ds, dt, None, None, None, None, None, None, None


def _grad_buffer(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=torch.float32 if x.dtype == torch.float16 else x.dtype, device=x.device)


def _scaled(grad: Tensor | None, scale: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if grad is None:
        return None
    if scale is not None:
        grad = grad * scale      # a 0-d fp32 scale keeps grad's dtype, computing in fp32
    return grad.to(dtype)


def fused_soft_target_loss(student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float,
                           alpha: float, ignore_index: int, reduction: str, teacher_grad: bool,
                           block_size: int | None = None) -> Tensor:
    """Triton form of ``pipebd.soft_target_loss`` (arguments already validated there; ``teacher``
    is [n, rows, V], ``labels`` int64 [rows])."""
    _check_device(*(t for t in (student, teacher, labels) if t is not None))
    grad_mode = torch.is_grad_enabled()
    # alpha = 1 leaves no soft term: the teacher gets no gradient (None, as from the torch backend).
    grads = (grad_mode and student.requires_grad,
             grad_mode and teacher_grad and teacher.requires_grad and float(alpha) < 1)
    labels = None if labels is None else labels.contiguous()
    return SoftTargetFunction.apply(student, teacher, labels, float(temperature), float(alpha), int(ignore_index),
                                    reduction, grads, block_size)
