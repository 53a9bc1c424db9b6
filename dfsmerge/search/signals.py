"""Pausing a search with SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, ``kill PID``).

The first signal only sets a flag: the loop finishes the candidate being scored (or abandons a racing block or a
Ray candidate still in flight, which a resume scores again), checks the flag at the next candidate boundary, writes
the checkpoint and raises :class:`SearchPaused`; the CLI prints the command that resumes it. The first signal also
restores the default action, so a second one ends the process at once, by the kernel, however busy the process is
(inside a long torch call Python runs no handler): the run is then exactly as after a SIGKILL, which ``--resume``
continues with nothing lost or repeated (every record is appended and fsynced whole, every checkpoint is renamed
into place).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from dfsmerge.errors import DfsmergeError

__all__ = ["PauseOnSignal", "SearchPaused"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SearchPaused(DfsmergeError):  # noqa: N818 - a pause, not a failure
    """A signal paused the search; the run directory is checkpointed and ``--resume`` continues it.

    Attributes:
        signum: the signal that paused it. n_evals: lines in ``evals.jsonl``. run_dir: the run directory.
    """

    def __init__(self, signum: int, run_dir, n_evals: int):
        self.signum, self.run_dir, self.n_evals = signum, run_dir, n_evals
        super().__init__(f"search paused by {self.signame} after {n_evals} evaluations; {run_dir} is checkpointed: "
                         f"continue with `dfsmerge search CONFIG --out {run_dir} --resume`")

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name


class PauseOnSignal:
    """Context manager: while active, SIGINT/SIGTERM request a pause instead of ending the process (main thread only;
    elsewhere it does nothing). ``requested`` is the signal number once one arrived."""

    def __init__(self, emit: Callable[[str], None] | None = None):
        self.emit = emit
        self.requested: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            return
        self.requested = signum
        for s in SIGNALS:  # the next signal takes the default action: the process ends at once
            signal.signal(s, signal.SIG_DFL)
        if self.emit is not None:
            self.emit(f"{signal.Signals(signum).name}: pausing after the running candidate (the run stays "
                      "resumable); send it again to stop at once")

    def __enter__(self) -> PauseOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
