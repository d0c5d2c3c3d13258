"""The profiler of automatic hybrid distribution: what each block costs at each batch size a plan
could give it, and what moving tensors between ranks costs on the backend in use.

``profile_job`` measures, per block, the teacher forward and the student forward + backward +
optimizer step (through the runtime's own ``RankRuntime`` code paths, on copies of the blocks) at
every per-replica batch size ``ceil(B / k)``, ``k = 1 .. world_size``; the data loading of stage 0;
the bytes per sample that cross each block boundary and the gradient bytes of each student block.
``measure_comm`` times point-to-point transfers and allreduces on ``world_size`` ranks of the real
backend (gloo or NCCL) and fits the usual latency/bandwidth models to them. Every compute and
loading figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones; transfers
take the median of ``COMM_REPEATS`` after ``COMM_WARMUP``.

A ``Profile`` is cached as JSON under ``$PIPEBD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pipebd``,
else ``~/.cache/pipebd``), keyed by what changes the costs: the blocks' structure (not their
weights: the repr, parameter shapes, the source of their classes and their settings: attributes
that hold numbers, strings, dtypes, devices, enums, or lists, tuples, sets and dicts of them,
long ones by their length; functions by their source; other objects, such as a transform, by
their class's source and their own settings, four levels deep), the boundary shapes, the
dataset's type, source, settings and length, batch size, world size, device (on a CPU its model
and core count), backend, the threads the blocks run with, optimizer (its class and each
parameter group's settings but the learning rate) and losses. Costs set by anything else (a global, a file) are not seen: an
empty ``$PIPEBD_CACHE_DIR`` measures again. ``str(profile)`` prints it as a table.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from .outputs import write_output
from .checks import build_optimizer, check_int, integer
from .data import PREFETCH, batch_loader
from .plan import Plan
from .runtime.launch import backend_for, own_gpu, spawn_tasks, torch_threads
from .runtime.worker import Job, RankRuntime, progress_bar

log = logging.getLogger("pipebd")

# Transfer sizes for the communication fits (bytes), and timed repeats of each: collectives of
# many ranks sharing few cores vary more from call to call than block computations do.
P2P_SIZES = (4 << 10, 4 << 20)
ALLREDUCE_SIZES = (4 << 10, 1 << 20)
COMM_REPEATS = 15
COMM_WARMUP = 3


@dataclass
class Profile:
    """Measured costs of one teacher/student pair at one global batch size.

    ``rows`` are the per-replica batch sizes measured, ascending; ``teacher[b][i]`` and
    ``student[b][i]`` are block ``b``'s seconds per call at ``rows[i]`` rows, ``load[i]`` stage
    0's data loading. ``act_bytes[i]`` is the bytes per sample received by a stage starting at
    block ``i`` (labels included when relayed); ``grad_bytes[b]`` the gradient of student block
    ``b``. Communication is modelled from the measurements in ``p2p`` (bytes, seconds) and
    ``allreduce`` (ranks, bytes, seconds): a transfer costs ``latency + bytes * s_per_byte``; a
    ring allreduce over ``k`` ranks ``2(k-1) * latency + 2(k-1)/k * bytes * s_per_byte``.
    ``bn_bytes[b]`` lists, per BatchNorm layer of student block ``b``, the bytes of statistics one
    replica contributes when ``sync_batchnorm`` is on (the job's option, not part of the cache).
    ``num_workers`` says how stage 0 loads: in its own process, where ``load`` adds to its time
    per batch, or by that many loader processes, which deliver a batch every
    ``load / num_workers`` seconds at best while the stage computes. Taking a ready batch from
    them still costs the rank ``receive[i]`` (unpickling, mapping shared memory), and the first
    batch comes ``loader_start`` seconds (starting the processes) plus one load after the start;
    both are measured only for a profile taken with loader processes (else 0).
    ``min_rows[b]`` is the fewest rows block ``b`` runs on (2 for a BatchNorm layer with one
    value per channel per row, in the student or, without running statistics, the teacher;
    empty: 1 for every block): below it its times are not measured but scaled down from its
    smallest measured row count, and the planner gives no replica fewer rows.
    """

    num_blocks: int
    batch_size: int
    world_size: int
    device: str
    backend: str
    rows: list[int]
    teacher: list[list[float]]
    student: list[list[float]]
    load: list[float]
    act_bytes: list[int]
    grad_bytes: list[int]
    p2p: list[tuple[int, float]] = field(default_factory=list)
    allreduce: list[tuple[int, int, float]] = field(default_factory=list)
    warmup: int = 0
    repeats: int = 1
    threads: int | None = None
    bn_bytes: list[list[int]] = field(default_factory=list)
    sync_batchnorm: bool = False
    num_workers: int = 0
    receive: list[float] = field(default_factory=list)
    loader_start: float = 0.0
    min_rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check()
        self.p2p = [tuple(m) for m in self.p2p]              # type: ignore[misc]
        self.allreduce = [tuple(m) for m in self.allreduce]  # type: ignore[misc]
        self.p2p_fit = _least_squares([(1.0, n) for n, _ in self.p2p], [t for _, t in self.p2p])
        self.allreduce_fit = _least_squares([(2.0 * (k - 1), 2.0 * (k - 1) / k * n) for k, n, _ in self.allreduce],
                                            [t for _, _, t in self.allreduce])

    def _check(self) -> None:
        """ValueError, naming the field, unless the figures have the shapes and ranges the
        planner reads: a profile from a file or the cache may have been edited, cut or written
        by another version, and a NaN in it would make every plan look impossible."""
        n = self.num_blocks
        for name in ("num_blocks", "batch_size", "world_size"):
            if integer(getattr(self, name)) is None or getattr(self, name) < 1:
                raise ValueError(f"profile field {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if integer(self.num_workers) is None or self.num_workers < 0:
            raise ValueError(f"profile field num_workers must be an integer >= 0, got {self.num_workers!r}")
        rows = self.rows
        if not rows or any(integer(r) is None or r < 1 for r in rows) or list(rows) != sorted(set(rows)):
            raise ValueError(f"profile field rows must be ascending batch sizes >= 1, got {rows!r}")
        for name, per_block in (("teacher", self.teacher), ("student", self.student)):
            if len(per_block) != n:
                raise ValueError(f"profile field {name} has {len(per_block)} blocks, not num_blocks={n}")
        curves = [("load", self.load)] + ([("receive", self.receive)] if self.receive else [])
        curves += [(name, times) for name in ("teacher", "student") for times in getattr(self, name)]
        for name, times in curves:
            if len(times) != len(rows) or not all(_seconds(t) for t in times):
                raise ValueError(f"profile field {name} needs {len(rows)} finite seconds >= 0 (one per "
                                 f"row count), got {times!r}")
        if self.min_rows and (len(self.min_rows) != n or any(integer(r) is None or r < 1 for r in self.min_rows)):
            raise ValueError(f"profile field min_rows needs {n} row counts >= 1 (or none), got {self.min_rows!r}")
        if not _seconds(self.loader_start):
            raise ValueError(f"profile field loader_start must be finite seconds >= 0, got {self.loader_start!r}")
        for name, values, least in (("act_bytes", self.act_bytes, n), ("grad_bytes", self.grad_bytes, n)):
            if len(values) < least or any(integer(v) is None or v < 0 for v in values):
                raise ValueError(f"profile field {name} needs {least} byte counts >= 0, got {values!r}")
        if not all(len(m) == 2 and _seconds(m[1]) for m in self.p2p) or \
                not all(len(m) == 3 and _seconds(m[2]) for m in self.allreduce):
            raise ValueError("profile fields p2p and allreduce need (bytes, seconds) and (ranks, bytes, seconds) "
                             "measurements with finite seconds >= 0")

    def block_rows(self, block: int) -> int:
        """The fewest rows block ``block`` runs on (``min_rows``)."""
        return self.min_rows[block] if self.min_rows else 1

    # Costs at any batch size: measured values, linear between them and beyond them.
    def teacher_time(self, block: int, rows: Any) -> Any:
        return _interp(self.rows, self.teacher[block], rows)

    def student_time(self, block: int, rows: Any) -> Any:
        return _interp(self.rows, self.student[block], rows)

    def load_time(self, rows: Any) -> Any:
        return _interp(self.rows, self.load, rows)

    def data_time(self, rows: Any) -> Any:
        """Seconds a batch of ``rows`` rows adds to stage 0's work: loading it when loading in
        the rank's own process, else taking it from the loader processes (see ``data_period``)."""
        if self.num_workers == 0:
            return self.load_time(rows)
        return _interp(self.rows, self.receive, rows) if self.receive else self.load_time(rows) * 0.0

    def data_period(self, rows: Any) -> Any:
        """The least seconds between batches of ``rows`` rows that ``num_workers`` loader
        processes can deliver (0 when loading in the rank's own process)."""
        return self.load_time(rows) / max(self.num_workers, 1) * (self.num_workers > 0)

    def p2p_time(self, nbytes: Any) -> Any:
        latency, per_byte = self.p2p_fit
        return np.where(np.asarray(nbytes) > 0, latency + per_byte * np.asarray(nbytes, dtype=float), 0.0)

    def allreduce_time(self, ranks: Any, nbytes: Any) -> Any:
        """Zero for one rank or no bytes: the runtime starts no allreduce for a student block
        without trainable parameters."""
        latency, per_byte = self.allreduce_fit
        k, n = np.asarray(ranks, dtype=float), np.asarray(nbytes, dtype=float)
        return np.where((k > 1) & (n > 0), 2 * (k - 1) * latency + 2 * (k - 1) / np.maximum(k, 1) * per_byte * n, 0.0)

    def sync_bn_time(self, block: int, ranks: Any) -> Any:
        """Seconds per step that ``sync_batchnorm`` adds to student block ``block`` on ``ranks``
        replicas: per BatchNorm layer, an allreduce of every replica's slot of statistics in the
        forward and one of their gradients in the backward (``pipebd.batchnorm``). Zero without
        the option, without BatchNorm, or with one replica."""
        k = np.asarray(ranks, dtype=float)
        total = np.zeros_like(k)
        if self.sync_batchnorm and self.bn_bytes:
            for nbytes in self.bn_bytes[block]:
                total = total + 2 * self.allreduce_time(k, k * nbytes)
        return float(total) if total.ndim == 0 else total

    def linear_costs(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Per block, non-negative ``(a, b)`` fitting the teacher's and the student's measured
        seconds per call to ``a + b * rows`` (least squares): how much of a call's cost is fixed.
        (``pipebd.models``'s emulated blocks sleep the measured costs themselves.)"""
        def fit(times: list[float]) -> tuple[float, float]:
            return _least_squares([(1.0, float(r)) for r in self.rows], times)

        return [fit(t) for t in self.teacher], [fit(t) for t in self.student]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        if not isinstance(data, dict):
            raise ValueError(f"a profile is a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(data.keys() - {f.name for f in fields}), sorted(required - data.keys())
        if unknown or missing:
            raise ValueError(f"not a profile of this pipebd version: unknown fields {unknown}, missing {missing}")
        return cls(**data)

    def save(self, path: str) -> None:
        write_output(path, lambda f: f.write(json.dumps(self.to_dict(), indent=1)), "w")

    @classmethod
    def load_file(cls, path: str) -> "Profile":
        """The profile ``save`` wrote to ``path``; ValueError naming the file if it is not one."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def __str__(self) -> str:
        how = f"median of {self.repeats}" if self.repeats > 1 else "one run"
        how += f" after {self.warmup} warm-up" if self.warmup else ""
        where = f"{self.device} ({self.backend})" if self.p2p or self.allreduce else f"{self.device}, no transfers timed"
        lines = [f"profile: {self.num_blocks} blocks, batch {self.batch_size}, world size {self.world_size}, "
                 f"{where}, {how}",
                 f"{'block':>5} {'rows':>6} {'teacher ms':>11} {'student ms':>11} {'in KiB/row':>11} {'grad KiB':>9}"]
        for b in range(self.num_blocks):
            for i, rows in enumerate(self.rows):
                ran = rows >= self.block_rows(b)
                teacher, student = (f"{t[b][i] * 1e3:>11.3f}" if ran else f"{'-':>11}" for t in (self.teacher, self.student))
                lines.append(f"{b:>5} {rows:>6} {teacher} {student} "
                             f"{self.act_bytes[b] / 1024:>11.2f} {self.grad_bytes[b] / 1024:>9.1f}")
        layers = sum(len(b) for b in self.bn_bytes)
        if self.sync_batchnorm and layers:
            lines.append(f"sync_batchnorm: {layers} BatchNorm layers, 2 allreduces each per step on replicated stages")
        for b in range(self.num_blocks):
            if self.block_rows(b) > 1:
                lines.append(f"block {b}: BatchNorm over one value per channel per row, not run (nor planned) on "
                             f"fewer than {self.block_rows(b)} rows per replica")
        lines.append("data load ms: " + ", ".join(f"{r} rows {t * 1e3:.3f}" for r, t in zip(self.rows, self.load)))
        if self.num_workers:
            lines.append(f"{self.num_workers} loader processes per loading rank: start {self.loader_start * 1e3:.1f} ms; "
                         f"taking a batch ms: " + ", ".join(f"{r} rows {t * 1e3:.3f}" for r, t in zip(self.rows, self.receive)))
        if self.p2p:
            lat, per_byte = self.p2p_fit
            lines.append("p2p: " + ", ".join(f"{n >> 10} KiB {t * 1e3:.3f} ms" for n, t in self.p2p)
                         + f" -> {lat * 1e6:.1f} us + {_gbps(per_byte)}")
        if self.allreduce:
            lat, per_byte = self.allreduce_fit
            lines.append("allreduce: " + ", ".join(f"{k} ranks {n >> 10} KiB {t * 1e3:.3f} ms" for k, n, t in self.allreduce)
                         + f" -> ring {lat * 1e6:.1f} us/hop + {_gbps(per_byte)}")
        return "\n".join(lines)


def _gbps(s_per_byte: float) -> str:
    return f"{1e-9 / s_per_byte:.2f} GB/s" if s_per_byte > 0 else "unbounded bandwidth"


def _least_squares(features: list[tuple[float, float]], times: list[float]) -> tuple[float, float]:
    """Non-negative ``(latency, s_per_byte)`` fitting ``times`` to ``features @ (latency, s_per_byte)``."""
    if not features:
        return 0.0, 0.0
    a, y = np.asarray(features, dtype=float), np.asarray(times, dtype=float)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    if coef[0] < 0:      # pure bandwidth
        coef = np.array([0.0, max(0.0, float(a[:, 1] @ y / max(a[:, 1] @ a[:, 1], 1e-300)))])
    if coef[1] < 0:      # pure latency
        coef = np.array([max(0.0, float(a[:, 0] @ y / (a[:, 0] @ a[:, 0]))), 0.0])
    return float(coef[0]), float(coef[1])


def _interp(xs: list[int], ys: list[float], x: Any) -> Any:
    """Piecewise-linear in the rows, extended linearly beyond the measured ones; below the
    smallest measurement never cheaper than proportional scaling. Exact at measured rows."""
    xs_a, ys_a = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    xq = np.asarray(x, dtype=float)
    if len(xs_a) == 1:
        y = ys_a[0] * xq / xs_a[0]
    else:
        i = np.clip(np.searchsorted(xs_a, xq), 1, len(xs_a) - 1)
        x0, x1, y0, y1 = xs_a[i - 1], xs_a[i], ys_a[i - 1], ys_a[i]
        y = np.where(xq == x1, y1, y0 + (y1 - y0) * (xq - x0) / (x1 - x0))
        y = np.where(xq < xs_a[0], np.maximum(y, ys_a[0] * xq / xs_a[0]), y)
    out = np.maximum(y, 0.0)
    return float(out) if out.ndim == 0 else out


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def replica_rows(batch_size: int, world_size: int) -> list[int]:
    """The per-replica batch sizes measured, ascending: ``ceil(B / k)`` for each replica count
    ``k`` (a stage's smaller slices, ``floor(B / k)``, are interpolated between them)."""
    return sorted({math.ceil(batch_size / k) for k in range(1, min(world_size, batch_size) + 1)})


def profile_job(job: Job, world_size: int, *, warmup: int = 2, repeats: int = 5, cache: bool = True,
                comm: Callable[[], tuple[list, list]] | None = None, progress: bool = False) -> Profile:
    """Profile the blocks of ``job`` (its plan is ignored) for plans on up to ``world_size``
    ranks, or read the cached profile. ``comm`` returns ``(p2p, allreduce)`` measurements
    (default: ``measure_comm`` on spawned local ranks). The profile's ``sync_batchnorm`` and
    ``num_workers`` are the job's."""
    warmup, repeats = check_int("warmup", warmup, 0), check_int("repeats", repeats, 1)
    path = None
    if cache:
        key = _cache_key(job, world_size, warmup, repeats)   # num_workers included: it changes what is measured
        path = os.path.join(cache_dir(), f"profile-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json")
    if path is not None and os.path.exists(path):
        try:
            return dataclasses.replace(Profile.load_file(path), **_job_options(job))
        except (OSError, ValueError, TypeError, KeyError):
            pass   # unreadable or from an older version: measure again
    profile = _measure_compute(job, world_size, warmup, repeats, progress)
    if world_size > 1:
        if comm is None:
            comm = functools.partial(measure_comm, world_size, job.device)
        p2p, allreduce = comm()
        # On a CPU a larger message no faster than a small one is a busy machine: measured
        # once more, then said.
        noisy = noisy_comm(job, p2p, allreduce)
        if noisy:
            p2p, allreduce = comm()
            noisy = noisy_comm(job, p2p, allreduce)
            if noisy:
                log.warning("pipebd: %s, measured twice; the machine may be busy. The plan uses these figures, "
                            "and they are cached%s", noisy,
                            f": to measure again, delete {path}" if path is not None else "")
        profile = dataclasses.replace(profile, p2p=p2p, allreduce=allreduce)   # refits the comm models
    if path is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            profile.save(path)
        except OSError as err:   # a cache that cannot be written costs a measurement next time, not this run
            log.warning("pipebd: the profile was not cached (%s; set PIPEBD_CACHE_DIR to a writable "
                        "directory): %s", path, err)
    return dataclasses.replace(profile, **_job_options(job))


def noisy_comm(job: Job, p2p: list, allreduce: list) -> str | None:
    """What in the transfer timings cannot be a transfer's cost, on a CPU: the largest message
    no slower than the smallest (the fit would then charge bytes nothing), else None. (On a GPU
    link 4 KiB and 1 MiB may well cost the same.)"""
    if torch.device(job.device).type != "cpu":
        return None
    series = [("a send", [(n, t) for n, t in p2p])]
    series += [(f"an allreduce on {k} ranks", [(n, t) for j, n, t in allreduce if j == k])
               for k in sorted({k for k, _, _ in allreduce})]
    for what, points in series:
        if len(points) > 1:
            (small, t_small), (large, t_large) = min(points), max(points)
            if t_large <= t_small:
                return (f"{what} of {large >> 10} KiB took {t_large * 1e3:.3f} ms, no longer than one of "
                        f"{small >> 10} KiB ({t_small * 1e3:.3f} ms)")
    return None


def _job_options(job: Job) -> dict[str, Any]:
    """The job's options that change what a plan costs but not what is measured."""
    return {"sync_batchnorm": job.sync_batchnorm}


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PIPEBD_CACHE_DIR") or os.path.join(base, "pipebd")


def _cache_key(job: Job, world_size: int, warmup: int, repeats: int) -> str:
    def structure(module: nn.Module, trained: bool) -> str:
        # The runtime freezes the teacher: whether its parameters came frozen changes nothing.
        params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad or not trained) for n, p in module.named_parameters()]
        # What the repr may leave out: the code of each submodule's classes and their plain settings.
        code = [(_source_hash(type(m)), _settings(m)) for m in module.modules()]
        return f"{module!r}|{params}|{code}"

    optimizer = _optimizer_setting(job)
    device = job.device
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(device))
    else:   # a cache directory may be shared by machines (a home directory on a cluster)
        device = f"cpu|{cpu_model()}|{os.cpu_count()}"
    return json.dumps({
        "teacher": [structure(job.teacher[i], trained=False) for i in range(job.num_blocks)],
        "student": [structure(job.student[i], trained=True) for i in range(job.num_blocks)],
        "boundary": [(s.shape, str(s.dtype)) for s in job.boundary],
        # The data loading is measured too: a dataset of another kind or size loads differently.
        "dataset": [f"{type(job.dataset).__module__}.{type(job.dataset).__qualname__}", job.dataset_len,
                    _source_hash(type(job.dataset)), _settings(job.dataset)],
        "labels": None if job.labels is None else (job.labels.shape, str(job.labels.dtype)),
        "batch_size": job.batch_size, "world_size": world_size, "device": device,
        "threads": job.threads if job.threads is not None else torch.get_num_threads(),   # None: as they are
        "num_workers": job.num_workers,
        # The learning rate changes no cost (tuning it would measure again); momentum and weight
        # decay may (a buffer, an extra term).
        "optimizer": optimizer,
        "losses": [_describe(job.block_loss), _describe(job.final_loss)],
        "warmup": warmup, "repeats": repeats, "torch": torch.__version__, "format": 8,
    }, sort_keys=True, default=str)


def _optimizer_setting(job: Job) -> Any:
    """The optimizer as the key holds it: its class and defaults but the learning rate (which
    changes no cost), from one built for the first student block with parameters; the factory's
    code and arguments where none can be built here (ZeroRedundancyOptimizer, which needs the
    ranks' process group; a factory that reads more parameters than a probe would have)."""
    module = next((m for m in job.student.values() if any(True for _ in m.parameters())), None)
    try:
        built = build_optimizer(job.optimizer, module)
    except Exception:
        return _describe(job.optimizer)
    groups = [sorted((k, v) for k, v in group.items() if k not in ("params", "lr", "initial_lr"))
              for group in built.param_groups]
    return [type(built).__qualname__, repr(groups)]


def _describe(fn: Any) -> str:
    if fn is None:
        return "none"
    if isinstance(fn, nn.Module):
        return f"{fn!r}|{_source_hash(type(fn))}|{_settings(fn)}"
    if isinstance(fn, functools.partial):   # its arguments, as a temperature, set what it computes
        args = [_argument(a) for a in fn.args] + [f"{k}={_argument(v)}" for k, v in sorted(fn.keywords.items())]
        return f"partial({_describe(fn.func)}, {', '.join(args)})"
    code = _source_hash(fn) if inspect.isfunction(fn) else _source_hash(type(fn))
    return f"{getattr(fn, '__qualname__', type(fn).__qualname__)}|{code}"


_PLAIN = (bool, int, float, str, type(None))


def _argument(value: Any) -> str:
    """A partial's argument as the key holds it: values, not memory addresses (which differ in
    each process); a tensor or array by a digest of its contents."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(_argument(v) for v in value)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_argument(k)}: {_argument(v)}" for k, v in sorted(value.items(), key=repr)) + "}"
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, torch.Tensor):      # as bytes: numpy has no bfloat16
        value = value.detach().cpu().contiguous()
        data = value.reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"Tensor{tuple(value.shape)}{value.dtype}:{hashlib.sha256(data).hexdigest()[:16]}"
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape}{value.dtype}:{hashlib.sha256(value.tobytes()).hexdigest()[:16]}"
    if callable(value):
        return _describe(value)
    return f"{type(value).__module__}.{type(value).__qualname__}{_settings(value)}"


def _settings(obj: Any, depth: int = 0, budget: list[int] | None = None) -> str:
    """The settings among the attributes of ``obj`` (``_setting``): what sets a block's or a
    dataset's cost without showing in its repr or parameters (a repeat count, a resolution, a
    dtype, a transform object and its own settings). One that changes as it runs (a counter)
    makes every run measure again: a cost, not an error."""
    budget = [_SETTING_BUDGET] if budget is None else budget
    attrs = getattr(obj, "__dict__", None)
    attrs = attrs if isinstance(attrs, dict) else {}
    kept = {k: setting for k, v in list(attrs.items()) if not k.startswith("_") and k != "training"   # modes: the runtime's
            and (setting := _setting(v, depth, budget)) is not None}
    return repr(sorted(kept.items()))


# A container longer than this (a dataset's files, a Subset's indices, which random_split draws
# afresh each run) counts by its length alone; so does one nested deeper than _SETTING_DEPTH
# (a list that holds itself, an object that points back to its owner), or beyond
# _SETTING_BUDGET items and attributes in one key.
_SETTING_ITEMS, _SETTING_DEPTH, _SETTING_BUDGET = 64, 4, 1024


def _setting(value: Any, depth: int = 0, budget: list[int] | None = None) -> str | None:
    """``value`` as the key holds an attribute that may set a cost: a number, string, dtype,
    device or enum; a list, tuple, set or dict of them (a list of repeat counts); a function by
    its code; any other object (a transform, a config) by its class's code and its own
    settings. None for tensors and arrays (data, not settings)."""
    if isinstance(value, (*_PLAIN, complex, bytes, range, slice, os.PathLike, torch.dtype, torch.device, enum.Enum)):
        return repr(value)
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return None
    if isinstance(value, functools.partial):
        return _describe(value)
    budget = [_SETTING_BUDGET] if budget is None else budget
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if len(value) > min(_SETTING_ITEMS, budget[0]) or depth >= _SETTING_DEPTH:
            return f"{type(value).__name__} of {len(value)}"
        budget[0] -= len(value)
        items = [x for pair in value.items() for x in pair] if isinstance(value, dict) else list(value)
        parts = [_setting(x, depth + 1, budget) for x in items]
        if None in parts:
            return None
        if isinstance(value, dict):
            parts = sorted(f"{k}: {v}" for k, v in zip(parts[::2], parts[1::2]))
        elif isinstance(value, (set, frozenset)):
            parts = sorted(parts)
        return f"{type(value).__name__}({', '.join(parts)})"
    if inspect.isroutine(value):   # a function, method or builtin: by its code
        func = getattr(value, "__func__", value)
        return f"{getattr(func, '__qualname__', name)}|{_source_hash(func) if inspect.isfunction(func) else ''}"
    if isinstance(value, type):    # a class to build things with (norm_layer=nn.BatchNorm2d)
        return f"class {value.__module__}.{value.__qualname__}|{_source_hash(value)}"
    if inspect.ismodule(value):
        return f"module {value.__name__}"
    attrs = getattr(value, "__dict__", None)
    # The standard library's objects (a logger, a lock) hold process state, not settings.
    if depth >= _SETTING_DEPTH or budget[0] <= 0 or type(value).__module__.split(".")[0] in sys.stdlib_module_names:
        return name
    budget[0] -= 1 + (len(attrs) if isinstance(attrs, dict) else 0)
    return f"{name}|{_source_hash(type(value))}|{_settings(value, depth + 1, budget)}"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; ``platform.processor()`` is empty there), else
    what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_hash(obj: Any) -> str:
    """A digest of the source of a function, or of a class and its bases outside torch (the torch
    version is in the key already) and the builtins; the name alone where the source cannot be
    read (a class made in an interactive session, a file since edited into invalid Python).
    Classes are looked up once per process."""
    return _class_source_hash(obj) if isinstance(obj, type) else _digest((obj,))


@functools.lru_cache(maxsize=None)
def _class_source_hash(cls: type) -> str:
    return _digest(cls.__mro__)


def _digest(items: tuple) -> str:
    parts = []
    for item in items:
        module = getattr(item, "__module__", "") or ""
        if module.split(".")[0] in ("torch", "builtins", "typing", "abc"):
            continue
        try:
            parts.append(inspect.getsource(item))
        except Exception:   # OSError, TypeError, a SyntaxError from the file as it is now
            parts.append(f"{module}.{getattr(item, '__qualname__', repr(item))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _nbytes(spec: Any) -> int:
    return math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()


def _measure_compute(job: Job, world_size: int, warmup: int, repeats: int, progress: bool) -> Profile:
    n, batch = job.num_blocks, job.batch_size
    rows = replica_rows(batch, world_size)
    calls = len(rows) * (warmup + repeats)
    # One rank holding copies of every block, run through the runtime's own code paths. Teacher
    # and student are copied together: a teacher block inside its student block stays shared.
    teachers, students = copy.deepcopy((job.teacher, job.student))
    solo = dataclasses.replace(job, strategy="baseline", plan=Plan([list(range(n))], [1]), steps=calls + 1,
                               teacher=teachers, student=students,
                               progress=False, start={}, resume_state={}, checkpoint_dir=None)
    with torch_threads(job.threads):
        rt = RankRuntime(solo, 0, 1, None)
        sync = (lambda: torch.cuda.synchronize(rt.device)) if rt.device.type == "cuda" else (lambda: None)
        timer = functools.partial(_median_time, warmup=warmup, repeats=repeats, sync=sync)
        step = iter(range(10 ** 9))
        x, y = rt.load(0, 0, batch)
        acts = [x]
        for i in range(n):
            acts.append(rt.teacher_forward(i, acts[-1], 0))
        load = [timer(lambda r=r: rt.load(0, 0, r)) for r in rows]
        receive, loader_start = [], 0.0
        if job.num_workers:
            first_batch = rt.rows([0], 0, batch).load(job.dataset, 0)   # as a loader process gives it
            receive, loader_start = _measure_receive(first_batch, rows, job.num_workers, warmup, repeats)
        teacher, student = [], []
        todo = progress_bar(n * len(rows), "pipebd profile", progress, unit="block-size")
        for i in range(n):
            # Below the rows block i needs (BatchNorm over one value per channel) it cannot run:
            # its figures there are scaled from the smallest row count it runs on.
            short = sum(r < (job.min_rows[i] if job.min_rows else 1) for r in rows)
            todo.update(short)
            forward, train_times = [], []
            for r in rows[short:]:
                labels = y[:r] if y is not None else None

                def train(r: int = r, labels: Any = labels) -> None:
                    t = next(step) % calls
                    rt.finish_step([i], [rt.train_block(i, acts[i][:r], acts[i + 1][:r], labels, t)], t)

                forward.append(timer(lambda r=r: rt.teacher_forward(i, acts[i][:r], 0)))
                train_times.append(timer(train))
                todo.update()
            for times, into in ((forward, teacher), (train_times, student)):
                into.append([times[0] * r / rows[short] for r in rows[:short]] + times)
        todo.close()
    act_bytes = [_nbytes(job.boundary[i]) + (_nbytes(job.labels) if job.labels is not None and i > 0 else 0)
                 for i in range(n + 1)]
    grad_bytes = [sum(p.numel() * p.element_size() for p in rt.buckets[i].params) for i in range(n)]
    frozen = [{id(m) for m in job.teacher[i].modules()} for i in range(n)]   # a teacher block in its student
    bn_bytes = [[(2 * m.num_features + 1) * _statistics_itemsize(m) for m in job.student[i].modules()
                 if isinstance(m, _BatchNorm) and id(m) not in frozen[i]] for i in range(n)]
    return Profile(n, batch, world_size, job.device, backend_for(job.device), rows, teacher, student, load,
                   act_bytes, grad_bytes, warmup=warmup, repeats=repeats, threads=job.threads, bn_bytes=bn_bytes,
                   num_workers=job.num_workers, receive=receive, loader_start=loader_start,
                   min_rows=list(job.min_rows))


class _Ready(Dataset):
    """Stands in for the dataset to time the loader processes' own overhead: every item is a
    fresh copy of one loaded batch (a tensor sent twice would be mapped only once)."""

    def __init__(self, batch: tuple[torch.Tensor, Any], count: int):
        self.batch, self.count = batch, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, j: int) -> tuple[torch.Tensor, Any]:
        return tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in self.batch)


def _measure_receive(batch: tuple[torch.Tensor, Any], rows: list[int], num_workers: int, warmup: int,
                     repeats: int) -> tuple[list[float], float]:
    """Per ``rows``, the median seconds a rank takes to get a batch that ``num_workers`` loader
    processes have ready (what ``data.batches`` does, with loading itself left out); and how
    long the first batch takes beyond that: starting the processes."""
    x, y = batch
    receive, starts = [], []
    warmup = max(warmup, PREFETCH * num_workers)   # the batches queued at the start come faster
    for r in rows:
        ready = _Ready((x[:r], y[:r] if y is not None else None), 1 + warmup + repeats)
        tick = time.perf_counter()
        source = iter(batch_loader(ready, num_workers))
        next(source)
        first = last = time.perf_counter() - tick
        times = []
        for _ in range(warmup + repeats):
            # Long enough for the processes to have the next batch ready: a batch's copy and
            # sending take them about as long as its receiving takes the rank.
            time.sleep(0.01 + 2 * last)
            tick = time.perf_counter()
            next(source)
            last = time.perf_counter() - tick
            times.append(last)
        del source                    # stops the processes
        receive.append(statistics.median(times[warmup:]))
        starts.append(max(0.0, first - receive[-1]))
    return receive, statistics.median(starts)


def _statistics_itemsize(bn: nn.Module) -> int:
    """Bytes per statistic ``GroupBatchNorm`` exchanges: float32, or float64 for a float64 layer."""
    tensors = [*bn.parameters(), *bn.buffers()]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return torch.promote_types(dtype, torch.float32).itemsize


def _median_time(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_comm(world_size: int, device: str = "cpu", repeats: int = COMM_REPEATS,
                 timeout: float = 120.0) -> tuple[list, list]:
    """Point-to-point and allreduce timings on ``world_size`` fresh local ranks of the backend
    ``device`` uses: ``([(bytes, s)], [(ranks, bytes, s)])``."""
    task = functools.partial(comm_task, device, repeats)
    return spawn_tasks([task] * world_size, backend_for(device), timeout)


def comm_task(device: str, repeats: int, rank: int, world_size: int) -> tuple[list, list]:
    """Run on every rank of the default process group: ping-pong between ranks 0 and 1, then an
    allreduce over the first 2 and over all ranks. Rank 0's timings are returned on every rank."""
    dev = own_gpu(rank) if device.startswith("cuda") else torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    p2p = []
    for size in P2P_SIZES:
        buf = torch.zeros(size // 4, dtype=torch.float32, device=dev)

        def ping_pong(buf: torch.Tensor = buf) -> None:
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)

        dist.barrier()
        p2p.append((size, _median_time(ping_pong, COMM_WARMUP, repeats, sync) / 2))
    allreduce = []
    for k in sorted({2, world_size}):
        group = dist.new_group(list(range(k)))   # every rank takes part in creating it
        for size in ALLREDUCE_SIZES:
            buf = torch.zeros(size // 4, dtype=torch.float32, device=dev)
            dist.barrier()
            if rank < k:
                allreduce.append((k, size, _median_time(lambda b=buf: dist.all_reduce(b, group=group), COMM_WARMUP,
                                                        repeats, sync)))
        dist.barrier()
        if rank < k:
            dist.destroy_process_group(group)
    result = [(p2p, allreduce)]
    dist.broadcast_object_list(result, src=0)
    return result[0]
