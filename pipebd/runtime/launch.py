"""Starting and running the ranks of a fit: in the calling process, as spawned local workers, or
as the already running processes of a ``torchrun`` launch (SPMD, like DDP).

Spawned workers report back through a pipe each. When one raises, the others are killed and the
caller gets the first failing rank's traceback (ranks that fail as a consequence, such as peers
whose connection dropped, are listed after it); a worker that dies without a word is reported
with its exit code. Nothing waits forever.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import marshal
import multiprocessing as mp
import multiprocessing.connection
import numbers
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import traceback
import types
from datetime import timedelta
from typing import Any, Callable, Iterator

import cloudpickle
import torch
import torch.distributed as dist

from .. import interrupts
from ..plan import Plan
from .baseline import run_baseline
from .relay import run_relay
from .worker import Job, NonFiniteLoss, RankResult, RankRuntime

LOOPS = {"pipebd": run_relay, "baseline": run_baseline}

# After the first failure, how long to collect the errors of ranks that fail in its wake.
_GRACE_S = 1.0
# An error that only says a peer went away is a reaction: it is taken to have happened this much
# later than reported, so that a rank that died without a word about then (noticed only when its
# process ended) comes first as the cause. Any other traceback keeps its time.
_REACTION_S = 1.0
# gloo's words, and NCCL's for a peer that died ("ncclRemoteError: ... remote process exited") or
# a communicator aborted after another rank's failure.
_LOST_PEER = re.compile(r"connection (closed|reset) by peer|broken pipe|remote process exited|ncclRemoteError|"
                        r"communicator was aborted", re.IGNORECASE)


class WorkerError(RuntimeError):
    """A rank of a distributed fit failed; the message holds its traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


class NonFiniteWorkerError(WorkerError, NonFiniteLoss):
    """A rank's ``NonFiniteLoss``: ``except pipebd.NonFiniteLoss`` catches it as it catches the
    error of a one-process fit, and ``except pipebd.WorkerError`` as any rank's failure.
    ``headline``: the rank and the worker's message, without its traceback."""

    headline: str = ""


def stage_group(plan: Plan, rank: int, timeout_s: float) -> Any:
    """Create one process group per replicated stage (every rank must take part in each
    ``new_group`` call) and return the one of ``rank``'s stage, or None. Subgroups do not inherit
    the default group's timeout (torch gives them its own default), so it is passed on."""
    mine = None
    for s, k in enumerate(plan.replicas):
        if k > 1:
            group = dist.new_group(plan.stage_ranks(s), timeout=timedelta(seconds=timeout_s))
            if rank in plan.stage_ranks(s):
                mine = group
    return mine


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch threads (None: as many as now), then restore the
    count: a fit in the caller's process (or a torchrun rank) leaves its setting as it was."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def kept_as_given(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Leave ``modules`` (and each of their submodules) in the train/eval mode, ``requires_grad``
    and device they came in with, as when spawned workers train copies of them. A fit in the
    caller's process (one rank, or torchrun) trains the caller's own modules, which the rank
    runtime moves to the fit's device and puts in train mode (the teacher: eval, frozen); the
    trained weights stay. A module whose tensors were on several devices stays on the fit's."""
    kept = [(m, [(sub, sub.training) for sub in m.modules()], [(p, p.requires_grad) for p in m.parameters()],
             {t.device for t in itertools.chain(m.parameters(), m.buffers())}) for m in modules]
    try:
        yield
    finally:
        for _, modes, flags, _ in kept:      # first what cannot fail
            for sub, training in modes:
                sub.training = training
            for p, flag in flags:
                p.requires_grad_(flag)
        for m, _, _, devices in kept:
            if len(devices) == 1:
                m.to(*devices)


def run_rank(job: Job, rank: int, world_size: int) -> list[RankResult]:
    """Run ``job`` as ``rank`` and return every rank's result (gathered with
    ``all_gather_object``, so under torchrun each rank gets the full result). With
    ``world_size > 1`` the default process group must exist."""
    with torch_threads(job.threads):
        return _run_rank(job, rank, world_size)


def _run_rank(job: Job, rank: int, world_size: int) -> list[RankResult]:
    distributed = world_size > 1
    group = stage_group(job.plan, rank, job.timeout) if distributed else None
    rt = RankRuntime(job, rank, world_size, group)
    if distributed:
        dist.barrier()
    rt.recorder.restart()
    if distributed:
        rt.recorder.align()
    if rt.stage is not None:
        try:
            LOOPS[job.strategy](rt)
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            rt.recorder.stop()
        finally:
            rt.close()
    mine = rt.result()
    if not distributed:
        return [mine]
    gathered: list[RankResult | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if group is not None:
        dist.destroy_process_group(group)
    return gathered  # type: ignore[return-value]


def torchrun_env() -> tuple[int, int] | None:
    """``(rank, world_size)`` when launched by torchrun (or any launcher that sets the env)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


# The longest timeout every layer accepts: a DataLoader polls its processes with a timeout in
# milliseconds that must fit a C int.
MAX_TIMEOUT = 2_147_483.0
MIN_TIMEOUT = 1e-3   # below this, timedelta and the backends' millisecond clocks round to 0


def check_timeout(timeout: Any) -> float:
    """``timeout`` (seconds) as a float; TypeError unless a real number, ValueError unless
    between ``MIN_TIMEOUT`` and ``MAX_TIMEOUT`` (about 24 days)."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:   # NaN fails too
        raise ValueError(f"timeout must be between {MIN_TIMEOUT:g} and {MAX_TIMEOUT:.0f} seconds "
                         f"(about 24 days), got {timeout!r}")
    return float(timeout)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def run_spmd(job: Job, timeout_s: float) -> list[RankResult]:
    """Run as this process's rank of an existing (or env-described) process group."""
    init_spmd(job.device, timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    pin_device(job, rank)
    # Like DDP: every rank starts from rank 0's weights, so that a teacher or student built
    # without a fixed seed cannot silently differ between the ranks of one pipeline.
    _broadcast_from_rank0([*job.teacher.values(), *job.student.values()], torch.device(job.device))
    return run_rank(job, rank, world_size)


def init_spmd(device: str, timeout_s: float) -> None:
    """Join the process group torchrun describes, unless the script already has: then check
    that its backend can carry ``device``'s tensors."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    elif device.startswith("cuda") and "nccl" not in dist.get_backend():
        raise ValueError(f"device {device!r} needs the NCCL backend, but the script's process group uses "
                         f"{dist.get_backend()!r} (gloo sends only CPU tensors between ranks): create it with "
                         f"init_process_group('nccl'), or leave it to pipebd")


def pin_device(job: Job, rank: int) -> None:
    """On CUDA, give the rank its own GPU (``own_gpu``)."""
    if job.device.startswith("cuda"):
        job.device = str(own_gpu(rank))


def own_gpu(rank: int) -> torch.device:
    """The GPU of the process that runs ``rank``, made current (NCCL needs it set before its
    first call): the one of its ``LOCAL_RANK`` under torchrun; under a launcher that sets only
    RANK and WORLD_SIZE, ``rank`` modulo the GPUs (each node's ranks in order, as torch's
    ``barrier`` assumes); for spawned ranks, their rank. One GPU each: two ranks on one GPU fail
    in NCCL ("Duplicate GPU detected")."""
    count = torch.cuda.device_count()
    if torchrun_env() is None:
        local = rank
    elif "LOCAL_RANK" in os.environ:
        local = int(os.environ["LOCAL_RANK"])
    else:
        local = rank % count if count else 0
    if not 0 <= local < count:
        raise ValueError(f"the process of local rank {local} has no GPU of its own: {count} visible "
                         f"(CUDA_VISIBLE_DEVICES); start at most {count} ranks per node (torchrun --nproc-per-node)")
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


def _broadcast_from_rank0(modules: list[torch.nn.Module], device: torch.device) -> None:
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                buf = tensor.data.to(device)
                dist.broadcast(buf, src=0)
                tensor.data.copy_(buf)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping the file name of the code it pickles by value (a class or function of
    the user's script): cloudpickle 3.1 writes ``<dynamic-code>``, so a rank's traceback showed
    neither the user's file nor the line that failed. The workers run this interpreter, so the
    code objects travel as ``marshal`` writes them, whole."""

    def reducer_override(self, obj: Any) -> Any:
        # torch pickles a storage with its device: every rank would unpickle the caller's CUDA
        # tensors (modules, dataset) onto GPU 0 and keep the memory there. They go as CPU
        # tensors; each rank moves them to its own device. (TypedStorage's public methods warn.)
        if isinstance(obj, torch.storage.TypedStorage) and obj._untyped_storage.device.type == "cuda":
            return torch.storage.TypedStorage(wrap_storage=obj._untyped_storage.cpu(), dtype=obj.dtype,
                                              _internal=True).__reduce__()
        if isinstance(obj, torch.UntypedStorage) and obj.device.type == "cuda":
            return obj.cpu().__reduce__()
        if isinstance(obj, types.CodeType):
            try:
                return marshal.loads, (marshal.dumps(obj),)
            except ValueError:   # a constant marshal cannot write (code made by hand): cloudpickle's way
                pass
        return super().reducer_override(obj)



class _SharingPickler(_Pickler):
    """``_Pickler`` that writes ``shared`` (pickled apart, once for all ranks: the dataset) as a
    reference. A subclass, since a ``persistent_id`` method costs a call per pickled object."""

    def __init__(self, file: Any, shared: Any):
        super().__init__(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
        self.shared, self.used_shared = shared, False

    def persistent_id(self, obj: Any) -> str | None:
        if obj is self.shared:
            self.used_shared = True
            return "shared"
        return None


class _Unpickler(pickle.Unpickler):
    """Reads a payload, taking its references to the shared object from ``shared`` (bytes),
    loaded once: every reference is the same object, as in the caller."""

    def __init__(self, file: Any, shared: bytes | None):
        super().__init__(file)
        self.shared, self.value = shared, None

    def persistent_load(self, pid: Any) -> Any:
        if self.shared is not None:   # the first reference: read, and the bytes let go
            self.value, self.shared = cloudpickle.loads(self.shared), None
        if pid != "shared" or self.value is None:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in a rank's payload")
        return self.value


def _dumps(obj: Any, into: Any = None) -> bytes:
    """``obj`` pickled as the ranks receive it (written ``into`` a file instead, if given)."""
    buffer = io.BytesIO() if into is None else into
    _Pickler(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buffer.getvalue() if into is None else b""


class _Discard:
    """A file that keeps nothing: pickling into it checks an object without holding its bytes."""

    def write(self, data: bytes) -> int:
        return len(data)


def _payloads(tasks: list[Callable[[int, int], Any]], parts: dict[str, Any],
              shared: Any = None) -> list[list[bytes | None]]:
    """Per rank, its task pickled and the shared object's bytes if the task holds it (else None),
    in a list the rank empties as it reads them: neither it nor the caller keeps the bytes."""
    try:
        if shared is None:
            return [[_dumps(task), None] for task in tasks]
        blob, payloads = _dumps(shared), []
        for task in tasks:
            buffer = io.BytesIO()
            pickler = _SharingPickler(buffer, shared)
            pickler.dump(task)
            payloads.append([buffer.getvalue(), blob if pickler.used_shared else None])
        return payloads
    except Exception as err:
        culprit = _unsendable(parts)
        raise _refusal(culprit[0] if culprit else "the work for the ranks", err) from err


def check_sendable(parts: dict[str, Any]) -> None:
    """Raise the TypeError that ``spawn_tasks`` would for the first of ``parts`` (name ->
    object) that cannot be pickled, before work that would be lost (profiling, checkpoints)."""
    culprit = _unsendable(parts)
    if culprit is not None:
        raise _refusal(*culprit) from culprit[1]


def _unsendable(parts: dict[str, Any]) -> tuple[str, Exception] | None:
    for name, part in parts.items():
        try:
            _dumps(part, into=_Discard())
        except Exception as err:
            return name, err
    return None


def _refusal(culprit: str, err: Exception) -> TypeError:
    return TypeError(f"{culprit} cannot be sent to the spawned ranks ({type(err).__name__}: {err}); run it "
                     f"with world_size=1, or start the ranks with torchrun, where each builds its own")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, payload: list[bytes | None], backend: str, timeout_s: float,
            report: mp.connection.Connection, lifeline: mp.connection.Connection, environ: dict[str, str]) -> None:
    # The caller's environment as it is now: the fork server's children inherit the server's, as
    # it was when the server started (the caller's first fit), so a later CUDA_VISIBLE_DEVICES,
    # NCCL_* or the user's own settings would not reach the ranks. (What torch reads as it is
    # imported, such as TORCH_LOGS or OMP_NUM_THREADS, keeps the server's value: it imported torch.)
    os.environ.clear()
    os.environ.update(environ)
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)   # a process group of its own, with its loader processes: _stop ends them all
    threading.Thread(target=_end_with_caller, args=(lifeline,), name="pipebd-lifeline", daemon=True).start()
    report.send(("started",))
    try:
        task_bytes, shared = payload
        payload.clear()   # the bytes go once read: the Process object holds its arguments for good
        task = _Unpickler(io.BytesIO(task_bytes), shared).load()
        del task_bytes, shared
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        value = task(rank, world_size)
        report.send(("ok", cloudpickle.dumps(value) if rank == 0 else None))
        dist.destroy_process_group()
    except BaseException as err:
        where = (err.where or ()) if isinstance(err, NonFiniteLoss) else None   # (step, block) of a NaN
        report.send(("error", time.time(), traceback.format_exc(), where))
        sys.exit(1)


def _end_with_caller(lifeline: mp.connection.Connection) -> None:
    """A rank's watch on the caller, which holds the other end of ``lifeline`` until the ranks
    have ended: end of file means that the caller died without ending them (SIGKILL, or a
    SIGTERM, which skips its cleanup). The rank then ends itself and its loader processes
    rather than train on unobserved, writing checkpoints that a resumed run would race."""
    try:
        lifeline.recv()      # nothing is ever sent
    except (EOFError, OSError):
        pass
    if hasattr(os, "killpg") and os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)   # the group this rank leads: itself and its loader processes
    os._exit(1)


def _fit_task(job: Job, rank: int, world_size: int) -> list[RankResult]:
    pin_device(job, rank)
    return run_rank(job, rank, world_size)


def _context() -> mp.context.BaseContext:
    # A fork server that has imported torch but never run it starts workers in a fraction of a
    # second and, unlike plain fork, shares no thread pools with the caller. torch._dynamo is
    # preloaded because creating an optimizer imports it (seconds per worker otherwise).
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        # The fork server is in the terminal's process group: a Ctrl-C while it starts (seconds)
        # would print its traceback next to the caller's one line, and end it. It starts with
        # SIGINT blocked (_start_forkserver), the first module it preloads ignores SIGINT, and the
        # last (this one, at its end) restores Python's handler, which the server hands on to the
        # processes it forks (it ignores SIGINT itself once loaded).
        ctx.set_forkserver_preload(["pipebd.runtime.preload", "torch", "torch._dynamo", "torch.distributed",
                                    "pipebd.runtime.launch"])
        return ctx
    return mp.get_context("spawn")


def _start_forkserver(ctx: mp.context.BaseContext) -> None:
    """Start the fork server, if ``ctx`` uses one that is not running, with SIGINT blocked: it
    inherits the mask, and its first preload (``pipebd.runtime.preload``) discards a pending
    SIGINT and ignores the next until torch is loaded. A Ctrl-C at its very start ended it
    (the caller then failed with a broken pipe). One meanwhile reaches the caller when the mask
    is restored here, or another of its threads at once: held by ``interrupts.noted`` either way."""
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()   # first: starting it unblocks SIGINT (its own guard, bpo-33613)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def spawn(job: Job, world_size: int, timeout_s: float) -> list[RankResult]:
    """Run ``job`` on ``world_size`` local worker processes and return the gathered results."""
    def role(rank: int) -> str:
        where = job.plan.locate(rank)
        return f" (stage {where[0]}, replica {where[1]})" if where and job.strategy == "pipebd" else ""

    tasks = [functools.partial(_fit_task, job.for_rank(r)) for r in range(world_size)]
    return spawn_tasks(tasks, backend_for(job.device), timeout_s, role, job_parts(job), shared=job.dataset)


def job_parts(job: Job) -> dict[str, Any]:
    """What of ``job`` the user gave, by name, for ``check_sendable``."""
    return {**{f"teacher block {i}": m for i, m in job.teacher.items()},
            **{f"student block {i}": m for i, m in job.student.items()},
            "the dataset": job.dataset, "the optimizer factory": job.optimizer, "the scheduler factory": job.scheduler,
            "block_loss": job.block_loss, "final_loss": job.final_loss}


def spawn_tasks(tasks: list[Callable[[int, int], Any]], backend: str, timeout_s: float,
                role: Callable[[int], str] = lambda rank: "", parts: dict[str, Any] | None = None,
                shared: Any = None) -> Any:
    """Run ``tasks[r](r, world_size)`` on local worker process ``r`` of a fresh process group
    and return rank 0's result; a failure raises ``WorkerError`` with the first failing rank's
    traceback (``role(rank)`` describes the rank in the message). A task that cannot be pickled
    is a TypeError before any process starts, naming the first of ``parts`` (name -> object
    the tasks hold) that cannot. ``shared`` (the dataset), wherever the tasks hold it, is
    pickled once and sent to the ranks that hold it, not pickled again for each."""
    world_size = len(tasks)
    payloads = _payloads(tasks, parts or {}, shared)
    ctx = _context()
    port = _free_port()
    procs, conns, ends = [], {}, []
    try:
        with interrupts.noted(hold=True):   # ranks start whole
            _start_forkserver(ctx)
            environ = dict(os.environ)
            for r in range(world_size):
                recv_end, send_end = ctx.Pipe(duplex=False)
                watch_end, hold_end = ctx.Pipe(duplex=False)
                ends.append(hold_end)   # held until the ranks have ended; the caller's death closes it
                # Not daemonic: a rank may start DataLoader workers. _stop ends every rank.
                p = ctx.Process(target=_worker, name=f"pipebd-rank{r}", daemon=False,
                                args=(r, world_size, port, payloads[r], backend, timeout_s, send_end,
                                      watch_end, environ))
                p.start()
                payloads[r].clear()   # sent: p keeps its arguments, the bytes need not stay
                send_end.close()  # the child holds the only write end: its exit means EOF here
                watch_end.close()
                procs.append(p)
                conns[recv_end] = r
                ends.append(recv_end)
        value, errors, silent = _collect(procs, conns)
    finally:
        _stop(procs)
        for end in ends:
            end.close()
    if errors:
        raise _worker_error(errors, role, silent)
    return value


def _collect(procs: list, conns: dict) -> tuple[Any, list, list[int]]:
    """Read every rank's report. After the first error, wait only a moment for the errors of
    ranks that fail in its wake, then give up on the rest. A rank that has exited without a
    report is dead even while its loader processes, which inherited its end of the pipe, live.
    Returns rank 0's result, the errors, and the ranks that had not reported when it gave up."""
    gathered, errors, first_error_at, started = None, [], None, set()
    while conns:
        timeout = None if first_error_at is None else max(0.0, first_error_at + _GRACE_S - time.monotonic())
        sentinels = {procs[rank].sentinel: conn for conn, rank in conns.items()}
        ready = mp.connection.wait(list(conns) + list(sentinels), timeout)
        if not ready:
            break
        ready = {sentinels.get(r, r) for r in ready}
        for conn in ready:
            rank = conns[conn]
            try:
                if not conn.poll():
                    raise EOFError   # exited without a word
                msg = conn.recv()
            except EOFError:
                procs[rank].join(1.0)
                code = procs[rank].exitcode
                how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exited with code {code}")
                text = f"rank {rank} {how} without reporting an error\n"
                if rank not in started:
                    text = f"rank {rank} {how} before it started; its output above says why. {_start_hint()}\n"
                msg = ("error", time.time(), text, None)
            if msg[0] == "started":
                started.add(rank)
                continue
            del conns[conn]
            if msg[0] == "ok":
                gathered = cloudpickle.loads(msg[1]) if msg[1] is not None else gathered
            else:
                errors.append(msg[1:] + (rank,))
                first_error_at = first_error_at or time.monotonic()
    return gathered, errors, sorted(conns.values())


def _start_hint() -> str:
    """Why ranks die before they start, as far as the caller's ``__main__`` tells: a new process
    imports the caller's script again, which must exist and must not start ranks on import."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path is not None and not os.path.isfile(path):     # python - < script.py: "<stdin>"
        return (f"The script was not read from a file ({path}), and the new processes cannot import it "
                f"again: save it to a file and run that")
    return 'A script that starts ranks when it is imported needs `if __name__ == "__main__":`'


def _stop(procs: list) -> None:
    """End every rank and the loader processes it started (the process group it leads)."""
    for p in procs:
        _end(p, kill=False)
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        _end(p, kill=True)
        p.join()


def _end(p: Any, kill: bool) -> None:
    if p.pid is None:
        return
    if hasattr(os, "killpg"):
        try:
            os.killpg(p.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass   # everything in it has exited, or the rank never made its group
    if p.is_alive():
        p.kill() if kill else p.terminate()


def _worker_error(errors: list, role: Callable[[int], str], silent: list[int]) -> WorkerError:
    """The first error (by the time it happened; for a NaN, the earliest step and block), with
    the last line of each later one, and the ranks that never reported: a rank that stalls makes
    its peers time out, so the first error is a peer's, and the stalled rank is named only here."""
    def happened(error: tuple) -> tuple[float, int]:
        when, text, _, rank = error
        lines = text.strip().splitlines()
        return when + (_REACTION_S if lines and _LOST_PEER.search(lines[-1]) else 0.0), rank

    errors.sort(key=happened)
    if errors[0][2] is not None:   # a NaN, which every later stage then sees: the earliest step and block
        errors.sort(key=lambda error: (error[2] is None, error[2] or (), happened(error)))
    _, tb, where, rank = errors[0]
    message = f"rank {rank}{role(rank)} failed:\n{tb.rstrip()}"
    others = [f"rank {r}: {t.strip().splitlines()[-1]}" for _, t, _, r in errors[1:]]
    if others:
        message += "\nthen, probably as a consequence:\n  " + "\n  ".join(others)
    if silent:
        ranks = ", ".join(f"{r}{role(r)}" for r in silent)
        message += (f"\nrank(s) {ranks} had not reported {_GRACE_S:g} s after that and were stopped "
                    f"(if the error above is a timeout, a stalled rank among these may be the cause)")
    if where is None:
        return WorkerError(rank, message)
    err = NonFiniteWorkerError(rank, message)
    err.where = tuple(where)
    err.headline = f"rank {rank}{role(rank)}: {tb.strip().splitlines()[-1].split(': ', 1)[-1]}"
    return err


if "pipebd.runtime.preload" in sys.modules:   # the last of the fork server's preloads: see _context
    signal.signal(signal.SIGINT, signal.default_int_handler)
