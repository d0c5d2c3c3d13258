"""Checkpoint and resume (pipebd.checkpoint): a run interrupted by a crash and resumed, on any
strategy, plan and world size, ends with the weights of an uninterrupted run (1e-5, the
tolerance of the exactness tests: replicated stages sum in another order); files are replaced
atomically; bad resumes are refused before any process starts."""

import json
import logging
import os
import re

import pytest
import torch
from torch import nn

import pipebd
from crash import crash_after
from pipebd import checkpoint
from pipebd.api import teacher_fingerprint
from pipebd.cli import main

def listing(directory):
    """The names in ``directory``, sorted, less the lock file a job holds it with."""
    return sorted(name for name in os.listdir(directory) if name != checkpoint.LOCK_FILE)


D, BLOCKS, BATCH, STEPS = 6, 5, 7, 20
DATA = torch.randn(50, D, generator=torch.Generator().manual_seed(1))


def warmup_then_cosine(optimizer):
    return pipebd.lr.warmup(optimizer, 5, then=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS))


def distiller(crash_block=None, crash_at=None, scheduler=warmup_then_cosine):
    torch.manual_seed(0)
    teacher = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(BLOCKS)]
    student = [crash_after(nn.Linear(D, D), crash_at if i == crash_block else None) for i in range(BLOCKS)]
    return pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                            scheduler=scheduler, device="cpu")


def weights(d):
    return d.student_model().state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference():
    d = distiller()
    d.fit(DATA, BATCH, STEPS, progress=False)
    return weights(d)


def saved_steps(directory):
    paths = [checkpoint.block_path(directory, i) for i in range(BLOCKS)]
    return [torch.load(p, weights_only=True)["step"] if os.path.exists(p) else 0 for p in paths]


@pytest.mark.parametrize("crashed, resumed", [
    (dict(world_size=2, plan=pipebd.Plan([[0, 1, 2], [3, 4]], [1, 1])),
     dict(world_size=3, plan=pipebd.Plan([[0], [1, 2, 3, 4]], [1, 2]))),
    (dict(world_size=2, strategy="baseline"), dict(world_size=2)),
    (dict(world_size=1), dict(world_size=1, strategy="baseline")),
], ids=["pipebd-w2-to-hybrid-w3", "baseline-w2-to-pipebd-w2", "w1-to-baseline-w1"])
def test_a_crashed_run_resumes_to_the_uninterrupted_weights(tmp_path, reference, crashed, resumed):
    # Student block 3 raises in its 14th training step: with checkpoints every 5 steps, block 3
    # saved step 10; the blocks before it saved 10 or 15 (their stage may run ahead under the
    # relay; under the baseline, blocks 0-2 finished all 20 steps first).
    with pytest.raises((pipebd.WorkerError, RuntimeError), match="injected crash"):
        distiller(3, 13).fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False,
                             timeout=60, **crashed)
    before = saved_steps(tmp_path)
    assert before[3] == 10 and before[4] <= 10
    if crashed.get("strategy") == "baseline":
        assert before == [20, 20, 20, 10, 0]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

    d = distiller()
    report = d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, resume=True, progress=False, timeout=60, **resumed)
    assert max_diff(weights(d), reference) < 1e-5
    assert report.start == before
    assert saved_steps(tmp_path) == [STEPS] * BLOCKS
    for block, history in enumerate(report.losses):
        assert all(v != v for v in history[:before[block]])          # NaN: not trained in this fit
        assert all(v == v for v in history[before[block]:])
    if report.strategy == "pipebd":
        # The relay restarts at the earliest saved step; blocks ahead of it only relay.
        assert report.teacher_block_runs == [(STEPS - min(before)) * BATCH] * BLOCKS
    assert "resumed: blocks had completed steps" in str(report)


def test_resume_can_train_further_and_equals_one_longer_run(tmp_path):
    longer = distiller()
    longer.fit(DATA, BATCH, 2 * STEPS, progress=False)
    d = distiller()
    d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, progress=False)
    assert saved_steps(tmp_path) == [STEPS] * BLOCKS           # saved after the last step by default
    d = distiller()
    report = d.fit(DATA, BATCH, 2 * STEPS, world_size=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert max_diff(weights(d), weights(longer)) < 1e-5
    assert report.trained_steps == [STEPS] * BLOCKS
    assert report.samples_per_s == pytest.approx(STEPS * BATCH / report.wall_s)


def test_resume_from_an_empty_directory_starts_at_step_0(tmp_path, reference):
    d = distiller()
    report = d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path / "new", resume=True, progress=False)
    assert max_diff(weights(d), reference) == 0.0
    assert report.start == [0] * BLOCKS
    record = json.loads((tmp_path / "new" / "run.json").read_text())
    assert record == {"kind": "distill", "num_blocks": BLOCKS, "batch_size": BATCH, "seed": 0, "dataset_len": len(DATA),
                      "teacher": teacher_fingerprint(d.teacher, (D,), torch.float32), "checkpoint_every": None}


def test_numpy_settings_are_saved_as_numbers_that_load(tmp_path):
    # torch.load(weights_only=True) refuses numpy scalars: an lr of np.float64 made every resume fail.
    import numpy as np
    runs = [distiller(), distiller()]
    for d in runs:
        d.optimizer = lambda p: torch.optim.SGD(p, lr=np.float64(0.05), momentum=np.float32(0.5))
    runs[0].fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, progress=False)
    report = runs[1].fit(DATA, BATCH, STEPS + 2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert report.start == [STEPS] * BLOCKS


def test_a_resume_without_checkpoint_every_is_warned_that_it_saves_only_at_the_end(tmp_path, caplog):
    distiller().fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    for every, warned in ((None, True), (3, False)):
        caplog.clear()
        steps = 2 * STEPS if every is None else 3 * STEPS
        with caplog.at_level("WARNING", logger="pipebd"):
            distiller().fit(DATA, BATCH, steps, checkpoint_dir=tmp_path, checkpoint_every=every, resume=True,
                            progress=False)
        message = f"the run in {tmp_path} saved every 2 steps; this one saves only after its last step"
        assert (message in caplog.text) == warned, caplog.text
        if not warned:
            assert json.loads((tmp_path / "run.json").read_text())["checkpoint_every"] == 3


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "block0.pt")
    checkpoint.atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, broken)
    assert open(path, "rb").read() == b"old"
    assert listing(tmp_path) == ["block0.pt"]


@pytest.fixture
def saved(tmp_path):
    distiller().fit(DATA, BATCH, 10, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (dict(resume=False), r"already holds a pipebd run \(run.json\); pass resume=True"),
    (dict(batch_size=8), "batch_size=7, this run has batch_size=8: its batches would differ"),
    (dict(seed=1), "seed=0, this run has seed=1"),
    (dict(steps=6), "block 0 of the checkpoint in .* has trained 10 steps, more than steps=6"),
    (dict(steps=10), "every block of the checkpoint .* has completed steps=10; pass a larger steps"),
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1"),
    (dict(checkpoint_dir=None), "resume=True needs checkpoint_dir"),
])
def test_bad_resumes_are_refused_before_any_worker_starts(saved, change, message):
    args = dict(batch_size=BATCH, steps=20, world_size=2, checkpoint_dir=saved, resume=True, progress=False)
    args.update(change)
    d = distiller()
    before = {k: v.clone() for k, v in weights(d).items()}
    with pytest.raises(ValueError, match=message):
        d.fit(DATA, **args)
    assert max_diff(weights(d), before) == 0.0          # nothing loaded into the blocks
    assert saved_steps(saved) == [10] * BLOCKS          # nothing overwritten


def test_a_checkpoint_that_does_not_fit_is_named_before_anything_is_loaded(saved):
    torch.manual_seed(0)
    other = pipebd.Distiller([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(BLOCKS)],
                             [nn.Sequential(nn.Linear(D, D)) for _ in range(BLOCKS)], device="cpu")
    with pytest.raises(ValueError, match=r"checkpoint of student block 0 does not fit the student block: "
                                         r"0.bias saved None vs \(6,\)"):
        other.fit(DATA, BATCH, 20, checkpoint_dir=saved, resume=True, progress=False)
    adam = distiller()
    adam.optimizer = lambda p: torch.optim.Adam(p, lr=0.01)
    no_scheduler = distiller(scheduler=None)
    for d, message in ((adam, "block 0 was saved with optimizer SGD, this run has Adam; resume with the same optimizer"),
                       (no_scheduler, "block 0 was saved with scheduler ChainedScheduler, this run has None")):
        before = {k: v.clone() for k, v in weights(d).items()}
        with pytest.raises(ValueError, match=message):
            d.fit(DATA, BATCH, 20, world_size=2, checkpoint_dir=saved, resume=True, progress=False)
        assert max_diff(weights(d), before) == 0.0
    with open(checkpoint.block_path(saved, 2), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint of block 2 .* the file is damaged or not a "
                                         "pipebd checkpoint .*; restore it") as caught:
        distiller().fit(DATA, BATCH, 20, checkpoint_dir=saved, resume=True, progress=False)
    assert "weights_only" not in str(caught.value)     # torch's advice to load unsafely
    import numpy as np
    torch.save({"lr": np.float64(0.1)}, checkpoint.block_path(saved, 2))    # an older pipebd's numpy setting
    with pytest.raises(ValueError, match="cannot read the checkpoint of block 2 .* it holds numpy.*, which pipebd "
                                         "does not load"):
        distiller().fit(DATA, BATCH, 20, checkpoint_dir=saved, resume=True, progress=False)


@pytest.mark.parametrize("record", ['"kind"', "5", "null", "[1, 2]"])
def test_a_run_json_that_is_not_an_object_is_refused(tmp_path, record):
    # Before the fix: an AttributeError, a TypeError, or (for a list) "an older pipebd".
    (tmp_path / "run.json").write_text(record)
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(tmp_path / 'run.json'))}: it holds "
                                         rf"{re.escape(record)}, not the JSON object that records a pipebd run"):
        distiller().fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_a_missing_block_file_is_refused(saved):
    # Before the fix block 2 restarted from step 0: "blocks had completed steps [10, 10, 0, 10, 10]".
    os.unlink(checkpoint.block_path(saved, 2))
    d = distiller()
    before = {k: v.clone() for k, v in weights(d).items()}
    path = re.escape(checkpoint.block_path(str(saved), 2))
    with pytest.raises(ValueError, match=rf"checkpoint in .* has no file for block 2 \({path}\); restore it"):
        d.fit(DATA, BATCH, STEPS, checkpoint_dir=saved, resume=True, progress=False)
    assert max_diff(weights(d), before) == 0.0
    assert saved_steps(saved) == [10, 10, 0, 10, 10]


class Killed(Exception):
    pass


def test_a_run_killed_while_saving_step_0_leaves_no_run_to_resume(tmp_path, monkeypatch, reference):
    # run.json is written after every block's step-0 file: a kill in between leaves a directory
    # that a resume starts afresh, not one whose missing files it refuses.
    save_block = checkpoint.save_block

    def killed_at_block_2(directory, block, *args):
        if block == 2:
            raise Killed
        save_block(directory, block, *args)

    monkeypatch.setattr(checkpoint, "save_block", killed_at_block_2)
    with pytest.raises(Killed):
        distiller().fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.undo()
    assert listing(tmp_path) == ["block0.pt", "block1.pt"]
    d = distiller()
    report = d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert report.start == [0] * BLOCKS and max_diff(weights(d), reference) == 0.0


def pipebd_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pipebd" and r.levelno >= logging.WARNING]


def sgd(lr=0.05, momentum=0.9):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)


def warmup_3_then_cosine(optimizer):
    return pipebd.lr.warmup(optimizer, 3, then=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS))


@pytest.mark.parametrize("optimizer, scheduler, warned", [
    (sgd(), warmup_then_cosine, None),
    (sgd(lr=0.001), warmup_then_cosine, "optimizer.initial_lr saved 0.05, this run 0.001"),
    (sgd(momentum=0.5), warmup_then_cosine, "optimizer.momentum saved 0.9, this run 0.5"),
    (sgd(), warmup_3_then_cosine, "scheduler._schedulers[0].total_iters saved 5, this run 3"),
], ids=["same", "lr", "momentum", "warmup"])
def test_changed_optimizer_or_scheduler_settings_are_kept_and_named_once(saved, reference, caplog, optimizer,
                                                                         scheduler, warned):
    # The checkpoint's settings are restored (torch's load_state_dict), so the resumed run still
    # ends with the uninterrupted run's weights; before the fix nothing told the caller.
    d = distiller(scheduler=scheduler)
    d.optimizer = optimizer
    with caplog.at_level(logging.WARNING, logger="pipebd"):
        d.fit(DATA, BATCH, STEPS, checkpoint_dir=saved, checkpoint_every=5, resume=True, progress=False)
    assert max_diff(weights(d), reference) < 1e-5
    if warned is None:
        assert pipebd_warnings(caplog) == []
    else:
        [message] = pipebd_warnings(caplog)
        assert f"student block 0, 1, 2, 3, 4: {warned}" in message
        assert "the checkpoint's values are kept" in message


@pytest.mark.parametrize("cyclic", [
    lambda optimizer: torch.optim.lr_scheduler.CyclicLR(optimizer, 0.01, 0.05, step_size_up=3),
    lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, 4, 2),
], ids=["cyclic", "warm-restarts"])
def test_a_cyclic_schedule_resumes_to_the_uninterrupted_weights_without_a_warning(tmp_path, caplog, cyclic):
    # CyclicLR's load_state_dict popped a key from the saved state when the resume checked it,
    # so the run's own load then failed (KeyError); it cycles the momentum, which is no change.
    # Warm restarts keep their progress in T_cur and T_i, which is no change either.
    once = distiller(scheduler=cyclic)
    once.fit(DATA, BATCH, STEPS, progress=False)
    distiller(scheduler=cyclic).fit(DATA, BATCH, 10, checkpoint_dir=tmp_path, progress=False)
    d = distiller(scheduler=cyclic)
    with caplog.at_level(logging.WARNING, logger="pipebd"):
        d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert max_diff(weights(d), weights(once)) < 1e-5
    assert pipebd_warnings(caplog) == []


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NanAfter(nn.Linear):
    """A Linear whose weight gets a NaN gradient in training call ``at`` (its loss stays finite)."""

    def __init__(self, at):
        super().__init__(D, D)
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += self.training
        weight = NanGradient.apply(self.weight) if self.calls == self.at else self.weight
        return nn.functional.linear(x, weight, self.bias)


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    d = pipebd.Distiller([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2)], [NanAfter(10), NanAfter(0)],
                         device="cpu")
    with pytest.raises(pipebd.NonFiniteLoss, match=r"non-finite weights \(weight\) at stage 0, block 0 after step 9"):
        d.fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    saved = torch.load(checkpoint.block_path(tmp_path, 0), weights_only=True)
    assert saved["step"] == 5 and all(torch.isfinite(v).all() for v in saved["weights"].values())


def test_files_are_whole_readable_and_stale_temporaries_go(tmp_path):
    (tmp_path / ".tmp-left-by-a-kill").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        distiller().fit(DATA, BATCH, 3, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    finally:
        os.umask(old)
    assert listing(tmp_path) == [f"block{i}.pt" for i in range(BLOCKS)] + ["run.json"]
    assert {os.stat(tmp_path / f).st_mode & 0o777 for f in listing(tmp_path)} == {0o644}


def test_a_fresh_run_saves_every_block_at_step_0_first(tmp_path):
    # The initial weights are on disk before any step, so a run that dies before its first
    # checkpoint resumes from them whatever the caller rebuilds.
    with pytest.raises(RuntimeError, match="injected crash"):
        distiller(0, 2).fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    assert saved_steps(tmp_path) == [0] * BLOCKS
    initial = weights(distiller())
    torch.manual_seed(123)
    rebuilt = distiller()
    for block in rebuilt.student:
        nn.init.normal_(block.weight)      # not the initial weights
    rebuilt.fit(DATA, BATCH, 1, checkpoint_dir=tmp_path, resume=True, progress=False)
    once = distiller()
    once.fit(DATA, BATCH, 1, progress=False)
    assert max_diff(weights(rebuilt), weights(once)) == 0.0 and max_diff(initial, weights(once)) > 0


def test_cli_resumes_a_run(tmp_path, capsys):
    common = ["run", "--set", "model={pair: mlp}", "--set", "batch_size=8", "--set", "data.samples=64",
              "--set", f"checkpoint_dir={tmp_path}", "--set", "checkpoint_every=2"]
    assert main(common + ["--set", "steps=4"]) == 0
    assert main(common + ["--set", "steps=6"]) == 2
    assert "already holds a pipebd run" in capsys.readouterr().err
    assert main(common + ["--set", "steps=6", "--resume"]) == 0
    assert "resumed: blocks had completed steps [4, 4, 4, 4]" in capsys.readouterr().out


def test_a_resume_with_another_teacher_is_warned_about(saved, caplog):
    # The teacher is not saved; run.json records its outputs on a fixed input instead.
    d = distiller()
    with torch.no_grad():
        d.teacher[2][0].weight.mul_(1.5)
    modes = [m.training for b in d.teacher for m in b.modules()]
    with caplog.at_level(logging.WARNING, logger="pipebd"):
        d.fit(DATA, BATCH, 12, checkpoint_dir=saved, checkpoint_every=5, resume=True, progress=False)
    [message] = pipebd_warnings(caplog)
    assert "the teacher gives other outputs than the one the checkpoint" in message
    assert [m.training for b in d.teacher for m in b.modules()] == modes
    # The record stays the first run's, so that the next resume with this teacher is warned about too.
    assert json.loads((saved / "run.json").read_text())["teacher"] == teacher_fingerprint(
        distiller().teacher, (D,), torch.float32)


def test_the_teacher_record_is_that_of_one_fixed_sample():
    """Records written before teachers got a second sample stay valid: a teacher that takes one
    sample is recorded on that one, as then; only one that cannot gets two (its first counts)."""
    teacher = distiller().teacher
    x = torch.sin(torch.arange(D, dtype=torch.float64) * 0.7).float().reshape(1, D)
    with torch.no_grad():
        for block in teacher:
            x = block.eval()(x)
    out = x.double().flatten()
    expected = [out.mean().item(), out.abs().mean().item(), *out[torch.linspace(0, D - 1, 8).long()].tolist()]
    assert teacher_fingerprint(teacher, (D,), torch.float32) == expected
    batch_stats = [nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D, track_running_stats=False))]
    assert len(teacher_fingerprint(batch_stats, (D,), torch.float32)) == 10


class Masked(nn.Linear):
    """A Linear with a buffer that is -inf by design (as an attention mask), added where finite."""

    def __init__(self):
        super().__init__(D, D)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

    def forward(self, x):
        return super().forward(x) + self.mask.exp()[0]


def test_a_buffer_that_is_non_finite_by_design_does_not_stop_the_saves(tmp_path):
    # The check before a save looks at what was finite when the fit started: every save of a
    # block with a -inf mask was refused as "non-finite weights".
    torch.manual_seed(0)
    d = pipebd.Distiller([nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(2)], [Masked(), Masked()],
                         device="cpu")
    d.fit(DATA, BATCH, 10, checkpoint_dir=tmp_path, checkpoint_every=5, world_size=2, progress=False, timeout=60)
    assert saved_steps(tmp_path)[:2] == [10, 10]


def test_a_directory_in_use_by_a_running_job_is_refused(tmp_path):
    # Two jobs started together in one directory both trained, and the last to record run.json
    # took it (or one crashed when the other removed its temporary file). The job's claim is a
    # flock on the directory: here this test holds it, as another job would.
    with checkpoint.claimed(str(tmp_path)):
        for resume in (False, True):
            with pytest.raises(ValueError, match="in use by another running pipebd job"):
                distiller().fit(DATA, BATCH, STEPS, checkpoint_dir=tmp_path, resume=resume, progress=False)
        assert listing(tmp_path) == []
    distiller().fit(DATA, BATCH, 2, checkpoint_dir=tmp_path, progress=False)        # released: free again
    distiller().fit(DATA, BATCH, 4, checkpoint_dir=tmp_path, resume=True, progress=False)   # and after a fit


def test_a_checkpoint_dir_that_cannot_be_written_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=f"checkpoint_dir {afile} is not a directory"):
        distiller().fit(DATA, BATCH, 2, checkpoint_dir=afile, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir /proc/self/pipebd cannot be written"):
        distiller().fit(DATA, BATCH, 2, checkpoint_dir="/proc/self/pipebd", progress=False)
    assert main(["check", "--set", f"checkpoint_dir={afile}"]) == 2
