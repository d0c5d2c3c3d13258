"""The simulator against closed forms of the schedule, and its speed at 1024 devices."""

import dataclasses
import time

import pytest

from pipebd.plan import Plan
from pipebd.planner import predict
from pipebd.profiler import Profile
from pipebd.simulator import simulate, simulate_baseline


def profile(teacher, student, batch=8, load=0.0, world=4, act=0, grad=0, comm=False, workers=0):
    """Costs that do not depend on the rows (equal at 1 and at ``batch`` rows), so closed forms
    stay short."""
    n = len(teacher)
    p2p = [(4096, 1e-3), (8192, 2e-3)] if comm else []
    ar = [(2, 4096, 4e-3), (2, 8192, 8e-3)] if comm else []
    return Profile(n, batch, world, "cpu", "gloo", [1, batch], [[t, t] for t in teacher], [[s, s] for s in student],
                   [load, load], [act] * (n + 1), [grad] * n, p2p, ar, num_workers=workers)


def test_single_stage_is_steps_times_its_cost():
    p = profile([1.0, 2.0], [0.5, 0.25], load=0.25)
    sim = simulate(p, Plan([[0, 1]]), steps=10)
    assert sim.wall_s == pytest.approx(10 * 4.0)
    assert sim.samples_per_s == pytest.approx(8 / 4.0)
    assert sim.stage_utilization == [pytest.approx(1.0)]


def test_two_stage_pipeline_fill():
    # Stage 0: teacher 1, student 2; stage 1: teacher 1, student 2. Stage 1 starts batch 0 once
    # stage 0 has sent it (after its teacher), then runs back to back.
    p = profile([1.0, 1.0], [2.0, 2.0])
    sim = simulate(p, Plan([[0], [1]]), steps=50)
    assert sim.wall_s == pytest.approx(1.0 + 50 * 3.0)
    assert sim.stage_waiting[1] == pytest.approx(1.0 / sim.wall_s)


def test_backpressure_holds_the_fast_stage_back():
    p = profile([0.5, 5.0], [0.5, 5.0])          # stage 0 takes 1 per batch, stage 1 takes 10
    free = simulate(p, Plan([[0], [1]]), steps=40, max_inflight=1000)
    bounded = simulate(p, Plan([[0], [1]]), steps=40, max_inflight=2)
    assert free.stage_waiting[0] == 0.0
    assert bounded.wall_s == pytest.approx(free.wall_s)       # the slow stage sets the pace either way
    # From step 4 on, stage 0 sends batch t when stage 1 starts batch t - 3 (it runs at most
    # max_inflight + 1 batches ahead, as the runtime does): it ends at 0.5 + 10 * 36 + 0.5.
    assert bounded.stage_waiting[0] == pytest.approx((0.5 + 10 * 36 + 0.5 - 40 * 1.0) / bounded.wall_s)
    assert bounded.wall_s == pytest.approx(0.5 + 40 * 10)


@pytest.mark.parametrize("load,workers", [(0.1, 0), (3.0, 2), (9.0, 2)])
def test_long_runs_converge_to_the_planner_bound(load, workers):
    # With 2 loader workers, 3 s of loading is hidden behind stage 0's work and 9 s is not.
    p = profile([3.0, 1.0, 2.0], [1.0, 1.0, 0.5], load=load, comm=True, act=1024, grad=4096, workers=workers)
    for plan in (Plan([[0], [1, 2]]), Plan([[0, 1], [2]], [2, 1]), Plan([[0], [1], [2]], [1, 2, 1])):
        bound = predict(p, plan).samples_per_s
        assert simulate(p, plan, steps=4000).samples_per_s == pytest.approx(bound, rel=2e-3)
        assert simulate(p, plan, steps=10).samples_per_s < bound    # fill and drain cost something


def test_loader_workers_closed_forms():
    # 4 workers, 2 s per batch: batches 4m..4m+3 are ready at 2(m+1). A consumer taking 0.2 s
    # per batch waits for each group of four: batch 4m+3 ends at 2(m+1) + 0.8.
    fast = simulate(profile([0.1], [0.1], load=2.0, workers=4), Plan([[0]]), steps=40)
    assert fast.wall_s == pytest.approx(2 * 10 + 0.8)
    assert fast.stage_waiting[0] == pytest.approx((fast.wall_s - 40 * 0.2) / fast.wall_s)
    # A consumer taking 2 s per batch waits for the first only, as the prefetch queue stays ahead;
    # loading inline it takes 2 + 2 s per batch.
    slow = profile([1.0], [1.0], load=2.0, workers=4)
    assert simulate(slow, Plan([[0]]), steps=40).wall_s == pytest.approx(2.0 + 40 * 2.0)
    assert simulate(dataclasses.replace(slow, num_workers=0), Plan([[0]]), steps=40).wall_s == pytest.approx(40 * 4.0)
    # One worker with a queue of two: it loads batch t + 2 only once batch t is taken.
    one = simulate(profile([0.5], [0.5], load=0.5, workers=1), Plan([[0]]), steps=3)
    assert one.wall_s == pytest.approx(0.5 + 3 * 1.0)


def test_baseline_with_loader_workers():
    # Per step, block 0 computes 1.5 s and block 1 2.5 s; 2 workers deliver a batch every 1.5 s,
    # so after the first batch (3 s) loading costs the baseline nothing; inline it costs 3 s a step.
    p = profile([1.0, 1.0], [0.5, 0.5], load=3.0, world=1, workers=2)
    steps = 20
    assert simulate_baseline(p, 1, steps).wall_s == pytest.approx(3.0 + steps * (1.5 + 2.5))
    inline = simulate_baseline(dataclasses.replace(p, num_workers=0), 1, steps)
    assert inline.wall_s == pytest.approx(steps * (1.5 + 2.5 + 2 * 3.0))


def test_baseline_closed_form():
    p = profile([1.0, 2.0, 3.0], [0.5, 0.5, 0.5], load=0.1, world=2, comm=True, grad=4096)
    ar = p.allreduce_time(2, 4096)
    per_step = (0.1 + 1 + 0.5 + ar) + (0.1 + 3 + 0.5 + ar) + (0.1 + 6 + 0.5 + ar)
    sim = simulate_baseline(p, 2, steps=7)
    assert sim.wall_s == pytest.approx(7 * per_step)
    assert sim.stage_utilization[0] == pytest.approx((per_step - 3 * ar) / per_step)


def test_1024_devices_64_blocks_in_seconds():
    n = 64
    p = Profile(n, 4096, 8, "cpu", "gloo", [512, 4096], [[0.01 * (1 + b % 5), 0.08 * (1 + b % 5)] for b in range(n)],
                [[0.005, 0.04]] * n, [0.001, 0.008], [1 << 14] * (n + 1), [1 << 20] * n,
                [(4096, 1e-5), (1 << 22, 1e-3)], [(2, 4096, 2e-5), (8, 1 << 20, 5e-3)])
    start = time.perf_counter()
    sim = simulate(p, Plan([[b] for b in range(n)], [16] * n), steps=200)
    base = simulate_baseline(p, 1024, steps=200)
    assert time.perf_counter() - start < 5.0
    assert sim.plan.ranks_used == 1024 and len(sim.stage_utilization) == 64
    assert 0 < min(sim.stage_utilization) <= max(sim.stage_utilization) <= 1
    assert base.samples_per_s < sim.samples_per_s
