"""Loader worker processes (``fit(num_workers=...)``): the same batches in the same order as
loading in the rank itself, loading overlapped with the blocks' work as the simulator predicts,
and a failing sample reported with its traceback."""

import time

import pytest
import torch
from torch.utils.data import Dataset

import pipebd
from pipebd.models import EmulatedBlock, mlp_pair
from pipebd.simulator import simulate

DATA = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(40) % 5


class Samples(Dataset):
    """``DATA`` as ``(x, label)`` items; each load sleeps ``delay`` seconds (as I/O would: it
    needs no core), and item ``fail_at`` cannot be read."""

    def __init__(self, delay=0.0, fail_at=None, features=16):
        self.delay, self.fail_at, self.features = delay, fail_at, features

    def __len__(self):
        return len(DATA)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise ValueError(f"cannot decode sample {i}")
        time.sleep(self.delay)
        return DATA[i, :self.features], LABELS[i]


def weights(distiller):
    return [p.detach().clone() for p in distiller.student_model().parameters()]


def fit(num_workers, world_size, strategy="pipebd", plan=None, steps=6, **options):
    teacher, student = mlp_pair(num_blocks=4, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    distiller.fit(Samples(), batch_size=6, steps=steps, world_size=world_size, strategy=strategy, plan=plan,
                  seed=3, timeout=60, num_workers=num_workers, **options)
    return weights(distiller)


@pytest.mark.parametrize("world_size,strategy,plan", [
    (1, "pipebd", None),
    (3, "pipebd", pipebd.Plan([[0], [1, 2, 3]], [2, 1])),     # two loading replicas of stage 0
    (2, "baseline", None),                                     # loads every batch once per block
])
def test_workers_load_the_same_batches(world_size, strategy, plan):
    # 6 steps of 6 rows from 40 samples: the run crosses an epoch boundary (a reshuffle).
    expected = fit(0, world_size, strategy, plan)
    got = fit(2, world_size, strategy, plan)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_dataset_class_of_a_script_in_spawned_ranks():
    # A class defined in a script (here: in a function) reaches spawned ranks by value, through
    # cloudpickle; their loader processes must get it without pickling it again.
    class Local(Dataset):
        def __len__(self):
            return len(DATA)

        def __getitem__(self, i):
            return DATA[i]

    teacher, student = mlp_pair(num_blocks=2, seed=1)
    expected = pipebd.Distiller(teacher, student, device="cpu")
    expected.fit(DATA, batch_size=6, steps=3, world_size=2, strategy="baseline", seed=3, timeout=60)
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    got = pipebd.Distiller(teacher, student, device="cpu")
    got.fit(Local(), batch_size=6, steps=3, world_size=2, strategy="baseline", seed=3, timeout=60, num_workers=1)
    assert all(torch.equal(a, b) for a, b in zip(weights(expected), weights(got)))


def test_resume_with_workers(tmp_path):
    # The baseline's feed starts each block at its own saved step.
    expected = fit(0, 1, "baseline", steps=6)
    fit(0, 1, "baseline", steps=3, checkpoint_dir=tmp_path)
    got = fit(2, 1, "baseline", steps=6, checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_workers_overlap_loading_as_simulated():
    # Two blocks sleeping 4 ms per call for teacher and student: about 20 ms of work per step
    # with the calls' own overhead. Loading 8 rows at 2 ms each takes 16 ms: inline it adds to
    # every step; 2 workers deliver a batch every 8 ms, hidden behind the work.
    features, batch, steps = 8, 8, 40
    teacher = [EmulatedBlock(features, 4e-3, 0.0) for _ in range(2)]
    student = [EmulatedBlock(features, 4e-3, 0.0) for _ in range(2)]
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    data = Samples(delay=2e-3, features=features)
    measured, simulated = {}, {}
    for workers in (0, 2):
        profile = distiller.profile(data, batch, 1, warmup=1, repeats=3, num_workers=workers)
        report = distiller.fit(data, batch_size=batch, steps=steps, seed=0, num_workers=workers)
        measured[workers] = report.samples_per_s
        simulated[workers] = simulate(profile, report.plan, steps).samples_per_s
        assert measured[workers] == pytest.approx(simulated[workers], rel=0.15)
    assert simulated[2] / simulated[0] > 1.4
    assert measured[2] / measured[0] > 1.4


def test_failing_sample_is_reported_from_the_worker():
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(ValueError, match="cannot decode sample 7"):
        distiller.fit(Samples(fail_at=7), batch_size=8, steps=10, seed=0, num_workers=2, timeout=60)
    with pytest.raises(pipebd.WorkerError, match="(?s)rank 0 .*cannot decode sample 7"):
        distiller.fit(Samples(fail_at=7), batch_size=8, steps=10, world_size=2, seed=0, num_workers=2, timeout=60)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_num_workers_is_checked(value):
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        distiller.fit(Samples(), batch_size=8, steps=2, num_workers=value)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        distiller.profile(Samples(), 8, 2, comm=False, num_workers=value)
