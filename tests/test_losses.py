import pytest
import torch
import torch.nn.functional as F

import pipebd
from pipebd.losses import resolve_block_loss


def reference(s, t, T):
    """T^2 * sum_j p_t log(p_t / p_s), per row, in float64."""
    p_t = torch.softmax(t.double() / T, -1)
    log_ps = torch.log_softmax(s.double() / T, -1)
    log_pt = torch.log_softmax(t.double() / T, -1)
    return T**2 * torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros((), dtype=torch.float64)).sum(-1)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_soft_target_loss_and_gradient_match_formula(T, reduction):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 11, generator=g, requires_grad=True)
    t = torch.randn(6, 11, generator=g)
    loss = pipebd.soft_target_loss(s, t, T, reduction)
    per_row = reference(s.detach(), t, T)
    expected = {"none": per_row, "sum": per_row.sum(), "batchmean": per_row.sum() / 6}[reduction]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    grad = T * (torch.softmax(s.detach().double() / T, -1) - torch.softmax(t.double() / T, -1))
    if reduction == "batchmean":
        grad = grad / 6
    torch.testing.assert_close(s.grad.double(), grad, rtol=1e-5, atol=1e-6)


def test_masked_teacher_entries_contribute_nothing():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0.5, float("-inf"), 1.5]])
    loss = pipebd.soft_target_loss(s, t, 2.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), reference(s, t, 2.0).sum(), rtol=1e-6, atol=1e-7)


def test_module_form_and_constructor_errors():
    # Errors of the call itself, for both backends, are in test_kernels.py.
    loss = pipebd.SoftTargetLoss(temperature=3.0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert loss(s, t).item() == pytest.approx(pipebd.soft_target_loss(s, t, 3.0).item())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        pipebd.SoftTargetLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        pipebd.SoftTargetLoss(temperature=2, alpha=-0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        pipebd.SoftTargetLoss(temperature=2, backend="cuda")
    with pytest.raises(TypeError, match="ignore_index must be an integer, got 'x'"):
        pipebd.SoftTargetLoss(temperature=2, ignore_index="x")
    with pytest.raises(TypeError, match="teacher_grad must be True or False"):
        pipebd.SoftTargetLoss(temperature=2, teacher_grad="no")
    with pytest.raises(TypeError, match="temperature must be a real number"):
        pipebd.SoftTargetLoss(temperature="2")


def test_block_losses():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert resolve_block_loss("mse")(a, b).item() == pytest.approx(F.mse_loss(a, b).item())
    assert resolve_block_loss("l1")(a, b).item() == pytest.approx(F.l1_loss(a, b).item())
    with pytest.raises(ValueError, match="unknown block_loss 'cosine'"):
        resolve_block_loss("cosine")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_numpy_scalars_and_integer_tensors_are_taken_as_their_values(backend):
    import numpy as np
    g = torch.Generator().manual_seed(1)
    s, t, labels = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.arange(5)
    expected = pipebd.soft_target_loss(s, t, 2.0, alpha=0.5, labels=labels, backend=backend)
    for temperature, alpha in ((np.float32(2.0), np.float64(0.5)), (np.array(2), np.array(0.5)),
                               (torch.tensor(2), torch.tensor(0.5)), (np.int64(2), 0.5)):
        got = pipebd.soft_target_loss(s, t, temperature, alpha=alpha, labels=labels, backend=backend,
                                      teacher_grad=np.bool_(False), ignore_index=np.int64(-100))
        assert got.item() == pytest.approx(expected.item(), rel=1e-6), (temperature, alpha)
    # A one-element floating tensor may be learned; it changes neither the shape nor the dtype.
    rows = pipebd.soft_target_loss(s, t, 2.0, "none", alpha=0.5, labels=labels, backend=backend)
    got = pipebd.soft_target_loss(s, t, torch.tensor([2.0]), "none", labels=labels, backend=backend,
                                  alpha=torch.tensor([[0.5]], dtype=torch.float64))
    assert got.shape == rows.shape and got.dtype == rows.dtype and torch.allclose(got, rows)
    for bad in (np.bool_(True), torch.tensor(True), np.array([2.0]), 2j):   # not one real number
        with pytest.raises(TypeError, match="temperature must be a real number"):
            pipebd.soft_target_loss(s, t, bad, backend=backend)
    with pytest.raises(TypeError, match="teacher_grad must be True or False, got 0"):
        pipebd.soft_target_loss(s, t, 2.0, teacher_grad=0, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_with_positions_are_rows(backend):
    # [batch, positions, V] is [batch * positions, V] (a mean over all positions), labels
    # [batch, positions], and "none" keeps [batch, positions]; with an ensemble teacher too.
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 4, 9, generator=g, requires_grad=True)
    sets = torch.randn(2, 3, 4, 9, generator=g)
    labels = torch.randint(0, 9, (3, 4), generator=g)
    labels[0, 1] = -100
    flat_s = s.detach().reshape(12, 9).requires_grad_()
    for t in (sets[0], sets):
        for reduction in ("batchmean", "sum", "none"):
            got = pipebd.soft_target_loss(s, t, 2.0, reduction, labels=labels, alpha=0.3, backend=backend)
            want = pipebd.soft_target_loss(flat_s, t.reshape(*t.shape[:-3], 12, 9), 2.0, reduction,
                                           labels=labels.reshape(12), alpha=0.3, backend=backend)
            assert got.shape == ((3, 4) if reduction == "none" else ())
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-6, atol=1e-7)
            s.grad = flat_s.grad = None
            got.sum().backward()
            want.sum().backward()
            torch.testing.assert_close(s.grad.reshape(12, 9), flat_s.grad, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 4\) for logits \(3, 4, 9\), got \(12,\)"):
        pipebd.soft_target_loss(s, sets[0], alpha=0.3, labels=labels.reshape(12), backend=backend)
    with pytest.raises(ValueError, match=r"student \(3, 4, 9\) and teacher \(12, 9\)"):
        pipebd.soft_target_loss(s, sets[0].reshape(12, 9), backend=backend)
    with pytest.raises(ValueError, match=r"logits \(3, 4, 9\) and teacher logits \(2, 3, 4, 8\) differ in shape"):
        pipebd.soft_target_loss(s, sets[..., :8], backend=backend)
