"""The profiler measures what the blocks really cost, caches it, and fits the comm models.

Emulated blocks sleep a known ``a + b * rows`` seconds, so their measured cost has a reference:
a sleep never ends early, and a call's overhead on top of it is well under 3 ms here.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

import pipebd
from pipebd import profiler
from pipebd.models import EmulatedBlock, emulated_pair
from pipebd.models.emulated import EmulatedProfile
from pipebd.profiler import Profile, replica_rows

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # spawned ranks cannot import this file

A, B_ROW = 2e-3, 2e-4          # 2 ms per call + 0.2 ms per row
NO_COMM = ([(4096, 1e-4), (1 << 20, 1e-3)], [(2, 4096, 2e-4), (2, 1 << 20, 2e-3)])


def emulated(blocks=2):
    torch.manual_seed(0)
    teacher = [EmulatedBlock(4, A, B_ROW) for _ in range(blocks)]
    student = [EmulatedBlock(4, A / 2, B_ROW / 2) for _ in range(blocks)]
    return pipebd.Distiller(teacher, student, device="cpu")


def job(distiller, batch=8, world=3):
    return distiller._job(torch.randn(16, 4), batch, 1, world, "pipebd", None, 0, 1, None, False)


def test_replica_rows():
    assert replica_rows(8, 3) == [3, 4, 8]
    assert replica_rows(7, 4) == [2, 3, 4, 7]
    assert replica_rows(2, 5) == [1, 2]          # never more replicas than rows


def test_measures_emulated_costs():
    distiller = emulated()
    before = [p.detach().clone() for b in distiller.student for p in b.parameters()]
    profile = profiler.profile_job(job(distiller), 3, warmup=1, repeats=3, comm=lambda: NO_COMM)
    assert profile.rows == [3, 4, 8]
    for b in range(2):
        for i, rows in enumerate(profile.rows):
            assert A + B_ROW * rows <= profile.teacher[b][i] <= A + B_ROW * rows + 3e-3
            assert (A + B_ROW * rows) / 2 <= profile.student[b][i] <= (A + B_ROW * rows) / 2 + 3e-3
    assert profile.act_bytes == [16, 16, 16]                 # 4 float32 features per sample
    assert profile.grad_bytes == [(16 + 4) * 4] * 2          # 4x4 weight + 4 bias
    after = [p.detach() for b in distiller.student for p in b.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "profiling must train copies only"
    text = str(profile)
    assert "teacher ms" in text and "p2p" in text and "allreduce" in text and "median of 3 after 1 warm-up" in text
    assert "one run after 2 warm-up" in str(dataclasses.replace(profile, repeats=1, warmup=2))
    assert len([line for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 6


def test_cache_hit_miss_and_corrupt_file(monkeypatch):
    distiller = emulated()
    first = profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    calls = []
    real = profiler._measure_compute
    monkeypatch.setattr(profiler, "_measure_compute", lambda *a: calls.append(a) or real(*a))
    again = profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    assert calls == [] and again == first
    profiler.profile_job(job(distiller, batch=6), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    assert len(calls) == 1                                    # another batch size is another profile
    for path in __import__("glob").glob(profiler.cache_dir() + "/profile-*.json"):
        with open(path, "w") as f:
            f.write("{not json")
    profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    assert len(calls) == 2                                    # unreadable cache: measured again
    for path in __import__("glob").glob(profiler.cache_dir() + "/profile-*.json"):
        try:
            data = json.loads(open(path).read())
        except ValueError:
            continue                                          # the batch-6 entry, still cut
        data["teacher"][0][0] = float("nan")
        with open(path, "w") as f:
            f.write(json.dumps(data))
    profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    assert len(calls) == 3                                    # readable but not a profile: measured again
    profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM, cache=False)
    assert len(calls) == 4


def test_transfer_timings_that_cannot_be_costs_are_measured_again_then_said(caplog):
    noisy = ([(4096, 2e-3), (4 << 20, 1.8e-3)], NO_COMM[1])          # 4 MiB no slower than 4 KiB
    for answers, warned in (([noisy, NO_COMM], False), ([noisy, noisy], True)):
        answers = list(answers)
        distiller = emulated(blocks=3 if warned else 1)               # a cache entry of its own
        with caplog.at_level("WARNING", logger="pipebd"):
            caplog.clear()
            profile = profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: answers.pop(0))
        assert answers == [] and profile.p2p == (noisy if warned else NO_COMM)[0]
        assert ("measured twice; the machine may be busy" in caplog.text) == warned
        # Cached either way: a busy machine must not cost every later plan a whole profile.
        again = profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: pytest.fail("measured"))
        assert again == profile


def test_a_cache_that_cannot_be_written_is_warned_about(monkeypatch, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PIPEBD_CACHE_DIR", str(tmp_path / "file"))      # not a directory
    with caplog.at_level("WARNING", logger="pipebd"):
        got = profiler.profile_job(job(emulated()), 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
    assert got.num_blocks == 2
    assert any("profile was not cached" in r.message and "PIPEBD_CACHE_DIR" in r.message for r in caplog.records)


def test_block_cost_is_part_of_the_cache_key():
    cheap, dear = emulated(), emulated()
    dear.teacher[0] = EmulatedBlock(4, 2 * A, B_ROW)
    assert profiler._cache_key(job(cheap), 3, 0, 1) != profiler._cache_key(job(dear), 3, 0, 1)


class Repeat(nn.Module):
    """Applies one Linear ``reps`` times: the cost grows with ``reps``, the repr and parameters do not."""

    def __init__(self, reps):
        super().__init__()
        self.reps, self.linear = reps, nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(self.reps):
            x = self.linear(x)
        return x


BLOCK_SOURCE = """from torch import nn
class Block(nn.Linear):
    def forward(self, x):
        return super().forward(x){extra}
"""


def test_what_the_repr_hides_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """A block whose cost is set by a plain attribute, or by code edited between runs, and a loss
    given as a lambda are measured again, not read from the entry of the block as it was."""
    import importlib
    d = emulated()
    key = lambda j: profiler._cache_key(j, 3, 0, 1)
    once, often = job(d), job(d)
    once.teacher[0], often.teacher[0] = Repeat(1), Repeat(400)
    assert repr(once.teacher[0]) == repr(often.teacher[0]) and key(once) != key(often)
    mse, l1 = dataclasses.replace(job(d), block_loss=lambda s, t: (s - t).pow(2).mean()), \
        dataclasses.replace(job(d), block_loss=lambda s, t: (s - t).abs().mean())
    assert key(mse) != key(l1)
    monkeypatch.syspath_prepend(str(tmp_path))
    keys = []
    for extra in ("", " * 2"):      # the user edits forward and runs again
        (tmp_path / "edited_block.py").write_text(BLOCK_SOURCE.format(extra=extra))
        sys.modules.pop("edited_block", None)
        importlib.invalidate_caches()
        edited = job(d)
        edited.student[0] = importlib.import_module("edited_block").Block(4, 4)
        keys.append(key(edited))
        profiler._class_source_hash.cache_clear()       # a new run is a new process
    assert keys[0] != keys[1]
    # Edited into invalid Python while the old module still runs: the key falls back to the name.
    (tmp_path / "edited_block.py").write_text(BLOCK_SOURCE.format(extra=" *"))
    assert key(edited) not in keys
    assert key(job(d)) == key(job(d))             # and the same blocks hit the same entry
    # A partial's arguments set what the loss computes.
    half, double = (dataclasses.replace(job(d), block_loss=functools.partial(scaled_mse, scale=s)) for s in (0.5, 2))
    assert key(half) != key(double) and key(half) == key(dataclasses.replace(half))
    weights = [dataclasses.replace(job(d), block_loss=functools.partial(scaled_mse, scale=torch.full((2,), w)))
               for w in (1.0, 1.0, 3.0)]     # a tensor by its values, not its address
    assert key(weights[0]) == key(weights[1]) != key(weights[2])


def scaled_mse(s, t, scale):
    return scale * (s - t).pow(2).mean()


class Settings(nn.Module):
    """The identity, holding ``setting`` where the key may find it."""

    def __init__(self, setting):
        super().__init__()
        self.setting = setting

    def forward(self, x):
        return x


def test_settings_in_containers_dtypes_threads_and_not_the_learning_rate_key_the_cache(monkeypatch):
    # A repeat count in a list, a dtype, an enum: the cache gave such blocks the profile of the
    # first setting. The threads the blocks run with when fit leaves them alone, too; the
    # learning rate and a teacher frozen by its caller change no cost (they measured again).
    import enum
    d = emulated()
    key = lambda j: profiler._cache_key(j, 3, 0, 1)

    def with_setting(setting):
        j = job(d)
        j.teacher[0] = Settings(setting)
        return key(j)

    class Mode(enum.Enum):
        FAST, SLOW = 1, 2

    pairs = [([1], [50]), ((1, (2,)), (1, (3,))), ({"reps": 1}, {"reps": 2}), ({1, 2}, {1, 3}),
             (torch.float32, torch.float64), (Mode.FAST, Mode.SLOW), (torch.device("cpu"), torch.device("meta")),
             (list(range(2000)), list(range(2001)))]
    for a, b in pairs:
        assert with_setting(a) != with_setting(b), (a, b)
    assert with_setting([1, {"a": (2, 3)}]) == with_setting([1, {"a": (2, 3)}])
    assert with_setting({3, 1, 2}) == with_setting({1, 2, 3}) and with_setting({"a": 1, "b": 2}) == with_setting({"b": 2, "a": 1})
    assert with_setting([torch.zeros(1)]) == with_setting([torch.ones(1)])   # tensors: weights, not settings
    assert with_setting(list(range(2000))) == with_setting(list(range(1, 2001)))   # long: by length alone
    assert with_setting(list(range(100))) == with_setting(list(range(1, 101)))   # a Subset's random indices
    looped = [1]
    looped.append(looped)
    assert with_setting(looped) == with_setting(looped)           # a list that holds itself: no recursion error
    assert len(with_setting([[0.5] * 60] * 60)) < 20_000          # nested: a bounded key
    as_they_are = dataclasses.replace(job(d), threads=None)   # torchrun, one rank
    before, spawned = key(as_they_are), key(job(d))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert key(as_they_are) != before and key(job(d)) == spawned   # spawned ranks: threads set
    monkeypatch.undo()
    assert key(as_they_are) == before
    before = key(job(d))
    lr = [dataclasses.replace(job(d), optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=m))
          for lr, m in ((0.1, 0.9), (0.5, 0.9), (0.1, 0.0))]
    assert key(lr[0]) == key(lr[1]) != key(lr[2])
    frozen = job(d)
    frozen.teacher[1].requires_grad_(False)
    assert key(frozen) == before


def test_measure_comm_on_two_gloo_ranks():
    p2p, allreduce = profiler.measure_comm(2, "cpu", repeats=3)
    assert [n for n, _ in p2p] == list(profiler.P2P_SIZES)
    assert [(k, n) for k, n, _ in allreduce] == [(2, n) for n in profiler.ALLREDUCE_SIZES]
    assert all(t > 0 for *_, t in p2p + allreduce)


def fake(p2p=(), allreduce=()):
    return Profile(1, 8, 4, "cpu", "gloo", [2, 8], [[1.0, 4.0]], [[0.5, 2.0]], [0.0, 0.0], [4, 4], [400],
                   list(p2p), list(allreduce))


@pytest.mark.parametrize("field, value, message", [
    ("teacher", [[float("nan"), 4.0]], "teacher needs 2 finite seconds"),
    ("student", [[-0.5, 2.0]], "student needs 2 finite seconds"),
    ("student", [[0.5, 2.0], [0.5, 2.0]], "student has 2 blocks, not num_blocks=1"),
    ("rows", [8, 2], "rows must be ascending"),
    ("num_workers", -2, "num_workers must be an integer >= 0"),
    ("world_size", 0, "world_size must be an integer >= 1"),
    ("grad_bytes", [], "grad_bytes needs 1 byte counts"),
    ("format", 3, r"not a profile of this pipebd version: unknown fields \['format'\]"),
])
def test_a_profile_file_that_does_not_hold_up_is_refused(tmp_path, field, value, message):
    # An edited, cut or foreign file; from the cache it is measured again (test_cache_...).
    path = tmp_path / "profile.json"
    fake().save(str(path))
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        Profile.load_file(str(path))


def test_comm_fits_recover_latency_and_bandwidth():
    lat, per_byte = 5e-5, 1e-9
    p = fake(p2p=[(n, lat + n * per_byte) for n in (4096, 1 << 22)],
             allreduce=[(k, n, 2 * (k - 1) * lat + 2 * (k - 1) / k * n * per_byte) for k in (2, 8) for n in (4096, 1 << 20)])
    assert p.p2p_fit == pytest.approx((lat, per_byte), rel=1e-6)
    assert p.allreduce_fit == pytest.approx((lat, per_byte), rel=1e-6)
    assert p.allreduce_time(4, 1000) == pytest.approx(6 * lat + 1.5 * 1000 * per_byte)
    assert p.allreduce_time(1, 1000) == 0 and p.p2p_time(0) == 0
    # A student block without trainable parameters starts no allreduce in the runtime.
    assert p.allreduce_time(4, 0) == 0 and list(p.allreduce_time([1, 2, 4], [0, 0, 8])) == [0, 0, p.allreduce_time(4, 8)]


def test_interpolation_between_and_beyond_measured_rows():
    p = fake()                      # teacher: 1.0 at 2 rows, 4.0 at 8 rows (0.5 per row + 0)
    assert p.teacher_time(0, 2) == 1.0 and p.teacher_time(0, 8) == 4.0
    assert p.teacher_time(0, 4) == pytest.approx(2.0)
    assert p.teacher_time(0, 16) == pytest.approx(8.0)               # extended linearly
    assert p.teacher_time(0, 1) == pytest.approx(0.5)                # never below proportional


def test_profile_round_trips_through_json(tmp_path):
    p = fake(p2p=[(4096, 1e-4), (1 << 20, 1e-3)])
    p.save(str(tmp_path / "p.json"))
    assert Profile.load_file(str(tmp_path / "p.json")) == p


def test_linear_costs_fit_each_block():
    rows = [3, 4, 8]
    line = lambda a, b: [a + b * r for r in rows]
    p = Profile(2, 8, 3, "cpu", "gloo", rows, [line(2e-3, 1e-4), line(0.0, 5e-4)],
                [line(1e-3, 0.0), [1.0, 1.0, 1.0]], [0.0] * 3, [4, 4, 4], [16, 16])
    teacher, student = p.linear_costs()
    flat = lambda costs: [x for cost in costs for x in cost]
    assert flat(teacher) == pytest.approx([2e-3, 1e-4, 0.0, 5e-4], abs=1e-12)
    assert flat(student) == pytest.approx([1e-3, 0.0, 1.0, 0.0], abs=1e-12)
    noisy = dataclasses.replace(p, teacher=[[1.0, 0.0, 1.0]] * 2)    # a falling line is clipped at b = 0
    assert all(a >= 0 and b >= 0 for a, b in noisy.linear_costs()[0])


def test_emulated_profile_from_measurement_round_trips_and_drives_emulated_pair(tmp_path):
    distiller = emulated()
    measured = distiller.profile(torch.randn(16, 4), 8, 3, warmup=1, repeats=3, comm=False)
    assert measured.p2p == [] and measured.allreduce == []        # one process, nothing spawned
    fitted = EmulatedProfile.from_measured(measured)
    assert fitted.batch_size == 8 and len(fitted.teacher) == len(fitted.student) == 2
    for cost in fitted.teacher:
        rows, times = zip(*cost.curve)
        assert rows == (3, 4, 8)
        for r, t in cost.curve:        # the sleep, plus host time per call (under 1.2 ms here, even in CI)
            assert A + B_ROW * r <= t <= A + B_ROW * r + 3e-3
        # the line is the least-squares fit of those points (closed form); its slope is not
        # checked against B_ROW: 1 ms of load on one point moves it by half of B_ROW
        mean_r, mean_t = sum(rows) / 3, sum(times) / 3
        b = sum((r - mean_r) * (t - mean_t) for r, t in cost.curve) / sum((r - mean_r) ** 2 for r in rows)
        line = (mean_t - b * mean_r, b) if b >= 0 else (mean_t, 0.0)   # a falling line is clipped
        assert line[0] > 0 and (cost.a, cost.b) == pytest.approx(line, rel=1e-9, abs=1e-12)
    path = str(tmp_path / "gpu.json")
    fitted.save(path, measured, device="test")
    assert EmulatedProfile.load(path) == fitted
    teacher, student = emulated_pair(path, scale=2.0)
    # an emulated block sleeps the measured seconds (times scale) at each measured batch size,
    # and lines between them (the profiler's interpolation)
    for blocks, times in ((teacher, measured.teacher), (student, measured.student)):
        for block, measured_times in zip(blocks, times):
            assert [block.cost.at(r) for r in measured.rows] == pytest.approx([2 * t for t in measured_times], rel=1e-12)
            assert block.cost.at(6) == pytest.approx(block.cost.at(4) + (block.cost.at(8) - block.cost.at(4)) / 2)
    assert "curve=[(3, " in repr(teacher[0])          # part of the profiler's cache key
    with pytest.raises(ValueError, match="curve rows must be increasing"):
        EmulatedBlock(4, 0.0, 0.0, [(4, 1e-3), (3, 2e-3)])
    unsorted = json.loads(open(path).read())
    unsorted["teacher"][0][2].reverse()
    (tmp_path / "unsorted.json").write_text(json.dumps(unsorted))
    with pytest.raises(ValueError, match="unsorted.json: cannot read an emulated profile: curve rows must be increasing"):
        EmulatedProfile.load(str(tmp_path / "unsorted.json"))
    with pytest.raises(ValueError, match="does not exist"):
        emulated_pair(str(tmp_path / "missing.json"))
    negative = json.loads(open(path).read())
    negative["student"][1][2][0][1] = -1.0           # a measured time
    (tmp_path / "negative.json").write_text(json.dumps(negative))
    with pytest.raises(ValueError, match="negative.json: cannot read an emulated profile: emulated costs must be finite"):
        emulated_pair(str(tmp_path / "negative.json"))
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="bad.json: cannot read an emulated profile"):
        emulated_pair(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="profile must be one of"):
        emulated_pair("lopsided")
    with pytest.raises(TypeError, match="comm must be True or False"):
        distiller.profile(torch.randn(16, 4), 8, 3, comm="no")


def test_gpu_profile_script_runs_on_cpu(tmp_path):
    # bench/gpu_profile.py is for a GPU; on CPU with a tiny pair it checks the script end to end.
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_profile.py"
    out = tmp_path / "cpu.json"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--threads", "1", "--width", "4",
                          "--depth", "1", "--batch-size", "8", "--world-size", "2", "--warmup", "0",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "worst straight-line fit error" in run.stdout
    fitted = EmulatedProfile.load(str(out))
    assert len(fitted.teacher) == 6 and fitted.batch_size == 8
    assert json.loads(out.read_text())["measured"]["rows"] == [4, 8]
    # one batch size cannot fit a line; two measured profiles need two names in planner.py's table
    one = subprocess.run([sys.executable, str(script), "--device", "cpu", "--world-size", "1", "--out",
                          str(tmp_path / "one.json")], capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "--world-size and --batch-size must be >= 2" in one.stderr
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "cpu.json").write_text(out.read_text())
    planner = script.with_name("planner.py")
    twice = subprocess.run([sys.executable, str(planner), "--profile-file", str(out), str(tmp_path / "again" / "cpu.json")],
                           capture_output=True, text=True, timeout=120, cwd=script.parent)
    assert twice.returncode == 2 and "needs a file name of its own" in twice.stderr


def test_batchnorm_statistics_bytes_and_the_jobs_sync_option(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEBD_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    teacher = [nn.Linear(4, 4), nn.Linear(4, 4)]
    student = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4))), nn.Linear(4, 4)]
    d = pipebd.Distiller(teacher, student, device="cpu")
    for sync in (True, False, True):        # measured, then read from the cache twice
        j = job(d)
        j.sync_batchnorm = sync
        profile = profiler.profile_job(j, 3, warmup=0, repeats=1, comm=lambda: NO_COMM)
        assert profile.bn_bytes == [[(2 * 4 + 1) * 4] * 2, []] and profile.sync_batchnorm is sync
        assert (profile.sync_bn_time(0, 3) > 0) is sync and profile.sync_bn_time(1, 3) == 0


def test_sync_batchnorm_reaches_the_profile_from_fit_and_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPEBD_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    teacher = [nn.Linear(4, 4), nn.Linear(4, 4)]
    student = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 4)]
    d = pipebd.Distiller(teacher, student, device="cpu")
    data = torch.randn(16, 4)
    monkeypatch.setattr(profiler, "measure_comm", lambda *a, **k: NO_COMM)
    for sync in (False, True):
        assert d.profile(data, 8, 2, warmup=0, repeats=1, sync_batchnorm=sync).sync_batchnorm is sync
    seen = []
    real = pipebd.api.auto_plan
    monkeypatch.setattr(pipebd.api, "auto_plan", lambda p, w: seen.append(p.sync_batchnorm) or real(p, w))
    d.fit(data, 8, 2, world_size=2, plan="auto", sync_batchnorm=True, progress=False, timeout=60)
    assert seen == [True]


def test_dataset_kind_and_loader_workers_are_part_of_the_cache_key():
    d = emulated()
    plain = job(d)
    assert profiler._cache_key(plain, 3, 0, 1) != profiler._cache_key(dataclasses.replace(plain, num_workers=2), 3, 0, 1)
    wrapped = dataclasses.replace(plain, dataset=torch.utils.data.TensorDataset(plain.dataset))
    assert profiler._cache_key(plain, 3, 0, 1) != profiler._cache_key(wrapped, 3, 0, 1)
    shorter = dataclasses.replace(plain, dataset_len=plain.dataset_len - 1)
    assert profiler._cache_key(plain, 3, 0, 1) != profiler._cache_key(shorter, 3, 0, 1)
    small, large = (dataclasses.replace(plain, dataset=Images(plain.dataset, side)) for side in (32, 224))
    assert profiler._cache_key(small, 3, 0, 1) != profiler._cache_key(large, 3, 0, 1)   # a resize to another size


class Images(torch.utils.data.Dataset):
    def __init__(self, x, side):
        self.x, self.side = x, side

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


class Resize:
    """A transform object, as torchvision's: its setting is an attribute of its own."""

    def __init__(self, side):
        self.side = side

    def __call__(self, x):
        return x


class Crop(Resize):
    pass


class Transformed(torch.utils.data.Dataset):
    def __init__(self, x, transform):
        self.x, self.transform = x, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(self.x[i])


def test_objects_and_functions_in_attributes_are_part_of_the_cache_key():
    # A dataset's transform object (its class or its own settings), a block's activation
    # function or layer class: the cache gave the second the first one's profile.
    d = emulated()
    plain = job(d)
    key = lambda j: profiler._cache_key(j, 3, 0, 1)

    def transformed(transform):
        return key(dataclasses.replace(plain, dataset=Transformed(plain.dataset, transform)))

    assert transformed(Resize(32)) != transformed(Resize(224)) != transformed(Crop(224))
    assert transformed(Resize(32)) == transformed(Resize(32))            # equal settings, one entry
    identity = lambda x: x            # noqa: E731 (a function by its source line)
    exp = lambda x: x.exp()           # noqa: E731
    assert transformed(identity) != transformed(exp)
    composed = [Resize(32), Crop(16)]
    assert transformed(composed) != transformed([Resize(32), Crop(8)])   # a list of them (Compose)

    def with_setting(setting):
        j = job(d)
        j.teacher[0] = Settings(setting)
        return key(j)

    assert with_setting(torch.nn.functional.gelu) != with_setting(torch.nn.functional.relu)
    assert with_setting(nn.BatchNorm2d) != with_setting(nn.LayerNorm)
    owner = Resize(3)
    owner.back = owner                                                  # points back at itself: bounded
    assert with_setting(owner) == with_setting(owner)
    assert with_setting(sys) == with_setting(sys) and len(with_setting(sys)) < 5000
    assert with_setting(functools.partial(max, 3)) != with_setting(functools.partial(sorted, key=len))
    assert with_setting(np.int64(4)) != with_setting(np.int64(5))
    assert with_setting(Path("/data/a")) != with_setting(Path("/data/b"))
    import logging
    logger = logging.getLogger("pipebd.test")
    before = with_setting(logger)
    logging.getLogger("pipebd.test.another")      # process state, which the key must not hold
    assert with_setting(logger) == before


def test_loader_workers_are_measured_and_change_stage_zero():
    # With loader processes the profile also has what taking a batch from them costs and how
    # long they take to start.
    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            __import__("time").sleep(2e-4)
            return torch.full((4,), float(i))

    d = emulated()
    inline = d.profile(Slow(), 8, 3, warmup=0, repeats=3, comm=False)
    loaded = d.profile(Slow(), 8, 3, warmup=0, repeats=3, comm=False, num_workers=2)
    assert (inline.num_workers, inline.receive, inline.loader_start) == (0, [], 0.0)
    assert loaded.num_workers == 2 and len(loaded.receive) == len(loaded.rows)
    assert all(0 < t < 0.01 for t in loaded.receive) and 0 < loaded.loader_start < 5.0
    assert all(t >= r * 2e-4 for r, t in zip(loaded.rows, loaded.load))   # a sleep never ends early
    assert loaded.data_time(8) == pytest.approx(loaded.receive[-1])
    assert loaded.data_period(8) == pytest.approx(loaded.load[-1] / 2)
    assert inline.data_time(8) == inline.load_time(8) and inline.data_period(8) == 0.0


def test_a_teacher_block_inside_its_student_block_stays_frozen_in_the_profile():
    torch.manual_seed(0)
    teacher = [nn.Sequential(EmulatedBlock(4, A, B_ROW), nn.BatchNorm1d(4)) for _ in range(2)]
    student = [nn.Sequential(t, nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)) for t in teacher]
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    before = [p.detach().clone() for t in teacher for p in t.parameters()]
    profile = profiler.profile_job(job(distiller), 3, warmup=0, repeats=1, comm=lambda: NO_COMM, cache=False)
    # The 4x4 adapter and the student's own BatchNorm only: the teacher's part is frozen, and in
    # eval mode its BatchNorm has no statistics to allreduce.
    assert profile.grad_bytes == [(16 + 2 * 4) * 4] * 2
    assert profile.bn_bytes == [[(2 * 4 + 1) * 4]] * 2
    assert all(torch.equal(x, p) for x, p in zip(before, (p for t in teacher for p in t.parameters())))


def test_a_profile_for_one_rank_under_torchrun_times_no_transfers(monkeypatch, tmp_path):
    # Its communication benchmark sent to rank 1, which a world of one lacks: it hung until the timeout.
    monkeypatch.setenv("PIPEBD_CACHE_DIR", str(tmp_path))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(pipebd.runtime.launch._free_port()))):
        monkeypatch.setenv(name, value)
    try:
        got = emulated().profile(torch.randn(16, 4), 8, 1, warmup=0, repeats=1, timeout=10)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert got.num_blocks == 2 and got.p2p == [] and got.allreduce == []


def test_the_cache_key_builds_the_optimizer_as_the_ranks_do():
    # The key built the factory's optimizer for one dummy parameter: a factory that puts the
    # first parameters in groups of their own raised IndexError in profile() and fit(plan="auto").
    d = emulated()
    key = lambda j: profiler._cache_key(j, 3, 0, 1)

    def grouped(decay):
        return lambda ps: torch.optim.SGD([{"params": ps[:1], "weight_decay": decay}, {"params": ps[1:]}], lr=0.1)

    with_decay, without = (dataclasses.replace(job(d), optimizer=grouped(w)) for w in (1e-4, 0.0))
    assert key(with_decay) != key(without)          # a group's setting counts, as the defaults do
    assert key(with_decay) == key(dataclasses.replace(with_decay))
    unbuildable = dataclasses.replace(job(d), optimizer=lambda ps: torch.optim.SGD([ps[5]], lr=0.1))
    assert key(unbuildable)                         # by the factory's code


def test_profile_under_torchrun_needs_its_world_size_or_no_transfers(monkeypatch):
    # It failed in torch's new_group ("the new group's world size should be less or equal...").
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = emulated()
    with pytest.raises(ValueError, match=r"profile\(world_size=4\) but torchrun started WORLD_SIZE=2 processes.*"
                                         r"comm=False to plan for 4 ranks"):
        d.profile(torch.randn(16, 4), 8, 4)
    assert d.profile(torch.randn(16, 4), 8, 4, comm=False, warmup=0, repeats=1).world_size == 4
    with pytest.raises(TypeError, match="cache must be True or False"):
        d.profile(torch.randn(16, 4), 8, 2, cache="no")     # was taken as True


def _profile_as_torchrun_rank(rank, world_size):
    """A rank of a script under torchrun whose transfer timings look noisy every time."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    runs = []
    real = pipebd.api.comm_task
    pipebd.api.comm_task = lambda *a, **k: runs.append(1) or real(*a, **k)
    pipebd.api.noisy_comm = profiler.noisy_comm = lambda job, p2p, allreduce: "forced"
    emulated().profile(torch.randn(16, 4), 8, world_size, warmup=0, repeats=1, cache=False, timeout=60)
    counts = [None] * world_size
    torch.distributed.all_gather_object(counts, len(runs))
    return counts


def test_noisy_transfers_are_measured_again_on_every_torchrun_rank():
    # Rank 0 asked for a second measurement and got the first one back, then said "measured twice".
    from pipebd.runtime.launch import spawn_tasks
    assert spawn_tasks([_profile_as_torchrun_rank] * 2, "gloo", timeout_s=120) == [2, 2]
