"""The runtime: the relay and baseline loops, per-rank setup, launching and transfers. Its
modules load on first access (``pipebd.runtime.launch``), as those of ``pipebd`` do."""

from .. import _submodule


def __getattr__(name: str):
    return _submodule(__name__, name)
