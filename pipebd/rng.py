"""Random streams that depend on the run's ``seed`` and on where the work is, not on history.

A student block's training forward (dropout masks, any other random op) draws from a stream of
its own, seeded by ``derived_seed(seed, what, block or model, step, replica)``, with the caller's
generator states put back afterwards. So the masks of a step are the same whatever ran before
it on the rank: a run resumed from a checkpoint draws what the uninterrupted run drew, and a plan
whose stages have one replica each draws what one process does. Replicas of a stage draw
independent masks for their slices (the replica index is part of the seed), so a plan with
replicas differs from one process by its masks, as DDP does.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator

import torch


def derived_seed(seed: int, *keys: Any) -> int:
    """A seed for one use of the run's ``seed`` (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def stream(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the CPU generator (and ``device``'s, on CUDA) seeded with ``seed``;
    their previous states are restored on exit."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):
        torch.random.default_generator.manual_seed(seed)
        torch.cuda.default_generators[index].manual_seed(seed)
        yield
