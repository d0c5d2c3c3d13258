"""Checkpoints of a ``Distiller.fit``: one file per student block, each written atomically, so
that an interrupted run resumes where every block left off and ends with the weights of an
uninterrupted one.

Blockwise distillation makes this simple. Block i's training depends only on its own state and
on the teacher's activations of each step's batch, and the batches are a function of the seed
(``pipebd.data``). So a block's checkpoint is its own: the number of steps it has completed, its
student weights, its optimizer state and its scheduler state. Blocks need not agree on a step:
with decoupled updates stage 0 may have saved step 40 when a later stage crashed after saving 35,
and on resume each block continues from its own step (the teacher relay starts at the earliest).
Nor do the plan, strategy or world size of the resumed run have to match the interrupted one.

``checkpoint_dir`` holds::

    run.json       {"kind": "distill"} and what the data order depends on: blocks, batch size,
                   seed, dataset length
    block{i}.pt    block i: {"format", "block", "step", "weights", "optimizer", "optimizer_type",
                   "scheduler", "scheduler_type"}, tensors on the CPU
    .lock          locked (``flock``) by the job running in the directory: a second is refused

A fresh run saves every block at step 0 before it starts, so a resume never depends on how the
caller rebuilt the student, and only then records ``run.json``: a directory with ``run.json``
has every block's file, and a resume refuses one that lacks a file rather than restart that
block from step 0. Each file is written to a temporary file in the same directory and
renamed over the old one (``os.replace``, atomic on POSIX), so a crash or a kill mid-write leaves
the previous checkpoint whole; a block whose weights are no longer finite is not saved (only
entries that were finite when the fit started count: a mask of -inf is no divergence). A resume
first checks every saved state against a fresh optimizer and scheduler, before anything is
loaded or started; settings of the optimizer (per parameter group) or the scheduler that differ
from this run's are restored from the checkpoint, as torch's ``load_state_dict`` does, and named
in one warning. Blocks with randomness in training (dropout) resume with fresh random state,
so only deterministic blocks resume bit for bit. The teacher is not saved: pass the same teacher.

Codistillation (``Codistillation.fit``) couples its models through the checkpoints they
exchange, so its checkpoints are a consistent cut instead: at a checkpoint step every model's
first rank writes its file into a directory of that step, all ranks meet at a barrier, and only
then does rank 0 record the step in ``run.json`` and remove older step directories. A crash at
any point leaves the last recorded step whole. Each model's file also holds its own weights at
the last two exchange steps, which are what the others distill from next (the staleness rule of
``pipebd.runtime.exchange``), so a resumed run distills from the same weights::

    run.json              {"kind": "codistill", n, mode, batch size, seed, dataset length,
                           exchange_every, "step": the last complete checkpoint}
    step{t}/model{i}.pt   model i after t steps: the training state above plus "snapshots"
                          (exchange step -> packed weights) and "sources" (the steps distilled
                          from so far)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .checks import build_optimizer, check_int

try:
    import fcntl
except ImportError:     # not on Windows: checkpoint directories are not locked there
    fcntl = None

log = logging.getLogger("pipebd")

FORMAT = 2   # 2: the weights are saved under "weights" (1: "student")
RUN_FILE = "run.json"
LOCK_FILE = ".lock"     # locked by the job running in the directory (``claimed``)


@dataclass(frozen=True)
class RunKey:
    """What a run's batches depend on; a checkpoint resumes only a run with the same key."""

    num_blocks: int
    batch_size: int
    seed: int
    dataset_len: int

    kind = "distill"


@dataclass(frozen=True)
class CodistillKey:
    """What a codistillation run's batches and exchanges depend on."""

    n: int
    mode: str
    batch_size: int
    seed: int
    dataset_len: int
    exchange_every: int

    kind = "codistill"


def options(directory: str | os.PathLike | None, every: int | None,
            resume: bool) -> tuple[str | None, int | None]:
    """Check a fit's checkpoint arguments; returns ``directory`` as an absolute path (or None)
    and ``every`` as an int (or None)."""
    if every is not None:
        every = check_int("checkpoint_every", every, 1)
    if every is not None and directory is None:
        raise ValueError("checkpoint_every needs checkpoint_dir: where to write the checkpoints")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if directory is None:
        return None, every
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"checkpoint_dir {directory} is not a directory")
    return directory, every


@contextlib.contextmanager
def claimed(directory: str | None) -> Iterator[None]:
    """Hold ``directory`` for this job while the ``with`` block runs: an exclusive ``flock`` on
    its lock file, which the kernel releases when the process ends, killed or not (NFS turns it
    into a POSIX lock that holds across nodes). A second job (or a second copy of this one,
    such as a requeued job whose first copy still runs) is refused with ValueError instead of
    writing into the same files, and no job removes the temporary files of another that is
    still writing. A directory that cannot be created or written in is refused here, before any
    training. None: nothing to hold."""
    if directory is None:
        yield
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):    # the saves will create files here
            pass
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise ValueError(f"checkpoint_dir {directory} cannot be written: {err.strerror or err}") from err
    try:
        try:
            if fcntl is None:
                raise OSError("no fcntl module on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"checkpoint_dir {directory} is in use by another running pipebd job; wait for it "
                             f"to end, or choose another directory") from None
        except OSError as err:      # a file system or platform without locks
            log.warning("pipebd: cannot lock checkpoint_dir %s (%s): a second job started in it would not be "
                        "refused", directory, getattr(err, "strerror", None) or err)
        yield
    finally:
        os.close(fd)


def hold(directory: str | None, held: contextlib.ExitStack, first_rank: bool, spmd: bool) -> None:
    """Take ``directory`` for this job until ``held`` closes (``claimed``): the caller, or rank 0
    under torchrun (``spmd``), takes it, and there every rank raises the same error when that
    fails, instead of the others waiting for rank 0 at the next collective."""
    error = None
    if first_rank:
        try:
            held.enter_context(claimed(directory))
        except ValueError as err:
            if not spmd:
                raise
            error = str(err)
    if spmd:
        import torch.distributed as dist
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise ValueError(error)


def finite_entries(module: nn.Module) -> set[str]:
    """The floating-point entries of ``module``'s state dict that are finite now. Only these
    count when checking before a save that training has not diverged: a buffer that is
    non-finite by design (an attention mask of -inf) would refuse every save."""
    return {k for k, v in module.state_dict().items() if v.is_floating_point() and bool(torch.isfinite(v).all())}


def diverged(module: nn.Module, entries: set[str]) -> list[str]:
    """The entries of ``entries`` (see ``finite_entries``) that are no longer finite, sorted."""
    return sorted(k for k, v in module.state_dict().items() if k in entries and not bool(torch.isfinite(v).all()))


def due(done: int, steps: int, directory: str | None, every: int | None) -> bool:
    """Whether a run saves after ``done`` completed steps: every ``every`` steps and after the last."""
    return directory is not None and (done == steps or (every is not None and done % every == 0))


def block_path(directory: str, block: int) -> str:
    return os.path.join(directory, f"block{block}.pt")


TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename
    it over ``path``: readers see the old file or the new one, never a part, and a failed write
    leaves the old one. The file gets the permissions of a plain ``open`` (0666 less the umask)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:   # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _cpu(obj: Any) -> Any:
    """``obj`` with its tensors on the CPU and numpy scalars as Python numbers (a setting such as
    ``lr=np.float64(0.1)``), which ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def training_state(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict:
    """The weights, optimizer and scheduler state of one trained module, on the CPU."""
    return {"weights": _cpu(module.state_dict()),
            "optimizer": _cpu(optimizer.state_dict()), "optimizer_type": type(optimizer).__qualname__,
            "scheduler": _cpu(scheduler.state_dict()) if scheduler is not None else None,
            "scheduler_type": type(scheduler).__qualname__ if scheduler is not None else None}


def save_block(directory: str, block: int, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any = None) -> None:
    """Save block ``block`` after ``step`` completed steps (tensors copied to the CPU)."""
    state = {"format": FORMAT, "block": block, "step": step, **training_state(student, optimizer, scheduler)}
    os.makedirs(directory, exist_ok=True)
    atomic_write(block_path(directory, block), lambda f: torch.save(state, f))


# Why a resume with another value of a run's key is refused (the rest: the batches).
_DIFFERENCE = {"num_blocks": "the checkpoint holds a state for each of its blocks",
               "n": "the checkpoint holds a state for each of its models",
               "mode": "the models would distill from other predictions",
               "exchange_every": "the steps at which the models distill from each other would differ"}


def _read_run(directory: str | None, key: RunKey | CodistillKey, resume: bool) -> dict | None:
    """The run recorded in ``directory`` if this run resumes it, None for a fresh start; raises
    ValueError when it belongs to another run or ``resume=False`` would overwrite it."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir: the directory to resume from")
        return None
    run_file = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_file):
        if resume:
            log.warning("pipebd: no checkpoint in %s; starting from step 0", directory)
        return None
    if not resume:
        raise ValueError(f"{directory} already holds a pipebd run ({RUN_FILE}); pass resume=True (--resume "
                         f"on the command line) to continue it, or choose an empty directory")
    try:
        with open(run_file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {run_file}: {err}") from err
    if not isinstance(saved, dict):
        shown = json.dumps(saved)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"cannot read {run_file}: it holds {shown}, not the JSON object that records a pipebd run")
    kinds = {"distill": "a Distiller", "codistill": "a Codistillation"}
    if "kind" not in saved:    # format 1 recorded no kind and saved the weights under another key
        raise ValueError(f"the checkpoint in {directory} was written by an older pipebd (checkpoint format 1) "
                         f"that this version cannot resume; start the run afresh in an empty directory")
    if saved.get("kind") != key.kind:
        raise ValueError(f"the checkpoint in {directory} is of {kinds.get(saved.get('kind'), 'an unknown')} run, "
                         f"not of {kinds[key.kind]} run")
    for name, value in asdict(key).items():
        if saved.get(name) != value:
            raise ValueError(f"the checkpoint in {directory} is of a run with {name}={saved.get(name)!r}, "
                             f"this run has {name}={value!r}: {_DIFFERENCE.get(name, 'its batches would differ')}")
    return saved


def _load(path: str, what: str, field: str, value: int) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise ValueError(f"cannot read the checkpoint of {what} ({path}): {err.strerror or err}") from err
    except Exception as err:   # torch's own text would advise weights_only=False: never for a damaged file
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unsafe = []
        if unsafe:   # written by an older pipebd from a setting such as lr=np.float64(0.1)
            raise ValueError(f"cannot read the checkpoint of {what} ({path}): it holds {', '.join(unsafe)}, which "
                             f"pipebd does not load (torch.load weights_only); start the run afresh") from err
        raise ValueError(f"cannot read the checkpoint of {what} ({path}): the file is damaged or not a pipebd "
                         f"checkpoint ({type(err).__name__}); restore it, or start the run afresh in an empty "
                         f"directory") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get(field) != value:
        raise ValueError(f"{path} is not a pipebd checkpoint of {what} (format {FORMAT})")
    return state


def check_teacher(directory: str, fingerprint: list[float]) -> list[float]:
    """Warn when this run's teacher gives other outputs than the one ``directory``'s run was
    trained with (its ``pipebd.api.teacher_fingerprint``; runs recorded by earlier versions have none), and
    return the fingerprint to record: the first run's, so that every later resume with another
    teacher is warned about too. A tolerance of 1% of the outputs' mean absolute value admits
    other devices and summation orders."""
    with open(os.path.join(directory, RUN_FILE)) as f:
        saved = json.load(f).get("teacher")
    if saved is None:
        return fingerprint
    before, now = torch.tensor(saved, dtype=torch.float64), torch.tensor(fingerprint, dtype=torch.float64)
    scale = abs(saved[1]) if len(saved) > 1 and math.isfinite(saved[1]) else 0.0    # the mean absolute output
    if before.shape == now.shape and torch.allclose(now, before, rtol=1e-2, atol=1e-2 * scale + 1e-12, equal_nan=True):
        return saved
    log.warning("pipebd: the teacher gives other outputs than the one the checkpoint in %s was trained with "
                "(on a fixed input: %s, then %s). The teacher is not saved: resume with the same teacher, or "
                "the run will not end as an uninterrupted one would", directory,
                [f"{v:.4g}" for v in saved[:4]], [f"{v:.4g}" for v in fingerprint[:4]])
    return saved


def check_every(directory: str, every: int | None, remaining: int) -> None:
    """Warn when a resumed run with ``remaining`` steps to train would save only after its last
    step while the run it continues saved every fewer steps (``checkpoint_every`` is not carried
    over: a resume sets its own)."""
    with open(os.path.join(directory, RUN_FILE)) as f:
        saved = json.load(f).get("checkpoint_every")
    if every is None and isinstance(saved, int) and saved < remaining:
        log.warning("pipebd: the run in %s saved every %d steps; this one saves only after its last step. "
                    "Pass checkpoint_every=%d (--set checkpoint_every=%d) to keep saving as it did",
                    directory, saved, saved, saved)


def read(directory: str | None, key: RunKey, steps: int, resume: bool) -> dict[int, dict]:
    """Check ``directory`` against this run and return the saved state of every block
    (block -> the file's dict), or {} for a fresh start. Raises ValueError when the directory
    belongs to another run, holds a checkpoint that ``resume=False`` would overwrite, lacks a
    block's file, or a block has already trained beyond ``steps``, or every block as far."""
    if _read_run(directory, key, resume) is None:
        return {}
    states = {}
    for block in range(key.num_blocks):
        path = block_path(directory, block)
        if not os.path.exists(path):   # run.json is written after every block's step-0 file
            raise ValueError(f"the checkpoint in {directory} has no file for block {block} ({path}); restore "
                             f"it, or start the run afresh in an empty directory")
        state = _load(path, f"block {block}", "block", block)
        if state["step"] > steps:
            raise ValueError(f"block {block} of the checkpoint in {directory} has trained {state['step']} "
                             f"steps, more than steps={steps}")
        states[block] = state
    if all(state["step"] == steps for state in states.values()):
        raise ValueError(f"every block of the checkpoint in {directory} has completed steps={steps}; "
                         f"pass a larger steps to train further")
    return states


def start(directory: str, key: RunKey | CodistillKey, **extra: Any) -> None:
    """Create ``directory`` if needed, remove temporary files a killed run left (the caller
    holds the directory: ``claimed``), and record this run's key (and ``extra``) in it."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            os.unlink(os.path.join(directory, name))
    record = {"kind": key.kind, **asdict(key), **extra}
    atomic_write(os.path.join(directory, RUN_FILE), lambda f: f.write(json.dumps(record, indent=1)), "w")


def model_path(directory: str, step: int, model: int) -> str:
    return os.path.join(directory, f"step{step}", f"model{model}.pt")


def save_model(directory: str, model: int, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, snapshots: dict[int, dict[torch.dtype, Tensor]], sources: list[int | None]) -> None:
    """Write codistillation model ``model``'s file for checkpoint step ``step``; the step counts
    only once ``commit`` records it."""
    state = {"format": FORMAT, "model": model, "step": step, **training_state(module, optimizer, scheduler),
             "snapshots": {s: {str(d).removeprefix("torch."): f.detach().cpu() for d, f in packed.items()}
                           for s, packed in snapshots.items()},
             "sources": list(sources)}
    path = model_path(directory, step, model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def commit(directory: str, key: CodistillKey, step: int, every: int | None, distillation: dict[str, Any], *,
           first: bool = False) -> None:
    """Record ``step`` as the run's checkpoint (every model's file for it is on disk), with the
    ``distillation`` settings it trained with, and remove the step directories of older
    checkpoints. Only the ``first`` commit of a fit, before any rank trains, also removes later
    ones (a killed run's unfinished steps): during training a model that is ahead may already be
    writing the next step's directory."""
    start(directory, key, step=step, checkpoint_every=every, distillation=distillation)
    for name in os.listdir(directory):
        saved = _step_of(name)
        if saved is not None and (saved < step or (first and saved != step)):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _step_of(name: str) -> int | None:
    """The step of a checkpoint's directory name (``step12``), or None for other names."""
    digits = name.removeprefix("step")
    return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


def saved_model_state(directory: str, model: int) -> dict | None:
    """Model ``model``'s saved state in the codistillation checkpoint in ``directory``, or None
    where there is none to read (``Codistillation.fit`` says why)."""
    try:
        with open(os.path.join(directory, RUN_FILE)) as f:
            step = json.load(f)["step"]
        return _load(model_path(directory, step, model), f"model {model}", "model", model)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_codistill(directory: str | None, key: CodistillKey, steps: int, resume: bool,
                   distillation: dict[str, Any] | None = None, warn: bool = False) -> tuple[int, dict[int, dict]]:
    """The step of the checkpoint in ``directory`` and each model's saved state (snapshots
    unpacked to dtype -> flat tensor), or ``(0, {})`` for a fresh start. With ``warn``, a
    ``distillation`` setting (alpha, temperature, burn_in) that differs from the saved run's is
    warned about: the resumed steps use this run's."""
    saved = _read_run(directory, key, resume)
    if saved is None:
        return 0, {}
    step = saved.get("step")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"{os.path.join(directory, RUN_FILE)} records no checkpoint step")
    before = saved.get("distillation")    # None: written before pipebd recorded them
    if warn and isinstance(before, dict) and distillation is not None:
        changed = [f"{name} saved {before.get(name)!r}, this run {value!r}" for name, value in distillation.items()
                   if before.get(name) != value]
        if changed:
            log.warning("pipebd: distillation settings differ from the checkpoint's (%s): the steps after step %d "
                        "use this run's, so the result is neither run's", "; ".join(changed), step)
    if step > steps:
        raise ValueError(f"the checkpoint in {directory} has trained {step} steps, more than steps={steps}")
    if step == steps:
        raise ValueError(f"the checkpoint in {directory} has completed steps={steps}; pass a larger steps "
                         f"to train further")
    states = {}
    for i in range(key.n):
        path = model_path(directory, step, i)
        if not os.path.exists(path):
            raise ValueError(f"the checkpoint in {directory} of step {step} has no file for model {i} ({path})")
        state = _load(path, f"model {i}", "model", i)
        state["snapshots"] = {s: {getattr(torch, d): f for d, f in packed.items()}
                              for s, packed in state["snapshots"].items()}
        states[i] = state
    return step, states


def check(states: dict[int, dict], modules: dict[int, nn.Module] | list[nn.Module],
          optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None,
          what: str = "student block", warn: bool = True) -> None:
    """Refuse, naming the block (or model: ``what``), any saved state that does not fit its
    module or a fresh optimizer and scheduler from this run's factories. Nothing is loaded.

    Loading the state restores the saved optimizer hyperparameters and scheduler settings over
    the factories' (torch's ``load_state_dict``), which keeps a resumed run equal to an
    uninterrupted one; so that a changed setting is not ignored silently, one warning names
    every setting that differs (those of ``_compared_keys`` and the scheduler's ``_flatten``),
    unless ``warn`` is false (torchrun ranks but the first)."""
    changed: dict[tuple[str, str, str], list[int]] = {}
    for index, state in states.items():
        module = modules[index]
        have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in state["weights"].items()}
        if have != saved:
            diff = sorted(k for k in have.keys() | saved.keys() if have.get(k) != saved.get(k))
            raise ValueError(f"the checkpoint of {what} {index} does not fit the {what}: "
                             f"{', '.join(f'{k} saved {saved.get(k)} vs {have.get(k)}' for k in diff[:4])}")
        probe = build_optimizer(optimizer, module)     # built, never stepped: the weights stay as they are
        declared = [set(group) - {"params"} for group in probe.param_groups]
        probe_scheduler = scheduler(probe) if scheduler is not None else None
        schedule = _flatten(probe_scheduler.state_dict(), "scheduler") if probe_scheduler is not None else None
        keys = _compared_keys(declared, probe.param_groups, schedule)
        fresh = _hyperparameters(probe.param_groups, keys) | (schedule or {})
        load_training(f"{what} {index}", probe, probe_scheduler, state)
        kept = _hyperparameters(state["optimizer"]["param_groups"], keys)
        if state["scheduler"] is not None:
            kept.update(_flatten(state["scheduler"], "scheduler"))
        for name in fresh.keys() & kept.keys():
            if fresh[name] != kept[name]:
                changed.setdefault((name, repr(kept[name]), repr(fresh[name])), []).append(index)
    if changed and warn:
        log.warning("pipebd: this run's optimizer or scheduler settings differ from the checkpoint's; the "
                    "checkpoint's values are kept (start afresh to change them): %s",
                    "; ".join(f"{what} {', '.join(map(str, sorted(indices)))}: {name} saved {old}, this run {new}"
                              for (name, old, new), indices in sorted(changed.items())))


# Scheduler state that changes with the steps taken, in torch's schedulers (base_lrs: the
# optimizer's initial_lr; T_cur, T_i: CosineAnnealingWarmRestarts; best, num_bad_epochs,
# cooldown_counter: ReduceLROnPlateau). A scheduler of one's own with other counters has them
# named in the warning.
_SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                      "base_lrs", "T_cur", "T_i", "best", "num_bad_epochs", "cooldown_counter"}


def _compared_keys(declared: list[set[str]], groups: list[dict], schedule: dict[str, Any] | None) -> list[set[str]]:
    """The hyperparameters of each param group that a checkpoint's must equal: those the
    optimizer factory set (``declared``), less those a scheduler (``schedule``: its settings)
    rewrites every step: ``lr``, whose start is compared instead (``initial_lr``), and with
    ``cycle_momentum`` (torch's CyclicLR, OneCycleLR) momentum or Adam's betas. The keys a
    scheduler adds to a group (OneCycleLR's ``max_lr``) are its own and not compared."""
    if schedule is None:
        return declared
    cyclic = any(name.endswith(".cycle_momentum") and value for name, value in schedule.items())
    scheduled = {"lr", "momentum", "betas"} if cyclic else {"lr"}
    return [(keys - scheduled) | ({"initial_lr"} & group.keys()) for keys, group in zip(declared, groups)]


def _hyperparameters(groups: list[dict], keys: list[set[str]]) -> dict[str, Any]:
    """Name -> value of the hyperparameters ``keys`` of each param group: "optimizer.momentum",
    or "optimizer.param_groups[1].momentum" with several groups."""
    settings = {}
    for g, (group, names) in enumerate(zip(groups, keys)):
        prefix = "optimizer." if len(groups) == 1 else f"optimizer.param_groups[{g}]."
        settings.update({prefix + k: _plain(group[k]) for k in names if k in group})
    return settings


def _flatten(value: Any, name: str) -> dict[str, Any]:
    """Name -> value of every entry of a scheduler's state but its progress, nested ones named
    by their path ("scheduler._schedulers[0].total_iters")."""
    if isinstance(value, dict):
        return {n: v for k, item in value.items() if k not in _SCHEDULE_PROGRESS
                for n, v in _flatten(item, f"{name}.{k}").items()}
    if isinstance(value, (list, tuple)):
        return {n: v for i, item in enumerate(value) for n, v in _flatten(item, f"{name}[{i}]").items()}
    return {name: _plain(value)}


def _plain(value: Any) -> Any:
    """``value`` comparable with ``==`` and shown by ``repr``: tensors (a capturable lr) as
    numbers or lists, tuples (Adam's betas) as lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_training(name: str, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict) -> None:
    """Restore the optimizer and scheduler state of ``name`` (a block or model; on a rank,
    after they are built)."""
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        saved, have = state[f"{what}_type"], type(obj).__qualname__ if obj is not None else None
        if saved != have:
            raise ValueError(f"the checkpoint of {name} was saved with {what} {saved}, this run has "
                             f"{have}; resume with the same {what}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:   # a copy: CyclicLR's load_state_dict pops from the dict it is given
            scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint's optimizer or scheduler state of {name} does not fit: "
                         f"{err!r}") from err
