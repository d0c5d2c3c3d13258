"""Triton softmax-with-temperature and soft-target kernels against a float64 torch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest sets it when there is no GPU).
Tolerances, relative to max(1, the reference's largest magnitude): float64 inputs 1e-10; float32
2e-6 on gradients (entries are probabilities times T or 1) and 2e-5 on losses, plus, for losses,
T^2 * 1e-6 * log(V + 1) absolute: KL is then a small difference of log-normalizers whose float32
resolution is about 1e-7 * log V, and T^2 scales it (the float32 torch formula is no better);
float16 gradients 1e-3 (their storage dtype's resolution).
"""

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pipebd
from pipebd.kernels import softmax_kd as K

INF = float("inf")
SHAPES = [(1, 1), (3, 7), (5, 100, 16), (4, 1000), (2, 5000)]   # rows, V[, column block]


def reference(s, t, T, labels=None, alpha=0.0, ignore_index=-100):
    """Per-row loss in float64, written from the formula; ``t`` is [rows, V] or [n, rows, V]."""
    s, t = s.double(), t.double()
    t = t if t.dim() == 3 else t[None]
    p_t = torch.softmax(t / T, -1).mean(0)
    log_ps = torch.log_softmax(s / T, -1)
    log_pt = torch.where(p_t > 0, p_t, 1.0).log()       # log's backward at 0 would be 0/0
    kl = (p_t * torch.where(p_t > 0, log_pt - log_ps, 0.0)).sum(-1)
    loss = T**2 * kl
    if alpha:
        ce = torch.where(labels == ignore_index, 0.0, -torch.log_softmax(s, -1).gather(
            1, labels.clamp(min=0)[:, None])[:, 0])
        loss = (1 - alpha) * loss + alpha * ce
    return loss


def run_child(args, env=None):
    """Run ``python *args`` in a child process; assert it succeeded and return its stdout."""
    run = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def reduce(per_row, reduction):
    return {"none": per_row, "sum": per_row.sum(), "batchmean": per_row.sum() / len(per_row)}[reduction]


def logits(rows, V, *, sets=None, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(rows, V, generator=g, dtype=torch.float64)).to(dtype)
    shape = (rows, V) if sets is None else (sets, rows, V)
    t = (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    return s, t


def assert_close(got, want, rtol, what, atol=0.0):
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=rtol * scale + atol,
                               msg=lambda m: f"{what}: {m}")


def loss_tol(T, V):
    return T**2 * 1e-6 * math.log(V + 1)


def loss_and_grads(s, t, T, *, reduction="batchmean", backend="triton", block=None, teacher_grad=False, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    if backend == "triton" and block is not None:
        labels = kw.get("labels")
        loss = K.fused_soft_target_loss(s, t if t.dim() == 3 else t[None], labels, T, kw.get("alpha", 0.0),
                                        kw.get("ignore_index", -100), reduction, teacher_grad, block_size=block)
    else:
        loss = pipebd.soft_target_loss(s, t, T, reduction, backend=backend, teacher_grad=teacher_grad, **kw)
    loss.sum().backward()
    return loss, s.grad, t.grad


def reference_grads(s, t, T, reduction, teacher_grad=False, **kw):
    s = s.detach().double().requires_grad_()
    t = t.detach().double().requires_grad_(teacher_grad)
    loss = reduce(reference(s, t, T, **kw), reduction)
    loss.sum().backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", [0.1, 1.0, 4.0, 100.0])
def test_soft_target_loss_and_gradient_match_float64_reference(shape, T):
    rows, V, *block = shape
    s, t = logits(rows, V)
    labels = torch.arange(rows) % V
    labels[0] = -100
    for i, (reduction, alpha) in enumerate([("batchmean", 0.0), ("sum", 0.5), ("none", 0.25), ("batchmean", 1.0)]):
        kw = {"labels": labels, "alpha": alpha} if alpha else {}
        loss, ds, _ = loss_and_grads(s, t, T, reduction=reduction, block=block[0] if block else None, **kw)
        want, want_ds, _ = reference_grads(s, t, T, reduction, **kw)
        assert loss.dtype == torch.float32
        assert_close(loss, want, 2e-5, f"loss {reduction} alpha={alpha}", loss_tol(T, V))
        assert_close(ds, want_ds, 2e-6, f"d/ds {reduction} alpha={alpha}")


@pytest.mark.parametrize("sets", [1, 2, 3])
def test_teacher_as_average_of_prediction_sets_with_teacher_gradient(sets):
    s, t = logits(4, 300, sets=sets, dtype=torch.float64)
    labels = torch.tensor([3, -100, 7, 299])
    for reduction in ("batchmean", "none"):
        got = loss_and_grads(s, t, 2.5, reduction=reduction, block=64, teacher_grad=True, labels=labels, alpha=0.3)
        want = reference_grads(s, t, 2.5, reduction, teacher_grad=True, labels=labels, alpha=0.3)
        for g, w, what in zip(got, want, ("loss", "d/ds", "d/dt")):
            assert_close(g, w, 1e-10, f"{what} {reduction}")


def test_teacher_gets_no_gradient_by_default():
    for backend in ("torch", "triton"):
        s, t = (x.requires_grad_() for x in logits(3, 20))
        pipebd.soft_target_loss(s, t, 2.0, backend=backend).backward()
        assert s.grad is not None and t.grad is None


def test_non_unit_incoming_gradient_scales_and_backward_can_repeat():
    s, t = logits(3, 50, dtype=torch.float64)
    s.requires_grad_()
    for reduction, weight in (("batchmean", torch.tensor(2.5)), ("none", torch.tensor([1.0, -2.0, 0.5]))):
        loss = pipebd.soft_target_loss(s, t, 3.0, reduction, backend="triton")
        first = torch.autograd.grad(loss, s, weight.double(), retain_graph=True)[0]
        second = torch.autograd.grad(loss, s, weight.double())[0]
        want = torch.autograd.grad(reduce(reference(s, t, 3.0), reduction), s, weight.double())[0]
        assert_close(first, want, 1e-12, reduction)
        assert torch.equal(first, second)


def test_fp16_gradient_survives_a_loss_scale():
    # GradScaler multiplies the loss by 65536 (above fp16's 65504): the gradient is scaled in
    # fp32 before it becomes fp16, as the torch formula's is.
    s, t = logits(256, 512, dtype=torch.float16)
    s.requires_grad_()
    (pipebd.soft_target_loss(s, t, 2.0, backend="triton") * 65536.0).backward()
    _, want, _ = reference_grads(s, t, 2.0, "batchmean")
    assert s.grad.dtype == torch.float16 and torch.isfinite(s.grad).all()
    assert_close(s.grad.double() / 65536, want, 1e-3, "d/ds")
    assert (s.grad != 0).float().mean() > 0.99


def test_saved_gradients_are_released_and_skipped_without_grad_mode(monkeypatch):
    s, t = logits(4, 30)
    s.requires_grad_()
    loss = pipebd.soft_target_loss(s, t, 2.0, backend="triton")
    loss.backward()
    with pytest.raises(RuntimeError, match="freed|second time"):
        loss.grad_fn.saved_tensors
    launches = []
    kernel = K._soft_target_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: (launches.append(kw), kernel[grid](*args, **kw))

    monkeypatch.setattr(K, "_soft_target_kernel", Spy())
    with torch.no_grad():
        pipebd.soft_target_loss(s, t, 2.0, backend="triton")
    pipebd.soft_target_loss(s, t, 2.0, backend="triton")
    assert [kw["STUDENT_GRAD"] for kw in launches] == [False, True]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_gradient_where_every_set_is_masked(backend):
    s = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, 1.0, -INF]] * 2, [[1.0, 0.5, -INF]] * 2], dtype=torch.float64, requires_grad=True)
    pipebd.soft_target_loss(s, t, 1.0, teacher_grad=True, backend=backend).backward()
    _, want_ds, want_dt = reference_grads(s, t, 1.0, "batchmean", teacher_grad=True)
    assert_close(t.grad, want_dt, 1e-12, "d/dt")
    assert_close(s.grad, want_ds, 1e-12, "d/ds")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_alpha_one_is_cross_entropy_alone(backend):
    s, t = logits(3, 10, dtype=torch.float64)
    s[0, 4] = -INF                      # the teacher's mass there would make KL infinite
    t[1] = -INF                         # a teacher row of no use: all -inf,
    t[2, 3] = INF                       # or overflowed
    s.requires_grad_()
    t.requires_grad_()
    labels = torch.tensor([1, 2, -100])
    loss = pipebd.soft_target_loss(s, t, 2.0, "sum", labels=labels, alpha=1.0, teacher_grad=True, backend=backend)
    want = F.cross_entropy(s, labels, reduction="sum")
    assert_close(loss, want, 1e-12, "loss")
    loss.backward()
    assert_close(s.grad, torch.autograd.grad(want, s)[0], 1e-12, "d/ds")
    assert t.grad is None          # the teacher takes no part (Triton ran a third sweep for zeros)


def test_strided_labels_and_empty_softmax():
    s, t = logits(3, 10)
    labels = torch.tensor([1, 0, 5, 0, 9, 0])[::2]
    got = K.fused_soft_target_loss(s, t[None], labels, 2.0, 0.5, -100, "none", False)
    assert_close(got, reference(s, t, 2.0, labels=labels, alpha=0.5), 2e-6, "loss")
    assert K.softmax(torch.empty(3, 0)).shape == (3, 0)


def test_gradcheck_small_shapes():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([1, -100, 4])

    def loss(s, t):
        return pipebd.soft_target_loss(s, t, 1.5, "none", labels=labels, alpha=0.4, teacher_grad=True,
                                       backend="triton")

    assert torch.autograd.gradcheck(loss, (s, t), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: K.softmax(x, 0.7), (s,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: K.log_softmax(x, 0.7, block_size=2), (s,), fast_mode=True)


def test_second_derivatives():
    # The softmax kernels' backward is differentiable; the loss's (saved gradients, no graph)
    # refuses create_graph rather than drop its share of a second derivative.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: K.softmax(x, 0.7), (x,))
    assert torch.autograd.gradgradcheck(lambda x: K.log_softmax(x, 0.7, block_size=2), (x,))
    t = torch.randn(3, 5, dtype=torch.float64, generator=g)
    (ds,) = torch.autograd.grad(pipebd.soft_target_loss(x, t, 2.0, backend="torch"), x, create_graph=True)
    assert ds.requires_grad
    loss = pipebd.soft_target_loss(x, t, 2.0, backend="triton")
    with pytest.raises(RuntimeError, match="no second derivative.*backend='torch'"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_the_interpreter_does_not_warn_of_masked_columns():
    # numpy's warnings of -inf arithmetic in masked lanes, by design, on every call in the
    # interpreter: the path the README gives for trying the kernels on a CPU.
    s, t = torch.randn(4, 40, requires_grad=True), torch.randn(4, 40)
    t[:, 5:9] = -INF
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipebd.soft_target_loss(s, t, 2.0, labels=torch.arange(4), alpha=0.3, backend="triton").backward()
        K.log_softmax(t, 2.0)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masked_vocabulary_and_infinite_losses(backend, dtype):
    # The torch backend's accurate value (kl_terms) made an infinite loss NaN (inf - inf) at first.
    s, t = logits(3, 40, dtype=dtype)
    t[:, 10:20] = -INF              # masked for the teacher only: contributes nothing
    s[1, 30:] = t[1, 30:] = -INF    # masked for both
    s[2, 5] = -INF                  # the student rules out what the teacher predicts: KL = inf
    loss, ds, _ = loss_and_grads(s, t, 2.0, reduction="none", block=16, backend=backend)
    want, want_ds, _ = reference_grads(s, t, 2.0, "none")
    assert torch.isfinite(loss[:2]).all() and loss[2] == INF and want[2] == INF
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(loss[:2], want[:2], tol, "loss")
    assert_close(ds, want_ds, tol, "d/ds")
    assert (ds[1, 30:] == 0).all()


def test_all_equal_logits_and_one_class():
    s = torch.full((4, 33), 7.0)
    loss, ds, _ = loss_and_grads(s, s.clone(), 0.1, reduction="none", labels=torch.tensor([0, 1, 2, -100]), alpha=0.5)
    want, want_ds, _ = reference_grads(s, s.clone(), 0.1, "none", labels=torch.tensor([0, 1, 2, -100]), alpha=0.5)
    assert_close(loss, want, 1e-6, "loss")
    assert_close(ds, want_ds, 1e-6, "d/ds")
    loss, ds, _ = loss_and_grads(torch.randn(3, 1), torch.randn(3, 1), 2.0, reduction="none")
    assert (loss == 0).all() and (ds == 0).all()


def test_largest_vocabulary():
    # KL to 1e-6 relative: the kernel's mass correction measured 9e-8 here, where the plain
    # float32 formula (the torch backend) is off by 3e-5.
    s, t = logits(2, 262144, scale=5.0)
    loss, ds, _ = loss_and_grads(s, t, 1.0)
    want, want_ds, _ = reference_grads(s, t, 1.0, "batchmean")
    assert_close(loss, want, 1e-6, "loss")
    assert_close(ds, want_ds, 2e-6, "d/ds")


def test_half_precision_inputs_accumulate_in_float32():
    s, t = logits(4, 3000, dtype=torch.float16)
    loss, ds, _ = loss_and_grads(s, t, 2.0)
    want, want_ds, _ = reference_grads(s, t, 2.0, "batchmean")
    assert loss.dtype == torch.float32 and ds.dtype == torch.float16
    assert_close(loss, want, 2e-5, "loss")
    assert_close(ds, want_ds, 1e-3, "d/ds")


OFFSETS_BEYOND_INT32 = """
import math, sys, torch, pipebd
from pipebd.kernels import softmax_kd as K
# Rows 2**28 elements apart in a sparse file: row 8 starts at element 2**31, which int32 offset
# arithmetic would wrap. Only the pages of the 10 rows used are ever touched.
rows, stride, V = 10, 2**28, 64
with open(sys.argv[1], "wb") as f:
    f.truncate(2 * rows * stride * 2)
storage = torch.from_file(sys.argv[1], shared=True, size=2 * rows * stride, dtype=torch.float16)
s = storage.as_strided((rows, V), (stride, 1))
t = storage.as_strided((rows, V), (stride, 1), rows * stride)
g = torch.Generator().manual_seed(0)
s.copy_(torch.randn(rows, V, generator=g))
t.copy_(torch.randn(rows, V, generator=g))
assert t.storage_offset() + (rows - 1) * stride > 2**31
loss = pipebd.soft_target_loss(s, t, 2.0, "none", backend="triton")
want = pipebd.soft_target_loss(s.contiguous().double(), t.contiguous().double(), 2.0, "none", backend="torch")
torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
y = K.softmax(s, 2.0)
torch.testing.assert_close(y.double(), torch.softmax(s.contiguous().double() / 2.0, -1), rtol=0, atol=1e-3)
print("ok")
"""


def test_row_offsets_beyond_int32(tmp_path):
    # In a child process: int32 offsets would read out of bounds and could crash the interpreter.
    assert run_child(["-c", OFFSETS_BEYOND_INT32, str(tmp_path / "logits.bin")]).strip() == "ok"


@pytest.mark.parametrize("V, block", [(1, None), (7, None), (100, 16), (5000, None)])
@pytest.mark.parametrize("T", [0.1, 1.0, 100.0])
def test_softmax_and_log_softmax_with_temperature(V, block, T):
    x = 4 * torch.randn(3, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, :V // 2] = -INF if V > 1 else x[0, :1]
    dy = torch.randn_like(x)
    for log, ours, theirs in ((False, K.softmax, torch.softmax), (True, K.log_softmax, torch.log_softmax)):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            xi = x.to(dtype).requires_grad_()
            y = ours(xi, T, block_size=block)
            (dx,) = torch.autograd.grad(y, xi, dy.to(dtype))
            xr = x.requires_grad_()
            yr = theirs(xr / T, -1)
            (dxr,) = torch.autograd.grad(yr, xr, dy)
            finite = torch.isfinite(yr)
            assert y.dtype == dtype and torch.equal(torch.isfinite(y), finite)
            assert_close(y[finite], yr.detach()[finite], tol, f"log={log} {dtype} y")
            assert_close(dx, dxr, tol * max(1.0, 1 / T), f"log={log} {dtype} dx")


def test_softmax_keeps_leading_dimensions():
    x = torch.randn(2, 3, 9)
    torch.testing.assert_close(K.softmax(x, 2.0), torch.softmax(x / 2, -1), rtol=0, atol=1e-6)


def test_module_form_backends_agree():
    s, t = logits(5, 30)
    labels = torch.tensor([0, 1, -100, 3, 4])
    losses = [pipebd.SoftTargetLoss(3.0, alpha=0.2, backend=b)(s, t, labels) for b in ("torch", "triton", "auto")]
    assert_close(losses[1], losses[0], 2e-6, "triton vs torch")
    assert losses[2].item() == losses[0].item()   # auto picks the torch reference on CPU
    assert pipebd.SoftTargetLoss(3.0, alpha=0.2).needs_labels and not pipebd.SoftTargetLoss(3.0).needs_labels
    assert "alpha=0.2" in repr(pipebd.SoftTargetLoss(3.0, alpha=0.2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_gets_a_clear_error(backend):
    s, t = torch.randn(4, 5), torch.randn(4, 5)

    def loss(s=s, t=t, T=2.0, **kw):
        return pipebd.soft_target_loss(s, t, T, backend=backend, **kw)

    with pytest.raises(ValueError, match="differ in shape"):
        loss(t=torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\[rows, classes\]"):
        loss(s=torch.randn(5), t=torch.randn(5))
    with pytest.raises(ValueError, match=r"\[rows, classes\]"):
        loss(t=torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match="at least one row"):
        loss(s=torch.randn(0, 5), t=torch.randn(0, 5))
    with pytest.raises(TypeError, match="floating point"):
        loss(s=torch.ones(4, 5, dtype=torch.long), t=torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="teacher_logits must be floating point, got torch.int64"):
        loss(t=torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="student_logits must be a tensor, got list"):
        loss(s=s.tolist())
    for T in (0.0, -1.0, INF, math.nan, 1e300):     # 1e300 squared overflows
        with pytest.raises(ValueError, match="temperature must be > 0"):
            loss(T=T)
    for T in ("2", None, True, torch.tensor([2.0, 3.0])):
        with pytest.raises(TypeError, match="temperature must be a real number"):
            loss(T=T)
    for T in (1e20, 1e-39):    # T^2 or 1/T overflows float32 (NaN before)
        with pytest.raises(ValueError, match=re.escape(f"temperature={T:g} is out of range for this loss's float32")):
            loss(T=T)
        if backend == "torch":      # float64 input computes in float64
            assert torch.isfinite(loss(s=s.double(), t=t.double(), T=T))
        else:                       # the kernels take float32 arguments on a GPU
            with pytest.raises(ValueError, match="float32 arithmetic"):
                loss(s=s.double(), t=t.double(), T=T)
    for index in (2 ** 63, -2 ** 63 - 1):    # an OverflowError or a loss, by backend, before
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            loss(alpha=0.5, labels=torch.tensor([0, 1, 2, 3]), ignore_index=index)
    with pytest.raises(TypeError, match="alpha must be a real number, got '0.5'"):
        loss(alpha="0.5")
    with pytest.raises(TypeError, match="ignore_index must be an integer, got 2.5"):
        loss(alpha=0.5, labels=torch.tensor([0, 1, 2, 3]), ignore_index=2.5)
    with pytest.raises(TypeError, match="teacher_grad must be True or False, got 'no'"):
        loss(teacher_grad="no")
    with pytest.raises(ValueError, match="alpha must be in"):
        loss(alpha=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        loss(alpha=0.5)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        loss(alpha=0.5, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer class indices"):
        loss(alpha=0.5, labels=torch.zeros(4))
    with pytest.raises(ValueError, match=r"in \[0, 5\) or ignore_index=-100, got \[5\]"):
        loss(alpha=0.5, labels=torch.tensor([0, 5, -100, 1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(reduction="mean")
    with pytest.raises(ValueError, match="backend must be one of"):
        pipebd.soft_target_loss(s, t, 2.0, backend="cuda")
    for fn in (K.softmax, K.log_softmax):
        with pytest.raises(TypeError, match="temperature must be a real number, got '2'"):
            fn(s, "2")
        with pytest.raises(ValueError, match="temperature that requires grad is not differentiated"):
            fn(s, torch.tensor(2.0, requires_grad=True))
    for T in (0.0, INF, math.nan):
        for fn in (K.softmax, K.log_softmax):
            with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
                fn(s, T)


def test_the_backends_agree_on_a_nan_teacher_row_and_a_learned_temperature():
    """A teacher row that is all -inf (or holds a NaN) has no distribution: the loss is NaN and
    so is that row's gradient, on both backends (the torch one gave 0). A temperature tensor that
    requires grad is learned with the torch backend (an alpha too); Triton refuses it rather than
    drop its grad."""
    s = torch.randn(3, 7)
    t = torch.randn(3, 7)
    t[1] = -INF
    t[2, 3] = math.nan
    grads = []
    for backend in ("torch", "triton"):
        x = s.clone().requires_grad_()
        loss = pipebd.soft_target_loss(x, t, 2.0, backend=backend)
        loss.backward()
        assert torch.isnan(loss)
        grads.append(x.grad)
        assert torch.isnan(x.grad[1:]).all(dim=1).tolist() == [True, True] and torch.isfinite(x.grad[0]).all()
    assert_close(grads[1][0], grads[0][0], 2e-6, "the finite row")
    T = torch.tensor(2.0, requires_grad=True)
    pipebd.soft_target_loss(s, torch.randn(3, 7), T, backend="torch").backward()
    assert T.grad is not None and T.grad != 0
    with pytest.raises(ValueError, match="temperature that requires grad .* backend='torch'"):
        pipebd.soft_target_loss(s, torch.randn(3, 7), T, backend="triton")
    alpha, labels = torch.tensor(0.3, requires_grad=True), torch.tensor([0, 4, 6])   # so is a learned mix
    pipebd.soft_target_loss(s, torch.randn(3, 7), 2.0, alpha=alpha, labels=labels, backend="torch").backward()
    assert alpha.grad is not None and alpha.grad != 0
    with pytest.raises(ValueError, match="alpha that requires grad .* backend='torch'"):
        pipebd.soft_target_loss(s, torch.randn(3, 7), 2.0, alpha=alpha, labels=labels, backend="triton")
    assert pipebd.soft_target_loss(s, s, torch.tensor(2.0), backend="triton").abs() < 1e-6   # a plain tensor is a number
    # The module form learns them too: it kept float(T), and T.grad stayed None.
    T, alpha = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(0.3))
    t = torch.randn(3, 7)
    module = pipebd.SoftTargetLoss(T, alpha=alpha, backend="torch")
    module(s, t, labels).backward()
    grads = (T.grad.clone(), alpha.grad.clone())
    T.grad = alpha.grad = None
    pipebd.soft_target_loss(s, t, T, alpha=alpha, labels=labels, backend="torch").backward()
    assert grads == (T.grad, alpha.grad) and T.grad != 0 and alpha.grad != 0
    assert list(module.parameters()) == [T, alpha] and module.needs_labels is True
    assert "temperature=2.0, alpha=0.30000001192092896" in repr(module)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_loss_value_is_accurate_near_convergence_and_at_large_temperature(backend):
    """KL summed as p_t * log(p_t / p_s) in fp32 carries the rounding of the two log-normalizers
    (about 1e-7 per row, times T^2): near convergence (KL ~ 5e-7) it came out negative, at
    T = 1000 some percent off (torch's F.kl_div too). Per row, relative to float64, over seeds."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        t = 3 * torch.randn(16, 1000, generator=g)
        s = t + 1e-3 * torch.randn(16, 1000, generator=g)
        torch.testing.assert_close(pipebd.soft_target_loss(s, t, 4.0, "none", backend=backend).double(),
                                   reference(s, t, 4.0), rtol=1e-3, atol=0)
        for T, rtol in ((100.0, 1e-5), (1000.0, 1e-4), (1e4, 1e-3)):
            s, t = logits(8, 100, seed=seed)
            torch.testing.assert_close(pipebd.soft_target_loss(s, t, T, "none", backend=backend).double(),
                                       reference(s, t, T), rtol=rtol, atol=0, msg=lambda m: f"T={T}: {m}")
        s, t = logits(8, 1000, seed=seed)      # masked teacher classes, where the student's mass enters
        t[:, :30] = -INF
        torch.testing.assert_close(pipebd.soft_target_loss(s, t, 4.0, "none", backend=backend).double(),
                                   reference(s, t, 4.0), rtol=1e-5, atol=0)


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        pipebd.soft_target_loss(torch.randn(2, 3), torch.randn(2, 3), backend="triton")


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two, got 24"):
        K.softmax(torch.randn(2, 50), block_size=24)


COMPILE_FOR_HOPPER = """
import sys
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from pipebd.kernels import softmax_kd as K

def build(kernel, dtype, num_warps, **constexprs):
    names = kernel.arg_names
    pointer = {"y_ptr": "*i64", "loss_ptr": "*fp32"}
    signature = {n: "constexpr" if n in constexprs else pointer.get(n, "*" + dtype) if n.endswith("_ptr")
                 else "fp32" if n in ("inv_t", "soft_w", "hard_w") else "i64" for n in names}
    # 16-byte alignment of pointers, strides and V, as the JIT specializes real launches with V a
    # multiple of 16 (32000, 128256): their loads must come out vectorized.
    aligned = [n for n in names if n.endswith("_ptr") or n.endswith("stride") or n == "V"]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    binary = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert binary.asm["cubin"] and "ld.global.v" in binary.asm["ptx"], kernel.fn.__name__

dtype, hard, student_grad, teacher_grad, sets = sys.argv[1], *map(int, sys.argv[2:])
block, warps = K._launch_config(128256, sets)
build(K._soft_target_kernel, dtype, warps, HARD=bool(hard), STUDENT_GRAD=bool(student_grad),
      TEACHER_GRAD=bool(teacher_grad), NP=sets, BLOCK=block, ACC=tl.float32, SERIES=9)
for log in (False, True):
    for kernel in (K._softmax_fwd_kernel, K._softmax_bwd_kernel):
        build(kernel, dtype, warps, LOG=log, BLOCK=block, ACC=tl.float32)
print("ok")
"""
HOPPER_VARIANTS = [("bf16", 1, 1, 1, 1), ("fp16", 0, 1, 0, 1), ("fp32", 1, 0, 1, 4)]


@pytest.mark.parametrize("variant", HOPPER_VARIANTS, ids=[v[0] for v in HOPPER_VARIANTS])
def test_kernels_compile_for_hopper(variant):
    # The interpreter runs Python semantics; Triton's real compiler, down to an sm_90 cubin with
    # its own ptxas (no GPU needed), rejects more (loop-carried type changes, bad broadcasts). It
    # runs in a child process without TRITON_INTERPRET, which is read when kernels are defined.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert run_child(["-c", COMPILE_FOR_HOPPER, *map(str, variant)], env=env).strip() == "ok"


def test_benchmark_script_runs():
    # bench/kernels.py measures on a GPU only; --smoke runs its code paths on tiny CPU shapes.
    script = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    rows = [line for line in run_child([str(script), "--smoke"]).splitlines() if line.startswith("| 4 | 37 |")]
    assert [r.split("|")[4].strip() for r in rows][-1] == "pipebd" and len(rows) >= 2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("V", [1000, 32000, 128256])
def test_cuda_kernels_match_float64_reference(dtype, tol, V):
    s, t = logits(64, V, sets=2, dtype=dtype)
    s, t = s.cuda(), t.cuda()
    labels = torch.randint(0, V, (64,), device="cuda")
    for backend in ("auto", "triton"):
        loss, ds, dt = loss_and_grads(s, t, 2.0, backend=backend, labels=labels, alpha=0.1, teacher_grad=True)
        want, want_ds, want_dt = reference_grads(s, t, 2.0, "batchmean", teacher_grad=True, labels=labels, alpha=0.1)
        assert ds.dtype == dtype
        assert_close(loss, want, 2e-5, "loss")
        assert_close(ds, want_ds, tol, "d/ds")
        assert_close(dt, want_dt, tol, "d/dt")
    y = K.softmax(s, 2.0)
    assert_close(y, torch.softmax(s.double() / 2.0, -1), tol, "softmax")
