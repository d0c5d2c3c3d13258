"""Codistillation and online distillation against a plain-torch reference loop.

The reference below is written from the documented semantics, not from the implementation: n
models, each with its own SGD; codistill mode trains model i on its shard and distills at step t
from copies of the others taken after ``K * (t // K - 1)`` steps (t >= 2K, t >= burn_in); online
mode trains every model on the same batch and distills from the others' current logits. The loss
is ``(CE_sum + alpha * T^2 * KL_sum) / batch`` written out with log_softmax.

Tolerance: 1e-5 max abs on the weights after 24 steps (float32; what differs is summation order:
DDP's gradient averaging over unequal slices, the fused loss's reparametrization). Exact equality
where nothing can differ (alpha = 0 in one process or one rank per model).
"""

import copy
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import pipebd
from pipebd.codistill import combined_loss, derived_seed, shards
from pipebd.data import BatchOrder
from pipebd.runtime.exchange import pack

FEATURES, CLASSES, LENGTH, BATCH, STEPS, K, TOL = 6, 5, 61, 9, 24, 4, 1e-5


def dataset():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(LENGTH, FEATURES, generator=gen)
    y = (x[:, :CLASSES] + 0.5 * torch.randn(LENGTH, CLASSES, generator=gen)).argmax(1)
    return TensorDataset(x, y)


def initial_models(n):
    gen = torch.Generator().manual_seed(5)
    models = []
    for _ in range(n):
        m = nn.Sequential(nn.Linear(FEATURES, 12), nn.Tanh(), nn.Linear(12, CLASSES))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        models.append(m)
    return models


def sgd(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.5)


def run(world_size, n=2, mode="codistill", alpha=0.7, temperature=2.0, burn_in=0, **fit):
    cd = pipebd.Codistillation(initial_models(n), optimizer=sgd, alpha=alpha, temperature=temperature,
                               burn_in=burn_in, exchange_every=K, mode=mode, backend="torch", device="cpu")
    report = cd.fit(dataset(), batch_size=BATCH, steps=STEPS, world_size=world_size, seed=3, timeout=60, **fit)
    return [list(m.parameters()) for m in cd.models], report


def reference(n=2, mode="codistill", alpha=0.7, temperature=2.0, burn_in=0, record=False):
    """Returns the final parameters of each model (and, with ``record``, model j's weights after
    every step s as ``snapshots[(j, s)]``)."""
    data = dataset()
    x_all, y_all = data.tensors
    models = initial_models(n)
    optimizers = [sgd(m.parameters()) for m in models]
    if mode == "codistill":
        parts = shards(LENGTH, n, 3)
        orders = [BatchOrder(len(p), BATCH, derived_seed(3, "order", i)) for i, p in enumerate(parts)]
        index = [lambda t, i=i: parts[i][orders[i].indices(t)] for i in range(n)]
    else:
        order = BatchOrder(LENGTH, BATCH, 3)
        index = [lambda t: order.indices(t)] * n
    copies, snapshots = {}, {}
    for t in range(STEPS):
        if t % K == 0:
            copies[t] = [copy.deepcopy(m) for m in models]
        if record:
            snapshots.update({(j, t): pack(m) for j, m in enumerate(models)})
        batches = [(x_all[index[i](t)], y_all[index[i](t)]) for i in range(n)]
        logits = [m(x) for m, (x, _) in zip(models, batches)]
        stale = copies.get(K * (t // K - 1))
        distill = alpha > 0 and t >= burn_in and (mode == "online" or t >= 2 * K)
        for i in range(n):
            loss = F.cross_entropy(logits[i], batches[i][1], reduction="sum")
            if distill:
                x = batches[i][0]
                others = [logits[j].detach() if mode == "online" else stale[j](x).detach()
                          for j in range(n) if j != i]
                p_t = torch.stack([F.softmax(o / temperature, -1) for o in others]).mean(0)
                kl = (p_t * (p_t.log() - F.log_softmax(logits[i] / temperature, -1))).sum()
                loss = loss + alpha * temperature**2 * kl
            (loss / BATCH).backward()
            optimizers[i].step()
            optimizers[i].zero_grad()
    if record:
        snapshots.update({(j, STEPS): pack(m) for j, m in enumerate(models)})
    return [list(m.parameters()) for m in models], snapshots


def max_diff(a, b):
    return max((x - y).abs().max().item() for ma, mb in zip(a, b) for x, y in zip(ma, mb))


@pytest.mark.parametrize("length, n", [(61, 2), (61, 3), (7, 7), (100, 4)])
def test_shards_are_disjoint_and_cover_the_data(length, n):
    parts = shards(length, n, seed=3)
    assert len(parts) == n
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(length))   # disjoint and covering
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(torch.equal(a, b) for a, b in zip(parts, shards(length, n, seed=3)))
    assert not torch.equal(joined, torch.cat(shards(length, n, seed=4)))


# (world_size, n, mode): one process, one rank per model (async broadcasts), and DDP groups of
# two ranks over a batch of 9 (slices of 5 and 4).
CASES = [(1, 2, "codistill"), (2, 2, "codistill"), (4, 2, "codistill"), (3, 3, "codistill"),
         (1, 2, "online"), (4, 2, "online")]


@pytest.mark.parametrize("world_size, n, mode", CASES, ids=[f"{m}-n{n}-w{w}" for w, n, m in CASES])
def test_same_weights_as_the_reference_loop(world_size, n, mode):
    want, _ = reference(n, mode, burn_in=10)
    got, report = run(world_size, n, mode, burn_in=10)
    assert max_diff(got, want) <= TOL
    assert max_diff(got, [list(m.parameters()) for m in initial_models(n)]) > 1e-2
    # Burn-in ends at 10; by then the checkpoint of step 4 has been installed (at step 2K = 8).
    assert report.sources == [None] * 10 + [t if mode == "online" else K * (t // K - 1) for t in range(10, STEPS)]
    without, _ = reference(n, mode, alpha=0.0)
    assert max_diff(got, without) > 1e-3          # the distillation term changed the training


@pytest.mark.parametrize("world_size", [1, 2])
def test_alpha_zero_is_independent_training_exactly(world_size):
    want, _ = reference(alpha=0.0)
    got, report = run(world_size, alpha=0.0)
    assert all(torch.equal(a, b) for ma, mb in zip(got, want) for a, b in zip(ma, mb))
    assert report.sources == [None] * STEPS and report.exchanged_bytes == 0


@pytest.mark.parametrize("world_size", [2, 4])
def test_distills_from_the_checkpoint_published_one_exchange_earlier(world_size):
    """Weights published at exchange k (after kK steps) are used from exchange k+1 on, although
    the transfer is asynchronous: what model i installed at step t is bit for bit what model j
    published at t - K, and that is model j's state after t - K steps (reference, 1e-5)."""
    _, report = run(world_size, keep_checkpoints=True)
    _, snapshots = reference(record=True)
    exchanges = list(range(2 * K, STEPS, K))
    assert sorted(report.installed) == [(i, t) for i in range(2) for t in exchanges]
    assert sorted(report.published) == [(j, t) for j in range(2) for t in range(K, STEPS - K, K)]
    for (i, t), received in report.installed.items():
        (j, checkpoint), = received.items()
        assert j == 1 - i
        published = report.published[(j, t - K)]
        assert all(torch.equal(checkpoint[d], published[d]) for d in published)
        assert (published[torch.float32] - snapshots[(j, t - K)][torch.float32]).abs().max() <= TOL
        # ... and not the fresher state of step t, which the schedule must not use.
        assert (published[torch.float32] - snapshots[(j, t)][torch.float32]).abs().max() > 1e-4
    for t in range(STEPS):
        assert report.sources[t] == (K * (t // K - 1) if t >= 2 * K else None)


def test_combined_loss_gradient_matches_the_formula():
    """Gradient of CE + alpha T^2 KL(mean_j softmax(t_j/T) || softmax(s/T)) wrt the student
    logits, both backends (Triton's interpreter on CPU), against float64 autograd of the plain
    formula; 3 peers, an ignored row. Tolerance 1e-5 relative (float32 kernels)."""
    gen = torch.Generator().manual_seed(0)
    rows, classes, alpha, temperature = 6, 11, 0.8, 3.0
    s = torch.randn(rows, classes, generator=gen) * 3
    peers = torch.randn(3, rows, classes, generator=gen) * 3
    labels = torch.randint(0, classes, (rows,), generator=gen)
    labels[2] = -100
    s64 = s.double().requires_grad_()
    p_t = F.softmax(peers.double() / temperature, -1).mean(0)
    want = (F.cross_entropy(s64, labels, ignore_index=-100, reduction="sum")
            + alpha * temperature**2 * (p_t * (p_t.log() - F.log_softmax(s64 / temperature, -1))).sum())
    want.backward()
    for backend in ("torch", "triton"):
        s32 = s.clone().requires_grad_()
        got = combined_loss(s32, labels, peers, alpha, temperature, backend=backend)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert (s32.grad.double() - s64.grad).abs().max() <= 1e-5 * s64.grad.abs().max()
    assert torch.equal(combined_loss(s, labels, peers, 0.0, temperature),
                       F.cross_entropy(s, labels, reduction="sum"))


def test_report_accuracy_and_ensemble_match_the_models():
    data = dataset()
    x, y = data.tensors
    cd = pipebd.Codistillation(initial_models(2), optimizer=sgd, exchange_every=K, device="cpu")
    report = cd.fit(data, batch_size=BATCH, steps=STEPS, eval_data=(x, y), eval_every=10)
    assert report.eval_steps == [10, 20, STEPS]
    with torch.no_grad():
        probs = [F.softmax(m(x), -1) for m in cd.models]
    for i, p in enumerate(probs):
        assert torch.allclose(report.eval_probs[i][-1], p, atol=1e-6)
        assert report.accuracy[i][-1] == (p.argmax(1) == y).float().mean().item()
    assert report.ensemble_accuracy[-1] == ((probs[0] + probs[1]).argmax(1) == y).float().mean().item()
    text = str(report)
    assert "mode=codistill n=2" in text and "ensemble accuracy after 24 steps" in text
    assert len(report.losses) == 2 and len(report.losses[0]) == STEPS
    # The accuracy curve, one row per evaluation: step, each model's, the ensemble's.
    curve = text.split("accuracy on eval_data by step:\n")[1].splitlines()[1:4]
    assert [row.split() for row in curve] == [
        [str(step), *(f"{a[e]:.2%}" for a in report.accuracy), f"{report.ensemble_accuracy[e]:.2%}"]
        for e, step in enumerate(report.eval_steps)]
    # Churn against another seed's fit: the rows whose predicted class differs, by brute force.
    other = pipebd.Codistillation(initial_models(2), optimizer=sgd, exchange_every=K, device="cpu").fit(
        data, batch_size=BATCH, steps=STEPS, seed=1, eval_data=(x, y), eval_every=10)
    for i in range(2):
        theirs = other.eval_probs[i][-1].argmax(1)
        differ = sum(int(a != b) for a, b in zip(probs[i].argmax(1).tolist(), theirs.tolist()))
        assert report.churn(other, model=i) == pytest.approx(differ / len(y)) and 0 < differ < len(y)
    assert report.churn(report) == 0.0
    with pytest.raises(ValueError, match="model must be in"):
        report.churn(other, model=2)


def test_model_fn_is_seeded_per_model_and_run():
    def build(i):
        return nn.Linear(FEATURES, CLASSES)

    def weights(seed):
        cd = pipebd.Codistillation(build, n=2, device="cpu")
        cd.fit(dataset(), batch_size=BATCH, steps=1, seed=seed)
        return [m.weight.detach().clone() for m in cd.models]

    a, b = weights(0), weights(0)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], weights(1)[0])


class Fails(nn.Module):
    """On rank 1, the ``after``-th training call ends the process or sleeps past the timeout."""

    def __init__(self, inner, how, after=7):
        super().__init__()
        self.inner, self.how, self.after, self.calls = inner, how, after, 0

    def forward(self, x):
        import os

        import torch.distributed as dist
        if self.training and dist.is_initialized() and dist.get_rank() == 1:
            self.calls += 1
            if self.calls == self.after:
                if self.how == "exit":
                    os._exit(3)
                time.sleep(120)
        return self.inner(x)


@pytest.mark.parametrize("how", ["stall", "exit"])
def test_an_exchange_that_fails_surfaces_as_a_clear_error(how):
    # Rank 1 stops in step 6, after publishing at step 6: rank 0 receives that checkpoint, but
    # its broadcast of step 8 has no peer (connection reset, or the 8 s timeout).
    models = [Fails(m, how) for m in initial_models(2)]
    cd = pipebd.Codistillation(models, optimizer=sgd, exchange_every=2, device="cpu")
    start = time.monotonic()
    with pytest.raises(pipebd.WorkerError) as info:
        cd.fit(dataset(), batch_size=BATCH, steps=STEPS, world_size=2, timeout=8)
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "(a peer may have stopped or stalled; timeout 8 s)" in message
    if how == "stall":
        assert message.startswith("rank 0 (model 0, replica 0) failed:")
        assert ("ExchangeError: weight exchange 4 failed on rank 0, sending model 0's checkpoint (after step 8) "
                "to the other models' ranks") in message
    else:
        # A dead peer resets the connection: whichever of rank 0's transfers notices first fails.
        assert "rank 1 exited with code 3 without reporting an error" in message
        assert re.search(r"ExchangeError: weight exchange \d failed on rank 0, (sending model 0's checkpoint "
                         r"\(after step \d+\) to|receiving model 1's checkpoint \(after step \d+\) from rank 1)",
                         message)


@pytest.mark.parametrize("kwargs, fit, message", [
    (dict(n=3), {}, "n=3 but 2 models were given"),
    (dict(mode="dml"), {}, "mode must be one of"),
    (dict(alpha=-1), {}, "alpha must be >= 0"),
    (dict(alpha=float("inf")), {}, "alpha must be >= 0 and finite, got inf"),
    (dict(temperature=0), {}, "temperature must be > 0"),
    (dict(temperature=float("inf")), {}, "temperature must be > 0 and its square finite, got inf"),
    (dict(temperature=1e300), {}, "temperature must be > 0 and its square finite, got 1e"),
    (dict(temperature="4"), {}, "temperature must be a real number, got '4'"),
    (dict(ignore_index=2.5), {}, "ignore_index must be an integer, got 2.5"),
    (dict(exchange_every=0), {}, "exchange_every must be an integer >= 1"),
    (dict(backend="cuda"), {}, "backend must be one of"),
    ({}, dict(world_size=3), "world_size 3 must be 1 or a multiple of n=2"),
    ({}, dict(world_size=4, batch_size=1), "batch_size 1 is smaller than the 2 ranks per model"),
    ({}, dict(eval_every=5), "eval_every needs eval_data"),
    ({}, dict(timeout=0), "timeout must be between 0.001 and 2147483 seconds"),
    ({}, dict(timeout="60"), "timeout must be a number of seconds"),
    ({}, dict(data=torch.randn(10, FEATURES)), "items carry no labels"),
    ({}, dict(data=TensorDataset(torch.randn(10, FEATURES), torch.rand(10))), "labels must be class indices"),
    ({}, dict(data=TensorDataset(torch.randn(10, FEATURES), torch.ones(10, dtype=torch.bool))),
     "labels must be class indices .* got torch.bool"),
    ({}, dict(data=TensorDataset(torch.randn(1, FEATURES), torch.zeros(1, dtype=torch.long))),
     "a dataset of 1 samples cannot give 2 models a shard each"),
    ({}, dict(data=TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))),
     r"model 0 failed on a dataset input of shape \(3,\)"),
    ({}, dict(data=TensorDataset(torch.randn(10, FEATURES), torch.zeros(10, 2, dtype=torch.long))),
     r"labels need shape \(\), but dataset labels have \(2,\)"),
    ({}, dict(data=TensorDataset(torch.randn(10, FEATURES), torch.tensor([0] * 9 + [CLASSES]))),
     rf"dataset labels must be in \[0, {CLASSES}\) \(the models' classes\) or ignore_index=-100, got \[{CLASSES}\]"),
    ({}, dict(eval_data=(torch.randn(10, FEATURES), torch.zeros(9, dtype=torch.long))),
     r"eval_data needs inputs and labels with one row per sample, got shapes \(10, 6\) and \(9,\)"),
    ({}, dict(eval_data=(torch.randn(3, FEATURES), torch.tensor(1))), r"got shapes \(3, 6\) and \(\)"),
    ({}, dict(eval_data=(torch.randn(3, FEATURES), torch.tensor([0, -1, 2]))),
     r"eval_data labels must be in \[0, 5\) .* got \[-1\]"),
    ({}, dict(threads=1.5), "threads must be an integer >= 1, got 1.5"),
    (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), {},
     "optimizer must be a factory such as lambda params: .* got an instance of SGD"),
])
def test_bad_input_is_refused_before_training(monkeypatch, kwargs, fit, message):
    monkeypatch.setattr(pipebd.codistill, "spawn_tasks", lambda *a, **k: pytest.fail("workers were started"))
    monkeypatch.setattr(pipebd.codistill, "_run", lambda *a, **k: pytest.fail("training started"))
    data = fit.pop("data", dataset())
    with pytest.raises((ValueError, TypeError), match=message):
        pipebd.Codistillation(initial_models(2), **kwargs).fit(data, **{"batch_size": 4, "steps": 2, **fit})


def test_models_that_share_parameters_or_one_model_are_refused():
    shared = initial_models(2)
    for one in (shared[0], nn.Sequential(nn.Linear(FEATURES, CLASSES), nn.Linear(CLASSES, CLASSES))):
        with pytest.raises(TypeError, match="models must be a factory .* got one Sequential"):   # not its layers
            pipebd.Codistillation(one, n=2)
    listed = pipebd.Codistillation(nn.ModuleList(initial_models(3)))        # a list of models, not a factory
    assert listed.n == 3 and len(listed.models) == 3
    with pytest.raises(ValueError, match="models 0 and 1 share parameters"):
        pipebd.Codistillation([shared[0], shared[0]])
    shared[1][0] = shared[0][0]
    with pytest.raises(ValueError, match="models 0 and 1 share parameters"):
        pipebd.Codistillation(shared)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_labels_of_any_integer_dtype_train_as_int64(dtype):
    """Before burn-in ends the loss is the task loss alone; it too takes any integer labels."""
    x, y = dataset().tensors
    reports = []
    for labels in (y, y.to(dtype)):
        cd = pipebd.Codistillation(initial_models(2), optimizer=sgd, burn_in=STEPS // 2, exchange_every=2,
                                   backend="torch", device="cpu")
        reports.append((cd.fit(TensorDataset(x, labels), batch_size=BATCH, steps=STEPS), cd.models))
    (expected, a), (got, b) = reports
    assert got.losses == expected.losses
    assert all(torch.equal(p, q) for m, n in zip(a, b) for p, q in zip(m.parameters(), n.parameters()))


def test_accuracy_leaves_out_ignored_labels():
    x, y = dataset().tensors
    y = y.clone()
    y[::3] = -1
    cd = pipebd.Codistillation(initial_models(2), optimizer=sgd, exchange_every=K, ignore_index=-1, device="cpu")
    report = cd.fit(dataset(), batch_size=BATCH, steps=2 * K + 1, eval_data=(x, y))
    keep = y != -1
    with torch.no_grad():
        probs = [F.softmax(m(x[keep]), -1) for m in cd.models]
    assert report.accuracy == [[(p.argmax(1) == y[keep]).float().mean().item()] for p in probs]
    assert report.ensemble_accuracy[0] == ((probs[0] + probs[1]).argmax(1) == y[keep]).float().mean().item()


def test_accuracy_reads_uint8_labels_as_classes():
    # 156 is -100 (the default ignore_index) wrapped to uint8: it is a class, not an ignored label.
    from pipebd.codistill import _accuracy
    probs = F.one_hot(torch.tensor([0, 3]), 200).float()
    assert _accuracy(probs, torch.tensor([156, 3], dtype=torch.uint8), -100) == 0.5


def test_one_process_exchanges_move_no_bytes():
    _, report = run(1)
    assert any(s is not None for s in report.sources) and report.exchanged_bytes == 0


@pytest.mark.parametrize("mode, k, burn_in, steps", [
    ("codistill", 2, 0, 5), ("codistill", 2, 0, 4), ("codistill", 3, 4, 8), ("codistill", 3, 4, 7),
    ("codistill", 1, 5, 6), ("codistill", 4, 12, 13), ("codistill", 4, 12, 12), ("online", 3, 5, 6),
    ("online", 3, 5, 5)])
def test_a_run_that_never_distills_is_warned_about(monkeypatch, caplog, mode, k, burn_in, steps):
    jobs = []
    build = pipebd.codistill._build_report
    monkeypatch.setattr(pipebd.codistill, "_build_report", lambda job, *a: jobs.append(job) or build(job, *a))
    cd = pipebd.Codistillation(initial_models(2), optimizer=sgd, mode=mode, exchange_every=k, burn_in=burn_in,
                               backend="torch", device="cpu")
    with caplog.at_level(logging.WARNING, logger="pipebd"):
        report = cd.fit(dataset(), batch_size=BATCH, steps=steps)
    first = next((t for t, source in enumerate(report.sources) if source is not None), None)
    assert jobs[0].first_distilled == first
    assert any("steps distills" in r.getMessage() for r in caplog.records) == (first is None)


def test_models_whose_logits_differ_are_refused():
    models = [nn.Linear(FEATURES, CLASSES), nn.Linear(FEATURES, CLASSES + 1)]
    with pytest.raises(ValueError, match=r"logits differ in shape per sample: \[\(5,\), \(6,\)\]"):
        pipebd.Codistillation(models).fit(dataset(), batch_size=4, steps=1)
    models = [nn.Linear(FEATURES, CLASSES), nn.Sequential(nn.Linear(FEATURES, CLASSES), Double())]
    with pytest.raises(ValueError, match=r"logits differ in dtype: \['float32', 'float64'\]"):
        pipebd.Codistillation(models).fit(dataset(), batch_size=4, steps=1)


class Double(nn.Module):
    def forward(self, x):
        return x.double()


def test_benchmark_script_runs(tmp_path):
    # bench/codistill.py --smoke: both tasks, every method, for a few steps; checks the script.
    script = Path(__file__).resolve().parents[1] / "bench" / "codistill.py"
    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--plot", str(png)], capture_output=True,
                          text=True, timeout=170, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for task in ("digits", "synthetic"):
        assert f"**{task}**" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows if not r.startswith("| method")] == \
        ["| alone", "| codistill", "| online", "| ensemble"] * 2
    assert png.stat().st_size > 10_000


class WithUnusedHead(nn.Module):
    """A model holding a head its forward does not use (left over from pre-training)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.head = net, nn.Linear(3, 3)

    def forward(self, x):
        return self.net(x)


def test_a_parameter_without_gradient_trains_in_ddp_groups_as_in_one_process():
    # DDP waits for every parameter's gradient unless told which it will not get.
    def fit(world_size):
        torch.manual_seed(0)   # the heads
        models = [WithUnusedHead(m) for m in initial_models(2)]
        head = [copy.deepcopy(m.head.state_dict()) for m in models]
        decayed = lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.5, weight_decay=0.1)   # noqa: E731
        cd = pipebd.Codistillation(models, optimizer=decayed, alpha=0.7, temperature=2.0, exchange_every=K,
                                   backend="torch", device="cpu")
        cd.fit(dataset(), batch_size=BATCH, steps=STEPS, world_size=world_size, seed=3, timeout=60)
        for m, before in zip(cd.models, head):   # not stepped: no decay without a gradient
            assert all(torch.equal(p, before[k]) for k, p in m.head.state_dict().items())
        return [list(m.parameters()) for m in cd.models]

    assert max_diff(fit(4), fit(1)) <= TOL


def test_finding_unused_parameters_leaves_the_model_as_it_was():
    from pipebd.codistill import _unused
    torch.manual_seed(0)
    model = WithUnusedHead(nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))).eval()
    state, x = copy.deepcopy(model.state_dict()), torch.randn(2, FEATURES)
    rng = torch.get_rng_state()
    assert _unused(model, x) == ["head.weight", "head.bias"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())   # BatchNorm statistics too
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert _unused(model.net, x) == []
    # Reentrant checkpointing refuses autograd.grad: a backward tells, and its gradients go.
    checkpointed = WithUnusedHead(nn.Sequential(nn.Linear(FEATURES, 4), nn.Linear(4, 4)))
    net = checkpointed.net
    checkpointed.forward = lambda x: torch.utils.checkpoint.checkpoint(net[1], net[0](x), use_reentrant=True)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    assert _unused(checkpointed, x) == ["head.weight", "head.bias"]
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    assert all(p.grad is None for name, p in checkpointed.named_parameters() if name != "net.0.weight")
