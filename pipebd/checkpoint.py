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

    run.json       what the data order depends on: blocks, batch size, seed, dataset length
    block{i}.pt    block i: {"format", "block", "step", "student", "optimizer", "optimizer_type",
                   "scheduler", "scheduler_type"}, tensors on the CPU

A fresh run saves every block at step 0 before it starts, so a resume never depends on how the
caller rebuilt the student. Each file is written to a temporary file in the same directory and
renamed over the old one (``os.replace``, atomic on POSIX), so a crash or a kill mid-write leaves
the previous checkpoint whole; a block whose weights are no longer finite is not saved. A resume
first checks every saved state against a fresh optimizer and scheduler, before anything is
loaded or started. Blocks with randomness in training (dropout) resume with fresh random state,
so only deterministic blocks resume bit for bit. The teacher is not saved: pass the same teacher.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("pipebd")

FORMAT = 1
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunKey:
    """What a run's batches depend on; a checkpoint resumes only a run with the same key."""

    num_blocks: int
    batch_size: int
    seed: int
    dataset_len: int


def block_path(directory: str, block: int) -> str:
    return os.path.join(directory, f"block{block}.pt")


TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename
    it over ``path``: readers see the old file or the new one, never a part. The file gets the
    permissions of a plain ``open`` (0666 less the umask)."""
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
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_block(directory: str, block: int, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any = None) -> None:
    """Save block ``block`` after ``step`` completed steps (tensors copied to the CPU)."""
    state = {"format": FORMAT, "block": block, "step": step, "student": _cpu(student.state_dict()),
             "optimizer": _cpu(optimizer.state_dict()), "optimizer_type": type(optimizer).__qualname__,
             "scheduler": _cpu(scheduler.state_dict()) if scheduler is not None else None,
             "scheduler_type": type(scheduler).__qualname__ if scheduler is not None else None}
    os.makedirs(directory, exist_ok=True)
    atomic_write(block_path(directory, block), lambda f: torch.save(state, f))


def read(directory: str | None, key: RunKey, steps: int, resume: bool) -> dict[int, dict]:
    """Check ``directory`` against this run and return the saved state of each block found
    (block -> the file's dict), or {} for a fresh start. Raises ValueError when the directory
    belongs to another run, holds a checkpoint that ``resume=False`` would overwrite, or a block
    has already trained beyond ``steps``."""
    if directory is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir: the directory to resume from")
        return {}
    run_file = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_file):
        if resume:
            log.warning("pipebd: no checkpoint in %s; starting from step 0", directory)
        return {}
    if not resume:
        raise ValueError(f"{directory} already holds a pipebd run ({RUN_FILE}); pass resume=True to continue "
                         f"it, or choose an empty directory")
    with open(run_file) as f:
        saved = json.load(f)
    for name, value in asdict(key).items():
        if saved.get(name) != value:
            raise ValueError(f"the checkpoint in {directory} is of a run with {name}={saved.get(name)!r}, "
                             f"this run has {name}={value!r}: its batches would differ")
    states = {}
    for block in range(key.num_blocks):
        path = block_path(directory, block)
        if not os.path.exists(path):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read the checkpoint of block {block} ({path}): {err}") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("block") != block:
            raise ValueError(f"{path} is not a pipebd checkpoint of block {block} (format {FORMAT})")
        if state["step"] > steps:
            raise ValueError(f"block {block} of the checkpoint in {directory} has trained {state['step']} "
                             f"steps, more than steps={steps}")
        states[block] = state
    return states


def start(directory: str, key: RunKey) -> None:
    """Create ``directory`` if needed, remove temporary files a killed run left, and record
    this run's key in it."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith(TMP_PREFIX):
            os.unlink(os.path.join(directory, name))
    atomic_write(os.path.join(directory, RUN_FILE), lambda f: f.write(json.dumps(asdict(key), indent=1)), "w")


def check(states: dict[int, dict], student: dict[int, nn.Module] | list[nn.Module],
          optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None) -> None:
    """Refuse, naming the block, any saved state that does not fit its student block or a fresh
    optimizer and scheduler from this run's factories. Nothing is loaded into ``student``."""
    for block, state in states.items():
        module = student[block]
        have = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in state["student"].items()}
        if have != saved:
            diff = sorted(k for k in have.keys() | saved.keys() if have.get(k) != saved.get(k))
            raise ValueError(f"the checkpoint of student block {block} does not fit the student block: "
                             f"{', '.join(f'{k} saved {saved.get(k)} vs {have.get(k)}' for k in diff[:4])}")
        probe = optimizer(module.parameters())     # built, never stepped: the weights stay as they are
        load_training(block, probe, scheduler(probe) if scheduler is not None else None, state)


def load_training(block: int, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict) -> None:
    """Restore a block's optimizer and scheduler state (on a rank, after they are built)."""
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        saved, have = state[f"{what}_type"], type(obj).__qualname__ if obj is not None else None
        if saved != have:
            raise ValueError(f"the checkpoint of block {block} was saved with {what} {saved}, this run has "
                             f"{have}; resume with the same {what}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint's optimizer or scheduler state of block {block} does not fit: "
                         f"{err!r}") from err
