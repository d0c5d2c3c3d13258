"""Batch slices of replicated stages and the rows that move between them.

Every step's global batch of B rows is cut into ``k`` contiguous slices for a stage with ``k``
replicas (sizes differ by at most one, so B need not be divisible by k). Between two stages of
different widths, replica ``j`` of the receiving stage needs exactly the rows of its slice; those
rows are the overlaps of the two partitions of ``[0, B)``, each sent point to point.
"""

from __future__ import annotations

from typing import NamedTuple

from ..plan import even_split


class Overlap(NamedTuple):
    src: int   # replica index in the sending stage
    dst: int   # replica index in the receiving stage
    lo: int    # first global row
    hi: int    # one past the last global row


def slices(batch_size: int, replicas: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` row range of each replica; raises ValueError if a slice would be empty."""
    if replicas > batch_size:
        raise ValueError(f"batch of {batch_size} rows cannot feed {replicas} replicas "
                         f"(each needs at least one row)")
    bounds, lo = [], 0
    for size in even_split(batch_size, replicas):
        bounds.append((lo, lo + size))
        lo += size
    return bounds


def overlaps(batch_size: int, src_replicas: int, dst_replicas: int) -> list[Overlap]:
    """Non-empty intersections of the two partitions, ordered by row."""
    src, dst = slices(batch_size, src_replicas), slices(batch_size, dst_replicas)
    out, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        lo, hi = max(src[i][0], dst[j][0]), min(src[i][1], dst[j][1])
        if lo < hi:
            out.append(Overlap(i, j, lo, hi))
        if src[i][1] <= dst[j][1]:
            i += 1
        else:
            j += 1
    return out
