"""Properties of the teacher relay beyond equal weights: who touches the data, no_grad teacher,
bounded run-ahead, and the report and trace built from the recorded spans."""

import dataclasses
import json
import os
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import pipebd
from pipebd.models import mlp_pair

DATA = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))


class LoggedDataset(Dataset):
    """Appends the reading process's pid to a file on every item access."""

    def __init__(self, path):
        self.path = path

    def __len__(self):
        return len(DATA)

    def __getitem__(self, i):
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return DATA[i]


def test_only_stage_zero_reads_the_dataset(tmp_path):
    log = tmp_path / "reads"
    teacher, student = mlp_pair(num_blocks=4)
    plan = pipebd.Plan([[0, 1], [2], [3]], [2, 1, 1])
    pipebd.Distiller(teacher, student, device="cpu").fit(LoggedDataset(str(log)), batch_size=6, steps=5,
                                                         world_size=4, plan=plan, timeout=60)
    pids = log.read_text().split()
    readers = set(pids) - {str(os.getpid())}  # the caller reads two samples to probe shapes
    assert len(readers) == 2  # the two replicas of stage 0
    assert len(pids) - pids.count(str(os.getpid())) == 5 * 6  # each sample of each batch once


class AssertsNoGrad(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        assert not torch.is_grad_enabled(), "teacher ran with autograd on"
        return self.inner(x)


@pytest.mark.parametrize("strategy", ["pipebd", "baseline"])
def test_teacher_runs_without_autograd(strategy):
    teacher, student = mlp_pair(num_blocks=4)
    teacher = [AssertsNoGrad(b) for b in teacher]
    report = pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=3, world_size=2,
                                                                  strategy=strategy, timeout=60)
    assert report.teacher_block_runs[-1] == 12


class Slow(nn.Module):
    def __init__(self, inner, seconds):
        super().__init__()
        self.inner, self.seconds = inner, seconds

    def forward(self, x):
        if self.training:
            time.sleep(self.seconds)
        return self.inner(x)


@pytest.mark.parametrize("max_inflight", [1, 3])
def test_a_stage_runs_at_most_max_inflight_plus_one_batches_ahead(max_inflight):
    teacher, student = mlp_pair(num_blocks=2)
    student[1] = Slow(student[1], 0.06)
    steps = 12
    report = pipebd.Distiller(teacher, student, device="cpu").fit(
        DATA, batch_size=4, steps=steps, world_size=2, max_inflight=max_inflight, timeout=60)
    (_, first), (_, second) = report.tracks
    teacher_start = {s.step: s.start for s in first if s.kind == "teacher"}
    received = {s.step: s.end for s in second if s.kind == "recv-wait"}
    ahead = max_inflight + 1
    # Both ranks' clocks start at the same barrier; allow 30 ms (half a slow step) for the skew
    # of leaving it.
    for t in range(ahead + 1, steps):
        assert teacher_start[t] >= received[t - ahead - 1] - 0.03, (t, teacher_start[t], received[t - ahead - 1])
    # ...and the bound is what limits the fast stage: it does get that far ahead.
    assert any(teacher_start[t] < received[t - ahead] for t in range(ahead, steps))


class Send:
    """A send's work handle as NCCL gives it: ``wait`` returns at once (it orders CUDA streams);
    the transfer completes ``polls`` queries later (never with None)."""

    def __init__(self, polls):
        self.polls, self.waited = polls, False

    def wait(self):
        self.waited = True

    def is_completed(self):
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0


def test_cuda_sends_are_drained_on_the_host():
    # The in-flight bound above rests on waiting for old sends; on CUDA the host must poll
    # until they complete, or it runs ahead holding ever more activations.
    from pipebd.runtime.relay import _drain
    sends = [Send(3), Send(0)]
    _drain(sends, torch.device("cuda"), timeout=5)
    assert all(s.waited for s in sends) and sends[0].polls < 0

    class Failed(Send):
        def wait(self):   # as NCCL's: a completed send that failed raises when waited for
            if self.polls is not None and self.polls < 0:
                raise RuntimeError("send failed")
    with pytest.raises(RuntimeError, match="send failed"):
        _drain([Failed(1)], torch.device("cuda"), timeout=5)
    with pytest.raises(TimeoutError, match="did not complete within 0.05 s"):
        _drain([Send(None)], torch.device("cuda"), timeout=0.05)
    idle = Send(None)
    _drain([idle], torch.device("cpu"), timeout=0.05)   # gloo's wait has already blocked
    assert idle.waited


def test_report_and_trace(tmp_path):
    teacher, student = mlp_pair(num_blocks=4)
    plan = pipebd.Plan([[0], [1, 2, 3]], [1, 2])
    report = pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=6, steps=8, world_size=3,
                                                                  plan=plan, timeout=60)
    assert report.samples_per_s == pytest.approx(8 * 6 / report.wall_s)
    assert len(report.stage_utilization) == 2
    for st in report.stages:
        assert 0 < st.utilization <= 1 and 0 <= st.idle <= 1
        assert st.utilization + st.communication + st.waiting <= 1 + 1e-9
    assert report.stages[1].communication > 0  # the replicated stage allreduces its gradients
    text = str(report)
    assert "samples/s" in text and "[1-3]x2" in text and "teacher block runs: [48, 48, 48, 48]" in text
    assert " idle: the plan uses" not in text       # a plan that leaves ranks out says so
    assert "rank 3 idle: the plan uses 3 of 4" in str(dataclasses.replace(report, world_size=4))
    assert "ranks 3-4 idle: the plan uses 3 of 5" in str(dataclasses.replace(report, world_size=5))
    # The devices' fractions, from the spans themselves: compute and communication, the rest bubble.
    from pipebd.trace import COMMUNICATION, COMPUTE
    timed = lambda kinds: sum(sp.end - sp.start for _, spans in report.tracks for sp in spans if sp.kind in kinds)
    assert report.compute_fraction == pytest.approx(timed(COMPUTE) / (3 * report.wall_s), rel=1e-9)
    assert report.communication_fraction == pytest.approx(timed(COMMUNICATION) / (3 * report.wall_s), rel=1e-9)
    assert report.bubble_fraction == pytest.approx(sum(len(st.ranks) * st.bubble for st in report.stages) / 3)
    assert dataclasses.replace(report, world_size=4).bubble_fraction == pytest.approx((3 * report.bubble_fraction + 1) / 4)
    assert f"{report.bubble_fraction:.1%} bubble" in text

    path = tmp_path / "trace.json"
    report.save_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"rank 0 (stage 0, replica 0)", "rank 1 (stage 1, replica 0)", "rank 2 (stage 1, replica 1)"}
    assert sorted(e["pid"] for e in events if e["name"] == "thread_name") == [0, 1, 2]   # no unnamed row
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["cat"] for e in spans} >= {"data", "teacher", "student", "step", "recv-wait", "allreduce", "send",
                                         "recv"}
    # The last stage sends nothing, so it never waits on a send.
    assert not [e for e in spans if e["cat"] == "send-wait" and e["pid"] > 0]
    teacher_spans = [e for e in spans if e["cat"] == "teacher"]
    assert len(teacher_spans) == 8 * 1 + 2 * 8 * 3  # rank 0: block 0; ranks 1 and 2: blocks 1-3
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


class ReadsTheEnvironment(nn.Module):
    """The identity, in a rank whose environment is the caller's at the fit."""

    def forward(self, x):
        seen = os.environ.get("PIPEBD_TEST_SET"), os.environ.get("PIPEBD_TEST_UNSET")
        if seen != ("after", None):
            raise RuntimeError(f"the rank's environment holds {seen}")
        return x


def test_spawned_ranks_get_the_callers_environment_at_each_fit(monkeypatch):
    # The fork server's children inherit its environment, the caller's when the server started
    # (the session's first fit): a CUDA_VISIBLE_DEVICES or NCCL_* set later did not reach the ranks.
    monkeypatch.setenv("PIPEBD_TEST_UNSET", "before")
    teacher, student = mlp_pair(num_blocks=2)
    pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=1, world_size=2, timeout=60)
    monkeypatch.delenv("PIPEBD_TEST_UNSET")
    monkeypatch.setenv("PIPEBD_TEST_SET", "after")
    teacher = [nn.Sequential(ReadsTheEnvironment(), block) for block in teacher]
    pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=1, world_size=2, timeout=60)


def test_a_fit_in_the_callers_process_leaves_its_thread_count():
    from test_codistill import dataset, initial_models
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        teacher, student = mlp_pair(num_blocks=2)
        pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=2, threads=1)
        assert torch.get_num_threads() == 3
        pipebd.Codistillation(initial_models(2), backend="torch", device="cpu").fit(dataset(), batch_size=4,
                                                                                   steps=2, threads=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_fit_in_the_callers_process_gives_the_blocks_back_as_they_came():
    # As with spawned workers, which train copies: one rank (and torchrun, test_torchrun.py)
    # trains the caller's own blocks, then restores their modes and requires_grad.
    teacher, student = mlp_pair(num_blocks=2)
    teacher[1].requires_grad_(False)
    teacher[0][1].eval()                   # a submodule in another mode than its block
    student[0].eval()
    student[1][1].eval()
    student[1][0].weight.requires_grad_(False)

    def modes():
        return ([m.training for b in teacher + student for m in b.modules()],
                [p.requires_grad for b in teacher + student for p in b.parameters()])

    given, weights = modes(), [p.clone() for p in student[0].parameters()]
    pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=2)
    assert modes() == given
    assert not all(torch.equal(a, b) for a, b in zip(weights, student[0].parameters()))   # trained, in place

    from test_codistill import dataset, initial_models
    models = initial_models(2)
    models[1].eval()
    weights = [p.clone() for p in models[1].parameters()]
    pipebd.Codistillation(models, backend="torch", device="cpu").fit(dataset(), batch_size=4, steps=2)
    assert all(m.training for m in models[0].modules()) and not any(m.training for m in models[1].modules())
    assert not all(torch.equal(a, b) for a, b in zip(weights, models[1].parameters()))


def _clock_after_a_late_start(rank, world_size):
    import torch.distributed as dist
    from pipebd.trace import Recorder
    if rank == 1:
        time.sleep(0.3)            # leaves the start well after rank 0
    recorder = Recorder()
    recorder.restart()
    recorder.align()
    dist.barrier()
    with recorder.span("step", 0):
        pass
    now: list = [None] * world_size
    dist.all_gather_object(now, (recorder.spans[0].start, recorder.elapsed))
    return now


def test_ranks_share_one_clock():
    """After ``align`` spans recorded at the same moment (after a barrier) are at the same time,
    however far apart the ranks started; without it rank 1, 0.3 s late, would be 0.3 s early.
    The axis starts when the late rank arrives, not 0.3 s of nothing before. Each rank's elapsed
    time stays its own, from after the exchange."""
    from pipebd.runtime.launch import spawn_tasks
    (at0, elapsed0), (at1, elapsed1) = spawn_tasks([_clock_after_a_late_start] * 2, "gloo", timeout_s=60)
    assert at0 < 0.1 and abs(at0 - at1) < 0.05, (at0, at1)
    assert elapsed0 < 0.1 and elapsed1 < 0.1


def test_an_activation_is_received_after_it_is_computed():
    teacher, student = mlp_pair(num_blocks=2)
    report = pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=6, world_size=2,
                                                                  timeout=60)
    (_, first), (_, second) = report.tracks
    computed = {s.step: s.end for s in first if s.kind == "teacher"}
    received = {s.step: s.end for s in second if s.kind == "recv-wait"}
    assert all(received[t] >= computed[t] - 1e-3 for t in range(6)), (computed, received)


def test_shutting_down_loader_processes_is_not_run_time(monkeypatch):
    from pipebd.runtime.worker import RankRuntime
    close = RankRuntime.close

    def slow_close(self):
        time.sleep(0.5)
        close(self)

    monkeypatch.setattr(RankRuntime, "close", slow_close)
    teacher, student = mlp_pair(num_blocks=2)
    report = pipebd.Distiller(teacher, student, device="cpu").fit(DATA, batch_size=4, steps=3, num_workers=1)
    last = max(s.end for _, track in report.tracks for s in track)
    assert report.wall_s < last + 0.25, (report.wall_s, last)


def test_spans_are_torch_profiler_ranges_while_a_profiler_runs():
    from torch.profiler import ProfilerActivity, profile
    teacher, student = mlp_pair(num_blocks=2)
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        report = distiller.fit(DATA, batch_size=4, steps=2)
    names = {e.key for e in prof.key_averages()}
    assert {"pipebd/data", "pipebd/teacher[0]", "pipebd/student[1]", "pipebd/step"} <= names
    # ...and the spans are recorded all the same, with or without one.
    assert [s.kind for _, track in report.tracks for s in track] == \
        [s.kind for _, track in distiller.fit(DATA, batch_size=4, steps=2).tracks for s in track]
