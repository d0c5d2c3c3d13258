import pytest

from pipebd import Plan
from pipebd.plan import default_plan, even_split


def test_locate_and_stage_ranks():
    plan = Plan(stages=[[0, 1], [2, 3, 4, 5]], replicas=[1, 3])
    assert plan.stage_ranks(0) == [0]
    assert plan.stage_ranks(1) == [1, 2, 3]
    assert [plan.locate(r) for r in range(5)] == [(0, 0), (1, 0), (1, 1), (1, 2), None]
    assert plan.ranks_used == 4
    plan.validate(num_blocks=6, world_size=4)
    plan.validate(num_blocks=6, world_size=5)  # a spare rank stays idle


def test_replicas_default_to_one():
    assert Plan([[0], [1, 2]]).replicas == (1, 1)


@pytest.mark.parametrize("stages, replicas, world, message", [
    ([[0, 1], [3]], None, 2, r"misses block\(s\) \[2\]"),
    ([[0, 1], [1, 2, 3]], None, 2, "repeats block 1"),
    ([[0, 2], [1, 3]], None, 2, "contiguous"),
    ([[2, 3], [0, 1]], None, 2, "contiguous"),
    ([[0, 1], [2, 3, 4]], None, 2, "names block 4"),
    ([[0, 1], [2, 3]], [2, 3], 4, r"needs 5 ranks .* world_size is 4"),
    ([[0, 1], [2, 3]], [1], 2, "2 stages but 1 replica"),
    ([[0, 1], [2, 3]], [1, 0], 2, "stage 1 has 0 replicas"),
    ([[0, 1, 2, 3], []], None, 2, "stage 1 has no blocks"),
    ([], None, 2, "no stages"),
])
def test_invalid_plans(stages, replicas, world, message):
    with pytest.raises(ValueError, match=message):
        Plan(stages, replicas).validate(num_blocks=4, world_size=world)


def test_even_split():
    assert even_split(10, 3) == [4, 3, 3]
    assert even_split(2, 4) == [1, 1, 0, 0]
    assert sum(even_split(17, 5)) == 17


@pytest.mark.parametrize("blocks, world, stages, replicas", [
    (4, 1, [[0, 1, 2, 3]], [1]),
    (4, 2, [[0, 1], [2, 3]], [1, 1]),
    (5, 2, [[0, 1, 2], [3, 4]], [1, 1]),
    (4, 3, [[0, 1], [2], [3]], [1, 1, 1]),
    (4, 4, [[0], [1], [2], [3]], [1, 1, 1, 1]),
    (2, 5, [[0], [1]], [3, 2]),
])
def test_default_plan_balances_block_counts(blocks, world, stages, replicas):
    plan = default_plan(blocks, world)
    assert plan == Plan(stages, replicas)
    plan.validate(blocks, world)


@pytest.mark.parametrize("text, stages, replicas", [
    ("[0-1]x1 | [2-5]x3", [[0, 1], [2, 3, 4, 5]], [1, 3]),
    ("0-1|2-5x3", [[0, 1], [2, 3, 4, 5]], [1, 3]),
    ("[0]x2|[1-3]", [[0], [1, 2, 3]], [2, 1]),
])
def test_parse_reads_what_describe_writes(text, stages, replicas):
    plan = Plan.parse(text)
    assert plan == Plan(stages, replicas)
    assert Plan.parse(plan.describe()) == plan


@pytest.mark.parametrize("text", ["a-b", "0-1|", "0x", "", "[0-1x2 | 2]x1", "0-1]x2", "\uff11-\uff12"])
def test_parse_rejects_malformed_plans(text):
    with pytest.raises(ValueError, match="cannot read stage"):
        Plan.parse(text)


def test_parse_rejects_ranges_that_count_down_and_non_strings():
    with pytest.raises(ValueError, match="counts down"):
        Plan.parse("[2-0]x1")
    with pytest.raises(TypeError, match="a plan to parse is a string"):
        Plan.parse(None)
    with pytest.raises(ValueError, match="names block 29999999; models have fewer than"):
        Plan.parse("[0-29999999]")    # built the 30-million-block list first (12 s, GBs)


@pytest.mark.parametrize("args,message", [
    (([0, 1, 2, 3],), r"stages are a list of block lists, one per stage, e.g. \[\[0, 1\], \[2, 3\]\]; got \[0, 1, 2, 3\]"),
    (([[0, 1], [2, 3]], 2), r"replicas are a list of counts, one per stage, e.g. \[1, 3\]; got 2"),
    (("[0-1]x2",), r"use pipebd.Plan.parse\('\[0-1\]x2'\)"),
])
def test_plans_of_the_wrong_shape_are_named(args, message):
    # They raised "'int' object is not iterable".
    with pytest.raises(TypeError, match=message):
        Plan(*args)


def test_describe_and_locate_outside_valid_plans():
    assert Plan([[0, 2], []]).describe() == "[0, 2]x1 | []x1"     # was "[0-2]x1" and an IndexError
    assert Plan([[0, 1]], [2]).locate(-1) is None                 # was (0, -1)


def test_plans_from_generators():
    # The shape check refused one-pass iterables, which had worked.
    assert Plan((range(i, i + 2) for i in (0, 2)), map(int, "12")) == Plan([[0, 1], [2, 3]], [1, 2])
