import itertools

import pytest

from pipebd.runtime.redistribute import overlaps, slices


def owner(parts, row):
    return next(i for i, (lo, hi) in enumerate(parts) if lo <= row < hi)


@pytest.mark.parametrize("batch", [1, 2, 5, 7, 12, 13])
def test_slices_partition_the_batch(batch):
    for k in range(1, batch + 1):
        parts = slices(batch, k)
        assert parts[0][0] == 0 and parts[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_slices_reject_more_replicas_than_rows():
    with pytest.raises(ValueError, match="batch of 2 rows cannot feed 3 replicas"):
        slices(2, 3)


@pytest.mark.parametrize("batch", [3, 7, 10, 13])
def test_overlaps_match_row_by_row_brute_force(batch):
    for src_k, dst_k in itertools.product(range(1, 5), repeat=2):
        if max(src_k, dst_k) > batch:
            continue
        src, dst = slices(batch, src_k), slices(batch, dst_k)
        expected = {}
        for row in range(batch):
            key = (owner(src, row), owner(dst, row))
            lo, hi = expected.get(key, (row, row))
            expected[key] = (lo, row + 1)
        got = overlaps(batch, src_k, dst_k)
        assert {(o.src, o.dst): (o.lo, o.hi) for o in got} == expected
        assert sum(o.hi - o.lo for o in got) == batch
        assert [o.lo for o in got] == sorted(o.lo for o in got)
