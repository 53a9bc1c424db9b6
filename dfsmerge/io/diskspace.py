"""A full disk as a user error: ``ENOSPC`` (or a quota's ``EDQUOT``) at a write becomes a one-line
:class:`DiskFullError` naming the path, the space the write needed and the space left, raised after the write was
undone (an appended line cut back, a temporary file removed), so the last good file stays in place.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from dfsmerge.errors import DfsmergeError

__all__ = ["DiskFullError", "disk_full_error", "free_bytes", "guard_disk_full", "human_bytes", "is_disk_full"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(DfsmergeError):
    """The filesystem has no room for a write (nothing half-written was left in place of a good file)."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_error(path: str | Path, needed: int | None, *, fix: str, at_least: bool = False) -> DiskFullError:
    """The error for a write of ``needed`` bytes (None: unknown; ``at_least``: a lower bound) to ``path`` that found
    the disk full."""
    free = free_bytes(path)
    need = "" if needed is None else f"{'at least ' * at_least}{human_bytes(needed)} needed, "
    left = "" if free is None else f"{human_bytes(free)} free"
    return DiskFullError(f"no space left on device writing {str(path)!r} ({need}{left}); {fix}")


@contextlib.contextmanager
def guard_disk_full(path: str | Path, needed: int | None = None, *, fix: str) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFullError` (other errors pass unchanged)."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise disk_full_error(path, needed, fix=fix) from None
