"""Outputs a user names (trace, plot, profile): what ``refusal`` passes before training is what
``write_output`` writes after it, each kind of path as its kind calls for."""

import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from pipebd import outputs
from pipebd.checkpoint import atomic_write
from pipebd.cli import main
from pipebd.profiler import Profile
from pipebd.trace import Span, write_chrome_trace

TINY = ["--set", "model={pair: mlp}", "--set", "steps=2", "--set", "batch_size=8", "--set", "data.samples=16",
        "--set", "world_size=1", "--set", "device=cpu"]
SPANS = [("rank 0", [Span("teacher", 0.0, 1.0, 0, 0)])]
LINUX_FDS = pytest.mark.skipif(not os.path.isdir(f"/proc/{os.getpid()}/fd"), reason="needs /proc/PID/fd")


def in_thread(fn, timeout=60):
    """``fn()``'s result or exception, or a test failure if it blocks."""
    result = []

    def target():
        try:
            result.append((fn(), None))
        except Exception as err:
            result.append((None, err))
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"{fn} blocked"
    value, err = result[0]
    if err is not None:
        raise err
    return value


@LINUX_FDS
@pytest.mark.parametrize("spelling", ["/dev/stdout", "//dev/stdout", "/dev/fd/1", "/proc/self/fd/1",
                                      "/proc/thread-self/fd/1", "/proc/self/task/PID/fd/1", "link"])
def test_a_trace_to_stdout_goes_into_the_log_stdout_is_redirected_to(tmp_path, spelling):
    """Opened anew, or renamed over, the log file stdout is redirected to lost the log: the
    trace is written through descriptor 1, after what was printed, whatever names it."""
    log, link = tmp_path / "log.txt", tmp_path / "trace.json"
    link.symlink_to("/dev/stdout")
    path = str(link) if spelling == "link" else spelling
    script = ("import os, pipebd.trace as t; print('the log', flush=True); "
              f"t.write_chrome_trace({path!r}.replace('PID', str(os.getpid())), "
              "[('rank 0', [t.Span('teacher', 0.0, 1.0, 0, 0)])]); "
              "print('more log', flush=True)")
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, check=True, timeout=120)
    text = log.read_text()
    assert text.startswith('the log\n{"traceEvents"') and text.endswith('"ms"}\nmore log\n'), text
    assert link.is_symlink()


@LINUX_FDS
def test_descriptors_are_checked_by_how_they_are_open(tmp_path, capsys):
    read, write = os.pipe()
    try:   # bash's >(...) names the write end of a pipe
        assert outputs.refusal(f"/dev/fd/{write}") is None
        assert outputs.refusal(f"/dev/fd/{read}") == f"descriptor {read} is open for reading only"
        assert main(["check", *TINY, "--set", f"trace=/dev/fd/{read}"]) == 2
        assert "config key 'trace': cannot write" in capsys.readouterr().err
        # Two outputs into /dev/null are not one file written twice.
        assert main(["check", *TINY, "--set", f"trace=/dev/fd/{write}", "--set", "plot=/dev/null"]) == 0
        assert main(["check", *TINY, "--set", "trace=/dev/null", "--set", "plot=/dev/null"]) == 0
        write_chrome_trace(f"/dev/fd/{write}", SPANS)
    finally:
        os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read().startswith('{"traceEvents"')
    assert outputs.refusal(f"/dev/fd/{write}") == f"descriptor {write} is not open"


def test_directories_and_files_are_told_apart_by_what_they_are(tmp_path):
    """Not by where they are: a folder under /dev is a folder, a file under it a file."""
    for folder in (tmp_path, f"{tmp_path}/", "/dev/shm", "/dev/shm/"):
        if os.path.isdir(folder):
            assert outputs.refusal(folder) == "it is a directory"
    assert outputs.is_file(tmp_path / "new.json") and outputs.is_file(tmp_path / "no" / "folder.json")
    assert not outputs.is_file("/dev/null") and not outputs.is_file("/dev/stdout")
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
            assert outputs.is_file(f.name)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_is_checked_without_opening_it_and_refused_without_a_reader(tmp_path):
    # Opening a FIFO waits for a reader: neither the check nor a write may wait for one.
    fifo = tmp_path / "trace.json"
    os.mkfifo(fifo)
    assert in_thread(lambda: main(["check", *TINY, "--set", f"trace={fifo}"])) == 0
    with pytest.raises(OSError, match="no process reads the FIFO"):
        in_thread(lambda: write_chrome_trace(str(fifo), SPANS))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        in_thread(lambda: write_chrome_trace(str(fifo), SPANS))
        os.set_blocking(reader, True)
        assert os.read(reader, 1 << 16).startswith(b'{"traceEvents"')
    finally:
        os.close(reader)


def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def test_a_folder_that_takes_no_new_file_still_lets_an_existing_one_be_written(tmp_path, monkeypatch, capsys):
    # What the check passes is written, in place when the folder takes no temporary file
    # (permission bits do not stop root, so the folder refuses here).
    existing, new = tmp_path / "old.json", tmp_path / "new.json"
    existing.write_text("old")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert main(["check", *TINY, "--set", f"trace={existing}"]) == 0
    assert main(["check", *TINY, "--set", f"trace={new}"]) == 2
    assert f"cannot write '{new}': Permission denied ({tmp_path})" in capsys.readouterr().err
    write_chrome_trace(str(existing), SPANS)
    assert existing.read_text().startswith('{"traceEvents"')
    with pytest.raises(PermissionError):           # checkpoints are never written in place
        atomic_write(str(existing), lambda f: f.write(b"x"))


@pytest.mark.parametrize("where, code", [("rename", errno.EPERM), ("rename", errno.EBUSY), ("folder", errno.EROFS)])
def test_an_existing_file_is_overwritten_in_place_when_a_rename_is_refused_not_when_the_disk_is_full(
        tmp_path, monkeypatch, capsys, where, code):
    """The rename is refused for another user's file in a sticky folder (EPERM), a file mounted
    on its own (EBUSY), a read-only folder holding a writable mounted file (EROFS). A full disk
    keeps the old file whole."""
    path = tmp_path / "t.json"
    path.write_text("old")

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    with monkeypatch.context() as m:
        if where == "folder":
            m.setattr(tempfile, "mkstemp", refused)
            m.setattr(tempfile, "TemporaryFile", refused)
            assert main(["check", *TINY, "--set", f"trace={path}"]) == 0
        else:
            m.setattr(os, "replace", refused)
        write_chrome_trace(str(path), SPANS)
    assert path.read_text().startswith('{"traceEvents"') and os.listdir(tmp_path) == ["t.json"]
    path.write_text("old")
    for fail in ("mkstemp", "fsync"):
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr(tempfile if fail == "mkstemp" else os, fail, full)
            with pytest.raises(OSError, match="No space left"):
                write_chrome_trace(str(path), SPANS)
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["t.json"], fail


def test_another_users_file_in_a_sticky_folder_is_overwritten_without_a_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text("old")
    monkeypatch.setattr(outputs, "_may_replace", lambda target: False)
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: pytest.fail("a temporary file"))
    write_chrome_trace(str(path), SPANS)
    assert path.read_text().startswith('{"traceEvents"')


def test_links_that_loop_and_names_too_long_are_refused(tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    assert "Too many levels of symbolic links" in outputs.refusal(str(loop))
    assert "File name too long" in outputs.refusal(str(tmp_path / ("x" * 300 + ".json")))


def test_a_sticky_folder_lets_only_owners_replace_a_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text("old")
    assert outputs._may_replace(str(path))
    tmp_path.chmod(0o1777)
    owner = os.stat(path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)     # another user, not root
    assert not outputs._may_replace(str(path))
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    assert outputs._may_replace(str(path))
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o1777


def test_a_failed_write_leaves_the_older_file_and_a_link_is_written_where_it_points(tmp_path):
    """Files are written whole or not at all: a failed write (a full disk, here an entry that
    does not serialize) leaves the file from before and no temporary file."""
    path = tmp_path / "t.json"
    write_chrome_trace(str(path), SPANS)
    before = path.read_text()
    with pytest.raises(TypeError):
        write_chrome_trace(str(path), [("rank 0", [Span("teacher", 0.0, 1.0, object(), 0)])])
    assert path.read_text() == before and os.listdir(tmp_path) == ["t.json"]
    profile = Profile(1, 8, 4, "cpu", "gloo", [2, 8], [[1.0, 4.0]], [[0.5, 2.0]], [0.0, 0.0], [4, 4], [400], [], [])
    (tmp_path / "link.json").symlink_to(path)
    profile.save(str(tmp_path / "link.json"))
    assert (tmp_path / "link.json").is_symlink() and Profile.load_file(str(path)) == profile
