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
import operator
from typing import Any, Iterator

import torch


def derived_seed(seed: int, *keys: Any) -> int:
    """A seed for one use of the run's ``seed`` (the same in every process, unlike ``hash``; a
    numpy integer seed gives what the same Python int gives)."""
    key = repr((operator.index(seed), *keys)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def check_seed(seed: object) -> int:
    """``seed`` as a Python int (numpy integers included); TypeError for anything else."""
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {seed!r}") from None


@contextlib.contextmanager
def stream(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the CPU generator (and ``device``'s, on CUDA) seeded with ``seed``;
    their previous states are restored on exit."""
    if device.type != "cuda":   # fork_rng(devices=[]) does this, at four times the cost (per block and step)
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            yield
        finally:
            generator.set_state(state)
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):
        torch.random.default_generator.manual_seed(seed)
        torch.cuda.default_generators[index].manual_seed(seed)
        yield
