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
  file beside it renamed over it (``checkpoint.atomic_write``). Where that is refused (a folder
  that takes no new file, another user's file in a sticky folder, a file mounted on its own), an
  existing file that can be written is overwritten in place instead, which is not whole or not
  at all; never on a full disk, which keeps the old file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
import tempfile
from typing import Any, Callable

from .checkpoint import atomic_write


# A descriptor's own name: /dev/fd/N, /proc/self/fd/N, /proc/thread-self/fd/N,
# /proc/PID/fd/N and /proc/PID/task/TID/fd/N (PID this process). The kernel takes no leading zero.
_FD = re.compile(r"/(?:dev|proc/(?:self|thread-self|(\d+))(?:/task/\d+)?)/fd/(0|[1-9][0-9]{0,8})")
# Errors of a full disk or quota: the old file is kept, not overwritten in place.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def descriptor(path: str | os.PathLike) -> int | None:
    """The descriptor of this process that ``path`` names, through any symbolic links
    (``/dev/stdout`` is one to ``/proc/self/fd/1``), else None. Read from the names, so that
    it holds where /proc is another PID namespace's, or absent."""
    path = os.fspath(path)
    for _ in range(40):                       # the kernel's own limit on links followed
        path = "/" + os.path.abspath(path).lstrip("/")
        folder, name = os.path.split(path)
        resolved = os.path.join(os.path.realpath(folder), name)
        for candidate in (path, resolved):
            match = _FD.fullmatch(candidate)
            if match and match[1] in (None, str(os.getpid())):
                return int(match[2])
        path = resolved
        if not name or not os.path.islink(path):
            return None
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return None


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is written as a file (new or regular), not into a descriptor, FIFO or
    device. A path that cannot be looked up (a loop of links) counts as a file: ``refusal`` says why."""
    return descriptor(path) is None and _regular_or_new(path)


def _regular_or_new(path: str | os.PathLike) -> bool:
    """``is_file`` for a path known to name no descriptor."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def refusal(path: str | os.PathLike) -> str | None:
    """Why ``write_output`` could not write ``path``, found by trying what it would do without
    changing anything (a temporary file made and removed, the file opened for writing without
    truncating it): permission bits alone would pass a root user, and a read-only or pseudo
    file system. None if it could, as far as can be told before writing."""
    path = os.fspath(path)
    fd = descriptor(path)
    if fd is not None:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            return f"descriptor {fd} is not open"
        return f"descriptor {fd} is open for reading only" if flags & os.O_ACCMODE == os.O_RDONLY else None
    if path.endswith((os.sep, "/")) or os.path.isdir(path):
        return "it is a directory"
    if not _regular_or_new(path):
        mode = os.stat(path).st_mode
        if stat.S_ISSOCK(mode):
            return "it is a socket"
        # Opening a FIFO to try would block until a reader came; a device is what it is.
        return None if os.access(path, os.W_OK) else "no permission to write it"
    target = os.path.realpath(path)           # a symbolic link is written where it points
    try:
        os.stat(target)
    except OSError as err:                    # a loop of links, a name too long
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"{err.strerror} ({target})"
    folder = os.path.dirname(target)
    while not os.path.exists(folder):         # the nearest folder that exists must take the new ones
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    exists = os.path.isfile(target)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        if not exists:
            return f"{err.strerror or err} ({folder})"
    else:
        if not exists or _may_replace(target):
            return None
    try:                                      # written in place instead
        os.close(os.open(target, os.O_WRONLY))
        return None
    except OSError as err:
        return f"{err.strerror or err} ({target})"


def _may_replace(target: str) -> bool:
    """Whether this process may rename a file over ``target`` as far as ownership goes: not in
    a sticky folder (``/tmp``) that neither it nor the file belongs to, unless it is root."""
    folder = os.stat(os.path.dirname(target))
    uid = os.geteuid()
    return not folder.st_mode & stat.S_ISVTX or uid in (0, folder.st_uid, os.stat(target).st_uid)


def write_output(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` to write the output ``path`` as its kind calls for (see the module's
    docstring), making missing folders. ``write`` may be called twice: when the rename is
    refused, the file is written again in place."""
    path = os.fspath(path)
    fd = descriptor(path)
    if fd is not None:
        for stream in (sys.stdout, sys.stderr):   # what was printed before comes first
            if stream is not None:
                stream.flush()
        with os.fdopen(os.dup(fd), mode) as f:
            write(f)
        return
    if not _regular_or_new(path):
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
    if os.path.isfile(target) and not _may_replace(target):
        return _overwrite(target, write, mode)
    stage = []                                # "writing", then "written"

    def tracked(f: Any) -> None:
        stage.append("writing")
        write(f)
        stage.append("written")
    try:
        atomic_write(target, tracked, mode)
    except OSError as err:
        # Making the temporary file or the rename failed (a read-only folder, a file mounted on
        # its own): write in place. Not when ``write`` failed, or the disk is full.
        if stage == ["writing"] or err.errno in _NO_SPACE or not os.path.isfile(target):
            raise
        _overwrite(target, write, mode)


def _overwrite(target: str, write: Callable[[Any], None], mode: str) -> None:
    """Write the existing file ``target`` in place. Without O_CREAT, which fs.protected_regular
    refuses on another user's file in a sticky folder even when it could be written."""
    with os.fdopen(os.open(target, os.O_WRONLY | os.O_TRUNC), mode) as f:
        write(f)
