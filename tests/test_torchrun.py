"""SPMD under torchrun: every rank calls fit, and the result equals the one-process reference."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipebd
from pipebd.models import mlp_pair


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_fit(out, plan, *extra, num_workers=0, lr=0.1, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUM_WORKERS": str(num_workers), "LR": str(lr)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).with_name("torchrun_fit.py")), str(out), plan,
           *map(str, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def reference_weights():
    teacher, student = mlp_pair(num_blocks=5, seed=0)
    distiller = pipebd.Distiller(teacher, student, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                 device="cpu")
    data = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    distiller.fit(data, batch_size=7, steps=20, world_size=1, seed=3)
    return [p.detach() for p in distiller.student_model().parameters()]


@pytest.mark.parametrize("plan, num_workers", [("[0-1]x1 | [2-4]x2", 0), ("auto", 0), ("[0]x2 | [1-4]x1", 2)])
def test_torchrun_matches_reference(tmp_path, plan, num_workers):
    """With "auto", every rank joins the communication benchmark, rank 0 profiles, and all ranks
    must run the same plan. With ``num_workers`` both ranks of stage 0 load their halves in
    DataLoader processes forked from a torchrun rank."""
    out = tmp_path / "result"
    torchrun_fit(out, plan, num_workers=num_workers)
    reference = reference_weights()
    plans = set()
    for rank in range(3):
        got = torch.load(f"{out}.{rank}")
        plans.add(got["plan"])
        assert got["teacher_block_runs"] == [20 * 7] * 5
        assert got["modes_kept"]          # fit trains the rank's own blocks, then gives them back as they came
        assert max((a - b).abs().max().item() for a, b in zip(got["weights"], reference)) <= 1e-5
    assert len(plans) == 1 and (plan == "auto" or plans == {plan})


def test_torchrun_resumes_from_a_checkpoint(tmp_path):
    """Every rank checks the directory before rank 0 claims it; the resumed ranks load the saved
    state and end with the uninterrupted run's weights. The changed learning rate is kept from
    the checkpoint and named once, by rank 0."""
    out, saved = tmp_path / "result", tmp_path / "checkpoint"
    torchrun_fit(out, "[0-1]x1 | [2-4]x2", saved, 10, "new")
    resumed = torchrun_fit(out, "[0-2]x2 | [3-4]x1", saved, 20, "resume", lr=0.2)
    assert resumed.stderr.count("settings differ from the checkpoint's") == 1, resumed.stderr[-3000:]
    assert "optimizer.lr saved 0.1, this run 0.2" in resumed.stderr
    assert "teacher gives other outputs" not in resumed.stderr      # rank 0's is the same; the others' differ
    reference = reference_weights()
    for rank in range(3):
        got = torch.load(f"{out}.{rank}")
        assert got["teacher_block_runs"] == [10 * 7] * 5
        assert max((a - b).abs().max().item() for a, b in zip(got["weights"], reference)) <= 1e-5


def test_torchrun_ranks_all_refuse_a_directory_in_use(tmp_path):
    """Rank 0 takes the directory for the job; when another job holds it, every rank raises the
    reason (the others waited for rank 0 at the next collective until torchrun or the timeout
    ended them, without it)."""
    saved = tmp_path / "checkpoint"
    with pipebd.checkpoint.claimed(str(saved)):
        proc = torchrun_fit(tmp_path / "result", "[0-1]x1 | [2-4]x2", saved, 10, "new", ok=False)
    assert proc.stderr.count("is in use by another running pipebd job") >= 3, proc.stderr[-3000:]


def torchrun_codistill(out, mode, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).with_name("torchrun_codistill.py")), str(out), mode,
           *map(str, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["codistill", "online"])
def test_torchrun_codistillation_matches_the_reference_loop(tmp_path, mode):
    # 2 models x 2 ranks (DDP groups); every rank ends with both trained models.
    from test_codistill import max_diff, reference
    out = tmp_path / "result"
    torchrun_codistill(out, mode)
    want, _ = reference(2, mode, burn_in=10)
    for rank in range(4):
        assert max_diff(torch.load(f"{out}.{rank}"), want) <= 1e-5


def test_torchrun_codistillation_resumes_from_a_checkpoint(tmp_path):
    # 14 of 24 steps, then the rest: the resume restores the stale copies (step 8) and the
    # exchange in flight (step 12) on every rank from the files of both models.
    from test_codistill import max_diff, reference
    out, saved = tmp_path / "result", tmp_path / "checkpoint"
    torchrun_codistill(out, "codistill", saved, 14, "new")
    torchrun_codistill(out, "codistill", saved, 24, "resume")
    want, _ = reference(2, "codistill", burn_in=10)
    for rank in range(4):
        assert max_diff(torch.load(f"{out}.{rank}"), want) <= 1e-5
        assert (tmp_path / f"result.{rank}.start").read_text() == "14"   # resumed, not started afresh
