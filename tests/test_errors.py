"""Bad input is refused before any process starts; a failing worker surfaces in the caller."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import pipebd
from pipebd.data import BatchOrder
from pipebd.models import mlp_pair

DATA = torch.randn(30, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if fit gets as far as starting worker processes."""
    def refuse(*args, **kwargs):
        raise AssertionError("worker processes were started")
    monkeypatch.setattr(pipebd.api, "spawn", refuse)


def distiller(**kwargs):
    teacher, student = mlp_pair(num_blocks=4, seed=0)
    return pipebd.Distiller(teacher, student, device="cpu", **kwargs)


def test_block_count_mismatch():
    teacher, student = mlp_pair(num_blocks=4)
    with pytest.raises(ValueError, match="teacher has 4 blocks but student has 3"):
        pipebd.Distiller(teacher, student[:3])


def test_student_shape_mismatch_names_block_and_shapes(no_spawn):
    teacher, student = mlp_pair(num_blocks=4, width=32)
    student[2] = nn.Sequential(nn.Linear(32, 12), nn.Tanh(), nn.Linear(12, 31))
    with pytest.raises(ValueError, match=r"student block 2 outputs shape \(31,\) per sample but teacher "
                                         r"block 2 outputs \(32,\)"):
        pipebd.Distiller(teacher, student).fit(DATA, batch_size=4, steps=1, world_size=2)


def test_student_that_cannot_take_the_teacher_activation(no_spawn):
    teacher, student = mlp_pair(num_blocks=4, width=32)
    student[1] = nn.Linear(30, 32)
    with pytest.raises(ValueError, match=r"student block 1 failed on an input of shape \(32,\)"):
        pipebd.Distiller(teacher, student).fit(DATA, batch_size=4, steps=1, world_size=2)


@pytest.mark.parametrize("plan, message", [
    (pipebd.Plan([[0, 1], [3]]), r"misses block\(s\) \[2\]"),
    (pipebd.Plan([[0, 1], [1, 2, 3]]), "repeats block 1"),
    (pipebd.Plan([[0, 2], [1, 3]]), "contiguous"),
    (pipebd.Plan([[0, 1], [2, 3]], [1, 2]), r"needs 3 ranks .* world_size is 2"),
])
def test_bad_plans(no_spawn, plan, message):
    with pytest.raises(ValueError, match=message):
        distiller().fit(DATA, batch_size=4, steps=1, world_size=2, plan=plan)


class Stream(torch.utils.data.IterableDataset):
    """A streaming dataset with a length, as many are: it has no ``__getitem__``."""

    def __len__(self):
        return len(DATA)

    def __iter__(self):
        return iter(DATA)


def test_other_bad_arguments(no_spawn):
    d = distiller()
    with pytest.raises(ValueError, match="dataset is empty"):
        d.fit(torch.empty(0, 16), batch_size=4, steps=1, world_size=2)
    with pytest.raises(TypeError, match="not a DataLoader: .* pass the loader's .dataset"):
        d.fit(torch.utils.data.DataLoader(DATA, batch_size=4), batch_size=4, steps=1, world_size=2)
    with pytest.raises(TypeError, match="not an IterableDataset"):
        d.fit(Stream(), batch_size=4, steps=1, world_size=2)
    with pytest.raises(ValueError, match=r"batch_size 2 is smaller than the widest stage's replica count \(3\)"):
        d.fit(DATA, batch_size=2, steps=1, world_size=4, plan=pipebd.Plan([[0, 1], [2, 3]], [1, 3]))
    with pytest.raises(ValueError, match=r"batch_size 1 is smaller than the widest stage's replica count \(2\)"):
        d.fit(DATA, batch_size=1, steps=1, world_size=2, strategy="baseline", plan="auto")   # one layout
    with pytest.raises(ValueError, match="strategy must be one of"):
        d.fit(DATA, batch_size=4, steps=1, world_size=2, strategy="dna")
    with pytest.raises(ValueError, match="plan applies to strategy='pipebd' only"):
        d.fit(DATA, batch_size=4, steps=1, world_size=2, strategy="baseline", plan=pipebd.Plan([[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        d.fit(DATA, batch_size=4, steps=0, world_size=2)
    for seed in (1.5, "1", True):
        with pytest.raises(TypeError, match="seed must be an integer"):
            d.fit(DATA, batch_size=4, steps=1, world_size=2, seed=seed)
    for timeout in (0, -1, 1e-4, 2_147_484, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"timeout must be between 0.001 and 2147483 seconds \(about 24 days\)"):
            d.fit(DATA, batch_size=4, steps=1, world_size=2, timeout=timeout)
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        d.profile(DATA, 4, 2, timeout=None)
    with pytest.raises(ValueError, match="plan must be None, 'auto' or a pipebd.Plan, got 'fastest'$"):
        d.fit(DATA, batch_size=4, steps=1, world_size=2, plan="fastest")
    with pytest.raises(ValueError, match=r"written as the CLI takes it: pipebd.Plan.parse\('\[0-1\]x1 \| \[2-3\]x1'\)"):
        d.fit(DATA, batch_size=4, steps=1, world_size=2, plan="[0-1]x1 | [2-3]x1")
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)    # one optimizer, not a factory
    for name, made in (("optimizer", sgd), ("scheduler", torch.optim.lr_scheduler.StepLR(sgd, 10))):
        with pytest.raises(TypeError, match=f"{name} must be a factory such as lambda .* got an instance of "
                                            f"{type(made).__name__}"):
            pipebd.Distiller(*mlp_pair(num_blocks=4), **{name: made})
    with pytest.raises(ValueError, match="needs labels"):
        class NeedsLabels(nn.Module):
            needs_labels = True
        distiller(final_loss=NeedsLabels()).fit(DATA, batch_size=4, steps=1, world_size=2)
    for name, value in (("batch_size", True), ("batch_size", 4.0), ("world_size", 1.5), ("max_inflight", "2"),
                        ("threads", "2"), ("threads", 1.5), ("threads", 0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value!r}"):
            d.fit(DATA, **{"batch_size": 4, "steps": 1, "world_size": 2, name: value})
    for comm in (True, False):
        with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 1.5"):
            d.profile(DATA, 4, 1.5, comm=comm)
    with pytest.raises(ValueError, match="a plan's replica count must be an integer, got 1.5"):
        pipebd.Plan([[0, 1], [2, 3]], [1, 1.5])
    with pytest.raises(ValueError, match="device 'tpu' is not a torch device"):
        pipebd.Distiller(*mlp_pair(num_blocks=4), device="tpu")
    # Devices torch knows but pipebd does not run on: "mps" failed in the ranks, "meta" trained
    # until .item() and left the caller's modules on it, their weights gone.
    for device in ("meta", "mps", "xpu"):
        with pytest.raises(ValueError, match=f"device must be 'cpu', 'cuda' or 'cuda:N' .*, got '{device}'"):
            pipebd.Distiller(*mlp_pair(num_blocks=4), device=device)
        with pytest.raises(ValueError, match=f"got '{device}'"):
            pipebd.Codistillation(lambda i: nn.Linear(4, 3), 2, device=device)
    # A model given whole (list() of it failed with "'Net' object is not iterable").
    teacher, student = mlp_pair(num_blocks=4)

    class Whole(nn.Module):
        def __init__(self, blocks):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(TypeError, match="teacher must be a sequence of blocks .*, got a Whole: split the model"):
        pipebd.Distiller(Whole(teacher), student)
    with pytest.raises(TypeError, match="student must be a sequence of blocks .*, got int"):
        pipebd.Distiller(teacher, 4)
    # nn.CrossEntropyLoss as a final loss reads the teacher's logits as class probabilities
    # (the loss was negative and the run trained on it); probabilities are what it takes.
    with pytest.raises(ValueError, match="final_loss nn.CrossEntropyLoss .* use pipebd.SoftTargetLoss"):
        distiller(final_loss=nn.CrossEntropyLoss()).fit(DATA, batch_size=4, steps=1, world_size=2)
    probabilities = [*mlp_pair(num_blocks=4)]
    probabilities[0][-1] = nn.Sequential(probabilities[0][-1], nn.Softmax(-1))
    pipebd.Distiller(*probabilities, final_loss=nn.CrossEntropyLoss(), device="cpu")._job(
        DATA, 4, 1, 1, "pipebd", None, 0, 1, None, False)
    # Labels that are not numbers: torch's "too many dimensions 'str'" before.
    files = [(x, f"file_{i}.png") for i, x in enumerate(DATA)]
    with pytest.raises(TypeError, match="dataset's second fields must be numbers or tensors .* got str 'file_0.png'"):
        distiller(final_loss=pipebd.SoftTargetLoss(2.0, alpha=0.5)).fit(files, batch_size=4, steps=1, world_size=2)


def test_labels_outside_the_classes_are_refused_before_starting(no_spawn):
    teacher, student = mlp_pair(num_blocks=4, width=16)      # 10 classes
    d = pipebd.Distiller(teacher, student, final_loss=pipebd.SoftTargetLoss(2.0, alpha=0.5), device="cpu")
    labels = torch.arange(len(DATA)) % 10
    labels[17] = 10                                         # beyond the rows the probe reads
    with pytest.raises(ValueError, match=r"dataset labels must be in \[0, 10\) .* or ignore_index=-100, got \[10\]"):
        d.fit(torch.utils.data.TensorDataset(DATA, labels), batch_size=4, steps=1, world_size=2)
    labels[17] = -100
    d.fit(torch.utils.data.TensorDataset(DATA, labels), batch_size=4, steps=1)   # ignored: taken


class SequenceCrossEntropy(nn.CrossEntropyLoss):
    """A user's final loss with labels, classes in dim 1 as torch's own losses have them."""
    needs_labels = True

    def forward(self, student, teacher, labels):
        return super().forward(student, labels)


def test_a_final_loss_of_its_own_reads_its_labels_its_own_way(no_spawn):
    # Logits [N, 5, 3], labels [N, 3] in [0, 5): not the soft-target loss's [N, classes] layout.
    teacher = [nn.Linear(16, 15), nn.Unflatten(1, (5, 3))]
    student = [nn.Linear(16, 15), nn.Sequential(nn.Linear(15, 15), nn.Unflatten(1, (5, 3)))]
    labels = torch.randint(0, 5, (len(DATA), 3), generator=torch.Generator().manual_seed(0))
    d = pipebd.Distiller(teacher, student, final_loss=SequenceCrossEntropy(), device="cpu")
    d.fit(torch.utils.data.TensorDataset(DATA, labels), batch_size=4, steps=1)


def batch_statistics_net(width):
    """Uses its batch's statistics in eval mode too, so it cannot run on one sample."""
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width, track_running_stats=False))


def test_blocks_that_need_two_samples_pass_the_probe(tmp_path):
    # Before the fix: "failed on an input of shape (16,) per sample (probed with one sample):
    # Expected more than 1 value per channel when training", for a block that trains fine; the
    # teacher record of a checkpoint failed the same way.
    teacher, student = mlp_pair(num_blocks=2, width=16)
    teacher[0], student[0] = batch_statistics_net(16), batch_statistics_net(16)
    report = pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=2, checkpoint_dir=tmp_path)
    assert report.teacher_block_runs == [8, 8]
    models = [nn.Sequential(batch_statistics_net(16), nn.Linear(16, 3)) for _ in range(2)]
    labels = torch.arange(len(DATA)) % 3
    pipebd.Codistillation(models, backend="torch", device="cpu").fit(
        torch.utils.data.TensorDataset(DATA, labels), batch_size=4, steps=2, eval_data=(DATA[:5], labels[:5]))


def test_integers_of_other_types_are_taken(tmp_path):
    # numpy integers and one-element integer tensors are integers; the run is the plain-int one.
    d, want = distiller(), distiller()
    d.fit(DATA, batch_size=np.int64(4), steps=torch.tensor(3), world_size=np.int32(1), threads=np.int64(1))
    want.fit(DATA, batch_size=4, steps=3, world_size=1, threads=1)
    for a, b in zip(d.student_model().state_dict().values(), want.student_model().state_dict().values()):
        assert torch.equal(a, b)


def test_a_student_block_without_trainable_parameters_is_refused():
    teacher, student = mlp_pair(num_blocks=4)
    student[1] = nn.Tanh()
    with pytest.raises(ValueError, match=r"student block 1 \(Tanh\) has no trainable parameters"):
        pipebd.Distiller(teacher, student)
    student[1] = mlp_pair(num_blocks=4)[1][1].requires_grad_(False)
    with pytest.raises(ValueError, match="student block 1 .* has no trainable parameters"):
        pipebd.Distiller(teacher, student)


class FailsInTraining(nn.Module):
    """Wraps a block; after ``after`` training calls (on ``rank`` only, if given) it raises, ends
    the process silently, or stalls for two minutes."""

    def __init__(self, inner, after, how="raise", rank=None):
        super().__init__()
        self.inner, self.after, self.how, self.rank, self.calls = inner, after, how, rank, 0

    def forward(self, x):
        import torch.distributed as dist
        if self.training and (self.rank is None or dist.get_rank() == self.rank):
            self.calls += 1
            if self.calls > self.after:
                if self.how == "exit":
                    os._exit(3)
                if self.how == "stall":
                    time.sleep(120)
                raise RuntimeError("student block exploded on purpose")
        return self.inner(x)


def failing_distiller(how):
    teacher, student = mlp_pair(num_blocks=4, seed=0)
    student[3] = FailsInTraining(student[3], after=3, how=how)
    return pipebd.Distiller(teacher, student, device="cpu")


def test_worker_exception_reaches_the_caller_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(pipebd.WorkerError) as info:
        failing_distiller("raise").fit(DATA, batch_size=4, steps=10, world_size=2, timeout=60)
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert message.startswith("rank 1 (stage 1, replica 0) failed:")
    assert "Traceback (most recent call last)" in message
    assert "RuntimeError: student block exploded on purpose" in message
    assert info.value.rank == 1


@pytest.mark.parametrize("attempt", range(2))
def test_worker_that_dies_silently_is_reported(attempt):
    # Rank 0 reports losing its peer at about the time the death is noticed; the dead rank must
    # still come first (before, it did in about half the runs).
    start = time.monotonic()
    with pytest.raises(pipebd.WorkerError) as info:
        failing_distiller("exit").fit(DATA, batch_size=4, steps=10, world_size=2, timeout=60)
    assert time.monotonic() - start < 60
    assert str(info.value).startswith("rank 1 (stage 1, replica 0) failed:\nrank 1 exited with code 3 "
                                      "without reporting an error"), str(info.value)
    assert info.value.rank == 1


def failing_script(script):
    """Run the user's ``script``, which must fail; its completed process."""
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    return proc


def test_a_rank_failing_in_the_users_dataset_shows_the_users_file_line_and_item(tmp_path):
    # cloudpickle 3.1 names code it pickles by value "<dynamic-code>": no file, no source line.
    script = tmp_path / "train.py"
    script.write_text("import torch, pipebd\n"
                      "from pipebd.models import mlp_pair\n"
                      "class Corrupt(torch.utils.data.Dataset):\n"
                      "    def __len__(self): return 64\n"
                      "    def __getitem__(self, i):\n"
                      "        if i == 50: raise KeyError('sample 50 is corrupt')\n"
                      "        return torch.randn(16)\n"
                      "if __name__ == '__main__':\n"
                      "    teacher, student = mlp_pair(num_blocks=2)\n"
                      "    pipebd.Distiller(teacher, student, device='cpu').fit(Corrupt(), 16, 8, world_size=2,"
                      " timeout=60, progress=False)\n")
    proc = failing_script(script)
    assert f'File "{script}", line 6, in __getitem__\n' in proc.stderr, proc.stderr
    assert "if i == 50: raise KeyError('sample 50 is corrupt')" in proc.stderr
    assert "pipebd: while reading dataset item 50\n" in proc.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_samples_of_other_shapes_are_named_by_their_items():
    from pipebd.data import load_rows
    items = [torch.randn(4), torch.randn(4), torch.randn(5)]
    with pytest.raises(RuntimeError) as info:
        load_rows(items, torch.tensor([0, 2]), None, labels=False)
    assert info.value.__notes__ == ["pipebd: while batching dataset items [0, 2] (samples must collate: tensors "
                                    "of one shape and dtype, or tuples of them)"]


def test_a_script_without_a_main_guard_is_told_why(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("import torch, pipebd\n"
                      "from pipebd.models import mlp_pair\n"
                      "teacher, student = mlp_pair(num_blocks=2)\n"
                      "pipebd.Distiller(teacher, student, device='cpu').fit(torch.randn(8, 16), 4, 1, world_size=2,"
                      " timeout=60)\n")
    proc = failing_script(script)
    assert "exited with code 1 before it started" in proc.stderr
    assert 'needs `if __name__ == "__main__":`' in proc.stderr


def test_a_script_read_from_stdin_is_told_to_be_a_file(tmp_path):
    # The new processes import the caller's script again; from stdin there is none, and the hint
    # of a missing main guard (which this script has) was wrong.
    script = ("import torch, pipebd\nfrom pipebd.models import mlp_pair\nif __name__ == '__main__':\n"
              "    teacher, student = mlp_pair(num_blocks=2)\n"
              "    pipebd.Distiller(teacher, student, device='cpu').fit(torch.randn(8, 16), 4, 1, world_size=2,"
              " timeout=60)\n")
    proc = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert ("before it started; its output above says why. The script was not read from a file (<stdin>), and "
            "the new processes cannot import it again: save it to a file and run that") in proc.stderr
    assert "__main__" not in proc.stderr.split("WorkerError")[-1]


ORPHAN_SCRIPT = """
import os, sys, time
import torch, pipebd
from torch import nn
from pipebd.models import mlp_pair

def mark(kind):
    open(os.path.join(sys.argv[1], f"{kind}-{os.getpid()}"), "w").close()

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        mark("loader")
        return torch.zeros(16)

class Slow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        mark("rank")
        time.sleep(0.02)
        return self.inner(x)

if __name__ == "__main__":
    teacher, student = mlp_pair(num_blocks=2)
    pipebd.Distiller(teacher, [Slow(b) for b in student], device="cpu").fit(
        Data(), batch_size=4, steps=100_000, world_size=2, num_workers=1, timeout=60, progress=False)
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_end_when_the_caller_is_killed(tmp_path):
    # SIGKILL (or SIGTERM) of the caller skips its cleanup; the ranks and their loader processes
    # must not train on without it.
    (tmp_path / "orphan.py").write_text(ORPHAN_SCRIPT)
    caller = subprocess.Popen([sys.executable, str(tmp_path / "orphan.py"), str(tmp_path)])
    pids = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            names = [p.name for p in tmp_path.iterdir() if "-" in p.name and p.name.split("-")[1] != str(caller.pid)]
            if sum(n.startswith("rank-") for n in names) >= 2 and any(n.startswith("loader-") for n in names):
                break
            assert caller.poll() is None, "the run ended early"
            time.sleep(0.2)
        else:
            pytest.fail("the ranks did not start")
        caller.kill()
        caller.wait()
        pids = {int(p.name.split("-")[1]) for p in tmp_path.iterdir() if "-" in p.name} - {caller.pid}
        deadline = time.monotonic() + 15
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _running(pid)]
    finally:
        caller.kill()
        for pid in pids:
            if _running(pid):
                os.kill(pid, 9)


def test_a_stalled_replica_times_out_its_peers_allreduce():
    # The stage's data-parallel group must use fit's timeout, not torch's 30-minute default.
    teacher, student = mlp_pair(num_blocks=4, seed=0)
    student[3] = FailsInTraining(student[3], after=3, how="stall", rank=1)
    start = time.monotonic()
    with pytest.raises(pipebd.WorkerError, match="rank 0 .*failed") as info:
        pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=10, world_size=2,
                                                             plan=pipebd.Plan([[0, 1, 2, 3]], [2]), timeout=5)
    assert time.monotonic() - start < 60
    # The timeout is rank 0's, but the cause is the rank that never answered.
    assert "rank(s) 1 (stage 0, replica 1) had not reported 1 s after that and were stopped (if the error above " \
           "is a timeout, a stalled rank among these may be the cause)" in str(info.value)


def nan_step(row, length=30, batch=4, seed=0):
    order = BatchOrder(length, batch, seed)
    return next(t for t in range(100) if row in order.indices(t).tolist())


def test_non_finite_loss_names_stage_block_and_step():
    data = DATA.clone()
    data[5, 0] = float("nan")
    step = nan_step(5)
    with pytest.raises(pipebd.NonFiniteLoss, match=f"non-finite loss \\(nan\\) at stage 0, block 0, step {step}$"):
        distiller().fit(data, batch_size=4, steps=step + 2, world_size=1)
    # From a worker rank: the same exception type (and a WorkerError with the traceback).
    with pytest.raises(pipebd.NonFiniteLoss, match=f"non-finite loss \\(nan\\) at stage \\d, block \\d, step {step}") as info:
        distiller().fit(data, batch_size=4, steps=step + 2, world_size=2, timeout=60)
    assert isinstance(info.value, pipebd.WorkerError)
    # Stage 1 trains on stage 0's relayed NaN too, maybe first: the cause is the earliest block.
    cause = str(info.value).split("\nthen, probably as a consequence")[0]
    assert cause.startswith("rank 0 (stage 0") and f"at stage 0, block 0, step {step}" in cause, str(info.value)


def test_student_blocks_sharing_a_trainable_parameter_are_refused():
    teacher, student = mlp_pair(num_blocks=4)
    student[2] = student[1]
    with pytest.raises(ValueError, match=r"student blocks 1 and 2 share a trainable parameter \('0.weight' in "
                                         r"block 1, '0.weight' in block 2\)"):
        pipebd.Distiller(teacher, student)
    student = mlp_pair(num_blocks=4)[1]
    student[3][0].weight = student[0][0].weight   # tied weights
    with pytest.raises(ValueError, match="student blocks 0 and 3 share"):
        pipebd.Distiller(teacher, student)
    student[0][0].weight.requires_grad_(False)    # frozen, it may be shared
    pipebd.Distiller(teacher, student)


def test_a_student_block_holding_a_teacher_parameter(no_spawn):
    teacher, student = mlp_pair(num_blocks=4)
    student[0] = teacher[0]   # a forgotten copy.deepcopy
    with pytest.raises(ValueError, match=r"student block 0 \(Sequential\) has no trainable parameters but teacher "
                                         r"block 0's, which stay frozen .*copy.deepcopy\(teacher\[0\]\)"):
        pipebd.Distiller(teacher, student)
    student[0] = nn.Sequential(mlp_pair(num_blocks=4)[1][0], teacher[1])
    with pytest.raises(ValueError, match="student block 0's parameter '1.0.weight' belongs to teacher block 1"):
        pipebd.Distiller(teacher, student)
    # Its own teacher block inside a student block is frozen with the teacher; the rest trains.
    student[0] = nn.Sequential(teacher[0], nn.Linear(32, 32))
    before = [p.clone() for p in teacher[0].parameters()]
    pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=5, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher[0].parameters()))


class SequenceFirst(nn.Module):
    """[batch, 16] -> [5, batch, 16], as an nn.LSTM with batch_first=False lays it out."""

    def forward(self, x):
        return x.unsqueeze(0).expand(5, -1, -1)


def test_blocks_must_keep_the_batch_in_dim_0(no_spawn):
    teacher, student = mlp_pair(num_blocks=2)
    teacher[0], student[0] = SequenceFirst(), nn.Sequential(SequenceFirst(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"teacher block 0 returned 5 rows for an input of 2 samples: blocks must "
                                         r"keep the batch in dim 0 \(batch_first=True"):
        pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=5, steps=1, world_size=2)


def test_a_loss_without_gradient_is_named():
    d = distiller(block_loss=lambda s, t: F.mse_loss(s, t).detach())
    with pytest.raises(RuntimeError, match=r"the block_loss of block 0 returned a value that does not depend on "
                                           r"the student's output \(no gradient\): tensor\("):
        d.fit(DATA, batch_size=5, steps=1)


def test_a_final_loss_given_no_labels_is_told_how_to_get_them(no_spawn):
    data = TensorDataset(DATA, torch.zeros(30, dtype=torch.long))
    d = distiller(final_loss=lambda s, t, labels: F.mse_loss(s, t))
    with pytest.raises(TypeError, match=r"final_loss failed on \(student logits, teacher logits\): .*missing 1 "
                                        r"required positional argument: 'labels'. .* needs_labels = True"):
        d.fit(data, batch_size=5, steps=1, world_size=2)


def test_a_block_that_cannot_be_pickled_is_named_before_any_rank_starts(monkeypatch):
    teacher, student = mlp_pair(num_blocks=4)
    student[2] = nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))
    monkeypatch.setattr(pipebd.runtime.launch, "_context", lambda: pytest.fail("a process was started"))
    with pytest.raises(TypeError, match=r"(?s)student block 2 cannot be sent to the spawned ranks \(RuntimeError: "
                                        r"Serialization of parametrized modules .*\); run it with world_size=1, "
                                        r"or start the ranks with torchrun"):
        pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=5, steps=1, world_size=2)


@pytest.mark.parametrize("options", [{"plan": "auto"}, {"checkpoint_dir": "ckpt"}])
def test_a_block_that_cannot_be_pickled_is_named_before_profiling_or_checkpoints(monkeypatch, tmp_path, options):
    teacher, student = mlp_pair(num_blocks=4)
    student[1] = nn.utils.parametrizations.weight_norm(nn.Linear(32, 32))
    monkeypatch.setattr(pipebd.Distiller, "_profile", lambda *a, **k: pytest.fail("profiled"))
    options = {k: tmp_path / v if k == "checkpoint_dir" else v for k, v in options.items()}
    with pytest.raises(TypeError, match=r"student block 1 cannot be sent to the spawned ranks \(RuntimeError: "):
        pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=5, steps=1, world_size=2, **options)
    assert not (tmp_path / "ckpt").exists()


def test_each_rank_takes_a_gpu_of_its_own(monkeypatch):
    # With more ranks on a node than GPUs, ranks shared one (local rank modulo the count), which
    # NCCL refuses with "Duplicate GPU detected". Emulated: two GPUs, torchrun's environment.
    from pipebd.runtime.launch import own_gpu
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert own_gpu(5) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"local rank 2 has no GPU of its own: 2 visible .* at most 2 ranks per node"):
        own_gpu(6)
    monkeypatch.delenv("LOCAL_RANK")      # a launcher that sets RANK and WORLD_SIZE only: in order per node
    assert own_gpu(9) == torch.device("cuda", 1)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert own_gpu(0) == torch.device("cuda", 0)   # spawned ranks: their rank
    with pytest.raises(ValueError, match="local rank 3 has no GPU"):
        own_gpu(3)
    assert len(current) == 3


def test_a_process_group_that_cannot_carry_cuda_tensors_is_refused(tmp_path):
    # A script's own gloo group with device="cuda": the relay would send CUDA tensors over gloo.
    import torch.distributed as dist
    from pipebd.runtime.launch import init_spmd
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        init_spmd("cpu", 60)
        with pytest.raises(ValueError, match=r"device 'cuda:1' needs the NCCL backend, but the script's process "
                                             r"group uses 'gloo'"):
            init_spmd("cuda:1", 60)
    finally:
        dist.destroy_process_group()


def test_a_scheduler_whose_step_needs_a_metric_is_refused_before_starting(no_spawn):
    # ReduceLROnPlateau.step(metrics) failed in the ranks after they had started and trained a step.
    plateau = distiller(scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    with pytest.raises(TypeError, match=r"scheduler: ReduceLROnPlateau.step\(\) needs metrics, but pipebd steps"):
        plateau.fit(DATA, batch_size=4, steps=2, world_size=2)
    co = pipebd.Codistillation(lambda i: nn.Linear(16, 3), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                               scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o), device="cpu")
    with pytest.raises(TypeError, match="ReduceLROnPlateau.step"):
        co.fit(TensorDataset(DATA, torch.zeros(30, dtype=torch.long)), batch_size=4, steps=2, world_size=2)


def test_an_optimizer_factory_may_read_its_parameters_twice_and_one_that_leaves_some_out_is_told(caplog):
    # Parameter groups built by two passes over the parameters: a generator left the second
    # group empty, so the biases never trained, silently.
    def grouped(params):
        return torch.optim.SGD([{"params": [p for p in params if p.dim() > 1], "weight_decay": 1e-4},
                                {"params": [p for p in params if p.dim() == 1]}], lr=0.1)

    d = distiller(optimizer=grouped)
    before = [b.bias.detach().clone() for b in d.student[0].modules() if isinstance(b, nn.Linear)]
    with caplog.at_level("WARNING", logger="pipebd"):
        d.fit(DATA, batch_size=4, steps=2)
    after = [b.bias.detach() for b in d.student[0].modules() if isinstance(b, nn.Linear)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after)) and "leaves out" not in caplog.text
    # One that leaves the biases out on purpose or not: named, before anything runs.
    weights_only = distiller(optimizer=lambda params: torch.optim.SGD([p for p in params if p.dim() > 1], lr=0.1))
    with caplog.at_level("WARNING", logger="pipebd"):
        weights_only._job(DATA, 4, 2, 1, "pipebd", None, 0, 1, None, False)
    assert "the optimizer of student block 0 leaves out trainable parameters, which will not change: " in caplog.text
    assert "Freeze them with requires_grad_(False)" in caplog.text
    # A factory that can only build in the ranks (ZeroRedundancyOptimizer needs their process
    # group) is not checked in the caller, rather than refused there.
    def ranks_only(params):
        if not torch.distributed.is_initialized():
            raise RuntimeError("Default process group has not been initialized")
        return torch.optim.SGD(params, lr=0.1)
    distiller(optimizer=ranks_only)._job(DATA, 4, 2, 2, "pipebd", None, 0, 1, None, False)


def test_a_block_in_another_dtype_and_dict_items_are_told_what_to_do(no_spawn):
    teacher, student = mlp_pair(num_blocks=2)
    student[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"student block 1 failed .* The block's parameters are torch.bfloat16: .* "
                                         r"casts its input itself"):
        pipebd.Distiller(teacher, student, device="cpu").fit(torch.randn(8, 16), 4, 1)
    with pytest.raises(TypeError, match=r"got dict: wrap the dataset so that its items are \(x, y\) pairs"):
        distiller().fit([{"input": torch.randn(16)}] * 4, 2, 1)
