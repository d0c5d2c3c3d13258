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
    block{i}.pt    block i: {"format", "block", "step", "student", "optimizer", "scheduler"}

Each file is written to a temporary file in the same directory and renamed over the old one
(``os.replace``, atomic on POSIX), so a crash or a kill mid-write leaves the previous checkpoint
whole. Blocks with randomness in training (dropout) resume with fresh random state, so only
deterministic blocks resume bit for bit. The teacher is not saved: pass the same teacher.
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


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename
    it over ``path``: readers see the old file or the new one, never a part."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_block(directory: str, block: int, step: int, student: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any = None) -> None:
    """Save block ``block`` after ``step`` completed steps."""
    state = {"format": FORMAT, "block": block, "step": step, "student": student.state_dict(),
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
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
        raise ValueError(f"{directory} already holds a checkpoint; pass resume=True to continue that run, "
                         f"or choose an empty directory")
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
    """Create ``directory`` if needed and record this run's key in it."""
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, RUN_FILE), lambda f: f.write(json.dumps(asdict(key), indent=1)), "w")


def load_student(block: int, module: nn.Module, state: dict) -> None:
    try:
        module.load_state_dict(state["student"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint of student block {block} does not fit the student block: {err}") from err


def load_training(block: int, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict) -> None:
    """Restore a block's optimizer and scheduler state (on a rank, after they are built)."""
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"the checkpoint's optimizer state of block {block} does not fit its optimizer: "
                         f"{err}") from err
    if (scheduler is None) != (state["scheduler"] is None):
        raise ValueError(f"the checkpoint of block {block} was saved {'with' if scheduler is None else 'without'} "
                         f"a scheduler; resume with the same scheduler setting")
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
