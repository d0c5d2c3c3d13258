"""The user-facing entry point: ``Distiller`` wraps a teacher and a student given as lists of
blocks and trains each student block to reproduce its teacher block (blockwise distillation)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import checkpoint
from .checks import build_optimizer, check_device, check_factory, check_int, check_training
from .data import PROBE_ROWS, _tensors, check_workers, dataset_length, probe_batch
from .losses import SoftTargetLoss, out_of_range, resolve_block_loss
from .plan import Plan, default_plan
from .planner import auto_plan
from .rng import check_seed
from .profiler import COMM_REPEATS, Profile, comm_task, noisy_comm, profile_job
from .report import Report, build_report
from .runtime.launch import (LOOPS, check_sendable, check_timeout, init_spmd, job_parts, kept_as_given, pin_device,
                             run_rank, run_spmd, spawn, torchrun_env)
from .runtime.worker import Job, TensorSpec, load_trained_state, normal_output
from .simulator import simulate

log = logging.getLogger("pipebd")

STRATEGIES = tuple(LOOPS)


class Distiller:
    """Blockwise distillation of ``teacher`` into ``student``.

    ``teacher[i]`` maps activation ``a_{i-1}`` to ``a_i`` and stays frozen; ``student[i]`` is
    trained to map ``a_{i-1}`` to ``a_i`` with ``block_loss`` (the last block with ``final_loss``
    when given). ``optimizer`` builds one optimizer per student block from its parameters.
    ``scheduler`` (optional) builds a learning-rate scheduler from each block's optimizer; it is
    stepped after every optimizer step (``pipebd.lr.warmup`` gives Goyal et al.'s gradual warmup).
    ``device`` is ``"cpu"``, ``"cuda"`` or None (CUDA when available). ``fit`` trains the student
    modules in place, like any optimizer loop; ``student_model()`` returns them as a Sequential.
    """

    def __init__(self, teacher: Sequence[nn.Module], student: Sequence[nn.Module],
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 block_loss: str | Callable[[Tensor, Tensor], Tensor] = "mse",
                 final_loss: Callable[..., Tensor] | None = None, device: str | None = None,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None):
        self.teacher, self.student = _blocks("teacher", teacher), _blocks("student", student)
        for name, blocks in (("teacher", self.teacher), ("student", self.student)):
            if not blocks:
                raise ValueError(f"{name} has no blocks")
            for i, b in enumerate(blocks):
                if not isinstance(b, nn.Module):
                    raise TypeError(f"{name} block {i} is a {type(b).__name__}, not an nn.Module")
        if len(self.teacher) != len(self.student):
            raise ValueError(f"teacher has {len(self.teacher)} blocks but student has "
                             f"{len(self.student)}; blockwise distillation pairs them one to one")
        _check_trainable(self.teacher, self.student)
        check_factory("optimizer", optimizer)
        check_factory("scheduler", scheduler)
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.scheduler = scheduler
        self.block_loss = resolve_block_loss(block_loss)
        if isinstance(final_loss, SoftTargetLoss) and final_loss.reduction != "batchmean":
            raise ValueError("final_loss must average over rows (reduction='batchmean') so that "
                             "replicated stages reproduce the full-batch gradient")
        self.final_loss = final_loss
        self.device = check_device(device)

    @property
    def num_blocks(self) -> int:
        return len(self.teacher)

    def fit(self, dataset: Any, batch_size: int, steps: int, world_size: int = 1,
            strategy: str = "pipebd", plan: Plan | str | None = None, seed: int = 0, *,
            max_inflight: int = 2, threads: int | None = None, progress: bool | None = None,
            timeout: float = 600.0, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, resume: bool = False, sync_batchnorm: bool = False,
            num_workers: int = 0) -> Report:
        """Train every student block for ``steps`` steps of ``batch_size`` samples.

        ``strategy``: ``"pipebd"`` (teacher relaying over pipeline stages) or ``"baseline"``
        (block by block, data parallel over all ranks, teacher recomputed from the input).
        ``plan``: None (one contiguous block range per rank), a ``Plan``, or ``"auto"``: profile
        the blocks (or read the cached profile), choose the optimal plan, log it with its
        prediction, and put the prediction in the report (``report.prediction``,
        ``report.simulation``). With ``world_size=1`` there is nothing to choose, nor for the
        baseline, whose layout is fixed: it takes None or ``"auto"``.
        ``world_size > 1`` spawns local workers unless the process runs under torchrun, where every
        rank calls ``fit``. A stage sends batch t only once the next stage has received batch
        t - ``max_inflight``; ``threads`` sets torch threads per spawned worker (default: cores / world_size);
        ``timeout`` (seconds) bounds every collective and point-to-point wait, and the wait for
        each batch from loader processes.

        BatchNorm layers of a replicated stage's student blocks normalize with the statistics of
        their replica's slice (as DDP does); ``sync_batchnorm=True`` uses the statistics of the
        stage's whole batch instead (``pipebd.batchnorm``), which gives the one-process result.
        ``torch.nn.SyncBatchNorm`` layers follow the same option (not the default group).

        Data: batch t is rows ``[t*batch_size, (t+1)*batch_size)`` of a stream of seeded
        permutations of the dataset, one per epoch (``pipebd.data.BatchOrder``), so a batch can
        span two epochs and hold a sample twice. Only the ranks of the first stage (every rank,
        for the baseline) load it, each its slice of the batch. With ``num_workers > 0`` each of them starts that many DataLoader
        worker processes that load the next batches while the rank computes (as
        ``DataLoader(num_workers=...)``); the batches and their order stay the same. A random
        transform in the dataset that draws from torch's CPU generator draws the same for a
        sample wherever it is loaded: each sample is read under a seed of ``seed`` and its step
        and row (``pipebd.data.StepRows``).

        Checkpoints (``pipebd.checkpoint``): with ``checkpoint_dir``, each student block's
        weights, optimizer and scheduler state are saved there, atomically, every
        ``checkpoint_every`` steps and after the last. ``resume=True`` continues the run saved
        there (each block from the step it saved; a directory without a checkpoint starts from
        step 0), with any strategy, plan and world size, and ends with the weights of an
        uninterrupted run; ``steps`` may be raised to train further. Without ``resume`` a
        directory that already holds a checkpoint is refused rather than overwritten.

        Raises ValueError/TypeError for bad input before any process starts, and
        ``pipebd.WorkerError`` with the failing rank's traceback if a worker fails.
        """
        env = torchrun_env()
        if env is not None and env[1] != world_size:
            raise ValueError(f"fit(world_size={world_size}) but torchrun started WORLD_SIZE={env[1]} processes")
        job = self._job(dataset, batch_size, steps, world_size, strategy, plan, seed, max_inflight,
                        threads, progress, timeout, sync_batchnorm, num_workers)
        batch_size, steps, world_size = job.batch_size, job.steps, int(world_size)   # checked: plain ints
        if env is None and world_size > 1 and (plan == "auto" or checkpoint_dir is not None):
            check_sendable(job_parts(job))   # before profiling and step-0 checkpoints, not after
        with contextlib.ExitStack() as held:    # the checkpoint directory, until the run has ended
            self._checkpoints(job, checkpoint_dir, checkpoint_every, resume, held)
            prediction = None
            if plan == "auto" and strategy == "pipebd" and world_size > 1:
                profile = self._profile(job, world_size, timeout, progress=job.progress)
                prediction = auto_plan(profile, world_size)
                job.plan = prediction.plan
                log.info("pipebd: auto %s", prediction)
            log.info("pipebd: strategy %s, plan %s on %d rank(s)", strategy, job.plan.describe(), world_size)
            if env is None and world_size > 1:
                results = spawn(job, world_size, timeout)
            else:
                losses = [f for f in (self.block_loss, self.final_loss) if isinstance(f, nn.Module)]
                with kept_as_given(self.teacher + self.student + losses):
                    results = run_spmd(job, timeout) if env is not None else run_rank(job, 0, 1)
            self._load_states(results)
            report = build_report(strategy, world_size, job.plan, batch_size, steps, self.num_blocks, results,
                                  [job.start_of(i) for i in range(self.num_blocks)])
            if prediction is not None:
                report.prediction = prediction
                report.simulation = simulate(profile, job.plan, steps, job.max_inflight,
                                             start=[job.start_of(i) for i in range(self.num_blocks)])
            return report

    def _checkpoints(self, job: Job, directory: str | os.PathLike | None, every: int | None, resume: bool,
                     held: contextlib.ExitStack) -> None:
        """Check the checkpoint options and take ``directory`` for this job until ``held``
        closes (``checkpoint.claimed``); on resume, check every saved state
        (``checkpoint.check``), then load the saved student weights into the blocks and give
        the job each block's step and optimizer state. A fresh run saves every block at step 0,
        then records the run (``checkpoint.start``)."""
        directory, every = checkpoint.options(directory, every, resume)
        spmd = torchrun_env() is not None and directory is not None
        if spmd:
            import torch.distributed as dist
            init_spmd(job.device, job.timeout)
            pin_device(job, dist.get_rank())   # before NCCL's barrier
        first_rank = not spmd or dist.get_rank() == 0    # the rank that writes the directory and warns
        checkpoint.hold(directory, held, first_rank, spmd)
        key = checkpoint.RunKey(self.num_blocks, job.batch_size, job.seed, job.dataset_len)
        states = checkpoint.read(directory, key, job.steps, resume)
        checkpoint.check(states, self.student, self.optimizer, self.scheduler, warn=first_rank)
        fingerprint = None
        if directory is not None and first_rank:
            fingerprint = teacher_fingerprint(self.teacher, job.boundary[0].shape, job.boundary[0].dtype)
            if states:
                fingerprint = checkpoint.check_teacher(directory, fingerprint)
                checkpoint.check_every(directory, every, job.steps - min(st["step"] for st in states.values()))
        for block, state in states.items():
            self.student[block].load_state_dict(state["weights"])
        job.start = {block: state["step"] for block, state in states.items()}
        job.resume_state = {block: {k: v for k, v in state.items() if k != "weights"} for block, state in states.items()}
        if states:
            log.info("pipebd: resuming from %s; blocks had completed steps %s", directory,
                     [job.start_of(i) for i in range(self.num_blocks)])
        if directory is None:
            return
        if spmd:
            dist.barrier()   # every rank has read the directory before rank 0 writes to it
        if first_rank:
            if not states:   # every step-0 file before run.json, so a run killed in between leaves no run
                for block in range(self.num_blocks):
                    optimizer = build_optimizer(self.optimizer, self.student[block])
                    scheduler = self.scheduler(optimizer) if self.scheduler is not None else None
                    checkpoint.save_block(directory, block, 0, self.student[block], optimizer, scheduler)
            checkpoint.start(directory, key, teacher=fingerprint, checkpoint_every=every)
        job.checkpoint_dir, job.checkpoint_every = directory, every

    def profile(self, dataset: Any, batch_size: int, world_size: int, *, threads: int | None = None,
                warmup: int = 2, repeats: int = 5, cache: bool = True, comm: bool = True,
                sync_batchnorm: bool = False, num_workers: int = 0, timeout: float = 600.0) -> Profile:
        """Measure what every block costs at each per-replica batch size a plan on ``world_size``
        ranks can give it, and the backend's point-to-point and allreduce costs (cached; see
        ``pipebd.profiler``). ``fit(plan="auto")`` does this itself. ``comm=False`` measures the
        blocks only, in this process (for one device standing in for ``world_size``; such a
        profile is neither read from nor written to the cache). ``sync_batchnorm``: cost the
        BatchNorm allreduces that ``fit(..., sync_batchnorm=True)`` adds; ``num_workers``: predict
        for ``fit(..., num_workers=...)``, whose loader processes take data loading off the first
        stage's critical path (the loading is measured in this process either way)."""
        for name, value in (("comm", comm), ("cache", cache)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        world_size = check_int("world_size", world_size, 1)
        env = torchrun_env()
        if comm and env is not None and world_size not in (1, env[1]):
            raise ValueError(f"profile(world_size={world_size}) but torchrun started WORLD_SIZE={env[1]} processes, "
                             f"which time the transfers; use comm=False to plan for {world_size} ranks from the "
                             f"blocks' costs alone")
        # Without comm, a one-rank job: this device may be the only one.
        job = self._job(dataset, batch_size, 1, world_size if comm else 1, "pipebd", "auto", 0, 1, threads, False,
                        timeout, sync_batchnorm, num_workers, planned=world_size)
        if not comm:
            return profile_job(job, world_size, warmup=warmup, repeats=repeats, cache=False, comm=lambda: ([], []))
        return self._profile(job, world_size, timeout, warmup=warmup, repeats=repeats, cache=cache)

    def _profile(self, job: Job, world_size: int, timeout: float, **options: Any) -> Profile:
        if torchrun_env() is None or world_size == 1:   # one rank: no transfers to time (none to time them with)
            return profile_job(job, world_size, **options)
        # SPMD: every rank takes part in the communication benchmark; rank 0 measures (or reads
        # the cache) and every rank plans from its profile, so they all choose the same plan.
        import torch.distributed as dist
        init_spmd(job.device, timeout)
        rank = dist.get_rank()
        measured = [comm_task(job.device, COMM_REPEATS, rank, world_size)]
        again = [rank == 0 and noisy_comm(job, *measured[0]) is not None]   # profile_job measures again: all must
        dist.broadcast_object_list(again, src=0)
        if again[0]:
            measured.append(comm_task(job.device, COMM_REPEATS, rank, world_size))
        box = [profile_job(job, world_size, comm=lambda: measured.pop(0), **options) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def student_model(self) -> nn.Sequential:
        """The student blocks (trained in place by ``fit``) as one Sequential, on CPU."""
        return nn.Sequential(*self.student).cpu()

    def _job(self, dataset: Any, batch_size: int, steps: int, world_size: int, strategy: str,
             plan: Plan | str | None, seed: int, max_inflight: int, threads: int | None,
             progress: bool | None, timeout: float = 600.0, sync_batchnorm: bool = False,
             num_workers: int = 0, *, planned: int = 1) -> Job:
        """Validate everything that can be checked in the caller and build the job (the
        checkpoint options apart: ``checkpoint.options``). ``pipebd check`` runs this alone.
        ``planned``: the world size an auto plan is made for, if more than this job's (a profile
        measured on one device)."""
        if not isinstance(sync_batchnorm, bool):
            raise TypeError(f"sync_batchnorm must be True or False, got {sync_batchnorm!r}")
        num_workers = check_workers(num_workers)
        seed = check_seed(seed)
        timeout = check_timeout(timeout)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        batch_size, steps, world_size, max_inflight = (check_int(name, value, 1) for name, value in (
            ("batch_size", batch_size), ("steps", steps), ("world_size", world_size), ("max_inflight", max_inflight)))
        threads = None if threads is None else check_int("threads", threads, 1)
        length = dataset_length(dataset)
        if length == 0:
            raise ValueError("dataset is empty")
        if self.device.startswith("cuda") and torchrun_env() is None and world_size > torch.cuda.device_count():
            raise ValueError(f"world_size {world_size} needs one GPU per rank but "
                             f"{torch.cuda.device_count()} are visible")
        resolved = self._resolve_plan(plan, strategy, world_size)   # "auto": the default until profiled
        widest = max(resolved.replicas)
        auto = strategy == "pipebd" and isinstance(plan, str) and plan == "auto"
        used, env = sum(resolved.replicas), torchrun_env()
        if used < world_size and (env is None or env[0] == 0):
            log.warning("pipebd: the plan %s uses %d of %d ranks: rank(s) %s will be idle", resolved.describe(), used,
                        world_size, f"{used}-{world_size - 1}" if world_size - used > 1 else used)
        if batch_size < widest and not auto:   # auto plans fit the batch
            raise ValueError(f"batch_size {batch_size} is smaller than the widest stage's replica "
                             f"count ({widest}); every replica needs at least one row")
        boundary, labels, inplace, rows = self._probe(
            dataset, replicas=widest > 1 or (auto and max(world_size, planned) > 1))
        _check_rows(resolved, batch_size, rows, sync_batchnorm, only_one=auto)
        check_training(self.optimizer, self.scheduler, self.student, "student block", warn=env is None or env[0] == 0)
        if threads is None and world_size > 1 and torchrun_env() is None:
            threads = max(1, (os.cpu_count() or 1) // world_size)   # spawned workers share the cores
        return Job(strategy=strategy, plan=resolved, num_blocks=self.num_blocks,
                   teacher=dict(enumerate(self.teacher)), student=dict(enumerate(self.student)),
                   optimizer=self.optimizer, block_loss=self.block_loss, final_loss=self.final_loss,
                   dataset=dataset, dataset_len=length, batch_size=batch_size, steps=steps, seed=seed,
                   boundary=boundary, labels=labels, device=self.device, max_inflight=max_inflight,
                   threads=threads, progress=sys.stderr.isatty() if progress is None else progress,
                   scheduler=self.scheduler, timeout=timeout, sync_batchnorm=sync_batchnorm,
                   num_workers=num_workers, inplace=inplace, min_rows=tuple(max(pair) for pair in rows))

    def _resolve_plan(self, plan: Plan | str | None, strategy: str, world_size: int) -> Plan:
        n = self.num_blocks
        if strategy == "baseline":
            if plan is not None and not (isinstance(plan, str) and plan == "auto"):   # "auto": nothing to choose
                raise ValueError("the baseline trains all blocks data parallel over all ranks; "
                                 "plan applies to strategy='pipebd' only")
            return Plan([list(range(n))], [world_size])
        if plan is None:
            return default_plan(n, world_size)
        if isinstance(plan, str):
            if plan == "auto":
                return default_plan(n, world_size)
            hint = f" (for a plan written as the CLI takes it: pipebd.Plan.parse({plan!r}))" if "[" in plan else ""
            raise ValueError(f"plan must be None, 'auto' or a pipebd.Plan, got {plan!r}{hint}")
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be None, 'auto' or a pipebd.Plan, got {type(plan).__name__}")
        plan.validate(n, world_size)
        return plan

    def _probe(self, dataset: Any, replicas: bool = False) -> tuple[list[TensorSpec], TensorSpec | None,
                                                                    dict[str, frozenset[int]], list[tuple[int, int]]]:
        """Run the first samples through every teacher and student block to learn the boundary
        shapes and catch mismatches before any process starts, which blocks change their
        input in place (``Job.inplace``) and the fewest rows each block's student and teacher
        need (``_block_rows``). With ``replicas`` (a stage may split the batch), warn
        of blocks that mix the samples of a batch. Random ops in the blocks leave the caller's
        generators as they were."""
        needs_labels = bool(getattr(self.final_loss, "needs_labels", False))
        x, y = probe_batch(dataset, labels=needs_labels)
        if not isinstance(x, Tensor):
            hint = (": wrap the dataset so that its items are (x, y) pairs, e.g. a Dataset whose __getitem__ "
                    "returns (item['input'], item['label'])") if isinstance(x, dict) else ""
            raise TypeError(f"dataset items must be tensors or (tensor, label) pairs, got {type(x).__name__}{hint}")
        if needs_labels and y is None:
            raise ValueError("final_loss needs labels but dataset items carry none (use (x, y) items)")
        y = _labels(y) if needs_labels else None
        labels = TensorSpec(tuple(y.shape[1:]), y.dtype) if needs_labels else None
        inplace: dict[str, set[int]] = {"teacher": set(), "student": set()}
        min_rows = []
        env = torchrun_env()
        mixing: list[str] | None = [] if replicas and (env is None or env[0] == 0) else None   # None: no check
        uneven: dict[str, list[str]] = {}     # how a loss is not the mean of its rows' -> blocks (as mixing)
        with kept_as_given(self.teacher + self.student), torch.no_grad(), _caller_rng():
            for m in self.teacher + self.student:
                m.eval()
            a = x.to(_device_of(self.teacher[0]))
            boundary = [TensorSpec(tuple(a.shape[1:]), a.dtype)]
            for i, (t, s) in enumerate(zip(self.teacher, self.student)):
                out = normal_output(_call_block(t, a, f"teacher block {i}", inplace["teacher"], i, mixing))
                if not isinstance(out, Tensor):
                    raise TypeError(f"teacher block {i} returned a {type(out).__name__}; "
                                    f"blocks must return one tensor")
                if out.dim() == 0 or len(out) != len(a):
                    raise ValueError(f"teacher block {i} returned {_rows(out)} for an input of {_samples(a)}: "
                                     f"blocks must keep the batch in dim 0 (batch_first=True for PyTorch's "
                                     f"recurrent and transformer layers)")
                s_out = _call_block(s, a.to(_device_of(s)), f"student block {i}", inplace["student"], i,
                                    None if _batch_statistics(s, t) else mixing)
                min_rows.append(_block_rows(s, t, a))
                if not isinstance(s_out, Tensor) or s_out.shape != out.shape:
                    got = tuple(s_out.shape[1:]) if isinstance(s_out, Tensor) else type(s_out).__name__
                    raise ValueError(f"student block {i} outputs shape {got} per sample but "
                                     f"teacher block {i} outputs {tuple(out.shape[1:])} "
                                     f"(probed with {_samples(a)})")
                last = i == self.num_blocks - 1
                loss_fn = self.final_loss if last and self.final_loss is not None else self.block_loss
                target = out.to(s_out.device)
                loss_args = (s_out, target, y.to(s_out.device)) if last and needs_labels else (s_out, target)
                try:
                    loss = loss_fn(*loss_args)
                except TypeError as err:
                    if not last or needs_labels or self.final_loss is None:
                        raise
                    raise TypeError(f"final_loss failed on (student logits, teacher logits): {err}. A final loss "
                                    f"is also given the labels only if it has needs_labels = True") from err
                if last and not needs_labels and isinstance(loss_fn, nn.CrossEntropyLoss) \
                        and not _probabilities(target):
                    raise ValueError("final_loss nn.CrossEntropyLoss is given (student logits, teacher outputs) "
                                     "and takes the teacher's outputs as class probabilities, but they are not "
                                     "(negative, or rows that do not sum to 1): to distill the teacher's logits "
                                     "use pipebd.SoftTargetLoss(temperature)")
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError(f"the loss of block {i} must return a scalar tensor, got "
                                     f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
                if mixing is not None:
                    unequal = _not_a_mean(loss_fn, loss_args, loss)
                    if unequal:
                        uneven.setdefault(unequal, []).append(str(i))
                a = out
                boundary.append(TensorSpec(tuple(a.shape[1:]), a.dtype))
        if mixing:   # one warning, from one rank
            log.warning("pipebd: blocks that mix the samples of a batch: in eval mode, a sample's output changes "
                        "when the others are in its batch: %s. Layers that take the sequence in dim 0 "
                        "(batch_first=False, the default of nn.TransformerEncoderLayer and nn.LSTM), or a "
                        "teacher's BatchNorm without running statistics? pipebd keeps "
                        "the batch in dim 0 and gives each replica of a stage its slice of the batch, so these "
                        "blocks train differently with replicas (or the baseline on several ranks) than in one "
                        "process", ", ".join(mixing))
        if uneven:   # one warning, from one rank
            log.warning("pipebd: losses that are not the mean of their rows' losses: %s. Each replica's loss is "
                        "scaled by its share of the batch, which gives the full-batch gradient only for a mean "
                        "over the rows (as 'mse', F.mse_loss's default, and SoftTargetLoss), so these blocks train "
                        "differently with replicas (or the baseline on several ranks) than in one process",
                        "; ".join(f"block(s) {', '.join(blocks)}: {how}" for how, blocks in uneven.items()))
        if needs_labels:
            self._check_all_labels(dataset, classes=s_out.shape[-1])
        return boundary, labels, {k: frozenset(v) for k, v in inplace.items()}, min_rows

    def _check_all_labels(self, dataset: Any, classes: int) -> None:
        """With the labels all at hand (a TensorDataset), check them against the classes of the
        final loss, as it will when it meets them; the probe checked only the first rows."""
        if not isinstance(self.final_loss, SoftTargetLoss) or not _tensors(dataset) or isinstance(dataset, Tensor) \
                or len(dataset.tensors) < 2:
            return   # another loss may read its labels otherwise (classes in dim 1, as torch's own)
        ignore_index = self.final_loss.ignore_index   # the labels' dtype: checked by the probe's loss
        bad = out_of_range(dataset.tensors[1], classes, ignore_index)
        if bad:
            raise ValueError(f"dataset labels must be in [0, {classes}) (the last block's outputs) or "
                             f"ignore_index={ignore_index}, got {bad}")

    def _load_states(self, results: list) -> None:
        for r in results:
            for block, state in r.state.items():
                load_trained_state(self.student[block], state)


def _blocks(name: str, blocks: Any) -> list:
    """``blocks`` as a list, else a TypeError that says what a model given whole needs."""
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"{name} must be a sequence of blocks (a list, nn.Sequential or nn.ModuleList of "
                        f"nn.Modules), got a {type(blocks).__name__}: split the model into the blocks whose "
                        f"outputs the student's blocks learn")
    try:
        return list(blocks)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of blocks (a list, nn.Sequential or nn.ModuleList of "
                        f"nn.Modules), got {type(blocks).__name__}") from None


def _check_trainable(teacher: list[nn.Module], student: list[nn.Module]) -> None:
    """Refuse student blocks that ``fit`` could not train as given: one without trainable
    parameters, one whose trainable parameters have several dtypes or devices (they share one
    gradient buffer), and a trainable parameter held by two blocks. Each block has its own
    optimizer and may train on another rank, so shared weights would be updated apart and one
    copy would win. A teacher's parameter inside its own student block is frozen with the
    teacher (the block's other parameters train); inside another block it is refused, since the
    rank that trains that block may not hold the teacher block."""
    owner: dict[int, list[int]] = {}   # parameter -> the teacher blocks that hold it
    for j, block in enumerate(teacher):
        for p in block.parameters():
            owner.setdefault(id(p), []).append(j)
    trained: dict[int, tuple[int, str]] = {}
    for i, block in enumerate(student):
        params = [(name, p) for name, p in block.named_parameters() if p.requires_grad and i not in owner.get(id(p), ())]
        for name, p in params:
            if id(p) in owner:
                raise ValueError(f"student block {i}'s parameter {name!r} belongs to teacher block {owner[id(p)][0]}, "
                                 f"which stays frozen: give the student a copy (copy.deepcopy) or freeze it "
                                 f"(requires_grad_(False))")
            if id(p) in trained:
                j, first = trained[id(p)]
                raise ValueError(f"student blocks {j} and {i} share a trainable parameter ({first!r} in block {j}, "
                                 f"{name!r} in block {i}): each block has its own optimizer and may train on "
                                 f"another rank, so shared weights cannot stay shared; give each block its own "
                                 f"copy (copy.deepcopy) or freeze the shared one (requires_grad_(False))")
            trained[id(p)] = (i, name)
        if not params:
            frozen = any(i in owner.get(id(p), ()) for p in block.parameters())
            raise ValueError(f"student block {i} ({type(block).__name__}) has no trainable parameters"
                             + (f" but teacher block {i}'s, which stay frozen (to start the student from the "
                                f"teacher, pass copy.deepcopy(teacher[{i}]))" if frozen else "")
                             + "; every student block is trained")
        kinds = {(p.dtype, p.device) for _, p in params}
        if len(kinds) > 1:
            raise ValueError(f"student block {i} has trainable parameters of several dtypes or devices "
                             f"({sorted(map(str, kinds))}); each block's gradients share one buffer")


def teacher_fingerprint(teacher: list[nn.Module], shape: tuple[int, ...], dtype: torch.dtype) -> list[float]:
    """Numbers that tell teachers apart, recorded with a checkpoint since the teacher is not saved
    (``checkpoint.check_teacher``): the last teacher block's output, in eval mode, on a fixed
    input of the first block's per-sample ``shape`` and ``dtype`` (zeros for an integer input),
    as its mean, its mean absolute value and eight of its entries. The input is one sample; a
    teacher that cannot take one (BatchNorm without running statistics) gets ``PROBE_ROWS``,
    and the first one's output counts."""
    with kept_as_given(teacher), torch.no_grad(), _caller_rng():
        torch.manual_seed(0)   # a sampling teacher draws the same each time
        try:
            out = _teacher_output(teacher, shape, dtype, 1)
        except Exception:
            out = _teacher_output(teacher, shape, dtype, PROBE_ROWS)
    out = out[0].detach().double().flatten().cpu()
    picks = out[torch.linspace(0, out.numel() - 1, 8).long()] if out.numel() else out
    return [out.mean().item(), out.abs().mean().item(), *picks.tolist()]


def _teacher_output(teacher: list[nn.Module], shape: tuple[int, ...], dtype: torch.dtype, rows: int) -> Tensor:
    numel = math.prod(shape)
    x = torch.sin(torch.arange(rows * numel, dtype=torch.float64) * 0.7) if dtype.is_floating_point \
        else torch.zeros(rows * numel)
    a = x.to(dtype).reshape(rows, *shape)
    for block in teacher:
        a = normal_output(block.eval()(a.to(_device_of(block))))
    return a



def _samples(x: Tensor) -> str:
    return "one sample" if len(x) == 1 else f"{len(x)} samples"


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _rows(x: Tensor) -> str:
    return "a 0-d tensor" if x.dim() == 0 else f"{len(x)} rows"


def _call_block(block: nn.Module, x: Tensor, name: str, inplace: set[int], index: int,
                mixing: list[str] | None) -> Any:
    """``block(x)``, adding ``index`` to ``inplace`` if the block changed ``x`` in place (an
    inference tensor keeps no version, and cannot change outside inference mode), and, unless
    ``mixing`` is None, ``name`` with the difference to it if the block mixes the samples of a
    batch (``_mixing``)."""
    version = None if x.is_inference() else x._version
    given = x.clone() if mixing is not None else x
    try:
        out = block(x)
    except Exception as err:
        own = sorted({str(p.dtype) for p in block.parameters() if p.is_floating_point()})
        hint = (f". The block's parameters are {', '.join(own)}: blocks get the previous teacher block's output "
                f"(or the data) in its own dtype, so a block in another dtype casts its input itself (x.to(...) "
                f"in its forward) or runs under torch.autocast"
                if x.is_floating_point() and own and str(x.dtype) not in own else "")
        raise ValueError(f"{name} failed on an input of shape {tuple(x.shape[1:])} and dtype {x.dtype} per "
                         f"sample (probed with {_samples(x)}): {err}{hint}") from err
    if version is not None and x._version != version:
        inplace.add(index)
    diff = _mixing(block, given, out) if mixing is not None else None
    if diff is not None:
        mixing.append(f"{name} (by up to {diff:.3g})")
    return out


def _mixing(block: nn.Module, x: Tensor, out: Any) -> float | None:
    """How far ``block``'s outputs move when each sample of ``x`` is alone in its batch rather
    than with the others (max abs difference; a replica sees a slice), where that is beyond
    rounding and the block repeats its output; None where it is not, or cannot tell (one
    sample, non-float output, a block that fails on one sample). Compiled code runs eagerly
    here, so that one sample does not compile it again."""
    if len(x) < 2 or not isinstance(out, Tensor) or out.dim() == 0 or len(out) != len(x) \
            or not out.is_floating_point():
        return None
    # Without dynamo imported nothing is compiled (and importing it takes seconds).
    eager = torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else contextlib.nullcontext()
    try:
        with eager:
            alone = [block(x[j:j + 1].clone()) for j in range(len(x))]
            if not all(isinstance(a, Tensor) and a.shape == out[:1].shape for a in alone):
                return None
            alone = torch.cat(alone).float()
            diff = (alone - out.float()).abs().max().item()
            scale = max(out.float().abs().max().item(), alone.abs().max().item())
            if not diff > (1e-1 if out.element_size() <= 2 else 1e-2) * scale:   # NaN too
                return None
            again = block(x.clone())
    except Exception:
        return None
    if not isinstance(again, Tensor) or again.shape != out.shape \
            or not (again.float() - out.float()).abs().max().item() <= diff / 10:   # random: cannot tell
        return None
    return diff


def _not_a_mean(loss_fn: Callable[..., Tensor], args: tuple[Tensor, ...], loss: Tensor) -> str | None:
    """How ``loss_fn``'s loss of the batch ``args`` departs from the mean of each row's loss (a
    sum over the rows, or other), where it does by over 1%; None where it is the mean or it
    cannot tell (one row, a loss that fails or is not a number on one row)."""
    rows = len(args[0])
    if rows < 2:
        return None
    try:
        each = [loss_fn(*(a[j:j + 1] for a in args)) for j in range(rows)]
    except Exception:
        return None
    if not all(isinstance(e, Tensor) and e.numel() == 1 for e in each):
        return None
    whole, total = loss.double().item(), sum(e.double().item() for e in each)
    mean = total / rows
    if not abs(whole - mean) > 1e-2 * max(abs(whole), abs(mean)):   # NaN too
        return None
    if abs(whole - total) <= 1e-2 * abs(total):
        return "the sum of the rows' losses, not their mean"
    return f"{whole:.4g} for {rows} rows whose own losses average {mean:.4g}"


def _probabilities(target: Tensor) -> bool:
    """Whether ``target`` holds class probabilities in dim 1 (as nn.CrossEntropyLoss reads a
    floating target): non-negative, each summing to 1."""
    if not target.is_floating_point() or target.dim() < 2:
        return True      # class indices, or nothing to tell
    return bool((target >= 0).all() and torch.allclose(target.float().sum(1), torch.ones(()), atol=1e-3))


def _labels(y: Any) -> Tensor:
    """The probe's labels as a tensor, else a TypeError naming what the dataset gave."""
    try:
        return torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as err:
        first = y[0] if isinstance(y, (list, tuple)) and y else y
        raise TypeError(f"final_loss takes labels, and the dataset's second fields must be numbers or tensors "
                        f"(integer class indices for SoftTargetLoss); got {type(first).__name__} "
                        f"{first!r:.40}: {err}") from None


def _own_batchnorm(module: nn.Module, frozen: nn.Module | None = None) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that train: not those of ``frozen`` (a teacher block
    inside its student block), which stays in eval mode."""
    skip = {id(m) for m in frozen.modules()} if frozen is not None else set()
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and id(m) not in skip]


def _min_rows(module: nn.Module, x: Tensor, layers: list[_BatchNorm]) -> int:
    """The fewest rows of ``x``'s kind that ``module``'s BatchNorm ``layers`` can normalize with
    the batch's statistics: torch refuses a single value per channel, so 2 where one of them gets
    one value per channel from each row (an input of [rows, channels]), else 1. Runs ``module``
    on ``x``: the caller has it in eval mode, without gradients."""
    if not layers:
        return 1
    counts: list[int] = []   # values per channel that each layer got for the len(x) rows

    def count(layer: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].dim() >= 2:
            counts.append(args[0].shape[0] * math.prod(args[0].shape[2:]))

    hooks = [m.register_forward_pre_hook(count) for m in layers]
    try:
        module(x.clone())
    finally:
        for hook in hooks:
            hook.remove()
    return max((len(x) // c + 1 for c in counts if c > 0), default=1)


def _block_rows(student: nn.Module, teacher: nn.Module, x: Tensor) -> tuple[int, int]:
    """``_min_rows`` of a block pair: the student's own BatchNorm layers (which train), the
    teacher's without running statistics (which use the batch's in eval mode too)."""
    batch_stats = [m for m in teacher.modules() if isinstance(m, _BatchNorm) and m.running_mean is None]
    return (_min_rows(student, x.to(_device_of(student)), _own_batchnorm(student, teacher)),
            _min_rows(teacher, x.to(_device_of(teacher)), batch_stats))


def _too_few_rows(what: str, batch_size: int, smallest: int, need: int, width: int = 1, over: str = "",
                  fixes: str = "") -> ValueError:
    """The refusal of a slice of ``smallest`` rows for ``what``, which needs ``need``: the whole
    batch on one rank, or its slices ``over`` (``"over the 3 replicas of stage 0 leaves a
    replica"``) ``width`` ranks, with ``fixes`` beyond a larger batch."""
    if width == 1:
        where, fix = f"gives it {_row_count(smallest)}", f"a batch of at least {_row_count(need)}"
    else:
        where, fix = f"{over} {_row_count(smallest)}", f"a batch of at least {_row_count(need * width)}{fixes}"
    return ValueError(f"{what} has a BatchNorm layer that gets one value per channel from each row (an input of "
                      f"[rows, channels]), and torch cannot normalize a single value: batch_size {batch_size} "
                      f"{where}; use {fix}")


def _row_count(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _check_rows(plan: Plan, batch_size: int, rows: Sequence[tuple[int, int]], sync_batchnorm: bool,
                only_one: bool = False) -> None:
    """ValueError unless every replica's slice of the batch has the rows its blocks need
    (``_block_rows``: student, teacher); with ``sync_batchnorm`` a replicated stage's student
    statistics cover the whole batch (a teacher's are its slice's). ``only_one``: check only
    that one rank could run the whole batch (an auto plan, which the planner fits to the blocks)."""
    for s, (stage, k) in enumerate(zip(plan.stages, plan.replicas)):
        k = 1 if only_one else k
        for block in stage:
            for role, need in zip(("student", "teacher"), rows[block]):
                synced = role == "student" and sync_batchnorm and k > 1
                smallest = batch_size if synced else batch_size // k
                if smallest < need:
                    raise _too_few_rows(f"{role} block {block}", batch_size, smallest, need, k,
                                        f"over the {k} replicas of stage {s} leaves a replica", ", fewer replicas"
                                        + (", or sync_batchnorm=True (statistics over the stage's whole batch)"
                                           if role == "student" else
                                           ", or running statistics in that layer (track_running_stats=True)"))


def _batch_statistics(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether ``student`` has BatchNorm layers of its own without running statistics, which
    mix the batch in eval mode too, by design: per replica by default, as DDP, and exactly
    with ``sync_batchnorm``. (A teacher's are not synchronized: they stay in eval mode.)"""
    return any(m.running_mean is None for m in _own_batchnorm(student, teacher))


@contextlib.contextmanager
def _caller_rng() -> Iterator[None]:
    """The caller's CPU generator (and CUDA's, where initialized) as they were, after the body."""
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
