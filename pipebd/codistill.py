"""Codistillation and online distillation: n models that learn from each other while they train.

Codistillation (Anil et al., "Large scale distributed neural network training through online
distillation", ICLR 2018): model i trains on its own disjoint shard of the data, with loss

    task_loss(s_i, y) + alpha * T^2 * KL(mean_{j != i} softmax(t_j / T) || softmax(s_i / T))

where ``t_j`` are model j's predictions on model i's batch, computed locally from j's latest
received checkpoint. Checkpoints are exchanged every ``exchange_every`` steps, asynchronously,
under the staleness rule of ``pipebd.runtime.exchange``: at step t (t >= 2K) the others' weights
are those after ``K * (t // K - 1)`` steps. Before ``burn_in`` steps the loss is the task loss alone.

Online mode (deep mutual learning, Zhang et al., CVPR 2018): every model sees the same batch and
``t_j`` are the others' current predictions (detached), exchanged every step.

Each model may be trained data parallel (DDP) by a group of ranks: ``world_size = n * g`` gives
every model g ranks; ``world_size = 1`` trains all n models in the calling process with the same
arithmetic. The task loss is cross-entropy over the rows of the last logits dimension, summed and
divided by the model's batch size (samples), so a group's slices sum to the full-batch step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint
from .checks import build_optimizer, check_device, check_factory, check_int, check_integer, check_real, check_training
from .api import _caller_rng, _device_of, _min_rows, _own_batchnorm, _samples, _too_few_rows
from .batchnorm import replica_batchnorm
from .data import PROBE_ROWS, BatchOrder, StepRows, _tensors, check_workers, dataset_length, feed, probe_batch
from .losses import _BACKENDS, out_of_range, soft_target_loss
from .rng import check_seed, derived_seed, stream
from .runtime.exchange import PeerLogits, Transfer, WeightExchange, packed_sizes, pack, unpack
from .runtime.launch import (_broadcast_from_rank0, backend_for, check_timeout, init_spmd, kept_as_given, own_gpu,
                             spawn_tasks, torch_threads, torchrun_env)
from .runtime.redistribute import slices
from .runtime.worker import NonFiniteLoss, load_trained_state, progress_bar, trained_state
from .trace import Recorder, Span, busy_time, write_chrome_trace

log = logging.getLogger("pipebd")

MODES = ("codistill", "online")


def combined_loss(logits: Tensor, labels: Tensor, peers: Tensor | None, alpha: float, temperature: float,
                  ignore_index: int = -100, backend: str = "auto") -> Tensor:
    """Summed over rows: ``CE(logits, labels) + alpha * T^2 * KL(mean_j softmax(peers_j/T) ||
    softmax(logits/T))``. ``logits`` [rows, V], ``labels`` [rows], ``peers`` [n, rows, V] (no
    gradient flows to them) or None for the task loss alone. One fused pass over the logits: the
    soft-target loss with hard-label weight ``1 / (1 + alpha)``, scaled by ``1 + alpha``."""
    if peers is None or alpha == 0:   # summed in float32 at least, like the fused path
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.long(),
                               ignore_index=ignore_index, reduction="sum")
    hard = 1.0 / (1.0 + alpha)
    return soft_target_loss(logits, peers, temperature, "sum", labels=labels, alpha=hard,
                            ignore_index=ignore_index, backend=backend) * (1.0 + alpha)


def shards(length: int, n: int, seed: int) -> list[Tensor]:
    """Disjoint shards of ``range(length)`` that cover it: a seeded permutation cut into n
    contiguous parts whose sizes differ by at most one."""
    if length < n:
        raise ValueError(f"a dataset of {length} samples cannot give {n} models a shard each")
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(derived_seed(seed, "shards")))
    return [perm[lo:hi] for lo, hi in slices(length, n)]


@dataclass
class _Job:
    models: list[nn.Module]
    mode: str
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    scheduler: Callable[[torch.optim.Optimizer], Any] | None
    alpha: float
    temperature: float
    burn_in: int
    exchange_every: int
    ignore_index: int
    backend: str
    dataset: Any
    shards: list[Tensor] | None        # codistill: sample indices of each model's shard
    batch_size: int
    steps: int
    seed: int
    device: str
    eval_data: tuple[Tensor, Tensor] | None
    eval_every: int | None
    keep_checkpoints: bool
    threads: int | None
    progress: bool
    timeout: float
    start: int = 0                     # steps completed before this fit (resume)
    resume_state: dict[int, dict] = field(default_factory=dict)   # model -> its checkpoint, less the weights
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    key: checkpoint.CodistillKey | None = None
    sync_batchnorm: bool = False       # BatchNorm statistics over each DDP group's whole batch
    num_workers: int = 0               # loader processes per feed (0: load in the rank's process)
    find_unused: frozenset[int] = frozenset()   # models with parameters their output does not use

    def checkpoint_key(self) -> checkpoint.CodistillKey:
        """What a checkpoint of this job must match to be resumed (``checkpoint.read_codistill``)."""
        return checkpoint.CodistillKey(self.n, self.mode, self.batch_size, self.seed, dataset_length(self.dataset),
                                       self.exchange_every)

    @property
    def distillation(self) -> dict[str, Any]:
        """The settings of the distillation term, recorded with each checkpoint."""
        return {"alpha": self.alpha, "temperature": self.temperature, "burn_in": self.burn_in}

    @property
    def n(self) -> int:
        return len(self.models)

    @property
    def exchanges(self) -> bool:
        """Whether checkpoints move at all (codistill mode, several models, a distillation term)."""
        return self.mode == "codistill" and self.n > 1 and self.alpha > 0

    @property
    def first_distilled(self) -> int | None:
        """The first step with the distillation term on (None: none of these steps). Online: the
        end of burn-in. Codistill: the checkpoint of the first published step s is installed at
        s + K, so the term starts at max(s + K, burn_in)."""
        if not (self.alpha > 0 and self.n > 1):
            return None
        first = self.burn_in
        if self.mode == "codistill":
            k = self.exchange_every
            s = max(k, k * ((self.burn_in - 2 * k) // k + 1))   # the least multiple of K with s + 2K > burn_in
            if not self.publishes_at(s):
                return None
            first = max(s + k, self.burn_in)
        return first if first < self.steps else None

    def publishes_at(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` is published: it is installed at ``step + K`` and
        used until ``step + 2K``, so skip it if training ends first or burn-in outlasts it."""
        k = self.exchange_every
        return (self.exchanges and step > 0 and step % k == 0
                and step + k < self.steps and step + 2 * k > self.burn_in)

    def restored_exchanges(self) -> tuple[int, int]:
        """For a run resumed after ``start`` steps: the steps of the checkpoints installed and
        pending at that point (the last exchange before ``start`` and the one before it)."""
        last = self.exchange_every * ((self.start - 1) // self.exchange_every)
        return last - self.exchange_every, last


@dataclass
class _RankResult:
    rank: int
    models: list[int]
    elapsed: float
    spans: list[Span]
    losses: dict[int, list[float]]                         # model -> this rank's share, per step
    sources: list[int | None]                              # step -> checkpoint step distilled from
    eval_steps: list[int]
    eval_probs: dict[int, list[Tensor]]                    # leaders only
    state: dict[int, dict[str, Tensor]]                    # leaders only
    exchanged_bytes: int
    published: dict[tuple[int, int], dict[torch.dtype, Tensor]] = field(default_factory=dict)
    installed: dict[tuple[int, int], dict[int, dict[torch.dtype, Tensor]]] = field(default_factory=dict)


class Codistillation:
    """n models trained together, each distilling from the others (see the module docstring).

    ``models``: a callable ``i -> nn.Module`` (called in ``fit`` under a seed derived from
    ``(seed, i)``, so a run is a function of its seed) or a sequence of n modules (trained in
    place). ``n`` defaults to 2, or to ``len(models)``. ``optimizer`` builds one optimizer per
    model (default SGD, lr 0.01, momentum 0.9); ``scheduler`` optionally builds a learning-rate
    scheduler from it, stepped after every optimizer step (see ``pipebd.lr``).
    ``mode``: ``"codistill"`` (disjoint shards, stale checkpoints every ``exchange_every`` steps)
    or ``"online"`` (same batch, current predictions every step). ``alpha`` weighs the
    distillation term, ``temperature`` softens both sides; the term is off before ``burn_in``
    steps. ``backend`` selects the soft-target kernel (``pipebd.soft_target_loss``).
    The models must map a batch to logits [batch, ..., classes]; labels are class indices of
    shape [batch, ...] (``ignore_index`` marks rows without a label: no task loss there, but they
    are still distilled).
    """

    def __init__(self, models: Callable[[int], nn.Module] | Sequence[nn.Module], n: int | None = None, *,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, alpha: float = 1.0,
                 temperature: float = 1.0, burn_in: int = 0, exchange_every: int = 100,
                 mode: str = "codistill", ignore_index: int = -100, backend: str = "auto",
                 device: str | None = None):
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            # An nn.Sequential is iterable: its layers would be taken as the models.
            raise TypeError(f"models must be a factory (lambda i: a new model) or a list of models, got one "
                            f"{type(models).__name__}; for copies of it pass lambda i: copy.deepcopy(model)")
        if callable(models) and not isinstance(models, nn.Module):   # an nn.ModuleList is callable too
            self.model_fn, self._models = models, None
            n = 2 if n is None else n
        else:
            self._models = list(models)
            self.model_fn = None
            for i, m in enumerate(self._models):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"model {i} is a {type(m).__name__}, not an nn.Module")
            owner: dict[int, int] = {}
            for i, m in enumerate(self._models):
                for p in m.parameters():
                    j = owner.setdefault(id(p), i)
                    if j != i:
                        raise ValueError(f"models {j} and {i} share parameters; each model must have its own")
            if n is not None and n != len(self._models):
                raise ValueError(f"n={n} but {len(self._models)} models were given")
            n = len(self._models)
        n = check_int("n", n, 1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= check_real("alpha", alpha) < math.inf:
            raise ValueError(f"alpha must be >= 0 and finite, got {alpha}")
        t = check_real("temperature", temperature)
        if not (0 < t and t * t < math.inf):      # T^2 scales the distillation term
            raise ValueError(f"temperature must be > 0 and its square finite, got {temperature}")
        ignore_index = check_integer("ignore_index", ignore_index)
        burn_in, exchange_every = check_int("burn_in", burn_in, 0), check_int("exchange_every", exchange_every, 1)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        check_factory("optimizer", optimizer)
        check_factory("scheduler", scheduler)
        self.n, self.mode, self.alpha, self.temperature = n, mode, float(alpha), float(temperature)
        self.burn_in, self.exchange_every, self.ignore_index, self.backend = burn_in, exchange_every, ignore_index, backend
        self.optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
        self.scheduler = scheduler
        self.device = check_device(device)

    @property
    def models(self) -> list[nn.Module]:
        """The n models, trained in place by ``fit``. Given a model_fn, every ``fit`` builds them
        afresh (a run is a function of its seed); pass modules to continue training."""
        if self._models is None:
            raise RuntimeError("the models are built by fit() from model_fn; call fit first")
        return self._models

    def fit(self, dataset: Any, batch_size: int, steps: int, world_size: int = 1, seed: int = 0, *,
            eval_data: tuple[Tensor, Tensor] | None = None, eval_every: int | None = None,
            keep_checkpoints: bool = False, threads: int | None = None, progress: bool | None = None,
            timeout: float = 600.0, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, resume: bool = False,
            sync_batchnorm: bool = False, num_workers: int = 0) -> "CodistillReport":
        """Train every model for ``steps`` steps of ``batch_size`` samples each, cut in turn from
        seeded permutations of its shard (of the dataset, in online mode), one per epoch: as in
        ``Distiller.fit``, a batch can span two epochs and hold a sample twice.

        ``world_size``: 1 (all models in this process) or a multiple of n (``world_size // n``
        data-parallel ranks per model; local workers are spawned unless the script runs under
        torchrun). ``eval_data`` = (inputs, labels): each model's softmax predictions on it are
        recorded every ``eval_every`` steps and after the last (``report.accuracy``).
        ``keep_checkpoints`` records every published and installed checkpoint in the report (for
        tests of the staleness rule; costs memory). ``timeout`` (seconds) bounds every transfer and
        the wait for each batch from loader processes.

        ``checkpoint_dir``: every model's weights, optimizer and scheduler state (and its
        weights at the last two exchanges, which the others distill from next) are saved there
        every ``checkpoint_every`` steps and after the last, as one consistent step for all
        models (``pipebd.checkpoint``). ``resume=True`` continues from the last complete step,
        on any world size, and ends with the weights of an uninterrupted run; ``steps`` may be
        raised. A directory that holds a run is refused without ``resume``.

        BatchNorm in a model trained by several ranks uses each rank's rows by default (as DDP);
        ``sync_batchnorm=True`` normalizes with the statistics of the model's whole batch
        (``pipebd.batchnorm``), so the group trains as one process on that batch would.
        ``torch.nn.SyncBatchNorm`` layers follow the same option (not the default group).

        ``num_workers`` > 0: every rank loads its batches with that many DataLoader worker
        processes per model it trains (per shard; one set for all models in online mode),
        ahead of use, so loading overlaps training. The batches and the result are the same as
        with 0 (loading in the rank's own process): a random transform in the dataset draws
        from torch's generator seeded per sample by ``seed`` and the sample's place in the
        stream of samples (the model's shard's, or in online mode the run's; see
        ``pipebd.data.StepRows``), wherever it is loaded.
        Raises ValueError/TypeError before any process starts; ``pipebd.WorkerError`` if a rank
        fails (``pipebd.ExchangeError`` in its message when a transfer failed).
        """
        env = torchrun_env()
        if env is not None and env[1] != world_size:
            raise ValueError(f"fit(world_size={world_size}) but torchrun started WORLD_SIZE={env[1]} processes")
        job = self._job(dataset, batch_size, steps, world_size, seed, eval_data, eval_every, keep_checkpoints,
                        threads, progress, timeout, sync_batchnorm, num_workers)
        world_size = int(world_size)   # checked: an integer
        with contextlib.ExitStack() as held:    # the checkpoint directory, until the run has ended
            self._checkpoints(job, checkpoint_dir, checkpoint_every, resume, held)
            log.info("pipebd: %s of %d model%s on %d rank(s)", self.mode, self.n, "" if self.n == 1 else "s",
                     world_size)
            if job.first_distilled is None and job.alpha > 0 and job.n > 1:
                why = (f"burn_in={job.burn_in}" if job.mode == "online" else
                       f"with burn_in={job.burn_in} and exchange_every={job.exchange_every} the first checkpoint "
                       f"to distill from is there at step {max(2 * job.exchange_every, job.burn_in)} at the earliest")
                log.warning("pipebd: alpha=%s but none of these %d steps distills: %s", job.alpha, job.steps, why)
            if env is not None:
                init_spmd(self.device, timeout)
                _broadcast_from_rank0(job.models, _rank_device(self.device, dist.get_rank(), world_size))
                with kept_as_given(self.models):
                    results = _run(job, dist.get_rank(), world_size)
            elif world_size == 1:
                with kept_as_given(self.models):
                    results = _run(job, 0, 1)
            else:
                tasks = [functools.partial(_run, job) for _ in range(world_size)]
                g = world_size // self.n
                parts = {**{f"model {i}": m for i, m in enumerate(job.models)}, "the dataset": job.dataset,
                         "the optimizer factory": job.optimizer, "the scheduler factory": job.scheduler}
                results = spawn_tasks(tasks, backend_for(self.device), timeout,
                                      lambda r: f" (model {r // g}, replica {r % g})", parts, shared=job.dataset)
            for r in results:
                for i, state in r.state.items():
                    load_trained_state(self._models[i], state)
            return _build_report(job, world_size, results)

    def _checkpoints(self, job: _Job, directory: str | os.PathLike | None, every: int | None, resume: bool,
                     held: contextlib.ExitStack) -> None:
        """Check the checkpoint options and take ``directory`` for this job until ``held``
        closes (``checkpoint.claimed``); on resume, check every model's saved state, load the
        weights into the models and give the job the rest. A fresh run saves step 0 first."""
        directory, every = checkpoint.options(directory, every, resume)
        spmd = torchrun_env() is not None and directory is not None
        if spmd:
            init_spmd(self.device, job.timeout)
            _rank_device(self.device, dist.get_rank(), dist.get_world_size())   # before NCCL's barrier
        first_rank = not spmd or dist.get_rank() == 0    # the rank that writes the directory and warns
        checkpoint.hold(directory, held, first_rank, spmd)
        key = job.checkpoint_key()
        start, states = checkpoint.read_codistill(directory, key, job.steps, resume, job.distillation, warn=first_rank)
        checkpoint.check(states, job.models, job.optimizer, job.scheduler, what="model", warn=first_rank)
        if states and first_rank:
            checkpoint.check_every(directory, every, job.steps - start)
        job.start = start
        if states and job.exchanges:
            for step in job.restored_exchanges():
                if step > 0 and job.publishes_at(step):
                    for j, model in enumerate(job.models):
                        _check_snapshot(directory, states[j]["snapshots"].get(step), model, j, step)
        for i, state in states.items():
            job.models[i].load_state_dict(state["weights"])
        job.resume_state = {i: {k: v for k, v in state.items() if k != "weights"} for i, state in states.items()}
        if states:
            log.info("pipebd: resuming the codistillation in %s after step %d", directory, start)
        if directory is None:
            return
        if spmd:
            dist.barrier()   # every rank has read the directory before rank 0 writes to it
        if first_rank:
            if not states:   # a fresh run saves its initial state, so a resume never rebuilds it
                for i, model in enumerate(job.models):
                    optimizer = build_optimizer(job.optimizer, model)
                    scheduler = job.scheduler(optimizer) if job.scheduler is not None else None
                    checkpoint.save_model(directory, i, 0, model, optimizer, scheduler, {}, [])
            checkpoint.commit(directory, key, start, every, job.distillation, first=True)
        job.checkpoint_dir, job.checkpoint_every, job.key = directory, every, key

    def _job(self, dataset: Any, batch_size: int, steps: int, world_size: int, seed: int,
             eval_data: Any, eval_every: int | None, keep_checkpoints: bool, threads: int | None,
             progress: bool | None, timeout: float, sync_batchnorm: bool = False, num_workers: int = 0) -> _Job:
        """Validate everything that can be checked in the caller and build the job (the
        checkpoint options apart: ``checkpoint.options``). ``pipebd codistill --check`` runs this alone."""
        if not isinstance(sync_batchnorm, bool):
            raise TypeError(f"sync_batchnorm must be True or False, got {sync_batchnorm!r}")
        num_workers = check_workers(num_workers)
        seed = check_seed(seed)
        timeout = check_timeout(timeout)
        batch_size, steps, world_size = (check_int(name, value, 1) for name, value in (
            ("batch_size", batch_size), ("steps", steps), ("world_size", world_size)))
        if world_size > 1 and world_size % self.n:
            raise ValueError(f"world_size {world_size} must be 1 or a multiple of n={self.n} "
                             f"(each model gets world_size // n ranks)")
        group_size = max(1, world_size // self.n)
        if batch_size < group_size:
            raise ValueError(f"batch_size {batch_size} is smaller than the {group_size} ranks per model; "
                             f"every rank needs at least one row")
        eval_every = None if eval_every is None else check_int("eval_every", eval_every, 1)
        if eval_every is not None and eval_data is None:
            raise ValueError("eval_every needs eval_data")
        threads = None if threads is None else check_int("threads", threads, 1)
        if self.device.startswith("cuda") and torchrun_env() is None and world_size > torch.cuda.device_count():
            raise ValueError(f"world_size {world_size} needs one GPU per rank but "
                             f"{torch.cuda.device_count()} are visible")
        length = dataset_length(dataset)
        if length == 0:
            raise ValueError("dataset is empty")
        parts = shards(length, self.n, seed) if self.mode == "codistill" else None
        models = self._build(seed)
        evaluation = None
        if eval_data is not None:
            if not (isinstance(eval_data, (tuple, list)) and len(eval_data) == 2):
                raise TypeError("eval_data must be an (inputs, labels) pair of tensors")
            evaluation = (torch.as_tensor(eval_data[0]), torch.as_tensor(eval_data[1]))
            x, y = evaluation
            if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
                raise ValueError(f"eval_data needs inputs and labels with one row per sample, got shapes "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
        x, y = probe_batch(dataset)
        if _tensors(dataset) and not isinstance(dataset, Tensor) and len(dataset.tensors) > 1:
            y = dataset.tensors[1]   # every label is at hand: check them all
        self._probe(models, (x, y), "dataset")
        self._check_rows(models, x, batch_size, group_size, sync_batchnorm)
        if evaluation is not None:
            self._probe(models, (evaluation[0][:PROBE_ROWS], evaluation[1]), "eval_data")
        env = torchrun_env()
        check_training(self.optimizer, self.scheduler, models, "model", warn=env is None or env[0] == 0)
        if threads is None and world_size > 1 and env is None:
            threads = max(1, (os.cpu_count() or 1) // world_size)
        # DDP must be told of parameters without gradient, or it waits for them and fails.
        find_unused = frozenset(i for i, m in enumerate(models) if _unused(m, x)) if world_size > self.n \
            else frozenset()
        return _Job(models=models, mode=self.mode, optimizer=self.optimizer, scheduler=self.scheduler,
                    alpha=self.alpha, temperature=self.temperature, burn_in=self.burn_in,
                    exchange_every=self.exchange_every, ignore_index=self.ignore_index, backend=self.backend,
                    dataset=dataset, shards=parts, batch_size=batch_size, steps=steps, seed=seed,
                    device=self.device, eval_data=evaluation, eval_every=eval_every,
                    keep_checkpoints=keep_checkpoints, threads=threads,
                    progress=sys.stderr.isatty() if progress is None else progress, timeout=timeout,
                    sync_batchnorm=sync_batchnorm, num_workers=num_workers, find_unused=find_unused)

    def _build(self, seed: int) -> list[nn.Module]:
        if self.model_fn is not None:
            built = []
            for i in range(self.n):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derived_seed(seed, "init", i))
                    model = self.model_fn(i)
                if not isinstance(model, nn.Module):
                    raise TypeError(f"model_fn({i}) returned a {type(model).__name__}, not an nn.Module")
                built.append(model)
            self._models = built
        return self._models

    @staticmethod
    def _check_rows(models: list[nn.Module], x: Tensor, batch_size: int, group_size: int, sync: bool) -> None:
        """ValueError unless each rank's slice of a model's batch has the rows the model trains
        on (``api._min_rows``); with ``sync_batchnorm`` the statistics cover the whole batch."""
        smallest = batch_size if sync and group_size > 1 else batch_size // group_size
        for i, m in enumerate(models):
            with kept_as_given([m]), torch.no_grad(), _caller_rng():
                need = _min_rows(m.eval(), x.to(_device_of(m)), _own_batchnorm(m))
            if smallest < need:
                raise _too_few_rows(f"model {i}", batch_size, smallest, need, group_size,
                                    f"over its {group_size} ranks leaves a rank",
                                    ", fewer ranks, or sync_batchnorm=True (statistics over the model's whole batch)")

    def _probe(self, models: list[nn.Module], item: tuple[Any, Any], source: str) -> None:
        """The first samples through every model: logits of one shape and dtype for all, integer
        labels that fit them (``item``'s labels may be those of many samples)."""
        x, y = item
        if not isinstance(x, Tensor):
            raise TypeError(f"{source} items must be (tensor, label) pairs, got {type(x).__name__}")
        if y is None:
            raise ValueError(f"{source} items carry no labels; codistillation needs (x, y) items")
        y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"labels must be class indices (an integer tensor), got {y.dtype}")
        shapes, dtypes = set(), set()
        for i, m in enumerate(models):
            try:
                with kept_as_given([m]), torch.no_grad():
                    out = m.eval()(x.to(_device_of(m)))
            except Exception as err:
                raise ValueError(f"model {i} failed on a {source} input of shape {tuple(x.shape[1:])} per "
                                 f"sample (probed with {_samples(x)}): {err}") from err
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise ValueError(f"model {i} must return logits [batch, ..., classes], got "
                                 f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
            shapes.add(tuple(out.shape[1:]))
            dtypes.add(str(out.dtype).removeprefix("torch."))
            if out.shape[1:-1] != y.shape[1:]:
                raise ValueError(f"model {i} returns logits of shape {tuple(out.shape[1:])} per sample, so labels "
                                 f"need shape {tuple(out.shape[1:-1])}, but {source} labels have "
                                 f"{tuple(y.shape[1:])}")
        if len(shapes) > 1:
            raise ValueError(f"the models' logits differ in shape per sample: {sorted(shapes)}")
        if len(dtypes) > 1:   # the ranks exchange logits and checkpoints in buffers of one dtype
            raise ValueError(f"the models' logits differ in dtype: {sorted(dtypes)}")
        classes = shapes.pop()[-1]
        bad = out_of_range(y, classes, self.ignore_index)
        if bad:
            raise ValueError(f"{source} labels must be in [0, {classes}) (the models' classes) or "
                             f"ignore_index={self.ignore_index}, got {bad}")


def _unused(model: nn.Module, x: Tensor) -> list[str]:
    """The trainable parameters of ``model`` that its output on ``x`` does not depend on, in
    training mode (as a head left out of ``forward``); none where that cannot be told. Found
    with ``autograd.grad``, or, where the model refuses it (reentrant checkpointing), with a
    backward whose gradients are then put back. The model's buffers, modes and gradients and
    the caller's generators stay as they were; its forward and gradient hooks do run once."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not named:
        return []
    buffers = {name: b.clone() for name, b in model.named_buffers()}   # BatchNorm statistics move
    with kept_as_given([model]), torch.enable_grad(), _caller_rng():
        try:
            loss = torch.func.functional_call(model.train(), buffers, (x.to(_device_of(model)),)).float().sum()
            try:
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
            except RuntimeError:
                saved = [p.grad for p in params]
                try:
                    for p in params:
                        p.grad = None
                    loss.backward()
                    grads = [p.grad for p in params]
                finally:
                    for p, grad in zip(params, saved):
                        p.grad = grad
        except Exception:
            return []
    return [name for (name, _), g in zip(named, grads) if g is None]


def _check_snapshot(directory: str, packed: dict | None, model: nn.Module, j: int, step: int) -> None:
    if packed is None:
        raise ValueError(f"the checkpoint in {directory} holds no weights of model {j} after step {step}, which "
                         f"the resumed run distills from (was it saved without a distillation term, alpha=0?)")
    if {d: f.numel() for d, f in packed.items()} != packed_sizes(model):
        raise ValueError(f"the weights of model {j} after step {step} in the checkpoint in {directory} do not "
                         f"fit model {j}")


def _rank_device(device: str, rank: int, world_size: int) -> torch.device:
    """The rank's device; on CUDA with several ranks its own GPU (LOCAL_RANK under torchrun, the
    rank for spawned workers), made current before any NCCL collective."""
    if not device.startswith("cuda") or world_size == 1:
        return torch.device(device)
    return own_gpu(rank)


class _Rank:
    """What one rank holds: its models (DDP-wrapped in groups of several ranks), their
    optimizers, the others' stale copies (codistill) and the transfers."""

    def __init__(self, job: _Job, rank: int, world_size: int):
        n = job.n
        self.job, self.rank, self.world_size = job, rank, world_size
        self.g = max(1, world_size // n)
        self.own = list(range(n)) if world_size == 1 else [rank // self.g]
        self.leader = rank % self.g == 0
        self.device = _rank_device(job.device, rank, world_size)
        self.recorder = Recorder()
        members = [list(range(i * self.g, (i + 1) * self.g)) for i in range(n)]
        mine = {}   # model -> its DDP group, with several ranks per model
        if self.g > 1:
            for i in range(n):   # every rank takes part in every new_group call
                group = dist.new_group(members[i], timeout=timedelta(seconds=job.timeout))
                if i in self.own:
                    mine[i] = group
        self.groups: list[Any] = list(mine.values())   # the process groups this rank belongs to
        # Copies with the same parameters, buffers and state-dict keys, where they hold BatchNorm.
        self.models = {i: replica_batchnorm(job.models[i].to(self.device).train(), mine.get(i), job.sync_batchnorm)
                       for i in self.own}
        self.trained = dict(self.models)    # what forward calls: the DDP wrappers in groups
        if mine:
            from torch.nn.parallel import DistributedDataParallel
            self.trained.update({i: DistributedDataParallel(self.models[i], process_group=group,
                                                            find_unused_parameters=i in job.find_unused)
                                 for i, group in mine.items()})
        self.optimizers = {i: build_optimizer(job.optimizer, self.models[i]) for i in self.own}
        self.schedulers = {i: job.scheduler(o) for i, o in self.optimizers.items()} if job.scheduler else {}
        # What must stay finite for a save (not buffers that are -inf by design).
        self.finite = {i: checkpoint.finite_entries(self.models[i]) for i in self.own} \
            if job.checkpoint_dir is not None and self.leader else {}
        for i in self.own:
            if i in job.resume_state:
                checkpoint.load_training(f"model {i}", self.optimizers[i], self.schedulers.get(i), job.resume_state[i])
        # Each model's weights at the last two exchange steps: what the others distill from next,
        # saved with its checkpoint (kept only by the ranks that save).
        self.snapshots: dict[int, dict[int, dict[torch.dtype, Tensor]]] = {
            i: dict(job.resume_state[i]["snapshots"]) if i in job.resume_state else {} for i in self.own}
        self.lo, self.hi = slices(job.batch_size, self.g)[rank % self.g]
        self.scale = self.g / job.batch_size   # local sum -> share of the global mean, before DDP averages
        # This rank's rows of every step's batch: per model from its shard (codistill), or one
        # batch for all models (online, key None). Loader processes start with the first batch.
        steps = range(job.start, job.steps)
        if job.mode == "codistill":
            rows = {i: StepRows(BatchOrder(len(job.shards[i]), job.batch_size, derived_seed(job.seed, "order", i)),
                                steps, self.lo, self.hi, job.shards[i]) for i in self.own}
        else:
            rows = {None: StepRows(BatchOrder(dataset_length(job.dataset), job.batch_size, job.seed),
                                   steps, self.lo, self.hi)}
        self.feeds = {i: feed(job.dataset, r, job.num_workers, self.recorder, self._to_device,
                              pin_memory=self.device.type == "cuda", timeout=job.timeout) for i, r in rows.items()}
        if job.mode == "online":
            self.peers = PeerLogits(n, self.g, rank, world_size, job.timeout)
            self.groups += [self.peers.group] if self.peers.group is not None else []
        if job.exchanges:
            others = [j for j in range(n) if world_size == 1 or j not in self.own]
            self.stale = {j: copy.deepcopy(job.models[j]).to(self.device).eval().requires_grad_(False)
                          for j in others}
            self.exchange = WeightExchange(job.models, [m[0] for m in members], members, rank, world_size,
                                           self.device, job.timeout)
            self.groups += self.exchange.groups.values()
        self.losses = torch.zeros(job.steps, n, dtype=torch.float32, device=self.device)
        self.losses[:job.start] = float("nan")   # steps completed before a resume
        self.sources: list[int | None] = list(job.resume_state[0]["sources"]) if job.resume_state else []
        self.eval_steps: list[int] = []
        self.eval_probs: dict[int, list[Tensor]] = {i: [] for i in self.own}
        self.published: dict = {}
        self.installed: dict = {}
        self.exchanged_bytes = 0

    def load(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Model -> (inputs, labels) of this rank's rows of its next batch; in online mode every
        model shares one batch, loaded once."""
        if self.job.mode == "online":
            return dict.fromkeys(self.own, next(self.feeds[None]))
        return {i: next(self.feeds[i]) for i in self.own}

    def _to_device(self, x: Tensor, y: Any) -> tuple[Tensor, Tensor]:
        return x.to(self.device, non_blocking=True), torch.as_tensor(y).to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the loader processes, also when training failed."""
        for batches in self.feeds.values():
            batches.close()
        self.feeds.clear()

    def install(self, transfer: Transfer, step: int) -> None:
        with self.recorder.span("exchange-wait", step):
            received = self.exchange.wait(transfer)
        for j, packed in received.items():
            unpack(self.stale[j], packed)
        if not transfer.restored and self.exchange.distributed:   # in one process nothing moves
            self.exchanged_bytes += transfer.bytes
        if self.job.keep_checkpoints:
            for i in self.own:
                self.installed[(i, step)] = {j: {d: f.cpu() for d, f in received[j].items()}
                                             for j in received if j != i}

    def publish(self, index: int, step: int) -> Transfer:
        if self.job.keep_checkpoints and self.leader:
            for i in self.own:
                self.published[(i, step)] = {d: f.cpu() for d, f in pack(self.models[i]).items()}
        with self.recorder.span("exchange", step):
            return self.exchange.publish(index, step, self.models)

    def targets(self, step: int, source: int | None, xs: dict[int, Tensor],
                logits: dict[int, Tensor]) -> dict[int, Tensor | None]:
        """Model -> the others' logits on its rows, [n-1, rows, V], or None (task loss only)."""
        job = self.job
        if source is None:
            return dict.fromkeys(self.own)
        if job.mode == "online":
            with self.recorder.span("exchange", step):
                everyone = self.peers.gather(step, {i: out.detach() for i, out in logits.items()})
            return {i: torch.stack([everyone[j] for j in range(job.n) if j != i]) for i in self.own}
        with self.recorder.span("teacher", step), torch.no_grad():
            return {i: torch.stack([self.stale[j](xs[i]) for j in range(job.n) if j != i]) for i in self.own}

    def restore(self) -> tuple[Transfer | None, int | None]:
        """After a resume: put the checkpoint the others distill from into the stale copies and
        return the exchange that was in flight (as a transfer already received) and the step of
        the installed checkpoint, as an uninterrupted run would have them."""
        job = self.job
        installed, last = job.restored_exchanges()
        step = None
        if installed > 0 and job.publishes_at(installed):
            for j, model in self.stale.items():
                unpack(model, self._saved(j, installed))
            step = installed
        pending = None
        if last > 0 and job.publishes_at(last):
            pending = Transfer(last // job.exchange_every, last, {j: self._saved(j, last) for j in self.stale},
                               restored=True)
        return pending, step

    def _saved(self, j: int, step: int) -> dict[torch.dtype, Tensor]:
        return {d: f.to(self.device) for d, f in self.job.resume_state[j]["snapshots"][step].items()}

    def snapshot(self, step: int) -> None:
        """At an exchange step, keep this rank's models' weights for their checkpoints."""
        if self.job.checkpoint_dir is None or not self.job.exchanges or not self.leader:
            return
        for i in self.own:
            kept = self.snapshots[i]
            kept[step] = pack(self.models[i])
            for old in [s for s in kept if s < step - self.job.exchange_every]:
                del kept[old]

    def save(self, done: int) -> None:
        """Checkpoint step ``done``: the leaders write their models' files, every rank meets at
        a barrier, then rank 0 records the step (``checkpoint.commit``)."""
        job = self.job
        with self.recorder.span("checkpoint", done - 1):
            if self.leader:
                for i in self.own:
                    bad = checkpoint.diverged(self.models[i], self.finite[i])
                    if bad:
                        raise NonFiniteLoss(f"non-finite weights ({', '.join(bad[:3])}) of model {i} after step "
                                            f"{done - 1}; the checkpoint of an earlier step is kept", (done - 1, i))
                    checkpoint.save_model(job.checkpoint_dir, i, done, self.models[i], self.optimizers[i],
                                          self.schedulers.get(i), self.snapshots[i], self.sources)
            if self.world_size > 1:
                dist.barrier()
            if self.rank == 0:
                checkpoint.commit(job.checkpoint_dir, job.key, done, job.checkpoint_every, job.distillation)

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        x, y = self.job.eval_data
        self.eval_steps.append(step)
        if not self.leader:
            return
        with self.recorder.span("eval", step):
            for i in self.own:
                model = self.models[i]
                model.eval()
                probs = [F.softmax(model(x[lo:lo + 1024].to(self.device)).float(), dim=-1).cpu()
                         for lo in range(0, len(x), 1024)]
                model.train()
                self.eval_probs[i].append(torch.cat(probs))

    def check_finite(self, step: int) -> None:
        losses = self.losses[step]
        if not torch.isfinite(losses).all():
            i = next(i for i in self.own if not torch.isfinite(losses[i]))
            raise NonFiniteLoss(f"non-finite loss ({losses[i].item()}) of model {i} at step {step}", (step, i))

    def result(self) -> _RankResult:
        state = {i: trained_state(self.models[i]) for i in self.own} if self.leader else {}
        losses = self.losses.cpu()
        return _RankResult(self.rank, self.own, self.recorder.elapsed, self.recorder.spans,
                           {i: losses[:, i].tolist() for i in self.own}, self.sources, self.eval_steps,
                           self.eval_probs if self.leader else {}, state, self.exchanged_bytes,
                           self.published, self.installed)


def _run(job: _Job, rank: int, world_size: int) -> list[_RankResult]:
    """Train this rank's model(s) for ``job.steps`` steps; every rank returns all ranks' results."""
    with torch_threads(job.threads):
        return _train(job, rank, world_size)


def _train(job: _Job, rank: int, world_size: int) -> list[_RankResult]:
    rt = _Rank(job, rank, world_size)
    if world_size > 1:
        dist.barrier()
    rt.recorder.restart()
    if world_size > 1:
        rt.recorder.align()
    k = job.exchange_every
    pending: Transfer | None = None
    installed_step: int | None = None   # the step of the others' checkpoint in rt.stale
    if job.start > 0 and job.exchanges:
        pending, installed_step = rt.restore()
    bar = progress_bar(job.steps - job.start, f"pipebd {job.mode}", job.progress and rank == 0)
    try:
        for t in range(job.start, job.steps):
            if job.mode == "codistill" and t > 0 and t % k == 0:
                rt.snapshot(t)
                if pending is not None:
                    rt.install(pending, t)
                    installed_step = pending.step
                pending = rt.publish(t // k, t) if job.publishes_at(t) else None
            distill = job.alpha > 0 and job.n > 1 and t >= job.burn_in
            source = (t if job.mode == "online" else installed_step) if distill else None
            rt.sources.append(source)
            batches = rt.load()
            xs = {i: x for i, (x, _) in batches.items()}
            logits = {}
            for i in rt.own:
                with rt.recorder.span("student", t), stream(derived_seed(job.seed, "model", i, t, rt.rank % rt.g),
                                                            rt.device):
                    logits[i] = rt.trained[i](xs[i])
            targets = rt.targets(t, source, xs, logits)
            for i in rt.own:
                with rt.recorder.span("student", t):
                    out = logits[i]
                    peers = targets[i]
                    rows = out.reshape(-1, out.shape[-1])
                    if peers is not None:
                        peers = peers.reshape(peers.shape[0], -1, peers.shape[-1])
                    loss = combined_loss(rows, batches[i][1].reshape(-1), peers, job.alpha, job.temperature,
                                         job.ignore_index, job.backend) / job.batch_size
                    (loss * rt.g if rt.g > 1 else loss).backward()   # DDP averages over the group's ranks
                rt.losses[t, i] = loss.detach()
                with rt.recorder.span("step", t):
                    rt.optimizers[i].step()
                    rt.optimizers[i].zero_grad(set_to_none=True)
                    if rt.schedulers:
                        rt.schedulers[i].step()
            due = checkpoint.due(t + 1, job.steps, job.checkpoint_dir, job.checkpoint_every)
            if rt.device.type == "cpu" or t == job.steps - 1 or t % 20 == 19 or due:
                rt.check_finite(t)
            if job.eval_data is not None and ((job.eval_every and (t + 1) % job.eval_every == 0)
                                              or t == job.steps - 1):
                rt.evaluate(t + 1)
            if due:
                rt.save(t + 1)
            bar.update()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        rt.recorder.stop()
    finally:
        rt.close()
        bar.close()
    mine = rt.result()
    if world_size == 1:
        return [mine]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    for group in rt.groups:   # under torchrun the script may go on and fit again
        dist.destroy_process_group(group)
    return gathered


@dataclass
class CodistillReport:
    """The result of ``Codistillation.fit``.

    ``losses[i][t]``: model i's loss on its global batch at step t (task + alpha * distillation).
    ``sources[t]``: the step of the others' checkpoint distilled from at step t (online mode: t),
    or None where the loss was the task loss alone. ``eval_steps`` and ``eval_probs[i][e]`` (the
    softmax predictions [rows, classes] of model i on ``eval_data`` after ``eval_steps[e]`` steps)
    are filled when ``fit`` got ``eval_data``. With ``keep_checkpoints``: ``published[(j, s)]``
    is model j's checkpoint published after s steps and ``installed[(i, t)][j]`` the checkpoint of
    model j that model i installed at step t (both ``pipebd.runtime.exchange.pack`` layouts).
    """

    mode: str
    n: int
    world_size: int
    batch_size: int
    steps: int
    exchange_every: int
    wall_s: float
    losses: list[list[float]] = field(repr=False)
    sources: list[int | None] = field(repr=False)
    eval_steps: list[int]
    eval_probs: list[list[Tensor]] = field(repr=False)
    eval_labels: Tensor | None = field(repr=False)
    exchange_wait_s: float
    exchanged_bytes: int
    tracks: list[tuple[str, list[Span]]] = field(repr=False)
    published: dict = field(default_factory=dict, repr=False)
    installed: dict = field(default_factory=dict, repr=False)
    start: int = 0                       # steps completed before a resumed fit (their losses are NaN)
    ignore_index: int = -100             # eval labels with this value count in no accuracy

    @property
    def samples_per_s(self) -> float:
        """Training samples per second of this fit, all models together."""
        trained = self.steps - self.start
        return self.n * trained * self.batch_size / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def accuracy(self) -> list[list[float]]:
        """Per model, the accuracy on ``eval_data`` at each of ``eval_steps``."""
        return [[_accuracy(p, self.eval_labels, self.ignore_index) for p in probs] for probs in self.eval_probs]

    @property
    def ensemble_accuracy(self) -> list[float]:
        """Accuracy of the n models' averaged softmax predictions at each of ``eval_steps``."""
        return [_accuracy(torch.stack(ps).mean(0), self.eval_labels, self.ignore_index) for ps in zip(*self.eval_probs)]

    def churn(self, other: CodistillReport, model: int = 0) -> float:
        """Prediction churn (Anil et al., 2018): the fraction of ``eval_data`` rows whose predicted
        class differs between model ``model`` of this fit and of ``other`` (the same set-up with
        another seed, say), after the last evaluation of each."""
        for report in (self, other):
            if not report.eval_steps:
                raise ValueError("churn compares predictions on eval_data: fit both with eval_data")
        if not (0 <= model < min(self.n, other.n)):
            raise ValueError(f"model must be in [0, {min(self.n, other.n)}), got {model!r}")
        a, b = self.eval_probs[model][-1], other.eval_probs[model][-1]
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"the two fits predicted {a.shape[0]} and {b.shape[0]} rows: churn compares "
                             f"predictions on the same eval_data")
        return (a.argmax(-1) != b.argmax(-1)).float().mean().item()

    def save_trace(self, path: str) -> None:
        """Chrome trace with one track per rank (data or data-wait, student, teacher, step,
        exchange-wait, eval)."""
        write_chrome_trace(path, self.tracks)

    def plot(self, path: str) -> None:
        """Draw the timeline of every rank and, with ``eval_data``, each model's accuracy against
        steps to ``path`` (PNG, or the format its suffix names; needs the ``plot`` extra,
        matplotlib). See ``pipebd.plot``."""
        from .plot import plot_report
        plot_report(self, path)

    def __str__(self) -> str:
        g = max(1, self.world_size // self.n)
        first = next((t for t, s in enumerate(self.sources) if s is not None), None)
        lines = [f"pipebd codistillation report: mode={self.mode} n={self.n} world_size={self.world_size} "
                 f"({g} rank(s) per model) batch_size={self.batch_size} steps={self.steps}",
                 f"throughput {self.samples_per_s:.1f} samples/s, all models (wall {self.wall_s:.3f} s)",
                 "distillation term: " + (f"from step {first}" if first is not None else "never on")]
        if self.start:
            lines.append(f"resumed after step {self.start} (losses from step {self.start} on)")
        if self.mode == "codistill" and self.n > 1:
            lines.append(f"exchanges every {self.exchange_every} steps: {self.exchanged_bytes / 1e6:.3f} MB "
                         f"received per rank (max), {self.exchange_wait_s:.3f} s blocked on transfers (max)")
        accuracy = self.accuracy if self.eval_steps else None
        if accuracy and len(self.eval_steps) > 1:   # the curve, at up to 8 evaluations spread out
            count = len(self.eval_steps)
            shown = sorted({round(k * (count - 1) / 7) for k in range(8)}) if count > 8 else range(count)
            ensemble = self.ensemble_accuracy if self.n > 1 else None
            lines.append("accuracy on eval_data by step:")
            lines.append(f"{'step':>6}" + "".join(f" {f'model {i}':>8}" for i in range(self.n))
                         + (f" {'ensemble':>8}" if ensemble else ""))
            for e in shown:
                lines.append(f"{self.eval_steps[e]:>6}" + "".join(f" {acc[e]:>8.2%}" for acc in accuracy)
                             + (f" {ensemble[e]:>8.2%}" if ensemble else ""))
        lines.append(f"{'model':>5} {'loss first':>10} {'loss last':>10}"
                     + (f" {'accuracy':>9}" if accuracy else ""))
        for i, h in enumerate(self.losses):
            last = sum(h[-5:]) / len(h[-5:])
            lines.append(f"{i:>5} {h[self.start]:>10.4g} {last:>10.4g}" + (f" {accuracy[i][-1]:>9.2%}" if accuracy else ""))
        if accuracy and self.n > 1:
            lines.append(f"ensemble accuracy after {self.eval_steps[-1]} steps: {self.ensemble_accuracy[-1]:.2%}")
        return "\n".join(lines)


def _accuracy(probs: Tensor, labels: Tensor, ignore_index: int) -> float:
    """The fraction of labelled positions (not ``ignore_index``) predicted right (NaN if none is)."""
    labels = labels.long()   # uint8 labels would compare with ignore_index=-100 as 156
    labelled = labels != ignore_index
    right = (probs.argmax(-1) == labels) & labelled
    return (right.sum() / labelled.sum()).item()


def _build_report(job: _Job, world_size: int, results: list[_RankResult]) -> CodistillReport:
    losses = [[0.0] * job.steps for _ in range(job.n)]
    eval_probs: list[list[Tensor]] = [[] for _ in range(job.n)]
    published, installed = {}, {}
    for r in results:
        for i, history in r.losses.items():
            losses[i] = [a + b for a, b in zip(losses[i], history)]
        for i, probs in r.eval_probs.items():
            eval_probs[i] = probs
        published.update(r.published)
        if r.rank % max(1, world_size // job.n) == 0:
            installed.update(r.installed)
    wait = max(busy_time(r.spans, ("exchange-wait",)) for r in results)
    tracks = [(f"rank {r.rank} (model {', '.join(map(str, r.models))})", r.spans) for r in results]
    labels = job.eval_data[1] if job.eval_data is not None else None
    return CodistillReport(job.mode, job.n, world_size, job.batch_size, job.steps, job.exchange_every,
                           max(r.elapsed for r in results), losses, results[0].sources, results[0].eval_steps,
                           eval_probs, labels, wait, max(r.exchanged_bytes for r in results), tracks,
                           published, installed, job.start, job.ignore_index)
