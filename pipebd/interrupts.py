"""A Ctrl-C (SIGINT) noted while a block runs and raised as KeyboardInterrupt after it, so that
nothing in the block loses it. Standard library only: the command line uses it while torch loads."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def noted(hold: bool) -> Iterator[None]:
    """Note a Ctrl-C while the block runs and raise KeyboardInterrupt after it (in its place if
    the block fails afterwards): at once too unless ``hold``. Without ``hold``, a library that
    catches everything while it imports (torch's import of numpy) swallowed one, and the run
    went on; with it, ranks start whole (one that a Ctrl-C cut short printed an unpickling
    traceback). Only where SIGINT raises KeyboardInterrupt (Python's default), in the main thread."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    seen = []

    def interrupted(signum: int, frame: object) -> None:
        seen.append(signum)
        if not hold:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    except BaseException:
        if seen:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if seen:
        raise KeyboardInterrupt
