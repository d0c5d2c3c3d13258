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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, pipebd {pipebd.__version__}")


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


def publish(title: str, script: str, argv: list[str] | None, lines: list[str], append: str | None) -> None:
    """Append ``lines`` under a heading with the date, machine and exact command to ``append``."""
    command = f"python bench/{script} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([f"### {title}", "", f"{date.today()} · {machine()}", f"`{command.strip()}`", "", *lines, ""])
    if append:
        with open(append, "a") as f:
            f.write("\n" + text)
