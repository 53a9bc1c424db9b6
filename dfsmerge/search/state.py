"""The run directory and its durable state (docs/design.md section 7).

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

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dfsmerge.errors import CheckpointError, ConfigError, OutputExistsError
from dfsmerge.io.diskspace import disk_full_error, is_disk_full
from dfsmerge.io.writer import fsync_dir

STATE_FORMAT = 1
DISK_FULL_FIX = ("the file there is as before (the run's last checkpoint is intact); free space and continue with "
                 "`dfsmerge search CONFIG --out RUN --resume`")


def jsonable(o: Any) -> Any:
    """Replace non-finite floats by None (strict JSON), recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [jsonable(v) for v in o]
    return o


def _finite_or_inf(v: Any) -> float:
    return math.inf if v is None else float(v)


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One line of ``evals.jsonl``: a candidate of the search and its evaluation.

    Attributes:
        id: line number (0-based, consecutive).
        generation: optimizer generation (counted over all stages). stage: 1, or 2 in staged mode.
        genome: the genome vector the optimizer asked.
        candidate: the decoded candidate (``{"ps": mergekit recipe | None, "path": plan | None}``, plus
            ``"infeasible": reason``), see :meth:`dfsmerge.genome.Candidate.to_dict`.
        key: the candidate key (:meth:`dfsmerge.genome.Candidate.key`): equal keys score equally.
        objectives: ``{objective key: raw score}`` (None where it failed).
        values: ``{objective key: value to minimise}`` (inf where it failed).
        fitness: weighted sum of ``values`` (:func:`dfsmerge.objectives.fitness.scalar_fitness`; inf on failure).
        error: why the candidate failed, None when it did not.
        cached: the result was copied from an earlier line with the same key (not scored again).
        infeasible: the genome decodes to no valid path (worst fitness, not a failure).
        timings: seconds spent per phase (``decode_s``, ``prepare_s``, ``eval_s``, ``total_s``).
        time: wall-clock time the line was written (Unix seconds).
        traceback: the failing candidate's traceback (last frames), when it raised.
        cost: what scoring it took (``tokens``, ``forward_tokens``, ``cached_tokens``, ``forward_calls``,
            ``prefix_hits``, ``docs``, ``seconds``; see :class:`dfsmerge.objectives.EvalResult`); empty when cached.
        race: racing runs: its blocks' sums and whether the race stopped it early (then ``objectives`` are the
            estimate on ``race.docs`` documents), see :mod:`dfsmerge.search.racing`.
    """

    id: int
    generation: int
    stage: int
    genome: tuple[float, ...]
    candidate: Mapping[str, Any]
    key: str
    objectives: Mapping[str, float | None]
    values: Mapping[str, float]
    fitness: float
    error: str | None = None
    cached: bool = False
    timings: Mapping[str, float] = field(default_factory=dict)
    time: float = 0.0
    infeasible: bool = False
    traceback: str | None = None
    cost: Mapping[str, float] = field(default_factory=dict)
    race: Mapping[str, Any] | None = None
    estimate: Mapping[str, Any] | None = None  # subset fitness: objectives estimated from few documents

    @property
    def ok(self) -> bool:
        """Scored without error (every value finite)."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object (non-finite values as null; ``infeasible``/``traceback`` only when set)."""
        out: dict[str, Any] = {
            "id": self.id, "generation": self.generation, "stage": self.stage, "genome": list(self.genome),
            "candidate": dict(self.candidate), "key": self.key, "objectives": jsonable(dict(self.objectives)),
            "values": jsonable(dict(self.values)), "fitness": jsonable(self.fitness), "error": self.error,
            "cached": self.cached, "timings": dict(self.timings), "time": self.time}
        if self.infeasible:
            out["infeasible"] = True
        if self.traceback:
            out["traceback"] = self.traceback
        if self.cost:
            out["cost"] = dict(self.cost)
        if self.race is not None:
            out["race"] = jsonable(dict(self.race))
        if self.estimate is not None:
            out["estimate"] = jsonable(dict(self.estimate))
        return out

    @property
    def partial(self) -> bool:
        """Racing stopped it early: its scores are an estimate on part of the documents."""
        return bool(self.race and self.race.get("stopped"))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalRecord:
        """Read a line written by :meth:`to_json` (null values and fitness back to inf)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["genome"] = tuple(float(v) for v in d["genome"])
        kw["values"] = {k: _finite_or_inf(v) for k, v in (d.get("values") or {}).items()}
        kw["fitness"] = _finite_or_inf(d.get("fitness"))
        kw["objectives"] = dict(d.get("objectives") or {})
        kw["infeasible"] = bool(d.get("infeasible", False))
        return cls(**kw)

    def copy_for(self, *, id: int, generation: int, stage: int, genome: tuple[float, ...], time: float
                 ) -> EvalRecord:
        """This result as a cached line for another genome with the same key (nothing is scored again)."""
        return replace(self, id=id, generation=generation, stage=stage, genome=genome, time=time, cached=True,
                       timings={}, traceback=None, cost={})


@dataclass(frozen=True, slots=True)
class LoopState:
    """The search loop's state (``state/state.json``), written after every ask and at the end of each stage.

    Attributes:
        stage: the stage being run (1, or 2 in staged mode).
        stage_offset: id of the stage's first line in ``evals.jsonl``.
        generation_offset: generations run by earlier stages.
        fixed_ps: staged mode, stage 2: the stage-1 best genome (model A's recipe), else None.
        phase: ``asked`` (a population is pending), ``told`` (the stage ended after tell) or ``stage_start``.
        elapsed_s: search seconds summed over sessions.
        optimizer: the optimizer's ``state_dict()`` (None at a stage start).
        rng: Python/NumPy/torch global RNG states.
        eval_dtype: the dtype candidates are scored in, once decided, with the measurement behind an ``auto``
            choice (``{"dtype": ..., "speedup": ..., "max_score_diff": ..., "candidates": ...}``); None before.
    """

    stage: int = 1
    stage_offset: int = 0
    generation_offset: int = 0
    fixed_ps: tuple[float, ...] | None = None
    phase: str = "stage_start"
    elapsed_s: float = 0.0
    optimizer: Mapping[str, Any] | None = None
    rng: Mapping[str, Any] | None = None
    eval_dtype: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-able dict (``format`` is added by :meth:`RunDir.write_state`)."""
        return {"stage": self.stage, "stage_offset": self.stage_offset, "generation_offset": self.generation_offset,
                "fixed_ps": None if self.fixed_ps is None else list(self.fixed_ps), "phase": self.phase,
                "elapsed_s": self.elapsed_s, "optimizer": self.optimizer, "rng": self.rng,
                "eval_dtype": self.eval_dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoopState:
        fixed = d.get("fixed_ps")
        return cls(stage=int(d.get("stage", 1)), stage_offset=int(d.get("stage_offset", 0)),
                   generation_offset=int(d.get("generation_offset", 0)),
                   fixed_ps=None if fixed is None else tuple(float(v) for v in fixed),
                   phase=str(d.get("phase", "stage_start")), elapsed_s=float(d.get("elapsed_s", 0.0)),
                   optimizer=d.get("optimizer"), rng=d.get("rng"), eval_dtype=d.get("eval_dtype"))


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path, len(text.encode()), fix=DISK_FULL_FIX) from None
        raise
    fsync_dir(path.parent)


class RunDir:
    """A run directory: evals log, state file and outputs.

    Use :meth:`open` (checks new vs resume). ``evals`` holds the :class:`EvalRecord` s of ``evals.jsonl`` in id
    order.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.evals: list[EvalRecord] = []
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
        # a run stopped before its config was written (a full disk) left only its lock and empty state/: new again
        leftovers = {".lock", "state"} if not (p / "state").is_dir() or not any((p / "state").iterdir()) else {".lock"}
        if not resume and p.exists() and (not p.is_dir() or any(c.name not in leftovers for c in p.iterdir())):
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
        from dfsmerge.rundir.reader import read_eval_lines

        lines = read_eval_lines(self.evals_path)  # the one torn-line policy: a partial last line is left out
        if lines.torn:  # a kill mid-append: drop the partial line before appending again
            with open(self.evals_path, "r+b") as f:
                f.truncate(lines.complete_bytes)
                f.flush()
                os.fsync(f.fileno())
        evals = []
        for row in lines.rows:
            try:
                evals.append(EvalRecord.from_json(row))
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.evals_path}: line {row.get('id', len(evals)) + 1} is not an evaluation "
                                      f"record ({type(e).__name__}: {e}); the log is corrupt") from e
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
    def append_eval(self, record: EvalRecord) -> None:
        """Append one candidate's line and fsync it (ids must be consecutive)."""
        if record.id != len(self.evals):
            raise RuntimeError(f"eval id {record.id} appended after {len(self.evals)} lines")
        line = (json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode()
        if self._fh is None:  # unbuffered: a failed write leaves no bytes behind to be flushed later
            self._fh = open(self.evals_path, "ab", buffering=0)  # noqa: SIM115 - kept open for the run
        end = self._fh.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[self._fh.write(view):]
            os.fsync(self._fh.fileno())
        except OSError as e:
            if not is_disk_full(e):
                raise
            os.ftruncate(self._fh.fileno(), end)  # no partial line: the log ends at the last whole record
            self.close()
            raise disk_full_error(self.evals_path, len(line), fix=DISK_FULL_FIX) from None
        self.evals.append(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    # ---------------------------------------------------------------- state
    def write_state(self, state: LoopState) -> None:
        """Atomically replace ``state/state.json``."""
        from dfsmerge.optim import dumps_state

        atomic_write(self.state_path, dumps_state({"format": STATE_FORMAT, **state.to_json()}))

    def read_state(self) -> LoopState | None:
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
        return LoopState.from_json(state)


def check_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must use the config it started with, except for the fields the config models mark resumable
    (budget, stage2.budget, backend, logging: :func:`dfsmerge.search.config.resumable_paths`).

    Raises:
        ConfigError: naming the fields that differ.
    """
    from dfsmerge.search.config import SearchConfig, load_search_config, resumable_paths

    free = resumable_paths(SearchConfig)
    # a run written by an older dfsmerge: compare in today's normal form (defaults filled, fields moved); an
    # unreadable saved config is compared as written (and differs)
    with contextlib.suppress(Exception):
        saved = load_search_config(saved).to_dict()

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
