"""Loader worker processes (``fit(num_workers=...)`` of ``Distiller`` and ``Codistillation``):
the same batches in the same order as loading in the rank itself, loading overlapped with the
blocks' work as the simulator predicts, and a failing sample reported with its traceback."""

import functools
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import pipebd
from pipebd.data import BatchOrder, StepRows, batches, check_workers
from pipebd.runtime.launch import spawn_tasks
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


class Noisy(Samples):
    """``Samples`` with noise drawn from the loading process's generators (a random transform):
    torch's, numpy's and Python's ``random``, which transforms written with them use."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        drawn = 0.1 * torch.rand(x.shape) + 0.1 * torch.from_numpy(np.random.rand(*x.shape)).float()
        return x + drawn + 0.1 * random.random(), y


class Logged(Samples):
    """``Samples`` that also append the loading process's pid to ``path``."""

    def __init__(self, path, delay=0.0):
        super().__init__(delay)
        self.path = path

    def __getitem__(self, i):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().__getitem__(i)


class Breaks(torch.nn.Linear):
    """A block that fails on a training batch (more than the two rows it is probed with)."""

    def forward(self, x):
        if x.shape[0] > 2:
            raise RuntimeError("block broke")
        return super().forward(x)


class KillsItsRank(torch.nn.Linear):
    """A block that leaves a mark at ``path`` and kills its own process on a training batch."""

    def __init__(self, path, *args):
        super().__init__(*args)
        self.path = path

    def forward(self, x):
        if x.shape[0] > 2:
            open(self.path, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class StallsAfterMark(Samples):
    """``Samples`` whose loads take 20 s once ``path`` exists."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def __getitem__(self, i):
        if os.path.exists(self.path):
            time.sleep(20)
        return super().__getitem__(i)


def alive(pid):
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def loader_pids(path, caller=os.getpid()):
    return {int(p) for p in path.read_text().split()} - {caller}


def weights(distiller):
    return [p.detach().clone() for p in distiller.student_model().parameters()]


def fit(num_workers, world_size, strategy="pipebd", plan=None, steps=6, dataset=None, **options):
    teacher, student = mlp_pair(num_blocks=4, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    distiller.fit(dataset or Samples(), batch_size=6, steps=steps, world_size=world_size, strategy=strategy, plan=plan,
                  seed=3, timeout=60, num_workers=num_workers, **options)
    return weights(distiller)


@pytest.mark.parametrize("world_size,strategy,plan", [
    (1, "pipebd", None),
    (3, "pipebd", pipebd.Plan([[0], [1, 2, 3]], [2, 1])),     # two loading replicas of stage 0
    (2, "baseline", None),                                     # loads every batch once per block
])
def test_workers_load_the_same_batches(world_size, strategy, plan):
    # 6 steps of 6 rows from 40 samples: the run crosses an epoch boundary (a reshuffle). The
    # noise is drawn in the loader processes with 2 workers, in the rank with 0.
    expected = fit(0, world_size, strategy, plan, dataset=Noisy())
    got = fit(2, world_size, strategy, plan, dataset=Noisy())
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_random_transforms_draw_per_sample():
    # Replicas of stage 0 each load half of a batch; the baseline loads every batch once per
    # block. Each sample still gets the noise one process gives it (1e-5: summation order).
    expected = fit(0, 1, dataset=Noisy())
    for world_size, strategy, plan in [(3, "pipebd", pipebd.Plan([[0], [1, 2, 3]], [2, 1])), (2, "baseline", None)]:
        got = fit(0, world_size, strategy, plan, dataset=Noisy())
        assert max((a - b).abs().max().item() for a, b in zip(expected, got)) <= 1e-5
    # The noise moves the weights far more than that (by 4e-4 without it).
    assert max((a - b).abs().max().item() for a, b in zip(expected, fit(0, 1))) > 1e-4


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
    # The baseline's one feed for all blocks starts at the saved step of each.
    expected = fit(0, 1, "baseline", steps=6, dataset=Noisy())
    fit(0, 1, "baseline", steps=3, checkpoint_dir=tmp_path, dataset=Noisy())
    got = fit(2, 1, "baseline", steps=6, checkpoint_dir=tmp_path, resume=True, dataset=Noisy())
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
        # Unloaded, within 6%; the bound leaves room for a loaded machine (as test_auto does).
        assert measured[workers] == pytest.approx(simulated[workers], rel=0.3)
    # About 1.5 unloaded; without overlap (loading left on the rank) it would be 1.0. A loaded
    # machine stretches the sleeps' overhead and so the work that hides the loading.
    assert simulated[2] / simulated[0] > 1.25
    assert measured[2] / measured[0] > 1.25


def test_failing_sample_is_reported_from_the_worker():
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(ValueError, match="cannot decode sample 7"):
        distiller.fit(Samples(fail_at=7), batch_size=8, steps=10, seed=0, num_workers=2, timeout=60)
    with pytest.raises(pipebd.WorkerError, match="(?s)rank 0 .*cannot decode sample 7"):
        distiller.fit(Samples(fail_at=7), batch_size=8, steps=10, world_size=2, seed=0, num_workers=2, timeout=60)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_loader_processes_end_with_a_failed_fit(tmp_path):
    # In this process: the exception (kept here, with its traceback) must not keep them alive.
    log = tmp_path / "in-process"
    teacher, student = mlp_pair(num_blocks=4, seed=1)
    student[3] = Breaks(32, 10)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(RuntimeError, match="block broke") as kept:
        distiller.fit(Logged(str(log)), batch_size=6, steps=4, seed=0, num_workers=2, timeout=60)
    assert kept.value is not None and loader_pids(log)
    assert not [pid for pid in loader_pids(log) if alive(pid)]
    # Spawned ranks: stage 1 fails while stage 0's loader processes work; stage 0 stops them as
    # it fails in its wake (a rank that cannot is ended with them: the next test).
    log = tmp_path / "spawned"
    with pytest.raises(pipebd.WorkerError, match="block broke"):
        distiller.fit(Logged(str(log), delay=2e-3), batch_size=6, steps=4, world_size=2, seed=0, num_workers=2,
                      timeout=60)
    deadline = time.monotonic() + 1.0      # on their own they would notice within 5 s
    while [pid for pid in loader_pids(log) if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert loader_pids(log) and not [pid for pid in loader_pids(log) if alive(pid)]


def _loads_then_hangs(path, rank, world_size):
    """Rank 0 starts loader processes and then hangs; rank 1 fails once they have loaded."""
    if rank == 0:
        feed = batches(Logged(path, delay=1e-3), StepRows(BatchOrder(40, 4, 0), list(range(10)), 0, 4), 2)
        next(feed)
        time.sleep(120)
    while not os.path.exists(path):
        time.sleep(0.01)
    raise RuntimeError("rank 1 fails")


@pytest.mark.skipif(not hasattr(os, "killpg") or not os.path.exists("/proc/self/stat"), reason="POSIX, /proc")
def test_ending_a_hung_rank_ends_its_loader_processes(tmp_path):
    # A rank that cannot clean up (it is terminated) leaves no loader processes behind.
    log = tmp_path / "loads"
    task = functools.partial(_loads_then_hangs, str(log))
    with pytest.raises(pipebd.WorkerError, match="rank 1 fails"):
        spawn_tasks([task, task], "gloo", 60)
    time.sleep(0.5)
    assert loader_pids(log) and not [pid for pid in loader_pids(log) if alive(pid)]


def test_killed_loading_rank_is_reported_at_once(tmp_path):
    # Its loader processes, busy for 20 s more, hold its end of the report pipe open: the
    # rank's own exit must be enough.
    mark = str(tmp_path / "killed")
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    teacher[0] = KillsItsRank(mark, 16, 32)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    start = time.monotonic()
    with pytest.raises(pipebd.WorkerError, match="rank 0 was killed by signal SIGKILL"):
        distiller.fit(StallsAfterMark(mark), batch_size=8, steps=20, world_size=2, seed=0, num_workers=2, timeout=60)
    assert time.monotonic() - start < 12.0


def codistill(num_workers, world_size, mode="codistill", steps=6, models=None, dataset=None, **options):
    """Final weights of n=2 models (Linear 16 -> 5, seeded) trained on ``Samples``."""
    torch.manual_seed(4)
    models = models or [torch.nn.Linear(16, 5) for _ in range(2)]
    cd = pipebd.Codistillation(models, alpha=0.5, exchange_every=2, mode=mode, backend="torch", device="cpu")
    cd.fit(dataset or Samples(), batch_size=6, steps=steps, world_size=world_size, seed=3, timeout=60,
           num_workers=num_workers, **options)
    return [p.detach().clone() for m in cd.models for p in m.parameters()]


@pytest.mark.parametrize("world_size,mode", [
    (1, "codistill"),    # both models in one process: a set of loader processes per shard
    (4, "codistill"),    # two data-parallel ranks per model, each loading its rows
    (2, "online"),       # one batch for both models, one rank each
])
def test_codistillation_workers_load_the_same_batches(world_size, mode):
    expected = codistill(0, world_size, mode, dataset=Noisy())
    got = codistill(2, world_size, mode, dataset=Noisy())
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    if world_size == 4:   # each rank loads its half of its model's batch: the noise of 1 process
        one = codistill(0, 1, mode, dataset=Noisy())
        assert max((a - b).abs().max().item() for a, b in zip(one, got)) <= 1e-5


def test_codistillation_resume_with_workers(tmp_path):
    expected = codistill(0, 1, dataset=Noisy())
    codistill(0, 1, steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, dataset=Noisy())
    got = codistill(2, 1, checkpoint_dir=tmp_path, resume=True, dataset=Noisy())
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_codistillation_failures_end_the_loader_processes(tmp_path):
    with pytest.raises(ValueError, match="cannot decode sample 7"):
        codistill(2, 1, steps=20, dataset=Samples(fail_at=7))
    log = tmp_path / "loads"
    with pytest.raises(RuntimeError, match="block broke"):
        codistill(2, 1, models=[Breaks(16, 5), Breaks(16, 5)], dataset=Logged(str(log)))
    assert loader_pids(log) and not [pid for pid in loader_pids(log) if alive(pid)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_leaves_the_callers_generator_alone(num_workers):
    # A DataLoader draws its processes' base seed from the caller's generator unless given one,
    # and loading in the caller's process would draw the noise from it: the script's next draw
    # would change, and the noise with the script's seed.
    def run(caller_seed, train):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        result = train()
        assert torch.equal(torch.get_rng_state(), before)
        return result

    def codistilled():
        cd = pipebd.Codistillation(lambda i: torch.nn.Linear(16, 5), alpha=0.5, exchange_every=2,
                                   backend="torch", device="cpu")   # built from seeds of the run's own
        cd.fit(Noisy(), batch_size=6, steps=4, seed=3, timeout=60, num_workers=num_workers)
        return [p.detach().clone() for m in cd.models for p in m.parameters()]

    for train in (lambda: fit(num_workers, 1, dataset=Noisy()), codistilled):
        first, second = run(1, train), run(2, train)
        assert all(torch.equal(a, b) for a, b in zip(first, second))   # noise seeded by the run's seed


@pytest.mark.parametrize("value,error,message", [(-1, ValueError, "must be >= 0"), (1.5, TypeError, "must be an integer"),
                                                 (True, TypeError, "must be an integer"), ("2", TypeError, "must be an integer")])
def test_num_workers_is_checked(value, error, message):
    teacher, student = mlp_pair(num_blocks=2, seed=1)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(error, match=f"num_workers {message}"):
        distiller.fit(Samples(), batch_size=8, steps=2, num_workers=value)
    with pytest.raises(error, match=f"num_workers {message}"):
        distiller.profile(Samples(), 8, 2, comm=False, num_workers=value)
    with pytest.raises(error, match=f"num_workers {message}"):
        codistill(value, 1)
    assert check_workers(np.int64(2)) == 2


PICKLED = []


class CountsPickles(Samples):
    """``Samples`` that note each time the caller pickles them."""

    def __getstate__(self):
        PICKLED.append(1)
        return self.__dict__


def test_the_dataset_is_pickled_once_for_all_ranks():
    # Each loading rank's task held its own pickled copy of the dataset: 3 baseline ranks, 3
    # copies in the caller at once (a 400 MB tensor took 2.1 GB more). Now once, and the same
    # batches reach every rank.
    PICKLED.clear()
    got = fit(0, 3, "baseline", dataset=CountsPickles())
    assert len(PICKLED) == 1
    assert all(torch.equal(a, b) for a, b in zip(got, fit(0, 3, "baseline")))
