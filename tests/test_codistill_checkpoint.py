"""Checkpoint and resume of Codistillation.fit: a run interrupted by a crash and resumed, on any
world size, ends with the weights of an uninterrupted run (1e-5, the tolerance of the
codistillation tests: DDP sums unequal slices in another order), distilling from the same stale
weights; a checkpoint step counts only once every model saved it; bad resumes are refused
before anything is loaded."""

import json
import logging
import os
import shutil

import pytest
import torch
from torch import nn

import pipebd
from crash import crash_after
from pipebd import checkpoint
from test_checkpoint import listing
from test_codistill import BATCH, FEATURES, K, STEPS, dataset, initial_models, sgd

EVERY, TOL = 6, 1e-5


def codistillation(mode="codistill", crash_model=None, crash_at=None, alpha=0.7, optimizer=sgd, exchange_every=K,
                   scheduler=None):
    models = [crash_after(m, crash_at if i == crash_model else None) for i, m in enumerate(initial_models(2))]
    return pipebd.Codistillation(models, optimizer=optimizer, scheduler=scheduler, alpha=alpha, temperature=2.0,
                                 burn_in=3, exchange_every=exchange_every, mode=mode, backend="torch", device="cpu")


def fit(cd, steps=STEPS, world_size=1, **options):
    return cd.fit(dataset(), batch_size=BATCH, steps=steps, world_size=world_size, seed=3, timeout=60,
                  progress=False, **options)


def weights(cd):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in cd.models]


def max_diff(a, b):
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b) for k in x)


@pytest.fixture(scope="module", params=["codistill", "online"])
def uninterrupted(request):
    cd = codistillation(request.param)
    report = fit(cd)
    return request.param, weights(cd), report


@pytest.mark.parametrize("crashed, resumed", [(1, 1), (2, 4), (4, 1)], ids=["w1-to-w1", "w2-to-w4", "w4-to-w1"])
def test_a_crashed_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, crashed, resumed):
    # Model 1 raises in its 14th training step: the last complete checkpoint is step 12, where
    # the stale copies hold the others' weights after step 4 and the exchange of step 8 is in
    # flight (K=4); the resumed run must restore both to distill as the uninterrupted one did.
    mode, want, reference = uninterrupted
    with pytest.raises((pipebd.WorkerError, RuntimeError), match="injected crash"):
        fit(codistillation(mode, 1, 13), world_size=crashed, checkpoint_dir=tmp_path, checkpoint_every=EVERY)
    # On several ranks model 0 may have saved step 18 before the crash stopped it at the
    # barrier: the step was never recorded, so it does not count.
    assert json.loads((tmp_path / "run.json").read_text())["step"] == 12
    cd = codistillation(mode)
    report = fit(cd, world_size=resumed, checkpoint_dir=tmp_path, resume=True)
    assert max_diff(weights(cd), want) <= TOL
    assert report.start == 12 and report.sources == reference.sources
    for got, ref in zip(report.losses, reference.losses):
        assert all(v != v for v in got[:12])   # NaN: trained before the resume
        assert max(abs(a - b) for a, b in zip(got[12:], ref[12:])) <= TOL
    assert "resumed after step 12" in str(report)


def test_raising_steps_continues_as_one_longer_run(tmp_path):
    # The first run ends at step 10, so it never publishes the weights of step 8 (they would
    # arrive after its end); the longer run distills from them at steps 12-15 all the same.
    reference = codistillation()
    fit(reference)
    fit(codistillation(), steps=10, checkpoint_dir=tmp_path)
    cd = codistillation()
    report = fit(cd, checkpoint_dir=tmp_path, resume=True)
    assert report.start == 10
    assert max_diff(weights(cd), weights(reference)) <= TOL


def test_only_a_step_every_model_saved_counts(tmp_path, uninterrupted):
    # A crash between the models' files and the commit leaves an unfinished step directory and
    # temporaries behind: the resume starts from the recorded step and removes them.
    mode, want, _ = uninterrupted
    fit(codistillation(mode), steps=12, checkpoint_dir=tmp_path, checkpoint_every=EVERY)
    assert listing(tmp_path) == ["run.json", "step12"]
    assert listing(tmp_path / "step12") == ["model0.pt", "model1.pt"]
    os.makedirs(tmp_path / "step18")
    shutil.copy(tmp_path / "step12" / "model0.pt", tmp_path / "step18" / "model0.pt")
    (tmp_path / f"{checkpoint.TMP_PREFIX}x").write_bytes(b"partial")
    cd = codistillation(mode)
    report = fit(cd, checkpoint_dir=tmp_path, checkpoint_every=100, resume=True)
    assert report.start == 12
    assert max_diff(weights(cd), want) <= TOL
    assert listing(tmp_path) == ["run.json", f"step{STEPS}"]


def test_a_commit_keeps_the_step_a_model_ahead_is_writing(tmp_path, uninterrupted):
    # With a checkpoint every step, the leader of model 1 trains on and writes step t+1 while
    # rank 0 still commits step t after the barrier: the commit must leave that directory alone.
    # Before the fix this run failed 3 times in 3 (model 1's file renamed into a removed directory).
    mode, want, _ = uninterrupted
    cd = codistillation(mode)
    fit(cd, world_size=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert max_diff(weights(cd), want) <= TOL
    assert json.loads((tmp_path / "run.json").read_text())["step"] == STEPS
    assert listing(tmp_path) == ["run.json", f"step{STEPS}"]
    assert listing(tmp_path / f"step{STEPS}") == ["model0.pt", "model1.pt"]


def test_commit_removes_later_steps_only_at_the_start(tmp_path):
    key = checkpoint.CodistillKey(2, "codistill", BATCH, 3, 61, K)
    for name in ("step4", "step6", "step9", "stepped", "other"):
        os.makedirs(tmp_path / name)
    checkpoint.commit(str(tmp_path), key, 6, None, {})     # during training: step 9 may be in the making
    assert listing(tmp_path) == ["other", "run.json", "step6", "step9", "stepped"]
    checkpoint.commit(str(tmp_path), key, 6, None, {}, first=True)   # a fit starting from step 6
    assert listing(tmp_path) == ["other", "run.json", "step6", "stepped"]
    assert json.loads((tmp_path / "run.json").read_text())["step"] == 6


@pytest.fixture
def saved(tmp_path):
    fit(codistillation(), steps=12, checkpoint_dir=tmp_path)
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (dict(resume=False), r"already holds a pipebd run \(run.json\); pass resume=True"),
    (dict(steps=12), "has completed steps=12; pass a larger steps"),
    (dict(steps=8), "has trained 12 steps, more than steps=8"),
    (dict(exchange_every=5), "run with exchange_every=4, this run has exchange_every=5: the steps at which the "
                             "models distill from each other would differ"),
    (dict(mode="online"), "run with mode='codistill', this run has mode='online': the models would distill"),
    (dict(optimizer=lambda p: torch.optim.Adam(p)), "model 0 was saved with optimizer SGD, this run has Adam"),
])
def test_bad_resumes_are_refused_before_anything_is_loaded(saved, change, message):
    steps = change.pop("steps", STEPS)
    resume = change.pop("resume", True)
    cd = codistillation(**change)
    before = weights(cd)
    with pytest.raises(ValueError, match=message):
        fit(cd, steps=steps, checkpoint_dir=saved, resume=resume)
    assert max_diff(weights(cd), before) == 0.0
    assert listing(saved) == ["run.json", "step12"]


def test_a_missing_model_file_or_snapshot_is_refused(saved, tmp_path_factory):
    # Saved without a distillation term, the run kept no weights of past exchanges.
    plain = tmp_path_factory.mktemp("alpha0")
    fit(codistillation(alpha=0.0), steps=12, checkpoint_dir=plain)
    with pytest.raises(ValueError, match="holds no weights of model 0 after step 4"):
        fit(codistillation(), checkpoint_dir=plain, resume=True)
    os.unlink(saved / "step12" / "model1.pt")
    with pytest.raises(ValueError, match="of step 12 has no file for model 1"):
        fit(codistillation(), checkpoint_dir=saved, resume=True)


def warmup(steps):
    return lambda optimizer: pipebd.lr.warmup(optimizer, steps)


@pytest.mark.parametrize("resumed, warned", [(8, None), (12, "model 0, 1: scheduler.total_iters saved 8, this run 12")],
                         ids=["same", "longer-warmup"])
def test_a_changed_schedule_is_kept_and_named_once(tmp_path, caplog, resumed, warned):
    # Saved in the middle of the warmup: the resumed run keeps the checkpoint's warmup of 8
    # steps (torch's load_state_dict restores it), so it ends with the uninterrupted run's
    # weights; before the fix nothing told the caller that the 12 passed was not used.
    reference = codistillation(scheduler=warmup(8))
    fit(reference)
    fit(codistillation(scheduler=warmup(8)), steps=6, checkpoint_dir=tmp_path)
    cd = codistillation(scheduler=warmup(resumed))
    caplog.clear()       # the 6-step fit was warned that it never distills
    with caplog.at_level(logging.WARNING, logger="pipebd"):
        fit(cd, checkpoint_dir=tmp_path, resume=True)
    assert max_diff(weights(cd), weights(reference)) <= TOL
    messages = [r.getMessage() for r in caplog.records if r.name == "pipebd" and r.levelno >= logging.WARNING]
    if warned is None:
        assert messages == []
    else:
        [message] = messages
        assert warned in message and "the checkpoint's values are kept" in message


def test_a_run_json_that_is_not_an_object_is_refused(tmp_path):
    # Before the fix a list read as a run of checkpoint format 1 ("an older pipebd").
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"run.json: it holds \[1, 2\], not the JSON object that records a pipebd run"):
        fit(codistillation(), checkpoint_dir=tmp_path, resume=True)


def test_distiller_and_codistillation_checkpoints_are_told_apart(saved, tmp_path_factory):
    teacher, student = [nn.Linear(FEATURES, FEATURES)], [nn.Linear(FEATURES, FEATURES)]
    distiller = pipebd.Distiller(teacher, student, device="cpu")
    with pytest.raises(ValueError, match="is of a Codistillation run, not of a Distiller run"):
        distiller.fit(torch.randn(20, FEATURES), 4, 3, checkpoint_dir=saved, resume=True)
    other = tmp_path_factory.mktemp("distill")
    distiller.fit(torch.randn(20, FEATURES), 4, 3, checkpoint_dir=other, progress=False)
    with pytest.raises(ValueError, match="is of a Distiller run, not of a Codistillation run"):
        fit(codistillation(), checkpoint_dir=other, resume=True)
    # a run.json of checkpoint format 1 named no kind
    record = json.loads((other / "run.json").read_text())
    del record["kind"]
    (other / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"older pipebd \(checkpoint format 1\)"):
        distiller.fit(torch.randn(20, FEATURES), 4, 3, checkpoint_dir=other, resume=True)


def test_non_finite_weights_are_never_saved(tmp_path):
    # A huge learning rate overflows the weights: the loss check or the weight check stops the
    # run, and the step-0 checkpoint stays the recorded one.
    cd = codistillation(optimizer=lambda p: torch.optim.SGD(p, lr=1e38))
    with pytest.raises(pipebd.NonFiniteLoss):
        fit(cd, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert listing(tmp_path) == ["run.json", "step0"]


def test_a_buffer_that_is_non_finite_by_design_does_not_stop_the_saves(tmp_path):
    cd = codistillation()
    for m in cd.models:
        m.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    fit(cd, steps=6, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert json.loads((tmp_path / "run.json").read_text())["step"] == 6


def test_a_directory_in_use_by_a_running_job_is_refused(tmp_path):
    with checkpoint.claimed(str(tmp_path)):
        with pytest.raises(ValueError, match="in use by another running pipebd job"):
            fit(codistillation(), checkpoint_dir=tmp_path)
    fit(codistillation(), steps=3, checkpoint_dir=tmp_path)
