"""Deterministic batch order and loading of batch slices, in the calling process or ahead of use
by DataLoader worker processes.

The samples of a run form one stream: epoch ``e`` is a permutation of the dataset drawn from a
generator seeded by ``(seed, e)``, and the epochs are concatenated. Batch ``t`` is rows
``[t*B, (t+1)*B)`` of that stream, so the batches depend on ``seed`` (and the dataset length)
only: every strategy and plan sees the same data in the same order, reshuffled each epoch.
Each sample is read with torch's generator seeded by its place in that stream (``StepRows``),
so random transforms in a dataset are part of the batches too.
"""

from __future__ import annotations

import numbers
import random
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from .rng import derived_seed

_SEED_MIX = 0x9E3779B1


class BatchOrder:
    """Sample indices of each step's batch."""

    def __init__(self, length: int, batch_size: int, seed: int):
        if length < 1:
            raise ValueError("dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        perm = self._epochs.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
            perm = torch.randperm(self.length, generator=gen)
            # Only the current and the next epoch are ever needed.
            self._epochs = {e: p for e, p in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = perm
        return perm

    def indices(self, step: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Indices of rows ``[lo, hi)`` of batch ``step`` (default: the whole batch)."""
        hi = self.batch_size if hi is None else hi
        start = step * self.batch_size + lo
        out, pos, end = [], start, step * self.batch_size + hi
        while pos < end:
            epoch, offset = divmod(pos, self.length)
            take = min(end - pos, self.length - offset)
            out.append(self._epoch(epoch)[offset:offset + take])
            pos += take
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def split_item(item: Any) -> tuple[Any, Any]:
    """A dataset item is ``x`` or ``(x, y, ...)``; return ``(x, y-or-None)``."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("dataset item is an empty sequence")
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def dataset_length(dataset: Dataset | torch.Tensor) -> int:
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"dataset must be a map-style torch Dataset or a tensor, not an IterableDataset "
                        f"({type(dataset).__name__}): pipebd draws every batch by index, in an order set by the seed")
    if isinstance(dataset, DataLoader):
        raise TypeError("dataset must be a map-style torch Dataset or a tensor, not a DataLoader: pipebd orders, "
                        "slices and loads the batches itself (fit's num_workers for loader processes); "
                        "pass the loader's .dataset")
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError("dataset must be a map-style torch Dataset (with __len__) or a tensor") from err


def _tensors(dataset: Dataset | torch.Tensor) -> bool:
    """Whether ``dataset``'s rows are indexed straight out of its tensors: a tensor, or a
    ``TensorDataset`` whose ``__getitem__`` is not overridden (a subclass's may transform)."""
    return isinstance(dataset, torch.Tensor) or (
        isinstance(dataset, TensorDataset) and type(dataset).__getitem__ is TensorDataset.__getitem__)


def load_rows(dataset: Dataset | torch.Tensor, index: torch.Tensor,
              seeds: Sequence[int] | None = None, labels: bool = True) -> tuple[torch.Tensor, Any]:
    """Collate the items at ``index`` into ``(x, y-or-None)`` batches. With ``seeds``, item
    ``index[r]`` is read with torch's CPU generator, numpy's global one and Python's ``random``
    seeded by ``seeds[r]`` (for random transforms in the dataset); their states are put back
    afterwards. Without ``labels`` the items' second fields are left out, so they need not
    collate (targets of varying size, say)."""
    if isinstance(dataset, torch.Tensor):
        return dataset[index], None
    if _tensors(dataset):
        tensors = dataset.tensors
        return tensors[0][index], (tensors[1][index] if labels and len(tensors) > 1 else None)
    rows = index.tolist()
    if seeds is None:
        pairs = [_item(dataset, i) for i in rows]
    else:
        generator = torch.random.default_generator
        states, pairs = (generator.get_state(), np.random.get_state(), random.getstate()), []
        try:
            for i, seed in zip(rows, seeds, strict=True):
                generator.manual_seed(seed)
                np.random.seed([seed & 0xFFFF_FFFF, seed >> 32])   # all of it, in numpy's 32-bit words
                random.seed(seed)
                pairs.append(_item(dataset, i))
        finally:
            generator.set_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
    try:
        x = default_collate([p[0] for p in pairs])
        y = default_collate([p[1] for p in pairs]) if labels and pairs[0][1] is not None else None
    except Exception as err:
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        _note(err, f"pipebd: while batching dataset items [{shown}] (samples must collate: tensors of one "
                   f"shape and dtype, or tuples of them)")
        raise
    return x, y


def _item(dataset: Dataset, i: int) -> tuple[Any, Any]:
    try:
        return split_item(dataset[i])
    except Exception as err:   # the user's __getitem__: say which item, the traceback says where
        _note(err, f"pipebd: while reading dataset item {i}")
        raise


def _note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):   # Python 3.11+
        err.add_note(note)


PROBE_ROWS = 2   # BatchNorm without running statistics cannot take a batch of one, even in eval mode


def probe_batch(dataset: Dataset | torch.Tensor, labels: bool = True) -> tuple[torch.Tensor, Any]:
    """The first ``PROBE_ROWS`` samples (fewer if that is all there is) as a batch, for shape
    checks before any process starts (read with a generator of its own: the caller's is left
    as it was)."""
    rows = min(PROBE_ROWS, dataset_length(dataset))
    return load_rows(dataset, torch.arange(rows), list(range(rows)), labels)


# Batches each loader worker keeps requested ahead of use (DataLoader's prefetch_factor); the
# simulator models the same queue.
PREFETCH = 2


def check_workers(num_workers: Any) -> int:
    """``num_workers`` as an int (numpy integers too); TypeError or ValueError otherwise."""
    if not isinstance(num_workers, numbers.Integral) or isinstance(num_workers, bool):
        raise TypeError(f"num_workers must be an integer, got {num_workers!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return int(num_workers)


class StepRows:
    """Index of request ``j``: rows ``[lo, hi)`` of batch ``steps[j]`` (picklable, for workers).
    With ``shard`` the order runs over a shard of the dataset: its positions are mapped to
    ``shard[position]``. Without ``labels`` the items' second fields are not loaded.

    ``load`` reads each sample with the CPU generator seeded by the order's seed and the
    sample's place in the run's stream of samples (``step * batch_size + row``): a random
    transform in the dataset draws the same for that sample whichever process loads it, in
    whatever slice, before or after a resume, and with or without loader processes.
    """

    def __init__(self, order: BatchOrder, steps: Sequence[int], lo: int, hi: int,
                 shard: torch.Tensor | None = None, labels: bool = True):
        self.order, self.steps, self.lo, self.hi, self.shard, self.labels = order, steps, lo, hi, shard, labels

    def __len__(self) -> int:
        return len(self.steps)

    def __call__(self, j: int) -> torch.Tensor:
        index = self.order.indices(self.steps[j], self.lo, self.hi)
        return index if self.shard is None else self.shard[index]

    def seeds(self, j: int) -> list[int]:
        start = self.steps[j] * self.order.batch_size
        return [derived_seed(self.order.seed, "sample", p) for p in range(start + self.lo, start + self.hi)]

    def load(self, dataset: Dataset | torch.Tensor, j: int) -> tuple[torch.Tensor, Any]:
        """Batch ``j``: ``load_rows`` of ``self(j)``, each sample read under its own seed."""
        return load_rows(dataset, self(j), None if _tensors(dataset) else self.seeds(j), self.labels)


class _Batches(Dataset):
    """Item ``j`` is the whole batch ``index.load(dataset, j)``, so that a loader worker
    builds batches and the DataLoader does no batching of its own."""

    def __init__(self, dataset: Dataset | torch.Tensor, index: StepRows):
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, Any]:
        return self.index.load(self.dataset, j)


def batches(dataset: Dataset | torch.Tensor, index: StepRows, num_workers: int = 0, *,
            pin_memory: bool = False, timeout: float = 0.0) -> Iterator[tuple[torch.Tensor, Any]]:
    """The batches ``index.load(dataset, j)`` for ``j = 0 .. len(index)-1``, in order.

    With ``num_workers == 0`` each is loaded in this process when it is asked for. Otherwise
    ``num_workers`` DataLoader worker processes load them ahead of use, each keeping
    ``PREFETCH`` requests in hand, so the loading overlaps the caller's work; an error in a
    worker is raised here with the worker's traceback. ``timeout`` (seconds, 0: none) bounds the
    wait for one batch from the workers. The workers start with the first batch asked for, and
    stop when the iterator is exhausted or closed (``close()``; dropping it is not enough while
    a traceback still refers to it).
    """
    if num_workers == 0:
        for j in range(len(index)):
            yield index.load(dataset, j)
        return
    seed = derived_seed(index.order.seed, "loader", index.lo, index.steps[0] if len(index) else 0)
    source = iter(batch_loader(_Batches(dataset, index), num_workers, seed=seed, pin_memory=pin_memory,
                               timeout=timeout))
    try:
        yield from source
    finally:
        shutdown = getattr(source, "_shutdown_workers", None)   # DataLoader's own, also run by its __del__
        if shutdown is not None:
            shutdown()


def feed(dataset: Dataset | torch.Tensor, index: StepRows, num_workers: int, recorder: Any,
         to_device: Callable[[torch.Tensor, Any], Any], *, pin_memory: bool = False,
         timeout: float = 0.0) -> Iterator[Any]:
    """``to_device(x, y)`` of each of the ``batches`` of ``index``, with the time it takes in a
    span of ``recorder`` (a ``pipebd.trace.Recorder``) named after its step: ``data`` when it is
    loaded then, ``data-wait`` while waiting for loader processes (their start included).
    Closing the generator stops the processes."""
    source = batches(dataset, index, num_workers, pin_memory=pin_memory, timeout=timeout)
    try:
        for t in index.steps:
            with recorder.span("data-wait" if num_workers else "data", t):
                batch = to_device(*next(source))
            yield batch
    finally:
        source.close()


def batch_loader(items: Dataset, num_workers: int, *, seed: int = 0, pin_memory: bool = False,
                 timeout: float = 0.0) -> DataLoader:
    """A DataLoader whose items are whole batches, loaded in order by ``num_workers`` processes.

    The processes' generators are seeded from ``seed`` (worker ``i``: the DataLoader's base seed
    drawn from it, plus ``i``), not from a draw of the caller's generator, which a DataLoader
    otherwise takes and which would change what the caller's script draws next.

    On Linux the processes are forked, as a DataLoader in a plain process forks them: they get
    the dataset without pickling it. (A rank that ``fit`` spawned is itself a fork-server child,
    whose default would pickle the dataset, which fails for classes defined in a script.)
    """
    context = "fork" if sys.platform.startswith("linux") else None
    return DataLoader(items, batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=PREFETCH,
                      pin_memory=pin_memory, timeout=timeout, multiprocessing_context=context,
                      generator=torch.Generator().manual_seed(seed))
