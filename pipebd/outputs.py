"""Files a user names (a trace, a plot, a saved profile): ``write_output`` writes one, and
``refusal`` says beforehand, without writing, why it could not. The two decide the same way, so
that what the CLI checks before training is what is written after it.

A path is written as one of three kinds:

- a descriptor of this process (``/dev/stdout``, ``/dev/fd/N``, bash's ``>(...)``, or a link to
  one): through the descriptor, at its position, after what Python printed before. Opened anew,
  a log file that stdout is redirected to would be written from its start, over the log; renamed
  over, it would be lost;
- a FIFO or a device: opened and written into; a FIFO that no process reads is an error, not a
  wait;
- a file, new or not (a symbolic link: the file it points to): whole or not at all, a temporary
  file beside it renamed over it (``checkpoint.atomic_write``). Where its folder takes no new file
  or the rename is not permitted (a sticky folder), an existing file that can be written is
  written in place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import tempfile
from typing import Any, Callable

from .checkpoint import atomic_write


def descriptor(path: str | os.PathLike) -> int | None:
    """The descriptor of this process that ``path`` names, through any symbolic links
    (``/dev/stdout`` is one to ``/proc/self/fd/1``), else None."""
    path = os.fspath(path)
    fds = f"/proc/{os.getpid()}/fd"
    for _ in range(40):                       # the kernel's own limit on links followed
        folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        name = os.path.basename(path)
        if folder == fds and name.isdigit():
            return int(name)
        path = os.path.join(folder, name)
        if not name or not os.path.islink(path):
            return None
        path = os.path.join(folder, os.readlink(path))
    return None


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is written as a file (new or regular), not into a descriptor, FIFO or device."""
    if descriptor(path) is not None:
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True                           # not there (yet): a new file


def refusal(path: str | os.PathLike) -> str | None:
    """Why ``write_output`` could not write ``path``, found by trying what it would do without
    changing anything (a temporary file made and removed, the file opened to append): permission
    bits alone would pass a root user, and a read-only or pseudo file system. None if it could."""
    path = os.fspath(path)
    fd = descriptor(path)
    if fd is not None:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            return f"descriptor {fd} is not open"
        return "descriptor {} is open for reading only".format(fd) if flags & os.O_ACCMODE == os.O_RDONLY else None
    if path.endswith((os.sep, "/")) or os.path.isdir(path):
        return "it is a directory"
    if not is_file(path):
        mode = os.stat(path).st_mode
        if stat.S_ISSOCK(mode):
            return "it is a socket"
        # Opening a FIFO to try would block until a reader came; a device is what it is.
        return None if os.access(path, os.W_OK) else "no permission to write it"
    target = os.path.realpath(path)           # a symbolic link is written where it points
    folder = os.path.dirname(target)
    while not os.path.exists(folder):         # the nearest folder that exists must take the new ones
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        if not os.path.isfile(target):
            return f"{err.strerror or err} ({folder})"
    else:
        if not os.path.exists(target) or _may_replace(target):
            return None
    try:                                      # written in place instead
        with open(target, "a"):
            return None
    except OSError as err:
        return f"{err.strerror or err} ({target})"


def _may_replace(target: str) -> bool:
    """Whether this process may rename a file over ``target``: not in a sticky folder (``/tmp``)
    that neither it nor the file belongs to, unless it is root."""
    folder = os.stat(os.path.dirname(target))
    uid = os.geteuid()
    return not folder.st_mode & stat.S_ISVTX or uid in (0, folder.st_uid, os.stat(target).st_uid)


def write_output(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` to write the output ``path`` as its kind calls for (see the module's
    docstring), making missing folders. ``write`` may be called twice: when the rename is not
    permitted, the file is written again in place."""
    path = os.fspath(path)
    fd = descriptor(path)
    if fd is not None:
        for stream in (sys.stdout, sys.stderr):   # what was printed before comes first
            if stream is not None:
                stream.flush()
        with os.fdopen(os.dup(fd), mode) as f:
            write(f)
        return
    if not is_file(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno == errno.ENXIO and stat.S_ISFIFO(os.stat(path).st_mode):
                raise OSError(errno.ENXIO, "no process reads the FIFO", path) from None
            raise
        os.set_blocking(fd, True)
        with os.fdopen(fd, mode) as f:
            write(f)
        return
    target = os.path.realpath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    atomic_write(target, write, mode, or_in_place=True)
