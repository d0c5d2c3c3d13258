"""Blocks that are unusual but legitimate train as a plain one-process loop trains them.

``plain_loop`` is that loop, written here without pipebd's runtime: for each batch the teacher
blocks run in turn, each student block trains on the activations its teacher blocks returned
(copies, so nothing a block does to its input reaches another block's target), and every
optimizer steps after ``zero_grad()``. Tiny MLP blocks, batch 6, a few steps. Tolerance 1e-6
max abs (float32 summation order; without replicas the runs agree bit for bit in practice).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipebd
from pipebd.data import BatchOrder
from pipebd.runtime.worker import GradBucket

BATCH, STEPS, SEED, TOL = 6, 5, 3, 1e-6
DATA = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def plain_loop(teacher, student, optimizer=sgd, data=DATA, final_loss=None, labels=None):
    teacher = [copy.deepcopy(t).eval() for t in teacher]
    student = [copy.deepcopy(s).train() for s in student]
    optimizers = [optimizer(s.parameters()) for s in student]
    order = BatchOrder(len(data), BATCH, SEED)
    for t in range(STEPS):
        rows = order.indices(t)
        acts = [data[rows]]
        with torch.no_grad():
            for block in teacher:
                acts.append(block(acts[-1].clone()))
        for i, (block, opt) in enumerate(zip(student, optimizers)):
            out = block(acts[i].clone())
            last = i == len(student) - 1 and final_loss is not None
            loss = final_loss(out, acts[i + 1], labels[rows]) if last else F.mse_loss(out, acts[i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student


def fit(teacher, student, world_size=1, plan=None, optimizer=sgd, data=DATA, final_loss=None):
    distiller = pipebd.Distiller(teacher, student, optimizer=optimizer, final_loss=final_loss, device="cpu")
    distiller.fit(data, batch_size=BATCH, steps=STEPS, world_size=world_size, plan=plan, seed=SEED, timeout=60)
    return distiller.student


def max_diff(blocks, others):
    return max((a - b).abs().max().item() for x, y in zip(blocks, others)
               for a, b in zip(x.state_dict().values(), y.state_dict().values()))


def linear(seed, *before):
    torch.manual_seed(seed)
    return nn.Sequential(*before, nn.Linear(8, 8))


def inplace_pair():
    """Teacher block 1 starts with an in-place ReLU: its input is student block 0's target.
    Teacher block 2 returns its input (Flatten of a 2-D tensor), so student block 2's input is
    its own target, and that block starts with an in-place ReLU."""
    teacher = [linear(0), linear(1, nn.ReLU(inplace=True)), nn.Flatten(), linear(2)]
    student = [linear(10), linear(11), linear(12, nn.ReLU(inplace=True)), linear(13)]
    return teacher, student


@pytest.mark.parametrize("world_size, plan", [(1, None), (2, pipebd.Plan([[0, 1], [2, 3]])),
                                              (3, pipebd.Plan([[0, 1], [2, 3]], [2, 1]))],
                         ids=["w1", "w2", "w3-replicas"])
def test_blocks_that_change_their_input_in_place(world_size, plan):
    reference = plain_loop(*inplace_pair())
    trained = fit(*inplace_pair(), world_size=world_size, plan=plan)
    assert max_diff(trained, reference) <= TOL
    assert max_diff(trained, inplace_pair()[1]) > 1e-3   # it trained


class InPlaceLater(nn.Module):
    """Changes its input in place from its second call on (the probe makes the first)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.mul_(2) if self.calls > 1 else x * 2


def test_an_in_place_change_the_probe_did_not_see_is_an_error():
    teacher, student = [linear(0), InPlaceLater()], [linear(10), linear(11)]
    with pytest.raises(RuntimeError, match="teacher block 1 changed its input in place at step 0"):
        fit(teacher, student)


class WithUnused(nn.Module):
    """A Linear and a parameter that only the other branch would use."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(8, 8)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.linear(x)


def adamw(params):
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize("world_size, plan", [(1, None), (2, pipebd.Plan([[0, 1]], [2]))], ids=["w1", "w2-replicas"])
def test_a_parameter_without_gradient_is_not_stepped(world_size, plan):
    # A plain loop's zero_grad() leaves it without a gradient, and AdamW skips it: no decay.
    make = lambda: ([linear(0), linear(1)], [WithUnused(10), linear(11)])   # noqa: E731
    reference = plain_loop(*make(), optimizer=adamw)
    trained = fit(*make(), world_size=world_size, plan=plan, optimizer=adamw)
    assert torch.equal(trained[0].unused, torch.ones(3))
    assert max_diff(trained, reference) <= TOL


def test_gradient_buffers_have_the_parameters_layout():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    bucket = GradBucket(conv)
    assert conv.weight.grad.stride() == conv.weight.stride() != conv.weight.contiguous().stride()
    conv(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    assert bucket.seen == [True, True] and conv.weight.grad.data_ptr() == bucket.flat.data_ptr()
    bucket.close()
    assert conv.weight.grad is None and not conv.weight._post_accumulate_grad_hooks


class Counted(nn.Module):
    """A Linear that counts the rows it trained on in a non-persistent buffer, and keeps the last
    input's rows in one that changes shape (a cache)."""

    def __init__(self, seed):
        super().__init__()
        self.linear = linear(seed)
        self.register_buffer("rows", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x):
        if self.training:
            self.rows += len(x)
            self.register_buffer("cache", x[:, 0].clone(), persistent=False)
        return self.linear(x)


def test_non_persistent_buffers_come_back_from_spawned_ranks():
    student = fit([linear(0), linear(1)], [Counted(10), Counted(11)], world_size=2)
    assert [int(b.rows) for b in student] == [STEPS * BATCH] * 2
    assert [b.cache.shape for b in student] == [(BATCH,)] * 2


def test_a_student_that_changes_its_input_in_place_only_in_training():
    # Its input has served as the previous block's target by then: nothing to refuse.
    make = lambda: ([linear(0), linear(1)], [linear(10), linear(11, nn.Dropout(0.0, inplace=True))])  # noqa: E731
    assert max_diff(fit(*make()), plain_loop(*make())) <= TOL


@pytest.mark.parametrize("norm", [nn.Identity, nn.SyncBatchNorm], ids=["plain", "syncbn"])
def test_a_teacher_block_inside_its_student_block_stays_in_eval_mode(norm):
    # A student holding SyncBatchNorm trains as a converted copy: the teacher block stays shared.
    teacher = [linear(0), linear(1, nn.Dropout(0.5))]
    modes = []
    teacher[1].register_forward_hook(lambda module, args, out: modes.append(module.training))
    fit(teacher, [linear(10), nn.Sequential(teacher[1], nn.Linear(8, 8), norm(8))])
    assert len(modes) > STEPS and not any(modes)
    assert teacher[1].training   # given in training mode, it comes back so


class UnderInferenceMode(nn.Module):
    """A teacher block run under ``torch.inference_mode`` (a common speed-up): it returns an
    inference tensor, which keeps no version counter and which autograd cannot save as a target."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        with torch.inference_mode():
            return self.block(x)


@pytest.mark.parametrize("world_size, plan", [(1, None), (2, pipebd.Plan([[0, 1], [2]]))], ids=["w1", "w2"])
def test_a_teacher_block_under_inference_mode(world_size, plan):
    # Its output is a target, and the input of the next blocks, which change it in place.
    teacher = [linear(0), linear(1, nn.ReLU(inplace=True)), linear(2)]
    student = [linear(10), linear(11, nn.ReLU(inplace=True)), linear(12)]
    reference = plain_loop(teacher, student)   # the same blocks, not wrapped
    trained = fit([UnderInferenceMode(t) for t in teacher], student, world_size=world_size, plan=plan)
    assert max_diff(trained, reference) <= TOL


class Noisy(nn.Module):
    """A teacher block that samples in eval mode (a variational encoder)."""

    def __init__(self, seed):
        super().__init__()
        self.linear = linear(seed)

    def forward(self, x):
        return self.linear(x) + 0.1 * torch.randn_like(x)


def test_a_random_teacher_draws_the_same_in_one_process_and_in_a_relay():
    make = lambda: ([Noisy(0), Noisy(1), Noisy(2)], [linear(10), linear(11), linear(12)])   # noqa: E731
    teacher, student = make()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = fit(teacher, student)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's generator is left as it was
    assert max_diff(fit(*make(), world_size=3), one) <= TOL


class SequenceHead(nn.Module):
    """[batch, positions, 8] -> logits [batch, positions, 11]."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.out = nn.Linear(8, 11)

    def forward(self, x):
        return self.out(x.reshape(len(x), 4, 2).repeat_interleave(4, dim=-1))


def test_sequence_logits_train_on_the_mean_soft_target_loss_over_positions():
    labels = torch.randint(0, 11, (20, 4), generator=torch.Generator().manual_seed(1))
    labels[::3, 1] = -100
    data = torch.utils.data.TensorDataset(DATA, labels)
    T, alpha = 2.0, 0.5

    def formula(s, t, y):   # per position, averaged over every position (ignored ones too)
        kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
        ce = F.cross_entropy(s.transpose(1, 2), y, ignore_index=-100, reduction="none")
        return ((1 - alpha) * T * T * kl + alpha * ce).mean()

    make = lambda: ([linear(0), SequenceHead(1)], [linear(10), SequenceHead(11)])   # noqa: E731
    reference = plain_loop(*make(), final_loss=formula, labels=labels)
    loss = pipebd.SoftTargetLoss(T, alpha=alpha)
    assert max_diff(fit(*make(), data=data, final_loss=loss), reference) <= TOL
    replicated = fit(*make(), world_size=2, plan=pipebd.Plan([[0, 1]], [2]), data=data, final_loss=loss)
    assert max_diff(replicated, reference) <= TOL


def transformer(seed, batch_first):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)


class Recurrent(nn.Module):
    def __init__(self, seed, batch_first):
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(8, 8, batch_first=batch_first)

    def forward(self, x):
        return self.lstm(x)[0]


def mixing_warnings(caplog, teacher, student, world_size=2):
    """The probe's warnings for fit(world_size=...) with one stage of world_size replicas."""
    data = torch.randn(20, 3, 8, generator=torch.Generator().manual_seed(1))
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipebd"):
        distiller._job(data, BATCH, 1, world_size, "pipebd", pipebd.Plan([[0, 1]], [world_size]), 0, 1, None, False)
    return [r.getMessage() for r in caplog.records if "mix the samples" in r.getMessage()]


@pytest.mark.parametrize("kind", [transformer, Recurrent], ids=["transformer", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_blocks_that_mix_the_samples_of_a_batch_are_warned_about(caplog, kind, batch_first):
    # batch_first=False on [batch, seq, features] data runs across the batch, not the sequence
    # (an LSTM's first sample does not see the second: the last one is what moves).
    warned = mixing_warnings(caplog, [kind(0, batch_first), linear(1)], [kind(10, batch_first), linear(11)])
    if batch_first:
        assert not warned
    else:
        assert len(warned) == 1 and "teacher block 0 (by up to" in warned[0] and "student block 0" in warned[0]
        assert "block 1" not in warned[0] and "batch_first=False" in warned[0]
        # Without replicas every stage sees the whole batch, as one process does: nothing to warn of.
        assert not mixing_warnings(caplog, [kind(0, False), linear(1)], [kind(10, False), linear(11)], world_size=1)


def test_a_students_batchnorm_without_running_statistics_is_not_taken_for_mixing(caplog):
    # It mixes the batch by design, and sync_batchnorm makes replicas exact; a teacher's is
    # never synchronized (the teacher stays in eval mode), so its targets would differ.
    batch_statistics = lambda seed: linear(seed, nn.BatchNorm1d(3, track_running_stats=False))   # noqa: E731
    assert not mixing_warnings(caplog, [linear(0), linear(1)], [batch_statistics(10), linear(11)])
    warned = mixing_warnings(caplog, [batch_statistics(0), linear(1)], [linear(10), linear(11)])
    assert len(warned) == 1 and "teacher block 0" in warned[0] and "student" not in warned[0]


def mean_warnings(caplog, world_size=2, **losses):
    """The probe's warnings of losses that are not a mean over rows, with a stage of replicas."""
    data = torch.utils.data.TensorDataset(DATA, torch.arange(len(DATA)) % 3)
    distiller = pipebd.Distiller([linear(0), linear(1)], [linear(10), linear(11)], device="cpu", **losses)
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipebd"):
        distiller._job(data, BATCH, 1, world_size, "pipebd", pipebd.Plan([[0, 1]], [world_size]), 0, 1, None, False)
    return [r.getMessage() for r in caplog.records if "not the mean of their rows' losses" in r.getMessage()]


def test_a_loss_that_sums_over_the_rows_is_warned_about_where_replicas_split_the_batch(caplog):
    # Each replica's loss is scaled by its share of the batch: exact for a mean only. A summed
    # block loss trained silently otherwise (4.6% off one process in a user's trial).
    summed = lambda s, t: ((s - t) ** 2).sum()                                # noqa: E731
    warned = mean_warnings(caplog, block_loss=summed)
    assert len(warned) == 1 and "block(s) 0, 1: the sum of the rows' losses, not their mean" in warned[0]
    # A loss of the batch as a whole, neither: named with its numbers; only the last block here.
    whole = lambda s, t, y: (s - t).abs().max()                               # noqa: E731
    whole.needs_labels = True
    warned = mean_warnings(caplog, final_loss=whole)
    assert len(warned) == 1 and "block(s) 1: " in warned[0] and "for 2 rows whose own losses average" in warned[0]
    # Means over the rows (all the elements, or batchmean): nothing to say, nor without replicas.
    for losses in ({}, {"block_loss": "l1"}, {"final_loss": pipebd.SoftTargetLoss(2.0)},
                   {"final_loss": pipebd.SoftTargetLoss(2.0, alpha=0.5)}):
        assert not mean_warnings(caplog, **losses), losses
    assert not mean_warnings(caplog, world_size=1, block_loss=summed)


def test_a_random_teacher_is_not_taken_for_one_that_mixes_samples(caplog):
    with caplog.at_level("WARNING", logger="pipebd"):
        pipebd.Distiller([Noisy(0), Noisy(1)], [linear(10), linear(11)], device="cpu").profile(
            DATA, batch_size=BATCH, world_size=2, comm=False, warmup=0, repeats=1)
    assert not [r for r in caplog.records if "mix the samples" in r.getMessage()]
