"""What every benchmark script records: the machine and versions, and markdown table cells."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from datetime import date

import torch

import pipebd
from pipebd.profiler import cpu_model


def machine() -> str:
    return (f"{platform.system()} {platform.machine()} ({cpu_model()}), {os.cpu_count()} cores; "
            f"Python {platform.python_version()}, torch {torch.__version__}, pipebd {pipebd.__version__}")


def cnn_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a timed run of the CNN pair: world size, batch, steps, repeats, model size, threads."""
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")


def cell(text: str) -> str:
    """``text`` as code in a markdown table cell (a bare ``|`` would end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reruns this one from where it was started: ``python bench/SCRIPT ARGS``
    from the repository root, ``cd DIR && python SCRIPT ARGS`` from another of its directories
    (the arguments' paths are relative to it). Paths outside the repository are not recorded."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = os.path.relpath(os.getcwd(), root)
    inside = not where.startswith("..")
    path = os.path.relpath(os.path.join(root, "bench", script)) if inside else f"bench/{script}"
    prefix = f"cd {shlex.quote(where)} && " if inside and where != "." else ""
    return prefix + shlex.join(["python", path, *(argv if argv is not None else sys.argv[1:])])


def publish(title: str, script: str, argv: list[str] | None, lines: list[str], append: str | None) -> None:
    """Append ``lines`` under a heading with the date, machine and exact command to ``append``."""
    text = "\n".join([f"### {title}", "", f"{date.today()} · {machine()}", f"`{command_line(script, argv)}`", "",
                      *lines, ""])
    if append:
        with open(append, "a") as f:
            f.write("\n" + text)
