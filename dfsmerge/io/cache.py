"""dfsmerge's cache directory and the lock that makes building an entry of it safe across processes.

Everything dfsmerge builds once and reuses -- converted GGUF files, fetched real models and wheels, LoRA adapters
applied to their base, the toy zoo, real expert sets -- lives under :func:`cache_root`. Each entry is built in a
temporary directory and renamed into place, so a reader never sees half an entry. Two processes that need the same
missing entry at once (two searches started together on a fresh machine, or ``pytest -n 2``) must not both build it:
the second would delete the first's finished entry to rename its own over it while the first is reading it.
:func:`building` serialises them: the builder holds an exclusive ``flock`` on a lock file beside the entry, and
every other process waits for it and then finds the entry finished. :func:`build_once` is that pattern, which
every cached builder uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["build_once", "building", "cache_root"]


def cache_root() -> Path:
    """dfsmerge's cache directory: ``$DFSMERGE_CACHE`` if set, else ``~/.cache/dfsmerge``."""
    env = os.environ.get("DFSMERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfsmerge"


@contextlib.contextmanager
def building(entry: str | Path) -> Iterator[None]:
    """Hold the build lock of the cache entry ``entry`` (a file or directory path) for the ``with`` block.

    Blocks while another process holds it. Use it around "is the entry finished? if not, build it": the check inside
    the lock sees what a process that built it meanwhile left. The lock file ``.<name>.lock`` beside the entry is
    left in place (removing it would race with a process about to lock it); the kernel releases the lock when the
    holder exits, killed or not. Re-entrant use on the same entry in one process deadlocks: lock once per entry.
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.parent / f".{entry.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def build_once(entry: str | Path, done: Callable[[], bool], build: Callable[[], object]) -> Path:
    """``entry``, built by ``build()`` unless ``done()`` says it is finished.

    ``done()`` is asked first without the lock (the common case: the entry is there), then again under the entry's
    build lock, since another process may have finished it while this one waited; ``build()`` runs at most once
    across all of them.
    """
    if not done():
        with building(entry):
            if not done():
                build()
    return Path(entry)
