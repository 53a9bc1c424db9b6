"""ENOSPC injection for the fault tests (never imported by the package): the ``n``-th ``write`` call on files whose
resolved path matches a glob writes part of its data and fails with ``ENOSPC``, as a filling disk does. Files are
caught where Python opens them (``open``, ``io.open``, ``Path.open``, ``os.fdopen``), buffered or not, and
``shutil``'s copies are made through them (not ``sendfile``)."""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import shutil


def install(glob: str, n: int, keep: int | None = None):
    """Patch ``open``; returns ``(undo, state)`` where ``state["hit"]`` is the path that failed (None until then).

    Args:
        glob: fnmatch pattern of the absolute paths to watch.
        n: the matching write call (1-based, counted over all matching files) that fails; 0: none (the writes
            are only recorded, ``state["paths"]``).
        keep: bytes it writes before failing (default: half of them).
    """
    real_open = io.open
    state = {"writes": 0, "hit": None, "paths": []}  # paths: the file of each matching write, in order

    class Full:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def write(self, data):
            state["writes"] += 1
            state["paths"].append(self._name)
            if state["writes"] != n:
                return self._f.write(data)
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            part = size // 2 if keep is None else min(keep, size)
            if part:
                self._f.write(data[:part])
                self._f.flush()
            state["hit"] = self._name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __iter__(self):
            return iter(self._f)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+"):
            name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
            if fnmatch.fnmatch(name, glob):
                return Full(f, name)
        return f

    io.open = builtins.open = full_open
    sendfile = shutil._USE_CP_SENDFILE
    shutil._USE_CP_SENDFILE = False  # shutil's copies write through Python's file objects, so copies are caught too

    def undo():
        io.open = builtins.open = real_open
        shutil._USE_CP_SENDFILE = sendfile

    return undo, state
