"""The run directory's writer lock: one process writes a run (``evals.jsonl``, ``state/``, ``best/``, ``report/``) at a
time; readers (``inspect``, ``export RUN``, ``ablate``) never take it.

The lock is ``fcntl.flock`` on ``RUN/.lock``, which holds the writer's pid and host. The kernel releases a flock when
its holder dies, however it dies, so a run SIGKILLed (or OOM-killed) leaves a lock file that the next ``--resume``
simply takes: a stale lock needs no cleanup and no guess from the pid whether the holder still lives. The pid inside
serves only the message that refuses a second writer. The descriptor is close-on-exec (Python's default), so the
processes a search starts (Ray's workers) do not inherit the lock.

Limits: ``flock`` is local to one machine on most network filesystems (NFS before Linux 2.6.12 and some FUSE
mounts ignore it), so two hosts writing one run on a shared mount are not stopped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from dfsmerge.errors import DfsmergeError

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "check_unlocked", "holder", "is_locked"]

LOCK_NAME = ".lock"


class RunLockedError(DfsmergeError):
    """Another live process is writing the run directory."""


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return text.splitlines()[0] if text else ""


def holder(run_dir: str | Path) -> str | None:
    """``"pid N on HOST"`` of the live process holding ``run_dir``'s lock, or None when nobody holds it (no lock
    file, or a stale one left by a dead process). Takes no lock that outlives the call."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_holder(path) or "an unknown process"
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refusal(run_dir: str | Path, who: str) -> RunLockedError:
    pid = who.split()[1] if who.startswith("pid ") else "PID"
    return RunLockedError(f"run directory {str(run_dir)!r} is being written by {who} (a live `dfsmerge search`); "
                          f"wait for it to end, or pause it (kill -TERM {pid}) and resume it once, or choose "
                          "another --out")


def check_unlocked(run_dir: str | Path) -> None:
    """Refuse at once a second writer of ``run_dir`` (cheap: no import beyond this module).

    Raises:
        RunLockedError: a live process holds the lock (the message names its pid and host).
    """
    if Path(run_dir).is_dir() and (who := holder(run_dir)) is not None:
        raise _refusal(run_dir, who)


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s writer lock."""
    return holder(run_dir) is not None


class RunLock:
    """The exclusive writer lock of one run directory.

    Args:
        run_dir: the run directory (must exist when :meth:`acquire` is called).

    Use :meth:`acquire` / :meth:`release` or ``with RunLock(run) as lock: ...``; ``stale`` tells after acquiring
    whether a dead writer's lock file was found (and taken over).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self.stale: str | None = None  # the dead holder's line, when the lock was recovered

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or refuse at once (never waits).

        Raises:
            RunLockedError: another live process holds it (the message names its pid).
        """
        if self._fd is not None:
            return self
        from dfsmerge.io.diskspace import guard_disk_full

        with guard_disk_full(self.path, 0, fix="free space and run the command again"):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _refusal(self.run_dir, _read_holder(self.path) or "another process") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        self.stale = previous.splitlines()[0] if previous else None
        line = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file is no lock)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a reader seeing the file between runs finds no holder's pid
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
