"""Subset fitness in the search loop (issue 26; the estimators are :mod:`dfsmerge.objectives.subset`).

The first ``fit_generations`` generations (and, with ``refit_every``, one generation every so often) are scored on
every document; their per-document results fit the subset and the estimator of each task, which later generations
are scored with: a candidate is scored on ``size`` documents and the optimizer sees the estimated full-set score.
A generation that follows one whose scores the subset cannot rank (all near 0 or all near 1,
:func:`~dfsmerge.objectives.subset.low_signal`) is also scored on every document, and the subset refitted after it.
At the end the best ``elite`` estimated candidates are scored on every document and the run's best is picked among
candidates scored in full, so it is never an estimate.

Everything a fit depends on is in the run, so ``--resume`` continues exactly::

    RUN/subset/responses.jsonl  per-document results of every candidate scored in full (``generation``, ``key``)
    RUN/subset/fits.json        every fit, by the last full generation it was fitted after
    RUN/subset/rescored.jsonl   the elite's full-set scores beside their estimates
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dfsmerge.errors import ConfigError
from dfsmerge.objectives.fitness import objective_values, scalar_fitness
from dfsmerge.objectives.subset import estimate, fit_subset, low_signal
from dfsmerge.search.state import atomic_write, jsonable


def check_subset_search(config) -> None:
    """Refuse what subset fitness does not support, before the run directory exists.

    Raises:
        ConfigError: naming the field and the fix.
    """
    subs = {o.name: o.subset for o in config.model_objectives if o.subset is not None}
    if not subs:
        return
    where = f"objective {next(iter(subs))!r} has subset"
    if config.racing.enabled:
        raise ConfigError(f"{where} and racing.enabled=true; use one of them (both shrink the documents scored)")
    if config.genome.mode == "staged":
        raise ConfigError(f"{where} but genome.mode='staged' is not supported with subset fitness; use dfs, ps or "
                          "joint, or drop subset")
    if config.backend != "local":
        raise ConfigError(f"{where} but backend={config.backend!r}; subset fitness runs on backend: local")
    if config.n_obj > 1:
        raise ConfigError(f"{where} but the search is multi-objective (combine: pareto); subset fitness needs one "
                          "fitness: set combine: weighted, or drop subset")
    for o in config.model_objectives:
        if o.type == "task" and o.name in subs and o.subset != subs[o.name]:
            raise ConfigError(f"task {o.name!r} appears in two objectives with different subset settings; a task "
                              "is scored once per candidate: give both the same subset")
    first = next(iter(subs.values()))
    for name, s in subs.items():
        for k in ("fit_generations", "refit_every", "elite", "full_below"):
            if getattr(s, k) != getattr(first, k):
                raise ConfigError(f"objective {name!r} subset.{k}={getattr(s, k)!r} differs from another "
                                  f"objective's {getattr(first, k)!r}; the schedule is one per search: use the same")


class SubsetFitness:
    """The subset schedule, fits and estimates of one run (see the module).

    Args:
        config: the search config (some objective has ``subset``).
        run_path: the run directory (``subset/`` is read on resume, created otherwise).
    """

    def __init__(self, config, run_path: Path):
        self.config = config
        self.objectives = config.objectives
        self.tasks = {o.name: o.subset for o in config.model_objectives if o.subset is not None}
        self.keys = {name: [o.key for o in config.model_objectives if o.type == "task" and o.name == name]
                     for name in self.tasks}
        first = next(iter(self.tasks.values()))
        self.fit_generations, self.refit_every, self.elite = first.fit_generations, first.refit_every, first.elite
        self.full_below = first.full_below
        self.dir = Path(run_path) / "subset"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.responses: dict[str, dict] = {}  # candidate key -> {"generation", "responses": {objective key: [...]}}
        for line in _lines(self.dir / "responses.jsonl"):
            self.responses.setdefault(line["key"], line)
        fits = self.dir / "fits.json"
        self.fits: dict[str, dict] = json.loads(fits.read_text()) if fits.is_file() else {}
        self.rescored: dict[str, dict] = {r["key"]: r for r in _lines(self.dir / "rescored.jsonl")}
        self.active: tuple[str, dict] | None = None  # (fit id, {task: fit}) of the generation being scored
        self.directions: dict[str, str] | None = None

    # ------------------------------------------------------------------ schedule
    def is_full(self, gen: int, evals=()) -> bool:
        """Generation ``gen`` is scored on every document (fitting data) rather than estimated: a fitting or refit
        generation of the schedule, or one after a generation (in ``evals``, the run's records) whose scores on a
        subset task are too close to 0 or 1 for the subset to rank (:func:`low_signal`)."""
        g0 = self.fit_generations - 1
        if gen <= g0 or (self.refit_every is not None and (gen - g0) % self.refit_every == 0):
            return True
        prev = [r for r in evals if r.generation == gen - 1 and r.ok and math.isfinite(r.fitness)]
        return any(low_signal([r.objectives[k] for r in prev if r.objectives.get(k) is not None], sub.size,
                              self.full_below) for task, sub in self.tasks.items() for k in self.keys[task])

    def begin_generation(self, gen: int, backend, evals=()) -> None:
        """Point the backend at every document (a full generation) or at the subsets fitted for ``gen`` (after the
        last generation scored in full; ``evals``: the run's records, for :meth:`is_full`)."""
        if self.directions is None:
            self.directions = dict(backend.worker.directions)
        if self.is_full(gen, evals):
            self.active = None
            backend.set_doc_positions(None)
            return
        done = [e["generation"] for e in self.responses.values() if e["generation"] < gen]
        last = max(done, default=self.fit_generations - 1)  # the fit after the last generation scored in full
        fid = str(last)
        if fid not in self.fits:
            self.fits[fid] = self._fit(last)
            atomic_write(self.dir / "fits.json", json.dumps(self.fits))
        self.active = (fid, self.fits[fid])
        backend.set_doc_positions({t: f["positions"] for t, f in self.fits[fid].items()})

    def _fit(self, last: int) -> dict[str, dict]:
        rows = sorted((e for e in self.responses.values() if e["generation"] <= last), key=lambda e: e["key"])
        if not rows:
            raise ConfigError(f"subset: no candidate of generations 0-{last} was scored (all failed or infeasible); "
                              "raise subset.fit_generations")
        out = {}
        for task, sub in self.tasks.items():
            R = np.array([e["responses"][self.keys[task][0]] for e in rows])  # (models, documents)
            seed = self.config.seed if sub.seed is None else sub.seed
            out[task] = fit_subset(sub.method, R, sub.size, seed)
        return out

    # ------------------------------------------------------------------ results
    def on_result(self, key: str, result, gen: int):
        """A fresh candidate's result: kept as fitting data in a full generation, else its scores replaced by the
        estimates (``estimate`` says how; the optimizer sees these). Returns the result to record."""
        if result.responses is None or result.error is not None:
            return replace(result, responses=None)
        if self.active is None:
            if key not in self.responses:
                entry = {"key": key, "generation": gen, "responses": result.responses}
                self.responses[key] = entry
                _append(self.dir / "responses.jsonl", entry)
            return replace(result, responses=None)
        fid, fits = self.active
        scores = dict(result.scores)
        subset_means = {}
        for task, fit in fits.items():
            for k in self.keys[task]:
                subset_means[k] = scores[k]
                scores[k] = estimate(fit, result.responses[k])
        values = objective_values(scores, self.objectives, self.directions)
        est = {"fit": int(fid), "methods": {t: f["method"] for t, f in fits.items()},
               "docs": {t: len(f["positions"]) for t, f in fits.items()}, "subset_means": subset_means}
        return replace(result, scores=scores, values=values, fitness=scalar_fitness(values, self.objectives),
                       responses=None, estimate=est)

    # ------------------------------------------------------------------ the end
    def final_best(self, evals, space, backend) -> dict[str, Any] | None:
        """Score the ``elite`` best estimated candidates on every document (once: a resumed run reads them back),
        then return the best record scored in full (its line, with ``rescored`` and the estimate it replaced)."""
        est = {}
        for r in evals:
            if r.estimate is not None and r.ok and math.isfinite(r.fitness):
                est.setdefault(r.key, r)
        elite = sorted(est.values(), key=lambda r: (r.fitness, r.id))[:self.elite]
        todo = [r for r in elite if r.key not in self.rescored]
        if todo:
            backend.set_doc_positions(None)
            xs = [np.asarray(r.genome, dtype=np.float64) for r in todo]
            for j, res in backend.evaluate(xs, [space.decode(x) for x in xs]):
                r = todo[j]
                line = {"id": r.id, "key": r.key, "objectives": res.scores, "values": res.values,
                        "fitness": res.fitness, "error": res.error, "estimated": dict(r.objectives),
                        "estimated_fitness": r.fitness, "cost": res.cost}
                self.rescored[r.key] = jsonable(line)
                _append(self.dir / "rescored.jsonl", self.rescored[r.key])
        full = [(r.fitness, r.id, r.to_json()) for r in evals if r.estimate is None and r.ok and not r.cached
                and math.isfinite(r.fitness)]
        for r in elite:
            line = self.rescored[r.key]
            if line.get("error") is None and line.get("fitness") is not None:
                rec = {**r.to_json(), "objectives": line["objectives"], "values": line["values"],
                       "fitness": line["fitness"], "rescored": True, "estimate": r.estimate,
                       "estimated": line["estimated"]}
                full.append((line["fitness"], r.id, rec))
        if not full:
            return None
        return min(full, key=lambda t: (t[0], t[1]))[2]


def _lines(path: Path) -> list[dict]:
    """The complete lines of an append-only file; a partial last line (a kill mid-append) is cut off the file."""
    if not path.is_file():
        return []
    text = path.read_text()
    keep = text[:text.rfind("\n") + 1]
    if keep != text:
        atomic_write(path, keep)
    return [json.loads(line) for line in keep.splitlines() if line.strip()]


def _append(path: Path, obj: dict) -> None:
    """Append one JSON line, fsynced; a full disk cuts the partial line back and stops with one line."""
    from dfsmerge.io.diskspace import disk_full_error, is_disk_full
    from dfsmerge.search.state import DISK_FULL_FIX

    line = memoryview((json.dumps(obj, separators=(",", ":")) + "\n").encode())
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        try:
            while line:
                line = line[f.write(line):]
            os.fsync(f.fileno())
        except OSError as e:
            if not is_disk_full(e):
                raise
            f.truncate(start)
            raise disk_full_error(path, len(line), fix=DISK_FULL_FIX) from None
