"""Random ops in student blocks (``pipebd.rng``): dropout masks depend on the seed, block, step
and replica only. Reference: the same run in one process, or uninterrupted. Tolerance 1e-6 where
only float summation order can differ (none here: no replicated stage), and the guards show
that without the seeded streams the results would differ by far more."""

import pytest
import torch
from torch import nn

import pipebd
from crash import crash_after
from pipebd.rng import derived_seed, stream

D, BLOCKS, BATCH, STEPS, TOL = 6, 4, 8, 12, 1e-6
DATA = torch.randn(40, D, generator=torch.Generator().manual_seed(1))


def distiller(crash_block=None, crash_at=None):
    torch.manual_seed(0)
    teacher = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(BLOCKS)]
    student = [crash_after(nn.Sequential(nn.Linear(D, D), nn.Dropout(0.3)), crash_at if i == crash_block else None)
               for i in range(BLOCKS)]
    return pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu")


def weights(d):
    return d.student_model().state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process():
    d = distiller()
    d.fit(DATA, BATCH, STEPS, progress=False)
    return weights(d)


def test_stream_is_a_function_of_the_seed_and_restores_the_callers_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with stream(derived_seed(0, "student", 1, 5, 0), torch.device("cpu")):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with stream(derived_seed(0, "student", 1, 5, 0), torch.device("cpu")):
        assert torch.equal(torch.rand(4), a)
    with stream(derived_seed(0, "student", 1, 5, 1), torch.device("cpu")):   # another replica
        assert not torch.equal(torch.rand(4), a)


def test_masks_do_not_depend_on_the_callers_random_state(one_process):
    torch.manual_seed(99)
    d = distiller()
    torch.manual_seed(7)           # after the blocks are built: only the training's draws could see it
    d.fit(DATA, BATCH, STEPS, progress=False)
    assert max_diff(weights(d), one_process) == 0.0
    other = distiller()
    other.fit(DATA, BATCH, STEPS, seed=1, progress=False)    # another seed: other batches and masks
    assert max_diff(weights(other), one_process) > 1e-3


def test_one_replica_per_stage_draws_what_one_process_draws(one_process):
    d = distiller()
    d.fit(DATA, BATCH, STEPS, world_size=2, plan=pipebd.Plan([[0, 1], [2, 3]], [1, 1]), progress=False, timeout=60)
    assert max_diff(weights(d), one_process) <= TOL


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_dropout_run_ends_with_the_uninterrupted_weights(tmp_path, one_process, world_size):
    with pytest.raises((pipebd.WorkerError, RuntimeError), match="injected crash"):
        distiller(2, 7).fit(DATA, BATCH, STEPS, world_size=world_size, checkpoint_dir=tmp_path, checkpoint_every=3,
                            progress=False, timeout=60)
    d = distiller()
    report = d.fit(DATA, BATCH, STEPS, world_size=world_size, checkpoint_dir=tmp_path, resume=True, progress=False,
                   timeout=60)
    assert report.start[2] == 6
    assert max_diff(weights(d), one_process) <= TOL


def codistill_models(n=2):
    gen = torch.Generator().manual_seed(5)
    models = [nn.Sequential(nn.Linear(D, 12), nn.Dropout(0.3), nn.Tanh(), nn.Linear(12, 3)) for _ in range(n)]
    with torch.no_grad():
        for p in (p for m in models for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return models


def codistill(world_size, mode, steps=STEPS, **fit):
    data = torch.utils.data.TensorDataset(DATA, DATA[:, :3].argmax(1))
    cd = pipebd.Codistillation(codistill_models(), optimizer=lambda p: torch.optim.SGD(p, lr=0.2), alpha=0.5,
                               exchange_every=3, mode=mode, backend="torch", device="cpu")
    report = cd.fit(data, batch_size=BATCH, steps=steps, world_size=world_size, timeout=60, **{"seed": 2, **fit})
    return [m.state_dict() for m in cd.models], report


@pytest.mark.parametrize("mode", ["codistill", "online"])
def test_codistillation_models_draw_the_same_masks_on_any_rank(mode):
    want, _ = codistill(1, mode)
    got, _ = codistill(2, mode)
    assert max(max_diff(g, w) for g, w in zip(got, want)) <= TOL


def test_a_resumed_codistillation_with_dropout_ends_with_the_uninterrupted_weights(tmp_path):
    want, _ = codistill(1, "codistill")
    codistill(1, "codistill", steps=7, checkpoint_dir=tmp_path, checkpoint_every=3)   # saved at 3, 6, 7
    got, report = codistill(1, "codistill", checkpoint_dir=tmp_path, resume=True)
    assert report.start == 7
    assert max(max_diff(g, w) for g, w in zip(got, want)) <= TOL


def test_a_numpy_seed_is_the_same_seed(one_process):
    np = pytest.importorskip("numpy")
    d = distiller()
    d.fit(DATA, BATCH, STEPS, seed=np.int64(0), progress=False)
    assert max_diff(weights(d), one_process) == 0.0
    with pytest.raises(TypeError, match="seed must be an integer, got 0.5"):
        codistill(1, "codistill", seed=0.5)
