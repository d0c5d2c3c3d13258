"""The first module the ranks' fork server preloads (``launch._context``). The server started
with SIGINT blocked (``launch._start_forkserver``); here a pending SIGINT is discarded and the
next ignored while the server imports torch, so that a Ctrl-C meant for the caller neither ends
it nor prints its traceback. ``pipebd.runtime.launch``, the last preload, restores Python's
handler. Nothing else imports this module."""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)      # discards one that is pending
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
