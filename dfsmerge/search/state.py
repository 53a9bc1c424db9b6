"""The run directory and its durable state (DESIGN.md section 7).

Layout::

    RUN/config.yaml      the resolved search config
    RUN/evals.jsonl      one line per candidate, appended and fsynced as each is scored
    RUN/state/state.json loop state + optimizer state (written atomically after every ask and every tell)
    RUN/best/            plan.yaml, recipe.yaml, mergekit.yaml, best.json
    RUN/pareto.jsonl     multi-objective runs: the non-dominated candidates
    RUN/report/          plots and report.md

Why the two files suffice for an exact resume (nanochat's checkpoint manager: weights plus a human-readable JSON of
the loop state): ``state.json`` written after ``ask`` holds the pending population (the optimizer replays that ask
on load); every candidate of it already in ``evals.jsonl`` is reused, not re-scored; a state written after
``tell`` starts the next generation. A kill mid-append leaves a partial last line, which :meth:`RunDir.open` drops.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError
from dfsmerge.io.writer import fsync_dir

STATE_FORMAT = 1
_NONFINITE_FIELDS = ("objectives", "values", "fitness")


def jsonable(o: Any) -> Any:
    """Replace non-finite floats by None (strict JSON), recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [jsonable(v) for v in o]
    return o


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temporary file renamed into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class RunDir:
    """A run directory: evals log, state file and outputs.

    Use :meth:`open` (checks new vs resume). ``evals`` holds the parsed lines of ``evals.jsonl`` in id order.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.evals: list[dict[str, Any]] = []
        self._fh = None

    # ---------------------------------------------------------------- paths
    @property
    def evals_path(self) -> Path:
        return self.path / "evals.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / "state" / "state.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def pareto_path(self) -> Path:
        return self.path / "pareto.jsonl"

    # ---------------------------------------------------------------- open
    @staticmethod
    def check(path: str | Path, *, resume: bool) -> None:
        """Raise what :meth:`open` would raise, without creating anything."""
        p = Path(path)
        if not resume and p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise OutputExistsError(f"--out {str(p)!r} exists and is not empty; pass --resume to continue that "
                                    "run, or choose another --out directory")
        if resume and not (p / "config.yaml").is_file():
            raise CheckpointError(f"--resume: {str(p)!r} holds no search run (no config.yaml); drop --resume to "
                                  "start a new run there, or point --out at an existing run")

    @classmethod
    def open(cls, path: str | Path, *, resume: bool) -> RunDir:
        """Open ``path`` for a new run (must be missing or empty) or a resumed one (must hold a run).

        Raises:
            OutputExistsError: a new run into a non-empty directory.
            CheckpointError: ``resume`` on a directory without a run, or a corrupt evals log.
        """
        cls.check(path, resume=resume)
        run = cls(path)
        if not resume:
            run.path.mkdir(parents=True, exist_ok=True)
            (run.path / "state").mkdir(exist_ok=True)
            return run
        run._load_evals()
        return run

    def _load_evals(self) -> None:
        if not self.evals_path.exists():
            return
        raw = self.evals_path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a kill mid-append: drop the partial line
            with open(self.evals_path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        evals = []
        for n, line in enumerate(raw[:end].splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{self.evals_path}: line {n + 1} is not JSON ({e}); the log is corrupt") from e
            if rec.get("id") != len(evals):
                raise CheckpointError(f"{self.evals_path}: line {n + 1} has id={rec.get('id')!r}, expected "
                                      f"{len(evals)}; the log has a gap or a duplicate")
            evals.append(rec)
        self.evals = evals

    # ---------------------------------------------------------------- config
    def write_config(self, config_dict: dict[str, Any]) -> None:
        import yaml

        atomic_write(self.config_path, "# resolved search config written by `dfsmerge search`\n"
                     + yaml.safe_dump(config_dict, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.config_path.read_text())

    # ---------------------------------------------------------------- evals
    def append_eval(self, record: dict[str, Any]) -> None:
        """Append one candidate's line and fsync it (ids must be consecutive)."""
        if record["id"] != len(self.evals):
            raise RuntimeError(f"eval id {record['id']} appended after {len(self.evals)} lines")
        # Only the objective fields can hold non-finite floats (genomes, candidates and timings are finite).
        rec = {k: (jsonable(v) if k in _NONFINITE_FIELDS else v) for k, v in record.items()}
        line = json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n"
        if self._fh is None:
            self._fh = open(self.evals_path, "a")  # noqa: SIM115 - kept open for the run
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.evals.append(rec)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    # ---------------------------------------------------------------- state
    def write_state(self, state: dict[str, Any]) -> None:
        """Atomically replace ``state/state.json``."""
        from dfsmerge.optim import dumps_state

        state = {"format": STATE_FORMAT, **state}
        atomic_write(self.state_path, dumps_state(state))

    def read_state(self) -> dict[str, Any] | None:
        """The saved state, or None when the run was killed before its first checkpoint.

        Raises:
            CheckpointError: unreadable or of another format.
        """
        from dfsmerge.optim import loads_state

        if not self.state_path.is_file():
            return None
        state = loads_state(self.state_path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{self.state_path}: format={state.get('format')!r}, this version reads "
                                  f"{STATE_FORMAT}; start a new run")
        return state


def check_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must use the config it started with, except for the fields the config models mark resumable
    (budget, stage2.budget, backend, logging: :func:`dfsmerge.search.config.resumable_paths`).

    Raises:
        ConfigError: naming the fields that differ.
    """
    from dfsmerge.search.config import SearchConfig, resumable_paths

    free = resumable_paths(SearchConfig)

    def diff(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict) and any(p.startswith(prefix) for p in free if prefix):
            return [d for k in sorted(set(a) | set(b)) if f"{prefix}{k}" not in free
                    for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    changed = [d for k in sorted(set(saved) | set(current)) if k not in free
               for d in diff(saved.get(k), current.get(k), f"{k}.")]
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's config.yaml in {changed}; resume with the "
                          f"original config (only {', '.join(sorted(free))} may change) or start a new --out")
