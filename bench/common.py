"""What every benchmark script records: the machine and versions, and markdown table cells."""

from __future__ import annotations

import os
import platform

import torch

import pipebd


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, pipebd {pipebd.__version__}")


def cell(text: str) -> str:
    """``text`` as code in a markdown table cell (a bare ``|`` would end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"
