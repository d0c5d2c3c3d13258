"""pipebd.lr against closed forms: linear scaling, warmup (alone and chained with torch
schedulers, to 1e-12), and the weight-decay parameter groups."""

import math

import pytest
import torch
from torch import nn

import pipebd
from pipebd.lr import linear_scaling, param_groups, warmup


def test_linear_scaling():
    assert linear_scaling(0.1, 8192) == pytest.approx(3.2)           # Goyal et al.: 0.1 per 256
    assert linear_scaling(0.1, 256) == 0.1
    assert linear_scaling(0.05, 32, base_batch_size=64) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        linear_scaling(0.1, 0)
    with pytest.raises(ValueError, match="base_lr must be > 0"):
        linear_scaling(0.0, 256)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="base_lr must be > 0 and finite"):
            linear_scaling(bad, 256)


def lrs(optimizer, scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def optimizer(lr=2.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def ramp(t, steps=5, start=0.25):
    return start + (1 - start) * min(t, steps) / steps


def test_warmup_alone():
    opt = optimizer()
    got = lrs(opt, warmup(opt, 5, start_factor=0.25), 9)
    assert got == pytest.approx([2.0 * ramp(t) for t in range(9)], abs=1e-12)


@pytest.mark.parametrize("schedule, factor", [
    (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[4, 8], gamma=0.1),
     lambda t: 0.1 ** ((t >= 4) + (t >= 8))),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12),
     lambda t: 0.5 * (1 + math.cos(math.pi * t / 12))),
    (lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), lambda t: 0.9 ** t),
    (lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=10, power=2.0),
     lambda t: (1 - min(t, 10) / 10) ** 2),
], ids=["multistep", "cosine", "exponential", "polynomial"])
def test_warmup_composes_with_torch_schedulers(schedule, factor):
    opt = optimizer()
    got = lrs(opt, warmup(opt, 5, start_factor=0.25, then=schedule(opt)), 12)
    assert got == pytest.approx([2.0 * ramp(t) * factor(t) for t in range(12)], abs=1e-12)


def test_no_warmup_keeps_the_rate():
    opt = optimizer()
    assert lrs(opt, warmup(opt, 0, start_factor=0.25), 4) == [2.0] * 4


def test_multihead_attention_biases_are_exempt():
    model = nn.MultiheadAttention(8, 2)
    _, keep = param_groups(model, weight_decay=0.1)
    assert names(model, keep["params"]) == ["in_proj_bias", "out_proj.bias"]


def test_warmup_bad_arguments():
    opt = optimizer()
    with pytest.raises(ValueError, match=r"start_factor must be in \(0, 1\], got 0"):
        warmup(opt, 5, start_factor=0)
    with pytest.raises(ValueError, match="warmup steps must be an integer >= 0"):
        warmup(opt, -1)
    with pytest.raises(ValueError, match="same optimizer"):
        warmup(opt, 5, then=torch.optim.lr_scheduler.StepLR(optimizer(), 3))


@pytest.mark.parametrize("then", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12, eta_min=0.08),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=20),
], ids=["lambda", "cosine-floor", "onecycle"])
def test_warmup_refuses_schedulers_that_set_the_rate_outright(then):
    # Chained, LambdaLR gave 0.08 then 0.72: the warmup was gone after its first step; a
    # cosine floor was off by up to 0.0046.
    opt = optimizer()
    with pytest.raises(ValueError, match="sets the rate from its own formula .* would undo the warmup"):
        warmup(opt, 5, then=then(opt))
    warmup(opt, 0, then=then(opt))     # no warmup to undo


def test_warmup_takes_a_chain_of_multiplying_schedulers():
    opt = optimizer()
    chain = torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
                                                       torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)])
    got = lrs(opt, warmup(opt, 5, start_factor=0.25, then=chain), 10)
    assert got == pytest.approx([2.0 * ramp(t) * 0.9 ** t * 0.5 ** (t // 4) for t in range(10)], abs=1e-12)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4, bias=False)
        self.ln = nn.LayerNorm(4)
        self.tied = self.fc            # a shared module: its weight must appear once


def names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_exempt_norm_and_bias():
    model = Block()
    decay, keep = param_groups(model, weight_decay=5e-4)
    assert decay["weight_decay"] == 5e-4 and keep["weight_decay"] == 0.0
    assert names(model, decay["params"]) == ["conv.weight", "fc.weight"]
    assert names(model, keep["params"]) == ["bn.bias", "bn.weight", "conv.bias", "ln.bias", "ln.weight"]
    # Given only the parameters (a Distiller's optimizer factory), the 1-D rule finds the same split.
    by_shape = param_groups(model.parameters(), weight_decay=5e-4)
    assert [names(model, g["params"]) for g in by_shape] == [names(model, decay["params"]),
                                                              names(model, keep["params"])]
    everything, = param_groups(model, weight_decay=5e-4, no_decay_norm_and_bias=False)
    assert len(everything["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(model, -1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_decay must be >= 0 and finite"):
            param_groups(model, bad)


def test_exempt_parameters_are_not_decayed_by_sgd():
    model = Block()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(param_groups(model, weight_decay=0.5), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        shrunk = n in ("conv.weight", "fc.weight")
        assert torch.allclose(p, before[n] * (0.5 if shrunk else 1.0)), n


def test_lr_is_reachable_from_the_package():
    assert pipebd.lr.warmup is warmup
