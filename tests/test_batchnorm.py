"""BatchNorm over a replicated stage's whole batch (``pipebd.batchnorm``, ``fit(sync_batchnorm=True)``).

Reference: one ``nn.BatchNorm*d`` on the full batch in one process. ``GroupBatchNorm`` on three
gloo ranks holding unequal slices (3, 2 and 2 of 7 rows) must give the same outputs, input
gradients, summed parameter gradients and running statistics over two steps, within 1e-5
(float summation order differs). A fit with a BatchNorm student on replicated stages must end
with the one-process weights and running statistics; without the option it must not.
"""

import sys

import cloudpickle
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import pipebd
from pipebd.batchnorm import GroupBatchNorm, local_batchnorm, sync_batchnorm
from pipebd.models import cnn_pair
from pipebd.runtime.launch import spawn_tasks
from pipebd.runtime.redistribute import slices

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the workers cannot import this file

TOL = 1e-5
ROWS = 7
LAYERS = {   # name -> (layer factory, per-sample input shape)
    "2d": (lambda: nn.BatchNorm2d(4), (4, 3, 3)),
    "1d-flat": (lambda: nn.BatchNorm1d(5, momentum=None), (5,)),
    "1d-seq": (lambda: nn.BatchNorm1d(3, affine=False), (3, 6)),
    "3d-untracked": (lambda: nn.BatchNorm3d(2, track_running_stats=False), (2, 2, 2, 2)),
}


def layer(name):
    torch.manual_seed(0)
    bn = LAYERS[name][0]()
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def inputs(name, step):
    g = torch.Generator().manual_seed(10 * step + 1)
    x = 3.0 + 2.0 * torch.randn(ROWS, *LAYERS[name][1], generator=g)   # a mean far from 0
    return x, torch.randn(x.shape, generator=g)                         # input, output weights


def reference(name):
    bn = layer(name)
    out = {}
    for step in range(2):
        x, w = inputs(name, step)
        x.requires_grad_(True)
        y = bn(x)
        bn.zero_grad()
        (y * w).sum().backward()
        out[step] = {"y": y.detach(), "dx": x.grad, **{f"d{n}": p.grad.clone() for n, p in bn.named_parameters()}}
    out["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
    return out


def replicated(rank, world_size):
    """Every layer on ``world_size`` ranks, each on its slice; rows gathered back in order."""
    lo, hi = slices(ROWS, world_size)[rank]
    group = dist.new_group(list(range(world_size)))
    results = {}
    for name in LAYERS:
        bn = sync_batchnorm(nn.Sequential(layer(name)), group)[0]
        assert isinstance(bn, GroupBatchNorm)
        out = {}
        for step in range(2):
            x, w = inputs(name, step)
            x = x[lo:hi].clone().requires_grad_(True)
            y = bn(x)
            bn.zero_grad()
            (y * w[lo:hi]).sum().backward()
            for p in bn.parameters():
                dist.all_reduce(p.grad, group=group)
            mine = {"y": y.detach(), "dx": x.grad}
            parts = [None] * world_size
            dist.all_gather_object(parts, mine)
            out[step] = {k: torch.cat([p[k] for p in parts]) for k in mine}
            out[step].update({f"d{n}": p.grad.clone() for n, p in bn.named_parameters()})
        out["state"] = {k: v.clone() for k, v in bn.state_dict().items()}
        bn.eval()
        x, _ = inputs(name, 0)
        out["eval"] = bn(x[lo:hi]).detach()
        results[name] = out
    dist.destroy_process_group(group)
    return results


@pytest.fixture(scope="module")
def three_ranks():
    return spawn_tasks([replicated] * 3, "gloo", timeout_s=60)


@pytest.mark.parametrize("name", list(LAYERS))
def test_group_batchnorm_equals_one_full_batch_layer(three_ranks, name):
    got, ref = three_ranks[name], reference(name)
    for step in range(2):
        assert set(got[step]) == set(ref[step])
        for key in ref[step]:
            torch.testing.assert_close(got[step][key], ref[step][key], atol=TOL, rtol=TOL, msg=f"step {step} {key}")
    assert set(got["state"]) == set(ref["state"])
    for key in ref["state"]:
        torch.testing.assert_close(got["state"][key], ref["state"][key], atol=TOL, rtol=TOL, msg=key)


@pytest.mark.parametrize("name", list(LAYERS))
def test_eval_mode_exchanges_nothing(three_ranks, name):
    # In eval mode no statistics are exchanged (as torch's SyncBatchNorm): rank 0's output is
    # plain BatchNorm on its rows, with the running statistics or, untracked, its rows' own.
    bn = layer(name)
    bn.load_state_dict(three_ranks[name]["state"])
    x, _ = inputs(name, 0)
    lo, hi = slices(ROWS, 3)[0]
    torch.testing.assert_close(three_ranks[name]["eval"], bn.eval()(x[lo:hi]), atol=TOL, rtol=TOL)


def per_rank(module):
    """``module`` converted to GroupBatchNorm layers without a group: each rank's own rows."""
    from pipebd.batchnorm import _converted
    from torch.nn.modules.batchnorm import _BatchNorm
    return _converted(module, None, _BatchNorm, ())


def default_group_mean(rank, world_size):
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), group=None)[0]
    bn(x[rank * 4:(rank + 1) * 4])
    return bn.running_mean


def test_sync_batchnorm_without_a_group_is_the_default_group():
    # group=None normalized each rank's rows alone (torch's SyncBatchNorm: the default group).
    full = nn.BatchNorm1d(3)
    torch.manual_seed(0)
    full(torch.randn(8, 3))
    got = spawn_tasks([default_group_mean] * 2, "gloo", timeout_s=60)
    torch.testing.assert_close(got, full.running_mean, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"group=None\) means the default process group, and none is initialized"):
        sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), group=None)


def test_conversion_copies_and_keeps_the_state_dict_keys():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    converted = per_rank(block)
    assert converted is not block and isinstance(block[1], nn.BatchNorm2d)   # the original is untouched
    assert [type(m) for m in converted.modules()].count(GroupBatchNorm) == 2
    assert list(converted.state_dict()) == list(block.state_dict())
    for a, b in zip(converted.state_dict().values(), block.state_dict().values()):
        assert torch.equal(a, b)
    plain = nn.Sequential(nn.Linear(2, 2))
    assert per_rank(plain) is plain
    # Without a group (one replica) the layer is plain BatchNorm.
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(converted(x), block(x), atol=0, rtol=0)
    # and it accepts the inputs the replaced layer accepts, and no others
    with pytest.raises(ValueError, match="expected 4D input, got 3D input"):
        converted[1](torch.randn(4, 5, 5))
    flat = per_rank(nn.Sequential(nn.BatchNorm1d(4)))[0]
    flat(torch.randn(3, 4)), flat(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="expected 2 or 3D input, got 4D input"):
        flat(torch.randn(3, 4, 2, 2))


def test_local_batchnorm_replaces_only_torch_sync_batchnorm():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    local = local_batchnorm(block)
    assert local is not block and isinstance(block[1], nn.SyncBatchNorm)   # the original is untouched
    assert [type(m) for m in local.modules()].count(GroupBatchNorm) == 1
    assert isinstance(local[2][1], nn.BatchNorm2d) and local[1].group is None
    assert list(local.state_dict()) == list(block.state_dict())
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert local_batchnorm(plain) is plain
    # Per-rank statistics: a plain BatchNorm's output and running statistics.
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    reference.load_state_dict(block.state_dict())
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(local(x), reference(x), atol=0, rtol=0)
    torch.testing.assert_close(local.state_dict(), reference.state_dict(), atol=0, rtol=0)


BATCH, STEPS = 7, 4


def fit_bn(world_size, strategy="pipebd", plan=None, sync=True, torch_sync=False):
    teacher, student = cnn_pair(width=8, depth=1, student_depth=1, seed=0)
    if torch_sync:   # as a user would prepare the student for DDP
        student = [nn.SyncBatchNorm.convert_sync_batchnorm(b) for b in student]
    distiller = pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                 device="cpu")
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 10, (20,), generator=g))
    distiller.fit(data, batch_size=BATCH, steps=STEPS, world_size=world_size, strategy=strategy, plan=plan,
                  seed=1, timeout=60, sync_batchnorm=sync)
    return distiller.student_model().state_dict()


def max_diff(a, b):
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def bn_reference():
    return fit_bn(1)


@pytest.mark.parametrize("world_size, strategy, plan", [
    (3, "pipebd", pipebd.Plan([[0], [1, 2, 3]], [1, 2])),
    (2, "baseline", None),
], ids=["hybrid-w3", "baseline-w2"])
def test_sync_batchnorm_fit_matches_one_process(bn_reference, world_size, strategy, plan):
    # Weights and running statistics (every state-dict entry) of a BatchNorm student.
    assert max_diff(fit_bn(world_size, strategy, plan), bn_reference) <= TOL


HYBRID = pipebd.Plan([[0], [1, 2, 3]], [1, 2])


@pytest.fixture(scope="module")
def per_replica():
    return fit_bn(3, plan=HYBRID, sync=False)


def test_per_replica_batchnorm_differs_from_one_process(bn_reference, per_replica):
    # Guards the test above: the default (per-replica statistics) is not the one-process result.
    assert max_diff(per_replica, bn_reference) > 1e-3


@pytest.mark.parametrize("sync", [True, False])
def test_torch_sync_batchnorm_layers_follow_the_option(bn_reference, per_replica, sync):
    # Left alone, torch's SyncBatchNorm would gather over the default group, which holds the
    # other stage's rank (CPU: "expected input tensor to be on GPU"; GPU: a hang). Its layers
    # train as plain BatchNorm layers do: over the stage's replicas with sync_batchnorm, else per replica.
    got = fit_bn(3, plan=HYBRID, sync=sync, torch_sync=True)
    assert max_diff(got, bn_reference if sync else per_replica) <= TOL


def test_sync_batchnorm_must_be_a_bool():
    teacher, student = cnn_pair(width=8, depth=1, seed=0)
    with pytest.raises(TypeError, match="sync_batchnorm must be True or False"):
        pipebd.Distiller(teacher, student, device="cpu").fit(torch.randn(8, 3, 32, 32), batch_size=4, steps=1,
                                                             sync_batchnorm="yes")


def flat_bn_pair():
    """Student blocks with BatchNorm over [rows, channels]: one value per channel per row."""
    torch.manual_seed(0)
    teacher = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2)]
    student = [nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()) for _ in range(2)]
    return pipebd.Distiller(teacher, student, device="cpu")


@pytest.mark.parametrize("batch,plan,needs", [(3, "[0-1]x3", "at least 6 rows"), (1, "[0]x1 | [1]x1", "at least 2 rows"),
                                              (5, "[0]x1 | [1]x3", "at least 6 rows")])
def test_batchnorm_over_single_values_is_refused_a_one_row_slice(batch, plan, needs):
    # torch refuses to train BatchNorm on one value per channel; it failed in the ranks, after they started.
    with pytest.raises(ValueError, match=rf"student block \d has a BatchNorm layer .* {needs}"):
        flat_bn_pair().fit(torch.randn(8, 6), batch_size=batch, steps=1, world_size=4, plan=pipebd.Plan.parse(plan))


def test_batchnorm_one_row_slices_pass_with_sync_or_values_in_other_dims():
    data = torch.randn(8, 6)
    plan = pipebd.Plan.parse("[0-1]x3")
    job = flat_bn_pair()._job(data, 3, 1, 3, "pipebd", plan, 0, 1, None, False, sync_batchnorm=True)
    assert job.min_rows == (2, 2)   # statistics over the stage's 3 rows
    teacher, student = cnn_pair(width=8, depth=1, seed=0)   # BatchNorm2d over 32 x 32 values per row
    job = pipebd.Distiller(teacher, student, device="cpu")._job(torch.randn(8, 3, 32, 32), 3, 1, 3, "pipebd",
                                                                pipebd.Plan([list(range(len(teacher)))], [3]),
                                                                0, 1, None, False)
    assert job.min_rows == (1,) * len(teacher)


def test_a_teacher_batchnorm_without_running_statistics_needs_two_rows_even_with_sync():
    # Such a layer uses the batch's statistics in eval mode too, and is not synchronized.
    torch.manual_seed(0)
    teacher = [nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, track_running_stats=False)), nn.Linear(6, 6)]
    student = [nn.Linear(6, 6), nn.Linear(6, 6)]
    d = pipebd.Distiller(teacher, student, device="cpu")
    for sync in (False, True):
        with pytest.raises(ValueError, match="teacher block 0 has a BatchNorm layer .* leaves a replica 1 row; use "
                                             "a batch of at least 4 rows, fewer replicas, or running statistics"):
            d.fit(torch.randn(8, 6), batch_size=3, steps=1, world_size=3, plan=pipebd.Plan([[0], [1]], [2, 1]),
                  sync_batchnorm=sync)
    profile = d.profile(torch.randn(8, 6), 2, 2, comm=False, warmup=0, repeats=1)   # crashed timing 1 row
    assert profile.min_rows == [2, 1] and "block 0: BatchNorm over one value per channel" in str(profile)


def test_auto_plan_gives_batchnorm_over_single_values_two_rows_per_replica():
    from pipebd.planner import auto_plan
    from pipebd.profiler import profile_job
    distiller = flat_bn_pair()
    comm = ([(4096, 1e-6), (1 << 20, 1e-5)], [(2, 4096, 1e-6), (2, 1 << 20, 1e-5)])   # cheap: replicas pay
    job = distiller._job(torch.randn(8, 6), 3, 1, 3, "pipebd", "auto", 0, 1, None, False)
    profile = profile_job(job, 3, warmup=0, repeats=1, comm=lambda: comm, cache=False)   # 1 row: not trained
    assert profile.rows == [1, 2, 3] and profile.min_rows == [2, 2]
    assert "-" in str(profile).splitlines()[2].split()   # block 0 at 1 row: not measured
    for world in (2, 3):
        plan = auto_plan(profile, world).plan
        assert all(3 // k >= 2 for k in plan.replicas), plan.describe()
    with pytest.raises(ValueError, match="at least 2 rows"):
        distiller.fit(torch.randn(8, 6), batch_size=1, steps=1, world_size=2, plan="auto")


# Codistillation: each model data parallel over two ranks (DDP groups), BatchNorm in the models.
CD_STEPS = 12


def fit_codistill(world_size, mode="codistill", sync=True, torch_sync=False):
    from test_codistill import BATCH as CD_BATCH, CLASSES, FEATURES, K, dataset
    gen = torch.Generator().manual_seed(5)
    models = []
    for _ in range(2):
        norm = nn.SyncBatchNorm(12) if torch_sync else nn.BatchNorm1d(12)
        m = nn.Sequential(nn.Linear(FEATURES, 12), norm, nn.Tanh(), nn.Linear(12, CLASSES))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        models.append(m)
    cd = pipebd.Codistillation(models, optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5), alpha=0.7,
                               temperature=2.0, exchange_every=K, mode=mode, backend="torch", device="cpu")
    cd.fit(dataset(), batch_size=CD_BATCH, steps=CD_STEPS, world_size=world_size, seed=3, timeout=60,
           sync_batchnorm=sync)
    return [m.state_dict() for m in cd.models]


def test_codistillation_refuses_batchnorm_over_single_values_a_one_row_slice():
    from test_codistill import CLASSES, FEATURES, dataset
    cd = pipebd.Codistillation(lambda i: nn.Sequential(nn.Linear(FEATURES, 12), nn.BatchNorm1d(12), nn.Tanh(),
                                                       nn.Linear(12, CLASSES)), n=2, device="cpu")
    with pytest.raises(ValueError, match="model 0 has a BatchNorm layer .* over its 2 ranks leaves a rank 1 row; "
                                         "use a batch of at least 4 rows"):
        cd.fit(dataset(), batch_size=3, steps=1, world_size=4)
    with pytest.raises(ValueError, match="model 0 has a BatchNorm layer .* at least 2 rows"):
        cd.fit(dataset(), batch_size=1, steps=1, world_size=1)
    cd._job(dataset(), 3, 1, 4, 0, None, None, False, None, False, 60.0, sync_batchnorm=True)   # over 3 rows


@pytest.mark.parametrize("mode", ["codistill", "online"])
def test_codistillation_groups_with_sync_batchnorm_match_one_process(mode):
    # Two ranks per model hold 5 and 4 of the 9 rows; the distilled-from copies run in eval
    # mode on the running statistics, so those must agree too (every state-dict entry).
    want = fit_codistill(1, mode)
    got = fit_codistill(4, mode)
    assert max(max_diff(g, w) for g, w in zip(got, want)) <= TOL
    if mode == "codistill":     # guard: per-rank statistics (the default) give other weights
        default = fit_codistill(4, mode, sync=False)
        assert max(max_diff(g, w) for g, w in zip(default, want)) > 1e-3


def test_codistillation_sync_batchnorm_must_be_a_bool():
    with pytest.raises(TypeError, match="sync_batchnorm must be True or False"):
        fit_codistill(1, sync=1)


@pytest.mark.parametrize("world_size, sync", [(2, False), (4, True)])
def test_codistillation_torch_sync_batchnorm_stays_within_its_model(world_size, sync):
    # On 2 ranks (one per model) torch's layer would mix the two models' statistics over the
    # default group; with 2 ranks per model and sync_batchnorm it must cover the model's batch.
    want = fit_codistill(world_size, sync=sync)
    got = fit_codistill(world_size, sync=sync, torch_sync=True)
    assert max(max_diff(g, w) for g, w in zip(got, want)) <= TOL
