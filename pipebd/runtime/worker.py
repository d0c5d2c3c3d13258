"""What one rank holds: the job it runs, its blocks on the device, their optimizers and
gradient buckets, and the steps every strategy's loop is made of (load a slice, teacher forward,
student forward/backward, allreduce, optimizer step), each recorded as a span.

The job (``Job``) is plain data plus the user's modules. Nothing here reaches into the user's
modules beyond calling them, moving them to the device and reading their parameters.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import checkpoint
from ..batchnorm import replica_batchnorm
from ..checks import build_optimizer
from ..rng import derived_seed, stream
from ..data import BatchOrder, StepRows, feed
from ..plan import Plan
from ..trace import Recorder, Span


@dataclass(frozen=True)
class TensorSpec:
    """Per-sample shape and dtype of a tensor that crosses a block boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, rows: int, device: torch.device) -> Tensor:
        return torch.empty((rows, *self.shape), dtype=self.dtype, device=device)


@dataclass
class Job:
    """One ``fit`` call, as every rank sees it.

    ``teacher``/``student`` map block index to module; ``Job.for_rank`` drops the blocks and the
    dataset a rank does not need before the job is shipped to it. ``boundary[i]`` describes the
    input of block ``i`` (``boundary[0]`` is a data sample, ``boundary[N]`` the last output).
    """

    strategy: str
    plan: Plan
    num_blocks: int
    teacher: dict[int, nn.Module]
    student: dict[int, nn.Module]
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    block_loss: Callable[..., Tensor]
    final_loss: Callable[..., Tensor] | None
    dataset: Any
    dataset_len: int
    batch_size: int
    steps: int
    seed: int
    boundary: list[TensorSpec]
    labels: TensorSpec | None          # relayed with the activations when the final loss needs them
    device: str = "cpu"
    max_inflight: int = 2
    threads: int | None = None
    progress: bool = False
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None   # stepped after each optimizer step
    timeout: float = 600.0             # seconds, for every collective and point-to-point wait
    start: dict[int, int] = field(default_factory=dict)      # block -> steps it completed before (resume)
    resume_state: dict[int, dict] = field(default_factory=dict)   # block -> its checkpoint, less the weights
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None   # None: only after the last step (the caller saves step 0)
    sync_batchnorm: bool = False       # BatchNorm statistics over a replicated stage's whole batch
    num_workers: int = 0               # DataLoader worker processes per loading rank (0: load inline)
    # "teacher"/"student" -> blocks the probe saw change their input in place: they get a copy,
    # since their input is also another block's target (or input, or an activation being sent).
    inplace: dict[str, frozenset[int]] = field(default_factory=dict)
    # Per block, the fewest rows one replica's slice may have (2 where the student's BatchNorm,
    # or a teacher's without running statistics, gets one value per channel per row, which
    # torch cannot normalize on one row); () means 1.
    min_rows: tuple[int, ...] = ()

    def start_of(self, block: int) -> int:
        return self.start.get(block, 0)

    @property
    def first_step(self) -> int:
        """The first step any block still has to train: where a (resumed) relay starts."""
        return min(self.start_of(i) for i in range(self.num_blocks))

    def checkpoint_due(self, step: int) -> bool:
        """Whether blocks save their state after completing ``step``."""
        return checkpoint.due(step + 1, self.steps, self.checkpoint_dir, self.checkpoint_every)

    def blocks_of(self, rank: int) -> list[int]:
        where = self.plan.locate(rank)
        if where is None:
            return []
        return list(range(self.num_blocks)) if self.strategy == "baseline" else list(self.plan.stages[where[0]])

    def for_rank(self, rank: int) -> "Job":
        """A copy holding only the blocks and data that ``rank`` touches."""
        blocks = self.blocks_of(rank)
        where = self.plan.locate(rank)
        loads_data = where is not None and (self.strategy == "baseline" or where[0] == 0)
        return replace(self, teacher={i: self.teacher[i] for i in blocks},
                       student={i: self.student[i] for i in blocks},
                       resume_state={i: self.resume_state[i] for i in blocks if i in self.resume_state},
                       dataset=self.dataset if loads_data else None)


@dataclass
class RankResult:
    rank: int
    stage: int | None
    replica: int | None
    elapsed: float                            # seconds from the start barrier to this rank's end
    spans: list[Span]
    teacher_rows: dict[int, int]              # block -> rows this rank ran through it
    losses: dict[int, list[float]]            # block -> this rank's share of the loss, per step
    state: dict[int, dict[str, Tensor]] = field(default_factory=dict)   # replica 0 only


class GradBucket:
    """The gradients of one student block as views into one flat buffer, so a replicated stage
    needs a single allreduce per block and no copies. Each view has its parameter's strides
    (``channels_last`` included), as autograd would make it.

    The buffer ends with one slot per parameter, 1 where the parameter received a gradient this
    step, summed by the allreduce with the gradients. A parameter that no replica gave one (a
    branch not taken) is left out of the optimizer step, as after ``zero_grad()`` in a plain
    loop: no weight decay, momentum or Adam state for it."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        dtype = self.params[0].dtype if self.params else torch.float32
        device = self.params[0].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(total + len(self.params), dtype=dtype, device=device)
        self.used = self.flat[total:]
        self.grads = []
        offset = 0
        for p, n in zip(self.params, sizes):
            strides = torch.empty_like(p, device="meta").stride()   # p's own, if dense; else contiguous
            self.grads.append(self.flat[offset:offset + n].as_strided(p.shape, strides))
            offset += n
        self.seen = [False] * len(self.params)
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(_seen, self.seen, j))
                      for j, p in enumerate(self.params)]
        for p, grad in zip(self.params, self.grads):
            p.grad = grad

    def mark(self) -> None:
        """Write which parameters received a gradient into the buffer, before its allreduce."""
        if all(self.seen):
            self.used.fill_(1)
        else:
            self.used.copy_(torch.tensor(self.seen, dtype=self.used.dtype))

    def step(self, optimizer: torch.optim.Optimizer, reduced: bool) -> None:
        """Step ``optimizer`` over the parameters that received a gradient (on any replica, if the
        buffer was ``reduced``), then zero the buffer for the next step."""
        missing = []
        if not all(self.seen):   # else every replica's sum holds this one's 1s
            used = self.used.tolist() if reduced else self.seen
            missing = [j for j, u in enumerate(used) if not u]
        for j in missing:
            self.params[j].grad = None
        optimizer.step()
        for j in missing:
            self.params[j].grad = self.grads[j]
        self.flat.zero_()
        self.seen[:] = [False] * len(self.seen)

    def close(self) -> None:
        """Take the hooks off the parameters and their gradients away (in the caller's process
        they are the user's)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for p in self.params:
            p.grad = None


def _seen(seen: list[bool], index: int, param: Tensor) -> None:
    seen[index] = True


class NonFiniteLoss(FloatingPointError):
    """A block's loss became NaN or infinite; the message names the stage, block and step, and
    ``where`` is ``(step, block)`` (a model's index for codistillation): a NaN relayed on is seen
    by every later stage, and the earliest is the one to report."""

    where: tuple[int, int] | None = None

    def __init__(self, message: str, where: tuple[int, int] | None = None):
        super().__init__(message)
        self.where = where


class RankRuntime:
    """The per-rank pieces every strategy uses: blocks on the device, optimizers, gradient
    buckets, the data-parallel group, loss bookkeeping and the span recorder."""

    def __init__(self, job: Job, rank: int, world_size: int, group: Any):
        self.job, self.rank, self.world_size, self.group = job, rank, world_size, group
        where = job.plan.locate(rank)
        self.stage, self.replica = where if where is not None else (None, None)
        self.device = torch.device(job.device)
        self.recorder = Recorder()
        self.blocks = job.blocks_of(rank)
        self.teacher = {i: job.teacher[i].to(self.device).eval().requires_grad_(False) for i in self.blocks}
        self.student = {i: job.student[i].to(self.device).train() for i in self.blocks}
        for loss in (job.block_loss, job.final_loss):   # a class weight, say: ranks get the caller's on the CPU
            if isinstance(loss, nn.Module):
                loss.to(self.device)
        # Copies with the same parameters, buffers and state-dict keys, where they hold BatchNorm.
        self.student = {i: replica_batchnorm(m, group, job.sync_batchnorm, shared=[self.teacher[i]])
                        for i, m in self.student.items()}
        for m in self.teacher.values():   # after the students: one may hold its teacher block
            m.eval()
        self.optimizers = {i: build_optimizer(job.optimizer, self.student[i]) for i in self.blocks}
        self.schedulers = {i: job.scheduler(self.optimizers[i]) for i in self.blocks} if job.scheduler else {}
        for i in self.blocks:
            if i in job.resume_state:
                checkpoint.load_training(f"block {i}", self.optimizers[i], self.schedulers.get(i), job.resume_state[i])
        self.buckets = {i: GradBucket(self.student[i]) for i in self.blocks}   # last: nothing after it fails
        # What must stay finite for a save (not a block's buffers that are -inf by design).
        self.finite = {i: checkpoint.finite_entries(self.student[i]) for i in self.blocks} \
            if job.checkpoint_dir is not None and self.replica == 0 else {}
        self.teacher_rows = {i: 0 for i in self.blocks}
        self.group_size = dist.get_world_size(group) if group is not None else 1
        # NaN marks the steps a resumed block had completed before this fit.
        self.losses = torch.zeros(job.steps, job.num_blocks, dtype=torch.float32, device=self.device)
        for i in self.blocks:
            self.losses[:job.start_of(i), i] = float("nan")
        # A NaN check reads the losses back to the host; on a GPU do it every few steps only.
        self.check_every = 1 if self.device.type == "cpu" else 20
        self.checked = {i: job.start_of(i) for i in self.blocks}   # block -> first step not yet checked
        self.order = BatchOrder(job.dataset_len, job.batch_size, job.seed) if job.dataset is not None else None
        self.feeds: list[Iterator] = []

    def load(self, step: int, lo: int, hi: int) -> tuple[Tensor, Tensor | None]:
        """Rows ``[lo, hi)`` of batch ``step``, loaded now, on the device."""
        with self.recorder.span("data", step):
            return self._to_device(*self.rows([step], lo, hi).load(self.job.dataset, 0))

    def feed(self, steps: list[int], lo: int, hi: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Rows ``[lo, hi)`` of batch ``steps[j]`` for each ``j`` in turn, on the device: loaded
        when asked for, or with ``job.num_workers`` loader processes ahead of use (the time
        spent waiting for them, their start included, is a ``data-wait`` span). ``close``
        stops the processes of every feed."""
        batches = feed(self.job.dataset, self.rows(steps, lo, hi), self.job.num_workers,
                       self.recorder, self._to_device, pin_memory=self.device.type == "cuda",
                       timeout=self.job.timeout)
        self.feeds.append(batches)
        return batches

    def close(self) -> None:
        """Stop the loader processes of every feed, also when the loop failed (a traceback
        that refers to a feed would keep them alive), and take the gradient buckets off the
        parameters."""
        for batches in self.feeds:
            batches.close()
        self.feeds.clear()
        for bucket in self.buckets.values():
            bucket.close()

    def rows(self, steps: list[int], lo: int, hi: int) -> StepRows:
        """Rows ``[lo, hi)`` of batches ``steps``, with labels only where the final loss takes them."""
        return StepRows(self.order, steps, lo, hi, labels=self.job.labels is not None)

    def _to_device(self, x: Tensor, y: Any) -> tuple[Tensor, Tensor | None]:
        x = x.to(self.device, self.job.boundary[0].dtype, non_blocking=True)
        if self.job.labels is None:
            return x, None
        return x, torch.as_tensor(y).to(self.device, non_blocking=True)

    @torch.no_grad()
    def teacher_forward(self, block: int, x: Tensor, step: int) -> Tensor:
        with self.recorder.span("teacher", step, block):
            # Random ops of the teacher (in eval mode: a sampling encoder) draw what one process does.
            with stream(derived_seed(self.job.seed, "teacher", block, step, self.replica or 0), self.device):
                out = self._call("teacher", block, x, step)
            out = normal_output(out)
        self.teacher_rows[block] += x.shape[0]
        return out

    def _call(self, kind: str, block: int, x: Tensor, step: int) -> Any:
        """``kind``'s ``block`` on ``x``, or on a copy of it if the probe saw the block change its
        input in place. A teacher block that does so unseen (for some data) is an error rather
        than a wrong target."""
        module = (self.teacher if kind == "teacher" else self.student)[block]
        if block in self.job.inplace.get(kind, ()):
            return module(x.clone())
        # A student's input has served its other uses by now; an inference tensor (from a teacher
        # block running under inference_mode) keeps no version and cannot change outside it.
        if kind == "student" or x.is_inference():
            return module(x)
        version = x._version
        out = module(x)
        if x._version != version:
            raise RuntimeError(f"teacher block {block} changed its input in place at step {step}, which it did "
                               f"not do on the first samples; that input is also another block's target or "
                               f"input. Make the operation out of place (inplace=False)")
        return out

    def train_block(self, block: int, x: Tensor, target: Tensor, labels: Tensor | None,
                    step: int) -> Any:
        """Student forward/backward of ``block`` on one slice; starts the gradient allreduce and
        returns its handle (None without replicas)."""
        job = self.job
        with self.recorder.span("student", step, block):
            with stream(derived_seed(job.seed, "student", block, step, self.replica or 0), self.device):
                out = self._call("student", block, x, step)
            if block == job.num_blocks - 1 and job.final_loss is not None:
                args = (out, target) if job.labels is None else (out, target, labels)
                loss = job.final_loss(*args)
            else:
                loss = job.block_loss(out, target)
            # Mean over this slice -> this slice's share of the mean over the global batch.
            if x.shape[0] != job.batch_size:
                loss = loss * (x.shape[0] / job.batch_size)
            if not loss.requires_grad:
                name = "final_loss" if block == job.num_blocks - 1 and job.final_loss is not None else "block_loss"
                raise RuntimeError(f"the {name} of block {block} returned a value that does not depend on the "
                                   f"student's output (no gradient): {loss!r}")
            loss.backward()
        self.losses[step, block] = loss.detach()
        if self.group_size > 1:
            bucket = self.buckets[block]
            bucket.mark()
            with self.recorder.span("allreduce", step, block):
                return dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        return None

    def finish_step(self, blocks: list[int], handles: list[Any], step: int) -> None:
        """Wait for the gradient allreduces, then step each block's optimizer (no barrier with
        other stages)."""
        pending = [h for h in handles if h is not None]
        if pending:
            with self.recorder.span("allreduce", step):
                for h in pending:
                    h.wait()
        with self.recorder.span("step", step):
            for i in blocks:
                self.buckets[i].step(self.optimizers[i], reduced=self.group_size > 1)
                if self.schedulers:
                    self.schedulers[i].step()
        self.check_finite(blocks, step)
        if self.replica == 0 and self.job.checkpoint_due(step):
            with self.recorder.span("checkpoint", step):
                for i in blocks:
                    # The loss checked above is from before this step's update: check the weights
                    # too, so that NaN never replaces a good checkpoint.
                    bad = checkpoint.diverged(self.student[i], self.finite[i])
                    if bad:
                        raise NonFiniteLoss(f"non-finite weights ({', '.join(bad[:3])}) at stage {self.stage}, "
                                            f"block {i} after step {step}; its checkpoint of an earlier step is kept",
                                            (step, i))
                    checkpoint.save_block(self.job.checkpoint_dir, i, step + 1, self.student[i],
                                          self.optimizers[i], self.schedulers.get(i))

    def check_finite(self, blocks: list[int], step: int) -> None:
        """Raise NonFiniteLoss naming the stage, block and step of the first NaN/inf loss. One
        check of every due block's unchecked losses (a host sync); block by block only to name
        what it found."""
        now = step == self.job.steps - 1 or self.job.checkpoint_due(step)
        due = [b for b in blocks if now or step + 1 - self.checked[b] >= self.check_every]
        if not due:
            return
        first = min(self.checked[b] for b in due)
        if not bool(torch.isfinite(self.losses[first:step + 1, due]).all()):
            for b in due:
                window = self.losses[self.checked[b]:step + 1, b]
                bad = (~torch.isfinite(window)).nonzero()
                if len(bad):
                    t = self.checked[b] + int(bad[0])
                    raise NonFiniteLoss(f"non-finite loss ({self.losses[t, b].item()}) at stage "
                                        f"{self.stage}, block {b}, step {t}", (t, b))
        for b in due:
            self.checked[b] = step + 1

    def progress(self, total: int, show: bool) -> Any:
        """A tqdm bar on the rank that finishes last, or a no-op."""
        return progress_bar(total, f"pipebd {self.job.strategy}", show and self.job.progress)

    def result(self) -> RankResult:
        losses = self.losses.cpu()
        state = {}
        if self.replica == 0:
            state = {i: trained_state(self.student[i]) for i in self.blocks}
        return RankResult(self.rank, self.stage, self.replica, self.recorder.elapsed, self.recorder.spans,
                          self.teacher_rows, {i: losses[:, i].tolist() for i in self.blocks}, state)


def normal_output(out: Any) -> Any:
    """A teacher block's output as the runtime passes it on (the probe too): an inference tensor
    (from a block under ``torch.inference_mode``), which autograd cannot save as a target and
    no later block may change in place, copied to a normal one."""
    return out.clone() if isinstance(out, Tensor) and out.is_inference() else out


def trained_state(module: nn.Module) -> dict[str, Tensor]:
    """What a spawned rank sends back of a module it trained, on the CPU: its state dict and its
    non-persistent buffers (a count, a mask that training changes), which the caller's copy
    would otherwise keep as they were (``load_trained_state``)."""
    state = module.state_dict()
    state.update((name, b) for name, b in module.named_buffers() if name not in state)
    return {k: v.detach().cpu() for k, v in state.items()}


def load_trained_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load ``trained_state``'s result into the caller's ``module``."""
    keys = module.state_dict().keys()
    module.load_state_dict({k: v for k, v in state.items() if k in keys})
    for name, value in state.items():
        if name not in keys:   # assigned: training may have reshaped or added it
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix)
            old = owner._buffers.get(attr)
            owner.register_buffer(attr, value.to(old.device) if old is not None else value, persistent=False)


def progress_bar(total: int, desc: str, show: bool, unit: str = "step") -> Any:
    """A tqdm bar, or a no-op with the same ``update``/``close`` when ``show`` is false."""
    if not show:
        return _NoProgress()
    from tqdm.auto import tqdm
    # A thread lock: tqdm's default multiprocessing lock leaks a semaphore per worker.
    tqdm.set_lock(threading.RLock())
    return tqdm(total=total, unit=unit, desc=desc, leave=False)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
