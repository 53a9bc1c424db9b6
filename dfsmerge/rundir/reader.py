"""The one reader of a search run directory: every part that reads a run (resume, report, inspect, export, ablate,
the notebook API :func:`dfsmerge.open_run`) goes through here, so they agree on what a run holds.

Layout (written by :mod:`dfsmerge.search`)::

    RUN/config.yaml        the resolved search config
    RUN/evals.jsonl        one JSON line per candidate, appended and fsynced as each is scored
    RUN/state/state.json   loop and optimizer state; its ``format`` is the run directory's format version
    RUN/best/              plan.yaml (path), recipe.yaml (PS), mergekit.yaml, best.json (the record)
    RUN/pareto.jsonl       multi-objective runs: the non-dominated candidates
    RUN/report/            plots and report.md

One policy for a torn log (:func:`read_eval_lines`): the bytes after the last newline are a line still being written
(or cut by a kill) and are left out; a complete line that is not JSON, or ids that are not 0, 1, 2, ... mean a
corrupt log and raise :class:`~dfsmerge.errors.CheckpointError`.

Format versions: 1 is today's (state.json ``format: 1``, every line with ``key``, ``stage``, ``values``). 0 is a run
written before those fields existed (no ``format`` in state.json): its lines are read with ``stage`` 1, ``values``
from ``fitness`` and the key recomputed from the candidate. A run of a newer format than this version reads raises
:class:`RunFormatError` naming the version it needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfsmerge.errors import CheckpointError, ConfigError

#: the run-directory format this version writes (``state/state.json``'s ``format``) and the ones it reads.
FORMAT = 1
READS = (0, 1)

EVALS = "evals.jsonl"
CONFIG = "config.yaml"
STATE = "state/state.json"
BEST_DIR = "best"
BEST_PLAN = "best/plan.yaml"
BEST_RECIPE = "best/recipe.yaml"
BEST_RECORD = "best/best.json"
PARETO = "pareto.jsonl"
REPORT_DIR = "report"


class RunFormatError(CheckpointError):
    """The run directory was written in a format this version of dfsmerge cannot read."""


@dataclass(frozen=True, slots=True)
class EvalLines:
    """The complete lines of ``evals.jsonl``.

    Attributes:
        rows: each complete line's JSON object, in id order.
        complete_bytes: length of the complete part (what a resumed writer truncates the file to).
        size: the file's length (larger than ``complete_bytes`` when the last line is torn).
    """

    rows: tuple[dict[str, Any], ...]
    complete_bytes: int
    size: int

    @property
    def torn(self) -> bool:
        """The file ends in a partial line (a search writing it, or killed while writing)."""
        return self.size > self.complete_bytes


def read_eval_lines(path: str | Path) -> EvalLines:
    """Read an ``evals.jsonl`` with the one torn-line policy (see the module docstring); a missing file is empty.

    Raises:
        CheckpointError: a complete line is not JSON, or the ids have a gap or a duplicate.
    """
    p = Path(path)
    if not p.is_file():
        return EvalLines((), 0, 0)
    raw = p.read_bytes()
    end = raw.rfind(b"\n") + 1
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(raw[:end].splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}: line {n + 1} is not JSON ({e}); the log is corrupt") from e
        if not isinstance(row, dict) or row.get("id") != len(rows):
            got = row.get("id") if isinstance(row, dict) else row
            raise CheckpointError(f"{p}: line {n + 1} has id={got!r}, expected {len(rows)}; the log has a gap or "
                                  "a duplicate")
        rows.append(row)
    return EvalLines(tuple(rows), end, len(raw))


def _inf(v: Any) -> float:
    return math.inf if v is None else float(v)


def upgrade_row(row: Mapping[str, Any], format: int) -> dict[str, Any]:
    """A line of a run of format ``format`` in today's shape (format 0: ``stage``, ``generation``, ``values`` and
    ``key`` filled in)."""
    out = dict(row)
    if format >= 1:
        return out
    from dfsmerge.genome import stable_key

    out.setdefault("stage", 1)
    out.setdefault("generation", 0)
    out.setdefault("candidate", {"ps": None, "path": None})
    out.setdefault("objectives", {})
    out.setdefault("values", {"fitness": out.get("fitness")})
    out.setdefault("key", stable_key(out["candidate"]))
    return out


# ================================================================================================ typed views
@dataclass(frozen=True, slots=True)
class RunRecord:
    """One candidate of a run, read-only: a line of ``evals.jsonl``.

    Attributes:
        id: line number (0 is the search's start: the sources' own layer order / the initial recipe).
        generation, stage: when the optimizer asked it.
        genome: the genome vector.
        candidate: ``{"ps": mergekit recipe | None, "path": plan dict | None}`` (``"infeasible": reason``).
        key: equal keys score equally.
        objectives: ``{objective key: raw score}`` (None where it failed), each in its own direction.
        values: ``{objective key: value to minimise}`` (inf where it failed).
        fitness: weighted sum of ``values`` (inf on failure).
        error: why it failed, None when it did not. cached: copied from an earlier line with the same key.
        infeasible: the genome decodes to no valid path. cost: what scoring it took. timings: seconds per phase.
        race: racing's blocks (``stopped``: scores are an estimate on part of the documents).
        raw: the line as written.
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
    infeasible: bool = False
    cost: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    race: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunRecord:
        try:
            return cls(id=int(row["id"]), generation=int(row.get("generation", 0)), stage=int(row.get("stage", 1)),
                       genome=tuple(float(v) for v in row.get("genome") or ()),
                       candidate=dict(row.get("candidate") or {}), key=str(row.get("key", "")),
                       objectives=dict(row.get("objectives") or {}),
                       values={k: _inf(v) for k, v in (row.get("values") or {}).items()},
                       fitness=_inf(row.get("fitness")), error=row.get("error"), cached=bool(row.get("cached")),
                       infeasible=bool(row.get("infeasible")), cost=dict(row.get("cost") or {}),
                       timings=dict(row.get("timings") or {}), race=row.get("race"), raw=dict(row))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"evals.jsonl line with id={row.get('id')!r} is not an evaluation record "
                                  f"({type(e).__name__}: {e}); the log is corrupt") from e

    @property
    def ok(self) -> bool:
        """Scored, with a finite fitness."""
        return self.error is None and math.isfinite(self.fitness)

    @property
    def partial(self) -> bool:
        """Racing stopped it early: its scores are an estimate on part of the documents."""
        return bool(self.race and self.race.get("stopped"))

    @property
    def ps(self) -> Mapping[str, Any] | None:
        """The PS part as a mergekit recipe dict (None when the candidate has none)."""
        return self.candidate.get("ps")

    @property
    def path(self) -> Mapping[str, Any] | None:
        """The DFS part as a plan dict (None when the candidate has none or is infeasible)."""
        return self.candidate.get("path")

    @property
    def plan(self):
        """The DFS part as a :class:`dfsmerge.genome.plan.PathPlan` (None without one)."""
        from dfsmerge.genome.plan import PathPlan

        return None if self.path is None else PathPlan.from_dict(self.path)

    def to_json(self) -> dict[str, Any]:
        """The line as written."""
        return dict(self.raw)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


class RunReader:
    """Read-only view of a run directory (use :meth:`open`; also :func:`dfsmerge.open_run`).

    Attributes:
        path: the run directory.
        format: its format version (see the module docstring).
        records: every line of ``evals.jsonl`` as a :class:`RunRecord`, in id order (a torn last line left out).
        torn: the log ends in a partial line (a search still writing it).
    """

    def __init__(self, path: str | Path, lines: EvalLines, format: int) -> None:
        self.path = Path(path)
        self.format = format
        self.torn = lines.torn
        self.records: tuple[RunRecord, ...] = tuple(RunRecord.from_row(upgrade_row(r, format)) for r in lines.rows)

    @classmethod
    def open(cls, path: str | Path, *, require_evals: bool = True) -> RunReader:
        """Open the run directory ``path``.

        Raises:
            CheckpointError: not a run directory (no ``evals.jsonl`` when ``require_evals``), or a corrupt log.
            RunFormatError: written in a format this version does not read (names the version it needs).
        """
        p = Path(path)
        if not p.is_dir():
            raise CheckpointError(f"run directory {str(p)!r} does not exist; give the --out directory of a "
                                  "`dfsmerge search`")
        if require_evals and not (p / EVALS).is_file():
            raise CheckpointError(f"{str(p)!r} has no {EVALS}; is it a `dfsmerge search` run directory?")
        fmt = read_format(p)
        return cls(p, read_eval_lines(p / EVALS), fmt)

    # ------------------------------------------------------------------------------------------ files
    @property
    def config(self) -> dict[str, Any]:
        """The resolved search config (``config.yaml``) as a dict ({} when absent)."""
        import yaml

        f = self.path / CONFIG
        return (yaml.safe_load(f.read_text()) or {}) if f.is_file() else {}

    @property
    def state(self) -> dict[str, Any]:
        """``state/state.json`` as a dict ({} when the run was stopped before its first checkpoint)."""
        f = self.path / STATE
        return json.loads(f.read_text()) if f.is_file() else {}

    def best_files(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(recipe, plan)`` dicts of ``best/recipe.yaml`` and ``best/plan.yaml`` (None where absent).

        Raises:
            ConfigError: neither file exists (the run has not finished a generation yet).
        """
        import yaml

        plan_f, recipe_f = self.path / BEST_PLAN, self.path / BEST_RECIPE
        if not (plan_f.is_file() or recipe_f.is_file()):
            raise ConfigError(f"{self.path / BEST_DIR} has neither plan.yaml nor recipe.yaml; the run has not "
                              "finished a generation yet, or pass --candidate ID (an id of evals.jsonl)")
        return (yaml.safe_load(recipe_f.read_text()) if recipe_f.is_file() else None,
                yaml.safe_load(plan_f.read_text()) if plan_f.is_file() else None)

    # ------------------------------------------------------------------------------------------ candidates
    @property
    def candidates(self) -> tuple[RunRecord, ...]:
        """Every scored candidate once: the records that are not cached copies of an earlier line."""
        return tuple(r for r in self.records if not r.cached)

    @property
    def best(self) -> RunRecord | None:
        """The record with the lowest fitness over all stages (the first one on ties), as ``best/`` holds; None
        when nothing scored."""
        best = None
        for r in self.records:
            if r.ok and (best is None or r.fitness < best.fitness):
                best = r
        return best

    @property
    def start(self) -> RunRecord | None:
        """Record 0: the search's start (each stage's first candidate is its initial point)."""
        return self.records[0] if self.records else None

    def record(self, id: int | str) -> RunRecord:
        """The record of id ``id``.

        Raises:
            ConfigError: no such id (names the ids there are).
        """
        for r in self.records:
            if str(r.id) == str(id):
                return r
        ids = [str(r.id) for r in self.records]
        shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise ConfigError(f"--candidate {id!r} is not in {self.path / EVALS} (ids: {shown or 'none'}); use best or "
                          "one of the ids")

    def find(self, ps: Mapping[str, Any] | None, path: Mapping[str, Any] | None) -> RunRecord | None:
        """The first record whose candidate has exactly this recipe and plan, or None."""
        for r in self.records:
            if _same(r.path, path) and _same(r.ps, ps):
                return r
        return None

    @property
    def pareto(self) -> tuple[RunRecord, ...]:
        """The Pareto set (``pareto.jsonl``'s ids; the best alone for single-objective runs)."""
        f = self.path / PARETO
        if not f.is_file():
            return () if self.best is None else (self.best,)
        by_id = {r.id: r for r in self.records}
        ids = [json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip()]
        return tuple(by_id[i] for i in ids if i in by_id)

    @property
    def objective_keys(self) -> tuple[str, ...]:
        """The objective keys, in config order."""
        return tuple(self.records[0].values) if self.records else ()

    @property
    def costs(self) -> dict[str, float]:
        """Every candidate's recorded ``cost`` summed (forward tokens, prefix-store tokens, documents, seconds)."""
        out: dict[str, float] = {}
        for r in self.records:
            for k, v in r.cost.items():
                if isinstance(v, int | float):
                    out[k] = out.get(k, 0) + v
        return out

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def rows(self) -> list[dict[str, Any]]:
        """The lines as written (dicts), for code that reads them raw."""
        return [r.to_json() for r in self.records]

    def to_pandas(self, records: Sequence[RunRecord] | None = None):
        """One row per record: id, generation, stage, fitness, each objective's score, error, cached, path length,
        PS method.

        Raises:
            ConfigError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ConfigError("to_pandas() needs pandas; pip install pandas") from e
        rows = []
        for r in self.records if records is None else records:
            rows.append({"id": r.id, "generation": r.generation, "stage": r.stage, "fitness": r.fitness,
                         **{k: r.objectives.get(k) for k in self.objective_keys}, "error": r.error,
                         "cached": r.cached, "infeasible": r.infeasible,
                         "path_length": None if r.path is None else len(r.path.get("path", [])),
                         "ps_method": None if r.ps is None else r.ps.get("merge_method")})
        return pd.DataFrame(rows).set_index("id") if rows else pd.DataFrame(rows)


def read_format(path: str | Path) -> int:
    """The format version of the run directory ``path`` (see the module docstring).

    Raises:
        RunFormatError: a version this dfsmerge does not read, in one line naming the version it needs.
    """
    f = Path(path) / STATE
    if not f.is_file():
        return FORMAT  # stopped before its first checkpoint: the lines say the rest
    try:
        fmt = json.loads(f.read_text()).get("format", 0)
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{f} is not JSON ({e}); the run's state is corrupt") from e
    if not isinstance(fmt, int) or fmt not in READS:
        raise RunFormatError(f"{path}: run directory format {fmt!r} needs a dfsmerge that reads format {fmt!r}; "
                             f"this version reads formats {', '.join(map(str, READS))}: upgrade dfsmerge "
                             "(pip install -U dfsmerge)")
    return fmt


def open_run(path: str | Path) -> RunReader:
    """Read-only view of a search run directory (config, candidates with genome/plan/scores, best, Pareto set,
    costs; ``.to_pandas()``).

    Raises:
        CheckpointError: not a run directory, or a corrupt log.
        RunFormatError: a format this version does not read (the message names the version it needs).
    """
    return RunReader.open(path)
