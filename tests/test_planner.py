"""The planner's dynamic program finds the same optimum as brute force over every plan.

Random cost tables: N <= 6 blocks, world size <= 6, per-block costs at every per-replica batch
size, including integer-valued tables with many exact ties and blocks that cost more at a
smaller batch (so adding replicas hurts). Optimum values are compared with a relative tolerance
of 1e-9 (the DP adds costs with prefix sums, the reference block by block).
"""

import dataclasses
import functools
import itertools
import math
import random

import numpy as np
import pytest

from pipebd.plan import Plan
from pipebd.planner import auto_plan, best_plan, cost_table, predict, stage_cost, useful_replicas
from pipebd.profiler import Profile, replica_rows
from pipebd.simulator import simulate, simulate_baseline


def random_profile(rng, n, world, batch, ints=False, costly_small=False, comm=True, sync_bn=False, workers=0):
    rows = replica_rows(batch, world)

    def value():
        return float(rng.randint(1, 4)) if ints else rng.uniform(0.1, 3.0)

    def curve():
        # Cost per call at each rows value (ascending rows): usually rising with rows.
        per_row, fixed = value(), value()
        ys = [fixed + per_row * r / batch for r in rows]
        if costly_small and rng.random() < 0.5:
            ys = [y + (batch / r) * value() for y, r in zip(ys, rows)]   # small batches are inefficient
        return [float(round(y)) if ints else y for y in ys]

    p2p = [(4096, 1e-3), (1 << 20, 5e-2)] if comm else []
    allreduce = [(2, 4096, 2e-3), (2, 1 << 20, 0.1)] if comm and world > 1 else []
    # With loader workers, loading as slow as the blocks: their pace often sets stage 0's time.
    load = [float(rng.randint(0, 2)) if ints else rng.uniform(0, 0.5) for _ in rows] if not workers else curve()
    return Profile(n, batch, world, "cpu", "gloo", rows, [curve() for _ in range(n)], [curve() for _ in range(n)], load,
                   [rng.choice([0, 64, 4096]) for _ in range(n + 1)], [rng.choice([0, 1024, 1 << 16]) for _ in range(n)],
                   p2p, allreduce, bn_bytes=[[rng.choice([36, 4100])] * rng.randint(0, 3) for _ in range(n)],
                   sync_batchnorm=sync_bn, num_workers=workers)


def all_plans(n, world):
    for cuts in itertools.product([False, True], repeat=n - 1):
        stages, start = [], 0
        for b, cut in enumerate(cuts, start=1):
            if cut:
                stages.append(list(range(start, b)))
                start = b
        stages.append(list(range(start, n)))
        for replicas in itertools.product(range(1, world + 1), repeat=len(stages)):
            if sum(replicas) <= world:
                yield Plan(stages, replicas)


def brute_force(profile, world):
    """(slowest stage, sum of squared stage times) of the best plan, and how many plans tie."""
    scored = []
    for plan in all_plans(profile.num_blocks, world):
        times = [stage_cost(profile, s[0], s[-1] + 1, k).time for s, k in zip(plan.stages, plan.replicas)]
        scored.append((max(times), sum(t * t for t in times)))
    best = min(b for b, _ in scored)
    close = [sq for b, sq in scored if math.isclose(b, best, rel_tol=1e-9)]
    return best, min(close), len(close)


CASES = [(seed, n, world, ints, costly)
         for seed, (n, world) in enumerate([(1, 1), (1, 4), (2, 3), (3, 2), (3, 5), (4, 4), (5, 3), (5, 6), (6, 4), (6, 6)])
         for ints, costly in [(False, False), (True, False), (False, True), (True, True)]]
CASES = [case + (False, 0) for case in CASES]
SYNC_BN_CASES = [(seed, n, world, False, False, True, 0) for seed, (n, world) in enumerate([(3, 5), (5, 6), (6, 4)])]
LOADER_CASES = [(seed, n, world, ints, False, False, workers)
                for seed, (n, world, ints, workers) in enumerate([(3, 5, False, 1), (4, 4, True, 2), (6, 6, False, 3)])]


@pytest.mark.parametrize("seed,n,world,ints,costly,sync_bn,workers", CASES + SYNC_BN_CASES + LOADER_CASES)
def test_dp_equals_brute_force(seed, n, world, ints, costly, sync_bn, workers):
    rng = random.Random(1000 * seed + 10 * ints + costly + 100 * sync_bn + 10000 * workers)
    batch = rng.choice([world, 7, 12, 64])
    profile = random_profile(rng, n, world, batch, ints=ints, costly_small=costly, sync_bn=sync_bn, workers=workers)
    plan, bottleneck = best_plan(cost_table(profile, world), world)
    plan.validate(n, world)
    best, best_sq, ties = brute_force(profile, world)
    got = predict(profile, plan).stage_times
    assert bottleneck == pytest.approx(best, rel=1e-9)
    assert max(got) == pytest.approx(best, rel=1e-9)
    assert sum(t * t for t in got) == pytest.approx(best_sq, rel=1e-9), f"{ties} plans tie on the bottleneck"


def test_dp_equals_brute_force_with_blocks_that_need_two_rows():
    """Blocks with BatchNorm over one value per channel (``min_rows`` 2) get no replica with a
    slice of fewer rows: the optimum over the plans that give every replica enough rows."""
    changed = 0
    for seed, (n, world) in enumerate([(1, 4), (2, 4), (2, 6), (3, 6), (4, 5), (6, 6)] * 2):
        rng = random.Random(seed)
        batch = rng.choice([world, world + 1])   # the most replicas leave a slice one row
        profile = dataclasses.replace(random_profile(rng, n, world, batch, comm=False),
                                      min_rows=[rng.choice([1, 2, 2]) for _ in range(n)])

        def fits(plan):
            return all(batch // k >= max(profile.block_rows(b) for b in stage)
                       for stage, k in zip(plan.stages, plan.replicas))

        plan, bottleneck = best_plan(cost_table(profile, world), world)
        assert fits(plan)
        assert bottleneck == pytest.approx(min(
            max(stage_cost(profile, s[0], s[-1] + 1, k).time for s, k in zip(p.stages, p.replicas))
            for p in all_plans(n, world) if fits(p)), rel=1e-9)
        changed += not fits(best_plan(cost_table(dataclasses.replace(profile, min_rows=[]), world), world)[0])
    assert changed >= 2   # in some cases the constraint decided the plan, not only allowed it


def test_ties_are_common_in_integer_tables():
    """The integer cases above really exercise ties (else the tie-break is untested)."""
    rng = random.Random(7)
    profile = random_profile(rng, 5, 5, 10, ints=True, comm=False)
    assert brute_force(profile, 5)[2] > 1


def test_costly_small_batch_keeps_one_replica():
    """A block that slows down at smaller batches gets no replicas even when ranks are spare."""
    rows = replica_rows(8, 4)                      # [2, 3, 4, 8]
    slow_small = [10.0 / r * 8 for r in rows]      # 80 at 1 row ... 10 at 8 rows: replicas hurt
    profile = Profile(2, 8, 4, "cpu", "gloo", rows, [[1.0] * 4, slow_small], [[1.0] * 4, [0.0] * 4],
                      [0.0] * 4, [0, 0, 0], [0, 0])
    prediction = auto_plan(profile)
    assert prediction.plan.replicas[-1] == 1
    assert prediction.bottleneck_s == pytest.approx(10.0)   # block 1 alone, at all 8 rows


@pytest.mark.parametrize("sync_bn,workers", [(False, 0), (True, 0), (False, 2)])
def test_cost_table_matches_stage_cost(sync_bn, workers):
    rng = random.Random(3)
    profile = random_profile(rng, 4, 5, 16, sync_bn=sync_bn, workers=workers)
    table = cost_table(profile, 5)
    for first in range(4):
        for stop in range(first + 1, 5):
            for k in range(1, 6):
                assert table[first, stop, k] == pytest.approx(stage_cost(profile, first, stop, k).time, rel=1e-12)


def test_sync_batchnorm_charges_two_allreduces_per_layer_and_replica_slot():
    # pipebd.batchnorm: per layer and step, one allreduce of k slots of (2C + 1) floats in the
    # forward and one in the backward; nothing on one replica or without the option.
    rows = replica_rows(8, 4)
    plain = Profile(2, 8, 4, "cpu", "gloo", rows, [[1.0] * 4] * 2, [[1.0] * 4] * 2, [0.0] * 4, [0, 0, 0], [400, 400],
                    [], [(2, 4096, 2e-3), (2, 1 << 20, 0.1)], bn_bytes=[[36, 36], [4100]])
    synced = dataclasses.replace(plain, sync_batchnorm=True)
    for k in (1, 2, 4):
        extra = 2 * (2 * plain.allreduce_time(k, k * 36) + plain.allreduce_time(k, k * 4100))
        gap = stage_cost(synced, 0, 2, k).allreduce - stage_cost(plain, 0, 2, k).allreduce
        assert gap == pytest.approx(extra, rel=1e-12) and (gap > 0) == (k > 1)
    assert simulate_baseline(synced, 4, 3).wall_s - simulate_baseline(plain, 4, 3).wall_s == pytest.approx(3 * extra)
    # replicas cost more with it, so the planner may choose fewer of them, never a faster plan
    assert auto_plan(synced).bottleneck_s >= auto_plan(plain).bottleneck_s


def test_loader_workers_take_loading_off_stage_zero():
    # Loading 6 s per batch at any rows; stage 0's own work is 2 + 1 = 3 s (rows do not matter).
    rows = replica_rows(8, 4)
    inline = Profile(2, 8, 4, "cpu", "gloo", rows, [[2.0] * 4, [1.0] * 4], [[1.0] * 4, [1.0] * 4], [6.0] * 4,
                     [0, 0, 0], [0, 0])
    for workers, forward, period in ((0, 8.0, 0.0), (1, 2.0, 6.0), (2, 2.0, 3.0), (4, 2.0, 1.5)):
        p = dataclasses.replace(inline, num_workers=workers)
        cost = stage_cost(p, 0, 1, 1)
        assert (cost.forward, cost.data_period) == (forward, period)
        assert cost.time == max(forward + 1.0, period)
        assert stage_cost(p, 1, 2, 1).data_period == 0.0        # only stage 0 loads
    # Inline, the loading makes block 0 the bottleneck; with 2 workers stage 0 takes 3 s.
    assert auto_plan(inline).bottleneck_s == pytest.approx(9.0)
    assert auto_plan(dataclasses.replace(inline, num_workers=2)).bottleneck_s == pytest.approx(3.0)


def every_count_dp(table, world):
    """(slowest stage, least sum of squared stage times among plans that reach it), trying every
    replica count of every stage: the reference for the planner's pruned search."""
    n = table.shape[0] - 1

    @functools.cache
    def slowest(i, r):
        if i == n:
            return 0.0
        return min((max(table[i, stop, k], slowest(stop, r - k))
                    for stop in range(i + 1, n + 1) for k in range(1, r + 1)), default=math.inf)

    best = slowest(0, world)

    @functools.cache
    def squares(i, r):
        if i == n:
            return 0.0
        return min((table[i, stop, k] ** 2 + squares(stop, r - k)
                    for stop in range(i + 1, n + 1) for k in range(1, r + 1) if table[i, stop, k] <= best),
                   default=math.inf)

    return best, squares(0, world)


@pytest.mark.parametrize("seed", range(12))
def test_pruned_search_equals_every_replica_count_at_larger_worlds(seed):
    """Beyond brute force's reach: worlds of 9 to 40 ranks, batches smaller and larger than the
    world, ties (integer tables), stages that slow down with more replicas."""
    rng = random.Random(seed)
    n, world = rng.randint(2, 7), rng.randint(9, 40)
    batch = rng.choice([world // 2, world, 24, 64, 100])
    profile = random_profile(rng, n, min(world, 8), batch, ints=seed % 2 == 1, costly_small=seed % 3 == 0)
    table = cost_table(profile, world)
    plan, bottleneck = best_plan(table, world)
    plan.validate(n, world)
    best, best_sq = every_count_dp(table, world)
    got = predict(profile, plan).stage_times
    assert bottleneck == pytest.approx(best, rel=1e-9)
    assert max(got) == pytest.approx(best, rel=1e-9)
    assert sum(t * t for t in got) == pytest.approx(best_sq, rel=1e-9)


def test_useful_replicas_are_the_strict_prefix_minima():
    times = np.array([5.0, 3.0, 3.0, 4.0, 2.0, np.inf, 2.0, 1.0])
    assert useful_replicas(times).tolist() == [1, 2, 5, 8]
    assert useful_replicas(np.array([np.inf, np.inf])).tolist() == []


def test_large_world_is_fast():
    """Exact planning for 64 blocks on 1024 ranks takes seconds (about 2 s here)."""
    import time
    rng = random.Random(5)
    profile = random_profile(rng, 64, 8, 512)
    start = time.perf_counter()
    prediction = auto_plan(profile, 1024)
    assert time.perf_counter() - start < 30
    prediction.plan.validate(64, 1024)


def test_bad_world_sizes_steps_and_batches_are_refused():
    profile = random_profile(random.Random(0), 3, 4, 2)
    for world in (0, -1, 2.0, True):
        with pytest.raises((ValueError, TypeError), match="world_size must be an integer >= 1"):
            auto_plan(profile, world)
        with pytest.raises((ValueError, TypeError), match="world_size must be an integer >= 1"):
            simulate_baseline(profile, world, 10)
    for steps in (0, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="steps must be an integer >= 1"):
            simulate(profile, Plan([[0, 1, 2]]), steps)
    with pytest.raises((ValueError, TypeError), match="max_inflight must be an integer >= 1"):
        simulate(profile, Plan([[0, 1, 2]]), 10, max_inflight=1.5)
    # As fit: a replica without a row of the batch (2 here) is refused, where the planner never plans one.
    with pytest.raises(ValueError, match=r"batch_size 2 is smaller than the widest stage's replica count \(3\)"):
        simulate(profile, Plan([[0], [1, 2]], [1, 3]), 10)
    with pytest.raises(ValueError, match="batch_size 2 is smaller"):
        simulate_baseline(profile, 4, 10)
    assert max(auto_plan(profile, 4).plan.replicas) <= 2
